/**
 * Every cowherd.events.v1 message with the subject kind it travels under. One table, so publishers and
 * consumers cannot disagree on a subject.
 */
import * as events from '../../gen/cowherd/events/v1/events.js';
import { eventType } from '../platform/events.js';

export const HOST_ENROLLED = eventType('host.enrolled', events.HostEnrolled);
export const HOST_READY = eventType('host.ready', events.HostReady);
export const HOST_UNREACHABLE = eventType('host.unreachable', events.HostUnreachable);
export const HOST_DRAINED = eventType('host.drained', events.HostDrained);
export const HOST_DELETED = eventType('host.deleted', events.HostDeleted);
export const CERTIFICATE_REVOKED = eventType('certificate.revoked', events.CertificateRevoked);
export const IMAGE_PUBLISHED = eventType('image.published', events.ImagePublished);
export const IMAGE_PUBLISH_FAILED = eventType('image.publish_failed', events.ImagePublishFailed);
export const IMAGE_TRANSFER_PROGRESS = eventType('image.transfer_progress', events.ImageTransferProgress);
export const IMAGE_AVAILABLE = eventType('image.available', events.ImageAvailable);
export const IMAGE_TRANSFER_FAILED = eventType('image.transfer_failed', events.ImageTransferFailed);
export const IMAGE_REPLICA_DAMAGED = eventType('image.replica_damaged', events.ImageReplicaDamaged);
export const IMAGE_REPLICA_DELETED = eventType('image.replica_deleted', events.ImageReplicaDeleted);
export const IMAGE_DELETED = eventType('image.deleted', events.ImageDeleted);
export const IMAGE_READ_PROFILE = eventType('image.read_profile', events.ImageReadProfile);
export const CLONE_DONE = eventType('clone.done', events.CloneDone);
export const CLONE_FAILED = eventType('clone.failed', events.CloneFailed);
export const CLONE_REBASED = eventType('clone.rebased', events.CloneRebased);
export const VIRTUAL_MACHINE_CHANGED = eventType('vm.changed', events.VirtualMachineChanged);
export const OPERATION_DONE = eventType('operation.done', events.OperationDone);

/** All event types, for consumers that follow the whole stream (`cowherd events`). */
export const ALL_EVENT_TYPES = [
  HOST_ENROLLED,
  HOST_READY,
  HOST_UNREACHABLE,
  HOST_DRAINED,
  HOST_DELETED,
  CERTIFICATE_REVOKED,
  IMAGE_PUBLISHED,
  IMAGE_PUBLISH_FAILED,
  IMAGE_TRANSFER_PROGRESS,
  IMAGE_AVAILABLE,
  IMAGE_TRANSFER_FAILED,
  IMAGE_REPLICA_DAMAGED,
  IMAGE_REPLICA_DELETED,
  IMAGE_DELETED,
  IMAGE_READ_PROFILE,
  CLONE_DONE,
  CLONE_FAILED,
  CLONE_REBASED,
  VIRTUAL_MACHINE_CHANGED,
  OPERATION_DONE,
] as const;
