/**
 * PublishImage: an admin names a powered-off VM; its host's agent exports the disks and a sanitized
 * domain template into an immutable image (ExportImage, streamed progress); distribution registers the
 * image in the catalog (KV `images`) and the origin's replica (KV `replicas`), and publishes
 * image.published. A long-running operation: progress is in its metadata while the agent works. The agent
 * creates the private torrent (announcing to this service's tracker) and serves the files as web seed; the
 * image record keeps the torrent (info-hash and info dictionary) and the origin replica its web seed URL,
 * which is what DistributeImage hands to the receivers. The tracker accepts the info-hash from the moment
 * the record has it.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { ImagePublishStage } from '../gen/cowherd/common/v1/types.js';
import { PublishImageMetadata, PublishImageRequest } from '../gen/cowherd/distribution/v1/distribution_service.js';
import type { ExportImageResponse } from '../gen/cowherd/agent/v1/agent_service.js';
import {
  Host_State,
  Image,
  Image_State,
  ImageReplica,
  ImageReplica_State,
  VirtualMachine_State,
  type Host,
  type ImageHead,
  type VirtualMachine,
} from '../gen/cowherd/inventory/v1/resources.js';
import type { AgentClients } from '../common/domain/agent-clients.js';
import { CowherdError, relayServiceError, toStatus } from '../common/platform/errors.js';
import { IMAGE_PUBLISHED, IMAGE_PUBLISH_FAILED } from '../common/domain/event-types.js';
import type { EventPublisher } from '../common/platform/events.js';
import type { KvStore } from '../common/platform/kv.js';
import type { OperationKind } from '../common/domain/operations.js';
import {
  HOST_IMAGE_NAME,
  HOST_NAME,
  IMAGE_ID,
  IMAGE_NAME,
  VIRTUAL_MACHINE_NAME,
  imageNameOfKey,
  imageVersionNameOfKey,
  parseImageKey,
} from '../common/domain/resource-names.js';
import { setLatest } from './image-heads.js';

/** What publishing reads and writes. */
export interface PublishDeps {
  readonly images: KvStore<Image>;
  /** The image heads (versions, aliases, retention). */
  readonly heads: KvStore<ImageHead>;
  readonly replicas: KvStore<ImageReplica>;
  readonly inventory: {
    getVirtualMachine(name: string): Promise<VirtualMachine | undefined>;
    getHost(name: string): Promise<Host | undefined>;
  };
  readonly agents: AgentClients;
  readonly events: Pick<EventPublisher, 'publish'>;
  /** The tracker's announce URL, as agents reach it. */
  readonly trackerAnnounceUrl: string;
  /**
   * An export fails when the agent sends no progress message for this long (default 600 s, the distribution
   * stall time). The stream itself has no short deadline: exporting many GiB takes minutes.
   */
  readonly exportStallMs?: number;
}

/** The export stream's outer bound: a safety net far above any real export; the stall watchdog decides. */
const EXPORT_MAX_MS = 24 * 3_600_000;
const EXPORT_STALL_MS = 600_000;

/** Checks a PublishImage request; nothing changes when it fails. Returns the source VM and its host. */
export async function checkPublish(request: PublishImageRequest, deps: PublishDeps): Promise<{ vm: VirtualMachine; host: Host }> {
  if (!IMAGE_ID.test(request.imageId)) throw CowherdError.invalidArgument('image_id', `must match ${IMAGE_ID.source} (no path separators, no dots)`);
  const source = VIRTUAL_MACHINE_NAME.parse(request.sourceVirtualMachine);
  if (!source) throw CowherdError.invalidArgument('source_virtual_machine', 'must be hosts/{host}/virtualMachines/{vm}');
  if (request.description.length > 1024) throw CowherdError.invalidArgument('description', 'must be at most 1024 characters');
  // The version is claimed after these checks (image-heads.ts claimVersion): a FAILED version-1-only image is
  // replaced, an image with versions gets the next one, a PUBLISHING or DELETING one refuses.
  const vm = await deps.inventory.getVirtualMachine(request.sourceVirtualMachine);
  if (!vm) throw CowherdError.notFound(request.sourceVirtualMachine);
  if (vm.state !== VirtualMachine_State.STATE_SHUT_OFF)
    throw CowherdError.failedPrecondition(`${vm.name} is not powered off; stop it before publishing`, ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING);
  const hostName = HOST_NAME.format({ host: source.host });
  const host = await deps.inventory.getHost(hostName);
  if (!host) throw CowherdError.notFound(hostName);
  if (host.state !== Host_State.STATE_READY)
    throw new CowherdError(GrpcStatus.UNAVAILABLE, `${host.name} is not READY`, {
      reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
      metadata: { host: host.name },
    });
  return { vm, host };
}

/** The PublishImage operation. */
export function publishOperationKind(deps: PublishDeps): OperationKind<PublishImageRequest, PublishImageMetadata, Image, undefined> {
  return {
    kind: 'distribution.publish-image',
    requestType: PublishImageRequest,
    metadataType: PublishImageMetadata,
    responseType: Image,
    run: async (context) => {
      const request = context.request;
      // The handler claimed the version and named it in the metadata (its storage key is in the name).
      const key = IMAGE_NAME.parse(context.metadata.image)?.image ?? request.imageId;
      const version = parseImageKey(key)?.version ?? 1;
      const name = IMAGE_NAME.format({ image: key });
      // Checked before the operation was created.
      const hostId = VIRTUAL_MACHINE_NAME.parse(request.sourceVirtualMachine)?.host;
      if (hostId === undefined) throw CowherdError.invalidArgument('source_virtual_machine', 'must be hosts/{host}/virtualMachines/{vm}');
      const hostName = HOST_NAME.format({ host: hostId });
      const host = await deps.inventory.getHost(hostName);
      if (!host) throw CowherdError.notFound(hostName);
      const now = new Date();
      // The catalog entry exists from the start (PUBLISHING, written by the handler's claim), so the name is taken at once.
      await deps.images.mutate(key, (current) =>
        current && current.state !== Image_State.STATE_FAILED ? undefined : publishingRecord(request, host, name, version, now),
      );
      try {
        const result = await exportOnAgent(
          deps,
          host,
          { virtualMachine: request.sourceVirtualMachine, image: name, trackerAnnounceUrl: deps.trackerAnnounceUrl, operation: context.name },
          async (progress) => {
            await context.checkpoint({ metadata: { ...context.metadata, stage: progress.stage, progress: progress.progress, updateTime: new Date() } });
          },
        );
        await context.checkpoint({ metadata: { ...context.metadata, stage: ImagePublishStage.IMAGE_PUBLISH_STAGE_REGISTERING, updateTime: new Date() } });
        const exported = result.image;
        const image = await deps.images.mutate(key, (current) =>
          Image.fromPartial({
            ...current,
            name,
            version: String(version),
            state: Image_State.STATE_AVAILABLE,
            files: exported?.files ?? [],
            domainTemplate: exported?.domainTemplate ?? '',
            ...(exported?.torrent ? { torrent: exported.torrent } : {}),
            hypervisor: host.hypervisor,
            updateTime: new Date(),
          }),
        );
        const replicaKey = `${hostId}.${key}`;
        await deps.replicas.put(
          replicaKey,
          ImageReplica.fromPartial({
            ...result.replica,
            name: HOST_IMAGE_NAME.format({ host: hostId, image: key }),
            image: imageNameOfKey(key),
            imageVersion: imageVersionNameOfKey(key),
            host: hostName,
            state: ImageReplica_State.STATE_AVAILABLE,
            origin: true,
            createTime: new Date(),
            updateTime: new Date(),
          }),
        );
        await setLatest(deps, parseImageKey(key)?.id ?? request.imageId, version);
        const totalBytes = (exported?.files ?? []).reduce((sum, file) => sum + Number(file.sizeBytes), 0);
        await deps.events.publish(
          IMAGE_PUBLISHED,
          {
            image: name,
            originHost: hostName,
            sourceVirtualMachine: request.sourceVirtualMachine,
            hypervisor: host.hypervisor,
            totalBytes: String(totalBytes),
            infoHash: exported?.torrent?.infoHash ?? '',
            operation: context.name,
            occurTime: new Date(),
          },
          { host: hostId, id: `image.published/${key}/${context.name}` },
        );
        await context.checkpoint({ metadata: { ...context.metadata, stage: ImagePublishStage.IMAGE_PUBLISH_STAGE_DONE, updateTime: new Date() } });
        return image!.value;
      } catch (error) {
        const relayed = relayServiceError(error, hostName);
        await deps.images
          .mutate(key, (current) =>
            current && current.state === Image_State.STATE_PUBLISHING
              ? { ...current, state: Image_State.STATE_FAILED, error: toStatus(relayed), updateTime: new Date() }
              : undefined,
          )
          .catch(() => undefined);
        await deps.events
          .publish(
            IMAGE_PUBLISH_FAILED,
            {
              image: name,
              originHost: hostName,
              sourceVirtualMachine: request.sourceVirtualMachine,
              status: toStatus(relayed),
              operation: context.name,
              occurTime: new Date(),
            },
            { host: hostId, id: `image.publish_failed/${key}/${context.name}` },
          )
          .catch(() => undefined);
        throw relayed;
      }
    },
  };
}

/**
 * The PUBLISHING record of a publish's or an import's version (the handler's claim, and a run that finds none);
 * an import has no source virtual machine.
 */
export function publishingRecord(
  request: Pick<PublishImageRequest, 'description' | 'labels'> & { readonly sourceVirtualMachine?: string },
  host: Host,
  name: string,
  version: number,
  now = new Date(),
): Image {
  return Image.fromPartial({
    name,
    version: String(version),
    description: request.description,
    labels: request.labels,
    hypervisor: host.hypervisor,
    state: Image_State.STATE_PUBLISHING,
    sourceVirtualMachine: request.sourceVirtualMachine ?? '',
    originHost: host.name,
    createTime: now,
    updateTime: now,
  });
}

/** ExportImage on the host's agent: progress messages, then one result (exported for its unit test). */
export function exportOnAgent(
  deps: PublishDeps,
  host: Host,
  request: { virtualMachine: string; image: string; trackerAnnounceUrl: string; operation: string },
  onProgress: (progress: { stage: ImagePublishStage; progress: import('../gen/cowherd/common/v1/types.js').TransferProgress | undefined }) => Promise<void>,
): Promise<{ image: Image | undefined; replica: ImageReplica | undefined }> {
  return new Promise((resolve, reject) => {
    // Without an explicit deadline the client's 30 s default would end every export of a large VM.
    const stream = deps.agents.clientFor(host).exportImage(request, { deadline: Date.now() + EXPORT_MAX_MS });
    let result: { image: Image | undefined; replica: ImageReplica | undefined } | undefined;
    let lastProgress = 0;
    let pending: Promise<void> = Promise.resolve();
    const stallMs = deps.exportStallMs ?? EXPORT_STALL_MS;
    let watchdog: NodeJS.Timeout | undefined;
    const armWatchdog = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => {
        reject(
          new CowherdError(GrpcStatus.DEADLINE_EXCEEDED, `${host.name} sent no export progress for ${Math.round(stallMs / 1000)} s`, {
            reason: ErrorReason.ERROR_REASON_PROGRESS_DEADLINE_EXCEEDED,
            metadata: { host: host.name },
          }),
        );
        stream.cancel();
      }, stallMs);
    };
    armWatchdog();
    stream.on('close', () => clearTimeout(watchdog));
    stream.on('data', (message: ExportImageResponse) => {
      armWatchdog();
      const response = message.response;
      if (response?.$case === 'result') result = { image: response.value.image, replica: response.value.replica };
      else if (response?.$case === 'progress' && Date.now() - lastProgress > 1000) {
        // At most one checkpoint a second, in order.
        lastProgress = Date.now();
        pending = pending.then(() => onProgress({ stage: response.value.stage, progress: response.value.progress })).catch(() => undefined);
      }
    });
    stream.on('error', (error) => {
      clearTimeout(watchdog);
      reject(error);
    });
    stream.on('end', () => {
      clearTimeout(watchdog);
      void pending.then(() =>
        result
          ? resolve(result)
          : reject(new CowherdError(GrpcStatus.INTERNAL, `${host.name} ended the export without a result`, { reason: ErrorReason.ERROR_REASON_INTERNAL })),
      );
    });
  });
}
