/** AgentService handlers: thin wrappers over the agent's modules. */
import type { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import type { Handlers } from '../common/platform/rpc.js';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { Hypervisor, ImagePublishStage, TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { ImageImportStage } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { removeTree } from './image-directory/index.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import type { ImageTransfers } from './swarm/index.js';
import { Image, Image_State, ImageReplica, ImageReplica_State } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, imageNameOfKey, imageVersionNameOfKey } from '../common/domain/resource-names.js';
import type { Logger } from '../common/platform/logger.js';
import type { CloneEngine } from './clone-engine.js';
import type { CloneRebaser } from './clone-rebase.js';
import { exportImage, toImageFiles } from './image-export.js';
import { importImage, type DownloadLimits } from './image-import.js';
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

/** What importing needs besides the request. */
export interface ImportDeps {
  readonly libvirt: Pick<Libvirt, 'hypervisorFacts'>;
  readonly imageDirectory: string;
  readonly importDirectory: string;
  readonly host: string;
  readonly hypervisor: 'kvm' | 'xen';
  readonly download: DownloadLimits;
  readonly log: Logger;
}

/** What the handlers drive. */
export interface AgentHandlersDeps {
  readonly clones: CloneEngine;
  readonly rebaser: CloneRebaser;
  readonly vms: VmLifecycle;
  readonly replicas: { delete(name: string): Promise<void> };
  readonly transfers: ImageTransfers;
  readonly exporter: ExportDeps;
  readonly importer: ImportDeps;
}

/** The handlers this agent serves. */
export function agentHandlers({
  clones,
  rebaser,
  vms,
  replicas,
  transfers,
  exporter,
  importer,
}: AgentHandlersDeps): Partial<Handlers<typeof AgentServiceService>> {
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
            replica: originReplica(exporter.host, id, exported.directory, transfers.webSeedUrl(), now),
            webSeedUrl: transfers.webSeedUrl(),
          },
        },
      });
    },
    importImage: async (request, context, send) => {
      const id = IMAGE_NAME.parse(request.image)?.image;
      if (!id) throw CowherdError.invalidArgument('image', 'must be images/{image}');
      const source = request.source;
      if (!source) throw CowherdError.invalidArgument('source', 'is required: import_path or url');
      const template = request.template;
      if (!template) throw CowherdError.invalidArgument('template', 'is required: domain or domain_xml');
      let sending: Promise<void> = Promise.resolve();
      const progressMessage = (stage: ImageImportStage, progress: TransferProgress, sourceFormat: string) => {
        // In order, and never more than one message in flight.
        sending = sending.then(() => send({ response: { $case: 'progress', value: { stage, progress, sourceFormat } } })).catch(() => undefined);
      };
      let sourceFormat = '';
      const imported = await importImage({
        libvirt: importer.libvirt,
        imageDirectory: importer.imageDirectory,
        importDirectory: importer.importDirectory,
        hypervisor: importer.hypervisor,
        image: id,
        source:
          source.$case === 'importPath'
            ? { kind: 'path', path: source.value }
            : { kind: 'url', uri: source.value.uri, sha256: source.value.sha256, maxBytes: Number(source.value.maxBytes) },
        template: template.$case === 'domain' ? { kind: 'domain', domain: template.value } : { kind: 'xml', xml: template.value },
        download: importer.download,
        signal: context.signal,
        log: importer.log,
        onProgress: (progress) => {
          sourceFormat = progress.sourceFormat;
          progressMessage(
            progress.stage,
            TransferProgress.fromPartial({
              bytesDone: String(progress.bytesDone),
              bytesTotal: String(progress.bytesTotal),
              rateBytesPerSecond: String(progress.rateBytesPerSecond),
            }),
            progress.sourceFormat,
          );
        },
      });
      await sending;
      const files = toImageFiles(imported.files);
      const image = Image.fromPartial({
        name: request.image,
        files,
        domainTemplate: imported.domainTemplate,
        hypervisor: importer.hypervisor === 'xen' ? Hypervisor.HYPERVISOR_XEN : Hypervisor.HYPERVISOR_KVM,
        originHost: HOST_NAME.format({ host: importer.host }),
      });
      try {
        let lastTorrentReport = 0;
        const torrent = await transfers.seedExported(
          id,
          image,
          request.trackerAnnounceUrl,
          (bytesDone) => {
            if (bytesDone < imported.totalBytes && performance.now() - lastTorrentReport < 1000) return;
            lastTorrentReport = performance.now();
            progressMessage(
              ImageImportStage.IMAGE_IMPORT_STAGE_CREATING_TORRENT,
              TransferProgress.fromPartial({ bytesDone: String(bytesDone), bytesTotal: String(imported.totalBytes) }),
              sourceFormat,
            );
          },
          context.signal,
        );
        await sending;
        if (context.signal.aborted)
          throw new CowherdError(GrpcStatus.CANCELLED, 'the import was cancelled', { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT });
        const now = new Date();
        await send({
          response: {
            $case: 'result',
            value: {
              image: Image.fromPartial({ ...image, torrent, state: Image_State.STATE_AVAILABLE, createTime: now, updateTime: now }),
              replica: originReplica(importer.host, id, imported.directory, transfers.webSeedUrl(), now, { generation: '1' }),
              webSeedUrl: transfers.webSeedUrl(),
            },
          },
        });
      } catch (error) {
        // Nothing of a failed import stays: not the seeding replica, not its files.
        await transfers
          .release(id, () => removeTree(imported.directory))
          .catch((cleanupError: unknown) => importer.log.error({ err: cleanupError, image: request.image }, 'import: removing the imported replica failed'));
        await removeTree(imported.directory).catch(() => undefined);
        throw error;
      }
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
    rebaseClones: async (request) => ({ results: await rebaser.rebase(request) }),
    startVirtualMachine: (request) => vms.start(request.name),
    stopVirtualMachine: (request) =>
      vms.stop(request.name, request.force, request.timeout ? (Number(request.timeout.seconds) + request.timeout.nanos / 1e9) * 1000 : DEFAULT_STOP_TIMEOUT_MS),
    deleteVirtualMachine: async (request) => {
      await vms.delete(request.name, request.force);
      return {};
    },
  };
}

/** The AVAILABLE origin replica an export or an import leaves on `host`: its files in `directory`, seeded by the web seed. */
function originReplica(host: string, image: string, directory: string, webSeedUrl: string, now: Date, extra: Partial<ImageReplica> = {}): ImageReplica {
  return ImageReplica.fromPartial({
    name: HOST_IMAGE_NAME.format({ host, image }),
    image: imageNameOfKey(image),
    imageVersion: imageVersionNameOfKey(image),
    host: HOST_NAME.format({ host }),
    state: ImageReplica_State.STATE_AVAILABLE,
    path: directory,
    origin: true,
    webSeedUrl,
    createTime: now,
    updateTime: now,
    lastUseTime: now,
    ...extra,
  });
}
