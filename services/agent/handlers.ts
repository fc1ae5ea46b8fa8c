/** AgentService handlers: thin wrappers over the agent's modules. */
import type { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import type { Handlers } from '../common/platform/rpc.js';
import { Hypervisor, ImagePublishStage, TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import type { ImageTransfers } from './swarm/index.js';
import { Image, Image_State, ImageReplica, ImageReplica_State } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME } from '../common/domain/resource-names.js';
import type { Logger } from '../common/platform/logger.js';
import type { CloneEngine } from './clone-engine.js';
import { exportImage, toImageFiles } from './image-export.js';
import type { Libvirt } from './hypervisor/index.js';
import type { VmLifecycle } from './vm-lifecycle.js';

/** How long a graceful stop waits when the caller names no timeout. */
const DEFAULT_STOP_TIMEOUT_MS = 120_000;

/** What exporting needs besides the request. */
export interface ExportDeps {
  readonly libvirt: Libvirt;
  readonly imageDirectory: string;
  readonly host: string;
  readonly log: Logger;
}

/** What the handlers drive. */
export interface AgentHandlersDeps {
  readonly clones: CloneEngine;
  readonly vms: VmLifecycle;
  readonly replicas: { delete(name: string): Promise<void> };
  readonly transfers: ImageTransfers;
  readonly exporter: ExportDeps;
}

/** The handlers this agent serves. */
export function agentHandlers({ clones, vms, replicas, transfers, exporter }: AgentHandlersDeps): Partial<Handlers<typeof AgentServiceService>> {
  return {
    exportImage: async (request, context, send) => {
      const id = IMAGE_NAME.parse(request.image)?.image;
      if (!id) throw CowherdError.invalidArgument('image', 'must be images/{image}');
      let sending: Promise<void> = Promise.resolve();
      const exported = await exportImage({
        libvirt: exporter.libvirt,
        imageDirectory: exporter.imageDirectory,
        host: exporter.host,
        virtualMachine: request.virtualMachine,
        image: id,
        signal: context.signal,
        log: exporter.log,
        onProgress: (progress) => {
          // In order, and never more than one message in flight.
          sending = sending
            .then(() =>
              send({
                response: {
                  $case: 'progress',
                  value: {
                    stage: progress.stage,
                    progress: TransferProgress.fromPartial({ bytesDone: String(progress.bytesDone), bytesTotal: String(progress.bytesTotal) }),
                  },
                },
              }),
            )
            .catch(() => undefined);
        },
      });
      await sending;
      // The torrent: SHA-1 over every piece (CREATING_TORRENT), then the replica seeds and is on the web seed.
      const totalBytes = exported.totalBytes;
      let lastTorrentReport = 0;
      const files = toImageFiles(exported.files);
      const torrent = await transfers.seedExported(
        id,
        Image.fromPartial({
          name: request.image,
          files,
          domainTemplate: exported.domainTemplate,
          hypervisor: exported.domainType === 'xen' ? Hypervisor.HYPERVISOR_XEN : Hypervisor.HYPERVISOR_KVM,
          sourceVirtualMachine: request.virtualMachine,
          originHost: HOST_NAME.format({ host: exporter.host }),
        }),
        request.trackerAnnounceUrl,
        (bytesDone) => {
          if (bytesDone < totalBytes && performance.now() - lastTorrentReport < 1000) return;
          lastTorrentReport = performance.now();
          sending = sending
            .then(() =>
              send({
                response: {
                  $case: 'progress',
                  value: {
                    stage: ImagePublishStage.IMAGE_PUBLISH_STAGE_CREATING_TORRENT,
                    progress: TransferProgress.fromPartial({ bytesDone: String(bytesDone), bytesTotal: String(totalBytes) }),
                  },
                },
              }),
            )
            .catch(() => undefined);
        },
        context.signal,
      );
      await sending;
      const now = new Date();
      await send({
        response: {
          $case: 'result',
          value: {
            image: Image.fromPartial({
              name: request.image,
              files,
              domainTemplate: exported.domainTemplate,
              torrent,
              state: Image_State.STATE_AVAILABLE,
              sourceVirtualMachine: request.virtualMachine,
              originHost: HOST_NAME.format({ host: exporter.host }),
              createTime: now,
              updateTime: now,
            }),
            replica: ImageReplica.fromPartial({
              name: HOST_IMAGE_NAME.format({ host: exporter.host, image: id }),
              image: request.image,
              host: HOST_NAME.format({ host: exporter.host }),
              state: ImageReplica_State.STATE_AVAILABLE,
              path: exported.directory,
              origin: true,
              webSeedUrl: transfers.webSeedUrl(),
              createTime: now,
              updateTime: now,
            }),
            webSeedUrl: transfers.webSeedUrl(),
          },
        },
      });
    },
    fetchImage: (request) => transfers.fetch(request),
    getImageReplica: (request) => transfers.get(request.name),
    listImageReplicas: async (request) => {
      if (request.parent !== HOST_NAME.format({ host: exporter.host }))
        throw CowherdError.invalidArgument('parent', `must be ${HOST_NAME.format({ host: exporter.host })}`);
      if (request.pageSize < 0) throw CowherdError.invalidArgument('page_size', 'must not be negative');
      const size = Math.min(request.pageSize || 100, 1000);
      const all = transfers.list();
      // Names are unique and sorted: the token is the last name of the previous page.
      const after = request.pageToken === '' ? '' : Buffer.from(request.pageToken, 'base64url').toString('utf8');
      if (request.pageToken !== '' && HOST_IMAGE_NAME.parse(after)?.host !== exporter.host)
        throw CowherdError.invalidArgument('page_token', 'is not a token of this list', ErrorReason.ERROR_REASON_PAGE_TOKEN_INVALID);
      const rest = all.filter((replica) => replica.name > after);
      const page = rest.slice(0, size);
      return { imageReplicas: page, nextPageToken: rest.length > size ? Buffer.from(page.at(-1)!.name).toString('base64url') : '' };
    },
    setTransferLimits: async (request) => {
      const limits = request.transferLimits;
      if (!limits) throw CowherdError.invalidArgument('transfer_limits', 'is required');
      for (const field of ['uploadBytesPerSecond', 'downloadBytesPerSecond'] as const) {
        if (!(Number(limits[field]) >= 0))
          throw CowherdError.invalidArgument(
            `transfer_limits.${field === 'uploadBytesPerSecond' ? 'upload_bytes_per_second' : 'download_bytes_per_second'}`,
            'must not be negative (0 means unlimited)',
          );
      }
      const applied = transfers.setLimits({
        uploadBytesPerSecond: Number(limits.uploadBytesPerSecond),
        downloadBytesPerSecond: Number(limits.downloadBytesPerSecond),
      });
      return { uploadBytesPerSecond: String(applied.uploadBytesPerSecond), downloadBytesPerSecond: String(applied.downloadBytesPerSecond) };
    },
    deleteImageReplica: async (request) => {
      await replicas.delete(request.name);
      return {};
    },
    createClones: async (request) => {
      // validate_only: the cloning service's check before it creates an operation; nothing is made.
      if (request.validateOnly) {
        await clones.check(request);
        return { results: [] };
      }
      return { results: await clones.createClones(request) };
    },
    startVirtualMachine: (request) => vms.start(request.name),
    stopVirtualMachine: (request) =>
      vms.stop(request.name, request.force, request.timeout ? (Number(request.timeout.seconds) + request.timeout.nanos / 1e9) * 1000 : DEFAULT_STOP_TIMEOUT_MS),
    deleteVirtualMachine: async (request) => {
      await vms.delete(request.name, request.force);
      return {};
    },
  };
}
