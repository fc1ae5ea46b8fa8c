/**
 * Every cowherd.events.v1 message with the subject kind it travels under. One table, so publishers and
 * consumers cannot disagree on a subject.
 */
import * as events from '../../gen/cowherd/events/v1/events.js';
import { eventType } from '../platform/events.js';

const PACKAGE = 'cowherd.events.v1';

export const HOST_ENROLLED = eventType(`${PACKAGE}.HostEnrolled`, 'host.enrolled', events.HostEnrolled);
export const HOST_READY = eventType(`${PACKAGE}.HostReady`, 'host.ready', events.HostReady);
export const HOST_UNREACHABLE = eventType(`${PACKAGE}.HostUnreachable`, 'host.unreachable', events.HostUnreachable);
export const HOST_DRAINED = eventType(`${PACKAGE}.HostDrained`, 'host.drained', events.HostDrained);
export const HOST_DELETED = eventType(`${PACKAGE}.HostDeleted`, 'host.deleted', events.HostDeleted);
export const CERTIFICATE_REVOKED = eventType(`${PACKAGE}.CertificateRevoked`, 'certificate.revoked', events.CertificateRevoked);
export const IMAGE_PUBLISHED = eventType(`${PACKAGE}.ImagePublished`, 'image.published', events.ImagePublished);
export const IMAGE_PUBLISH_FAILED = eventType(`${PACKAGE}.ImagePublishFailed`, 'image.publish_failed', events.ImagePublishFailed);
export const IMAGE_TRANSFER_PROGRESS = eventType(`${PACKAGE}.ImageTransferProgress`, 'image.transfer_progress', events.ImageTransferProgress);
export const IMAGE_AVAILABLE = eventType(`${PACKAGE}.ImageAvailable`, 'image.available', events.ImageAvailable);
export const IMAGE_TRANSFER_FAILED = eventType(`${PACKAGE}.ImageTransferFailed`, 'image.transfer_failed', events.ImageTransferFailed);
export const IMAGE_REPLICA_DAMAGED = eventType(`${PACKAGE}.ImageReplicaDamaged`, 'image.replica_damaged', events.ImageReplicaDamaged);
export const IMAGE_REPLICA_DELETED = eventType(`${PACKAGE}.ImageReplicaDeleted`, 'image.replica_deleted', events.ImageReplicaDeleted);
export const IMAGE_DELETED = eventType(`${PACKAGE}.ImageDeleted`, 'image.deleted', events.ImageDeleted);
export const CLONE_DONE = eventType(`${PACKAGE}.CloneDone`, 'clone.done', events.CloneDone);
export const CLONE_FAILED = eventType(`${PACKAGE}.CloneFailed`, 'clone.failed', events.CloneFailed);
export const VIRTUAL_MACHINE_CHANGED = eventType(`${PACKAGE}.VirtualMachineChanged`, 'vm.changed', events.VirtualMachineChanged);
export const OPERATION_DONE = eventType(`${PACKAGE}.OperationDone`, 'operation.done', events.OperationDone);

/** All event types, for consumers that follow the whole stream (`cowherd events`). */
export const ALL_EVENT_TYPES = [
  HOST_ENROLLED, HOST_READY, HOST_UNREACHABLE, HOST_DRAINED, HOST_DELETED, CERTIFICATE_REVOKED,
  IMAGE_PUBLISHED, IMAGE_PUBLISH_FAILED, IMAGE_TRANSFER_PROGRESS, IMAGE_AVAILABLE, IMAGE_TRANSFER_FAILED,
  IMAGE_REPLICA_DAMAGED, IMAGE_REPLICA_DELETED, IMAGE_DELETED, CLONE_DONE, CLONE_FAILED, VIRTUAL_MACHINE_CHANGED, OPERATION_DONE,
] as const;
