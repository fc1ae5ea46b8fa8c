/**
 * Deleting images and replicas with the lineage rule: nothing any VM depends on is ever deleted. A replica
 * with dependent VMs on its host, or an image with dependents on any host, is FAILED_PRECONDITION
 * (IMAGE_IN_USE) with the dependents in the error metadata; the agent checks its own domains again before
 * it removes files. The last AVAILABLE replica of an image is kept: delete the image instead.
 *
 * Everything here works per version (storage key, see image-heads.ts): a replica is `<host>.<key>`, the VMs that
 * depend on it are those whose lineage names that version. DeleteImage of `images/{image}` deletes every version;
 * of a version name, that version only (deleteVersion, which garbage collection uses too).
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { DeleteImageMetadata, DeleteImageRequest } from '../gen/cowherd/distribution/v1/distribution_service.js';
import {
  Image_State,
  ImageReplica_State,
  type Host,
  type Image,
  type ImageHead,
  type ImageReplica,
  type VirtualMachine,
} from '../gen/cowherd/inventory/v1/resources.js';
import { Empty } from '../gen/google/protobuf/empty.js';
import type { AgentClients } from '../common/domain/agent-clients.js';
import { CowherdError, relayServiceError, toStatus } from '../common/platform/errors.js';
import { enumField, imageNameField, parseFilter } from '../common/domain/filter.js';
import { IMAGE_DELETED, IMAGE_REPLICA_DELETED } from '../common/domain/event-types.js';
import type { EventPublisher } from '../common/platform/events.js';
import type { KvStore } from '../common/platform/kv.js';
import type { OperationKind } from '../common/domain/operations.js';
import {
  EVERY_HOST,
  HOST_IMAGE_NAME,
  HOST_NAME,
  IMAGE_NAME,
  imageKey,
  imageNameOfKey,
  imageVersionNameOfKey,
  parseImageKey,
  parseImageReference,
} from '../common/domain/resource-names.js';
import { resolveVersionNumber } from '../common/domain/image-versions.js';
import { forgetVersion, readHead, versionRecords } from './image-heads.js';

/** What deleting reads and writes. */
export interface DeletionDeps {
  readonly images: KvStore<Image>;
  readonly heads: KvStore<ImageHead>;
  readonly replicas: KvStore<ImageReplica>;
  readonly inventory: {
    /**
     * VMs whose source_image is `image` (`images/{image}`, every version), on `parent` (hosts/{host} or hosts/-), that
     * depend on it: not reflink copies (lineage.disk_backend REFLINK_COPY), which need no base.
     */
    dependents(parent: string, image: string): Promise<VirtualMachine[]>;
    getHost(name: string): Promise<Host | undefined>;
  };
  readonly agents: AgentClients;
  readonly events: Pick<EventPublisher, 'publish'>;
}

function refuseDependents(what: string, dependents: readonly string[]): void {
  if (dependents.length === 0) return;
  throw CowherdError.failedPrecondition(`${dependents.length} virtual machines depend on ${what}`, ErrorReason.ERROR_REASON_IMAGE_IN_USE, {
    dependents: dependents.slice(0, 50).join(','),
  });
}

/**
 * The storage key of the version a VM stands on: lineage.image_version (or source_image_version), else the
 * replica its lineage names, else version 1 of its source image (clones made before versions existed).
 */
export function versionKeyOfVirtualMachine(vm: VirtualMachine): string | undefined {
  const exact = vm.lineage?.imageVersion || vm.sourceImageVersion;
  if (exact) return IMAGE_NAME.parse(exact)?.image;
  const replica = vm.lineage?.replica ? HOST_IMAGE_NAME.parse(vm.lineage.replica)?.image : undefined;
  if (replica) return replica;
  return IMAGE_NAME.parse(vm.sourceImage || vm.lineage?.image || '')?.image;
}

/** The VMs on `parent` (hosts/{host} or hosts/-) that stand on the version with storage key `key`. */
export async function versionDependents(deps: Pick<DeletionDeps, 'inventory'>, parent: string, key: string): Promise<string[]> {
  const vms = await deps.inventory.dependents(parent, imageNameOfKey(key));
  return vms.filter((vm) => versionKeyOfVirtualMachine(vm) === key).map((vm) => vm.name);
}

/** DeleteImageReplica: checks, the agent removes the files, the record goes, the event is published. */
export async function deleteReplica(deps: DeletionDeps, name: string, options: { allowLast?: boolean } = {}): Promise<void> {
  const parsed = HOST_IMAGE_NAME.parse(name);
  if (!parsed) throw CowherdError.invalidArgument('name', 'must be hosts/{host}/images/{image} or hosts/{host}/images/{image}/versions/{version}');
  const { host, image } = parsed;
  const replica = await deps.replicas.get(`${host}.${image}`);
  if (!replica) throw CowherdError.notFound(name);
  // The VMs of this version on this host (inventory), and whatever the record itself lists.
  refuseDependents(name, [...new Set([...(await versionDependents(deps, HOST_NAME.format({ host }), image)), ...replica.value.dependentVirtualMachines])]);
  if (!options.allowLast && replica.value.state === ImageReplica_State.STATE_AVAILABLE) {
    const others = (await deps.replicas.list(`*.${image}`)).filter(
      (entry) => entry.key !== `${host}.${image}` && entry.value.state === ImageReplica_State.STATE_AVAILABLE,
    );
    if (others.length === 0)
      throw CowherdError.failedPrecondition(
        `${name} is the last AVAILABLE replica of ${IMAGE_NAME.format({ image })}; delete the image instead`,
        ErrorReason.ERROR_REASON_LAST_AVAILABLE_REPLICA,
      );
  }
  const hostRecord = await deps.inventory.getHost(HOST_NAME.format({ host }));
  if (!hostRecord) throw CowherdError.notFound(HOST_NAME.format({ host }));
  await new Promise<void>((resolve, reject) =>
    deps.agents.clientFor(hostRecord).deleteImageReplica({ name }, (error) => (error ? reject(relayServiceError(error, hostRecord.name)) : resolve())),
  );
  await deps.replicas.delete(`${host}.${image}`);
  await deps.events.publish(
    IMAGE_REPLICA_DELETED,
    {
      image: IMAGE_NAME.format({ image }),
      host: HOST_NAME.format({ host }),
      replica: HOST_IMAGE_NAME.format({ host, image }),
      freedBytes: '0',
      occurTime: new Date(),
    },
    { host, id: `image.replica_deleted/${host}/${image}/${replica.revision}` },
  );
}

/** What a DeleteImage removes: every version of an image (`images/{image}`), or one version (its storage key). */
export type DeletionTarget = { readonly id: string; readonly all: true } | { readonly id: string; readonly all: false; readonly key: string };

/**
 * The target of a DeleteImage operation from the name in its metadata: `images/{image}` is every version; a
 * numbered version name (what the check resolved a version or alias to) is that version.
 */
export function deletionTargetOf(name: string): DeletionTarget {
  const reference = parseImageReference(name);
  if (!reference) throw CowherdError.invalidArgument('name', 'must be images/{image} or images/{image}/versions/{version}');
  if (reference.version === undefined) return { id: reference.id, all: true };
  return { id: reference.id, all: false, key: imageKey(reference.id, reference.version) };
}

/**
 * Checks a DeleteImage request before its operation exists. Returns the name the operation works on:
 * `images/{image}` for every version, or the numbered version name (an alias resolved now, so that moving it
 * later does not change what is deleted).
 */
export async function checkDeleteImage(deps: DeletionDeps, request: DeleteImageRequest): Promise<string> {
  const reference = parseImageReference(request.name);
  if (!reference) throw CowherdError.invalidArgument('name', 'must be images/{image} or images/{image}/versions/{version}');
  const records = await versionRecords(deps, reference.id);
  if (records.length === 0) throw CowherdError.notFound(request.name);
  const whole = request.name.split('/').length === 2;
  if (whole) {
    const publishing = records.find((entry) => entry.record.value.state === Image_State.STATE_PUBLISHING);
    if (publishing)
      throw CowherdError.failedPrecondition(
        `${imageVersionNameOfKey(publishing.key)} is being published; cancel that operation instead`,
        ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
      );
    const replicaDependents = (await deps.replicas.list())
      .filter((entry) => parseImageKey(entry.key.slice(entry.key.indexOf('.') + 1))?.id === reference.id)
      .flatMap((entry) => entry.value.dependentVirtualMachines);
    refuseDependents(request.name, [...new Set([...(await deps.inventory.dependents(EVERY_HOST, request.name)).map((vm) => vm.name), ...replicaDependents])]);
    return request.name;
  }
  const head = (await readHead(deps, reference.id))?.value;
  const version = resolveVersionNumber(reference, head);
  const target = version === undefined ? undefined : records.find((entry) => entry.version === version);
  if (!target) throw CowherdError.notFound(request.name);
  if (target.record.value.state === Image_State.STATE_PUBLISHING)
    throw CowherdError.failedPrecondition(
      `${request.name} is being published; cancel that operation instead`,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    );
  const latest = resolveVersionNumber({ id: reference.id }, head);
  if (target.version === latest && records.some((entry) => entry.version < target.version))
    throw CowherdError.failedPrecondition(
      `${imageVersionNameOfKey(target.key)} is the latest version of images/${reference.id}; publish a newer one or delete the older ones first`,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
      { image: `images/${reference.id}`, version: imageVersionNameOfKey(target.key) },
    );
  await refuseVersionDependents(deps, target.key);
  return imageVersionNameOfKey(target.key);
}

/** IMAGE_IN_USE when any VM on any host stands on the version (inventory, or a replica record's list). */
export async function refuseVersionDependents(deps: DeletionDeps, key: string): Promise<void> {
  const replicaDependents = (await deps.replicas.list(`*.${key}`)).flatMap((entry) => entry.value.dependentVirtualMachines);
  refuseDependents(imageVersionNameOfKey(key), [...new Set([...(await versionDependents(deps, EVERY_HOST, key)), ...replicaDependents])]);
}

/**
 * Deletes one version: its record turns DELETING, every replica goes (deleteReplica checks dependents again on
 * each host), then the record, and the head forgets the version. Resumable: each step is idempotent. Returns
 * the replicas removed.
 */
export async function deleteVersion(
  deps: DeletionDeps,
  key: string,
  onReplicaDone: (done: number, total: number, pending: string[]) => Promise<void> = async () => undefined,
): Promise<ImageReplica[]> {
  await deps.images.mutate(key, (current) =>
    current && current.state !== Image_State.STATE_DELETING ? { ...current, state: Image_State.STATE_DELETING, updateTime: new Date() } : undefined,
  );
  const replicas = await deps.replicas.list(`*.${key}`);
  const removed: ImageReplica[] = [];
  let done = 0;
  for (const entry of replicas) {
    // Dependents may have appeared since the check: deleteReplica refuses them again.
    await deleteReplica(deps, entry.value.name, { allowLast: true }).then(
      () => removed.push(entry.value),
      (error: unknown) => {
        if (error instanceof CowherdError && error.code === GrpcStatus.NOT_FOUND) return;
        throw error;
      },
    );
    done++;
    await onReplicaDone(
      done,
      replicas.length,
      replicas.slice(done).map((item) => item.value.host),
    );
  }
  await deps.images.delete(key);
  const parsed = parseImageKey(key);
  if (parsed) await forgetVersion(deps, parsed.id, parsed.version);
  return removed;
}

/** The DeleteImage operation: every replica, then the catalog entry, per version. Resumable: each step is idempotent. */
export function deleteImageOperationKind(deps: DeletionDeps): OperationKind<DeleteImageRequest, DeleteImageMetadata, Empty, undefined> {
  return {
    kind: 'distribution.delete-image',
    requestType: DeleteImageRequest,
    metadataType: DeleteImageMetadata,
    responseType: Empty,
    run: async (context) => {
      // The metadata names what the check resolved (an older operation's metadata holds the request's name).
      const name = context.metadata.image || context.request.name;
      const target = deletionTargetOf(name);
      const keys = target.all ? (await versionRecords(deps, target.id)).map((entry) => entry.key) : [target.key];
      // Every version turns DELETING first, so that nothing distributes or clones any of them meanwhile.
      for (const key of keys)
        await deps.images.mutate(key, (current) =>
          current && current.state !== Image_State.STATE_DELETING ? { ...current, state: Image_State.STATE_DELETING, updateTime: new Date() } : undefined,
        );
      let before = 0;
      let total = 0;
      for (const key of keys) total += (await deps.replicas.list(`*.${key}`)).length;
      for (const key of keys) {
        let counted = 0;
        await deleteVersion(deps, key, async (done, _count, pending) => {
          counted = done;
          await context.checkpoint({
            metadata: { ...context.metadata, hostsTotal: total, hostsDone: before + done, pendingHosts: pending, updateTime: new Date() },
          });
        });
        before += counted;
      }
      if (target.all) await deps.heads.delete(target.id).catch(() => undefined);
      await deps.events.publish(
        IMAGE_DELETED,
        { image: name, operation: context.name, occurTime: new Date() },
        { id: `image.deleted/${target.all ? target.id : target.key}/${context.name}` },
      );
      return {};
    },
  };
}

/**
 * CollectImageReplicas: every replica on `parent` that no VM depends on, except origin replicas, replicas
 * still transferring and the last AVAILABLE replica of each image. Each deletion goes through
 * deleteReplica, which checks dependents again; a host whose agent fails is reported, the others collected.
 */
export async function collectReplicas(
  deps: DeletionDeps,
  request: { parent: string; filter: string; validateOnly: boolean },
): Promise<{ replicas: ImageReplica[]; failures: Array<{ host: string; status: ReturnType<typeof toStatus> }>; freedBytes: string }> {
  let prefix = '';
  if (request.parent !== EVERY_HOST) {
    const host = HOST_NAME.parse(request.parent)?.host;
    if (!host) throw CowherdError.invalidArgument('parent', 'must be hosts/{host} or hosts/-');
    if (!(await deps.inventory.getHost(request.parent))) throw CowherdError.notFound(request.parent);
    prefix = `${host}.`;
  }
  const matches = parseFilter<ImageReplica>(request.filter, {
    image: imageNameField((replica) => replica.image),
    state: enumField(ImageReplica_State, 'STATE_', (replica) => replica.state),
  });
  const all = (await deps.replicas.list()).map((entry) => entry.value);
  // Per version: the storage key in the replica's name (replica.image names the image, every version alike).
  const keyOf = (replica: ImageReplica): string => HOST_IMAGE_NAME.parse(replica.name)?.image ?? '';
  const availableCount = new Map<string, number>();
  for (const replica of all)
    if (replica.state === ImageReplica_State.STATE_AVAILABLE) availableCount.set(keyOf(replica), (availableCount.get(keyOf(replica)) ?? 0) + 1);
  const candidates = all.filter(
    (replica) =>
      `${HOST_NAME.parse(replica.host)?.host ?? ''}.`.startsWith(prefix) &&
      matches(replica) &&
      !replica.origin &&
      replica.state !== ImageReplica_State.STATE_TRANSFERRING &&
      replica.state !== ImageReplica_State.STATE_VERIFYING &&
      replica.state !== ImageReplica_State.STATE_PENDING,
  );
  const collected: ImageReplica[] = [];
  const failures: Array<{ host: string; status: ReturnType<typeof toStatus> }> = [];
  const images = new Map((await deps.images.list()).map((entry) => [entry.key, entry.value]));
  let freed = 0;
  for (const replica of candidates) {
    const key = keyOf(replica);
    if (replica.dependentVirtualMachines.length > 0 || (await versionDependents(deps, replica.host, key)).length > 0) continue;
    if (replica.state === ImageReplica_State.STATE_AVAILABLE && (availableCount.get(key) ?? 0) <= 1) continue;
    if (!request.validateOnly) {
      try {
        await deleteReplica(deps, replica.name, { allowLast: false });
      } catch (error) {
        failures.push({ host: replica.host, status: toStatus(error) });
        continue;
      }
    }
    if (replica.state === ImageReplica_State.STATE_AVAILABLE) availableCount.set(key, (availableCount.get(key) ?? 1) - 1);
    collected.push(replica);
    freed += imageBytes(images.get(key));
  }
  return { replicas: collected, failures, freedBytes: String(freed) };
}

/** The bytes of an image version's files (what one replica of it holds). */
export function imageBytes(image: Image | undefined): number {
  return (image?.files ?? []).reduce((sum, file) => sum + Number(file.sizeBytes), 0);
}
