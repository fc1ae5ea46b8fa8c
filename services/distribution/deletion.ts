/**
 * Deleting images and replicas with the lineage rule: nothing any VM depends on is ever deleted. A replica
 * with dependent VMs on its host, or an image with dependents on any host, is FAILED_PRECONDITION
 * (IMAGE_IN_USE) with the dependents in the error metadata; the agent checks its own domains again before
 * it removes files. The last AVAILABLE replica of an image is kept: delete the image instead.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { DeleteImageMetadata, DeleteImageRequest } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { Image_State, ImageReplica_State, type Host, type Image, type ImageReplica, type VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import { Empty } from '../gen/google/protobuf/empty.js';
import type { AgentClients } from '../common/domain/agent-clients.js';
import { CowherdError, relayServiceError, toStatus } from '../common/platform/errors.js';
import { enumField, imageNameField, parseFilter } from '../common/domain/filter.js';
import { IMAGE_DELETED, IMAGE_REPLICA_DELETED } from '../common/domain/event-types.js';
import type { EventPublisher } from '../common/platform/events.js';
import type { KvStore } from '../common/platform/kv.js';
import type { OperationKind } from '../common/domain/operations.js';
import { EVERY_HOST, HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME } from '../common/domain/resource-names.js';

/** What deleting reads and writes. */
export interface DeletionDeps {
  readonly images: KvStore<Image>;
  readonly replicas: KvStore<ImageReplica>;
  readonly inventory: {
    /** VMs whose source_image is `image`, on `parent` (hosts/{host} or hosts/-). */
    dependents(parent: string, image: string): Promise<VirtualMachine[]>;
    getHost(name: string): Promise<Host | undefined>;
  };
  readonly agents: AgentClients;
  readonly events: Pick<EventPublisher, 'publish'>;
}

/** `images/{image}` -> id, or INVALID_ARGUMENT naming `field`. */
export function imageIdOf(name: string, field = 'name'): string {
  const parsed = IMAGE_NAME.parse(name);
  if (!parsed) throw CowherdError.invalidArgument(field, 'must be images/{image}');
  return parsed.image;
}

function refuseDependents(what: string, dependents: readonly VirtualMachine[]): void {
  if (dependents.length === 0) return;
  throw CowherdError.failedPrecondition(`${dependents.length} virtual machines depend on ${what}`, ErrorReason.ERROR_REASON_IMAGE_IN_USE, {
    dependents: dependents
      .slice(0, 50)
      .map((vm) => vm.name)
      .join(','),
  });
}

/** DeleteImageReplica: checks, the agent removes the files, the record goes, the event is published. */
export async function deleteReplica(deps: DeletionDeps, name: string, options: { allowLast?: boolean } = {}): Promise<void> {
  const parsed = HOST_IMAGE_NAME.parse(name);
  if (!parsed) throw CowherdError.invalidArgument('name', 'must be hosts/{host}/images/{image}');
  const { host, image } = parsed;
  const replica = await deps.replicas.get(`${host}.${image}`);
  if (!replica) throw CowherdError.notFound(name);
  refuseDependents(name, await deps.inventory.dependents(HOST_NAME.format({ host }), IMAGE_NAME.format({ image })));
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
    { image: IMAGE_NAME.format({ image }), host: HOST_NAME.format({ host }), replica: name, freedBytes: '0', occurTime: new Date() },
    { host, id: `image.replica_deleted/${host}/${image}/${replica.revision}` },
  );
}

/** Checks a DeleteImage request before its operation exists. */
export async function checkDeleteImage(deps: DeletionDeps, request: DeleteImageRequest): Promise<Image> {
  const id = imageIdOf(request.name);
  const image = await deps.images.get(id);
  if (!image) throw CowherdError.notFound(request.name);
  if (image.value.state === Image_State.STATE_PUBLISHING)
    throw CowherdError.failedPrecondition(
      `${request.name} is being published; cancel that operation instead`,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    );
  refuseDependents(request.name, await deps.inventory.dependents(EVERY_HOST, request.name));
  return image.value;
}

/** The DeleteImage operation: every replica, then the catalog entry. Resumable: each step is idempotent. */
export function deleteImageOperationKind(deps: DeletionDeps): OperationKind<DeleteImageRequest, DeleteImageMetadata, Empty, undefined> {
  return {
    kind: 'distribution.delete-image',
    requestType: DeleteImageRequest,
    metadataType: DeleteImageMetadata,
    responseType: Empty,
    run: async (context) => {
      const id = imageIdOf(context.request.name);
      await deps.images.mutate(id, (current) =>
        current && current.state !== Image_State.STATE_DELETING ? { ...current, state: Image_State.STATE_DELETING, updateTime: new Date() } : undefined,
      );
      const replicas = await deps.replicas.list(`*.${id}`);
      let done = 0;
      for (const entry of replicas) {
        // Dependents may have appeared since the check: deleteReplica refuses them again.
        await deleteReplica(deps, entry.value.name, { allowLast: true }).catch((error: unknown) => {
          if (error instanceof CowherdError && error.code === GrpcStatus.NOT_FOUND) return;
          throw error;
        });
        done++;
        await context.checkpoint({
          metadata: {
            ...context.metadata,
            hostsTotal: replicas.length,
            hostsDone: done,
            pendingHosts: replicas.slice(done).map((item) => item.value.host),
            updateTime: new Date(),
          },
        });
      }
      await deps.images.delete(id);
      await deps.events.publish(
        IMAGE_DELETED,
        { image: context.request.name, operation: context.name, occurTime: new Date() },
        { id: `image.deleted/${id}/${context.name}` },
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
  const availableCount = new Map<string, number>();
  for (const replica of all)
    if (replica.state === ImageReplica_State.STATE_AVAILABLE) availableCount.set(replica.image, (availableCount.get(replica.image) ?? 0) + 1);
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
  const images = new Map((await deps.images.list()).map((entry) => [entry.value.name, entry.value]));
  let freed = 0;
  for (const replica of candidates) {
    if ((await deps.inventory.dependents(replica.host, replica.image)).length > 0) continue;
    if (replica.state === ImageReplica_State.STATE_AVAILABLE && (availableCount.get(replica.image) ?? 0) <= 1) continue;
    if (!request.validateOnly) {
      try {
        await deleteReplica(deps, replica.name, { allowLast: false });
      } catch (error) {
        failures.push({ host: replica.host, status: toStatus(error) });
        continue;
      }
    }
    if (replica.state === ImageReplica_State.STATE_AVAILABLE) availableCount.set(replica.image, (availableCount.get(replica.image) ?? 1) - 1);
    collected.push(replica);
    freed += (images.get(replica.image)?.files ?? []).reduce((sum, file) => sum + Number(file.sizeBytes), 0);
  }
  return { replicas: collected, failures, freedBytes: String(freed) };
}
