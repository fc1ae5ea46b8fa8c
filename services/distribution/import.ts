/**
 * ImportImage: an admin names a disk file (in a host's import directory, or at an http(s) URL with its
 * SHA-256); that host's agent downloads, probes and converts it, writes the domain template and hashes,
 * seeds and serves the files exactly as an export's (AgentService.ImportImage, streamed progress); then
 * distribution registers what a publish registers: the catalog image (KV `images`), the origin replica (KV
 * `replicas`), image.published and the origin's image.available (generation 1). From then on the image is a
 * published one: DistributeImage and CloneVirtualMachines know no difference.
 *
 * Unlike a failed publish, which keeps a FAILED record to show, a failed import leaves nothing: the catalog
 * entry that held the id while it ran is deleted, the agent removes its files (a failure or a closed stream
 * there), a replica the agent finished but that could not be registered is deleted again, and no event is
 * published. The operation's error says what went wrong.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { Host_State, Image, Image_State, ImageReplica, ImageReplica_State, type Host } from '../gen/cowherd/inventory/v1/resources.js';
import { ImageImportStage, ImportImageMetadata, ImportImageRequest, type ImportImageDomain } from '../gen/cowherd/distribution/v1/distribution_service.js';
import type { ImportImageResponse } from '../gen/cowherd/agent/v1/agent_service.js';
import type { TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { CowherdError, readServiceError, relayServiceError } from '../common/platform/errors.js';
import { IMAGE_AVAILABLE, IMAGE_PUBLISHED } from '../common/domain/event-types.js';
import type { OperationKind } from '../common/domain/operations.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_ID, IMAGE_NAME, imageNameOfKey, imageVersionNameOfKey, parseImageKey } from '../common/domain/resource-names.js';
import { forgetVersion, setLatest } from './image-heads.js';
import { publishingRecord, type PublishDeps } from './publish.js';

/** The import stream's outer bound: the stall watchdog decides, as for exports. */
const IMPORT_MAX_MS = 24 * 3_600_000;
const IMPORT_STALL_MS = 600_000;
const MAX_DOMAIN_XML_BYTES = 1024 * 1024;
const SHA256_HEX = /^[0-9a-fA-F]{64}$/;

/**
 * The lexical rules of a path relative to the import directory (the agent checks them again and resolves
 * symlinks): not empty, at most 1024 characters, relative, no empty, `.` or `..` segment, no control characters.
 */
export function checkImportPathSyntax(value: string, field: string): void {
  if (value === '') throw CowherdError.invalidArgument(field, 'is required: a path relative to the import directory');
  if (value.length > 1024) throw CowherdError.invalidArgument(field, 'must be at most 1024 characters');
  if (/[\u0000-\u001f\u007f]/.test(value)) throw CowherdError.invalidArgument(field, 'must not contain control characters');
  if (value.startsWith('/')) throw CowherdError.invalidArgument(field, 'must be relative to the import directory, not absolute');
  if (value.split('/').some((segment) => segment === '' || segment === '.' || segment === '..'))
    throw CowherdError.invalidArgument(field, 'must not contain "..", "." or empty path segments');
}

/** The source as metadata and logs show it: the import path, or the URL without query and fragment (they may carry tokens). */
export function importSourceText(request: ImportImageRequest): string {
  const source = request.source;
  if (source?.$case === 'importPath') return source.value;
  if (source?.$case !== 'url') return '';
  try {
    const url = new URL(source.value.uri);
    return `${url.protocol}//${url.host}${url.pathname}`;
  } catch {
    return '';
  }
}

function checkDomainParameters(domain: ImportImageDomain): void {
  if (domain.vcpus < 0 || domain.vcpus > 256) throw CowherdError.invalidArgument('domain.vcpus', 'must be 1 to 256 (0 means 1)');
  const memory = Number(domain.memoryMib);
  if (memory !== 0 && (memory < 16 || memory > 4_194_304)) throw CowherdError.invalidArgument('domain.memory_mib', 'must be 16 to 4194304 (0 means 1024)');
  if (domain.kernelPath !== '') checkImportPathSyntax(domain.kernelPath, 'domain.kernel_path');
  if (domain.initrdPath !== '') {
    if (domain.kernelPath === '') throw CowherdError.invalidArgument('domain.initrd_path', 'needs a kernel_path');
    checkImportPathSyntax(domain.initrdPath, 'domain.initrd_path');
  }
  if (domain.kernelCommandLine !== '' && domain.kernelPath === '') throw CowherdError.invalidArgument('domain.kernel_command_line', 'needs a kernel_path');
  if (domain.kernelCommandLine.length > 4096) throw CowherdError.invalidArgument('domain.kernel_command_line', 'must be at most 4096 characters');
}

/** Checks an ImportImage request; nothing changes when it fails. Returns the importing host. */
export async function checkImport(request: ImportImageRequest, deps: PublishDeps): Promise<Host> {
  if (!IMAGE_ID.test(request.imageId)) throw CowherdError.invalidArgument('image_id', `must match ${IMAGE_ID.source} (no path separators, no dots)`);
  const hostId = HOST_NAME.parse(request.host)?.host;
  if (!hostId) throw CowherdError.invalidArgument('host', 'must be hosts/{host}');
  const source = request.source;
  if (!source) throw CowherdError.invalidArgument('source', 'is required: import_path or url');
  if (source.$case === 'importPath') checkImportPathSyntax(source.value, 'import_path');
  else {
    const { uri, sha256, maxBytes } = source.value;
    if (uri === '') throw CowherdError.invalidArgument('url.uri', 'is required');
    if (uri.length > 2048) throw CowherdError.invalidArgument('url.uri', 'must be at most 2048 characters');
    let url: URL;
    try {
      url = new URL(uri);
    } catch {
      throw CowherdError.invalidArgument('url.uri', 'is not a URL');
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw CowherdError.invalidArgument('url.uri', 'must be an http:// or https:// URL');
    if (url.username !== '' || url.password !== '') throw CowherdError.invalidArgument('url.uri', 'must not carry a user name or password');
    if (!SHA256_HEX.test(sha256)) throw CowherdError.invalidArgument('url.sha256', 'must be the SHA-256 of the file: 64 hex digits');
    if (Number(maxBytes) < 0) throw CowherdError.invalidArgument('url.max_bytes', 'must not be negative (0 means the default)');
  }
  const template = request.template;
  if (!template) throw CowherdError.invalidArgument('template', 'is required: domain or domain_xml');
  if (template.$case === 'domain') checkDomainParameters(template.value);
  else if (template.value.trim() === '') throw CowherdError.invalidArgument('domain_xml', 'is empty');
  else if (Buffer.byteLength(template.value) > MAX_DOMAIN_XML_BYTES) throw CowherdError.invalidArgument('domain_xml', 'must be at most 1 MiB');
  if (request.description.length > 1024) throw CowherdError.invalidArgument('description', 'must be at most 1024 characters');
  // The version is claimed after these checks (image-heads.ts claimVersion), as for a publish.
  const host = await deps.inventory.getHost(request.host);
  if (!host) throw CowherdError.notFound(request.host);
  if (host.state !== Host_State.STATE_READY)
    throw new CowherdError(GrpcStatus.UNAVAILABLE, `${host.name} is not READY`, {
      reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
      metadata: { host: host.name },
    });
  return host;
}

/** The metadata an ImportImage operation starts with. */
export function initialImportMetadata(request: ImportImageRequest, host: Host, image = IMAGE_NAME.format({ image: request.imageId })): ImportImageMetadata {
  const now = new Date();
  return ImportImageMetadata.fromPartial({
    image,
    host: host.name,
    source: importSourceText(request),
    stage: request.source?.$case === 'url' ? ImageImportStage.IMAGE_IMPORT_STAGE_DOWNLOADING : ImageImportStage.IMAGE_IMPORT_STAGE_CONVERTING,
    startTime: now,
    updateTime: now,
  });
}

/** What an import checkpoints: that the catalog entry is its own. */
export interface ImportState {
  readonly claimed: boolean;
}

/** The ImportImage operation. */
export function importOperationKind(deps: PublishDeps): OperationKind<ImportImageRequest, ImportImageMetadata, Image, ImportState> {
  return {
    kind: 'distribution.import-image',
    requestType: ImportImageRequest,
    metadataType: ImportImageMetadata,
    responseType: Image,
    run: async (context) => {
      const request = context.request;
      // The handler claimed the version and named it in the metadata (its storage key is in the name).
      const key = IMAGE_NAME.parse(context.metadata.image)?.image ?? request.imageId;
      const version = parseImageKey(key)?.version ?? 1;
      const name = IMAGE_NAME.format({ image: key });
      const hostId = HOST_NAME.parse(request.host)?.host;
      if (hostId === undefined) throw CowherdError.invalidArgument('host', 'must be hosts/{host}');
      const host = await deps.inventory.getHost(request.host);
      if (!host) throw CowherdError.notFound(request.host);
      const now = new Date();
      // The catalog entry holds the id from the start (PUBLISHING); it is removed again if the import fails. The
      // checkpoint says it is this operation's, so a replica that takes the operation over goes on with it.
      let claimed = context.state?.claimed === true;
      if (!claimed) {
        await deps.images.mutate(key, (current) => {
          // The handler's claim: PUBLISHING, made for this import (the metadata names its version).
          if (current?.state === Image_State.STATE_PUBLISHING && current.originHost === host.name) {
            claimed = true;
            return undefined;
          }
          if (current && current.state !== Image_State.STATE_FAILED) return undefined;
          claimed = true;
          return publishingRecord(request, host, name, version, now);
        });
        if (!claimed) throw CowherdError.alreadyExists(name);
        await context.checkpoint({ state: { claimed: true } });
      }
      let agentResult: { image: Image | undefined; replica: ImageReplica | undefined; sourceFormat: string } | undefined;
      const replicaKey = `${hostId}.${key}`;
      try {
        agentResult = await importOnAgent(
          deps,
          host,
          {
            image: name,
            source: request.source,
            template: request.template,
            trackerAnnounceUrl: deps.trackerAnnounceUrl,
            operation: context.name,
          },
          context.signal,
          async (progress) => {
            await context.checkpoint({
              metadata: {
                ...context.metadata,
                stage: progress.stage,
                progress: progress.progress,
                sourceFormat: progress.sourceFormat || context.metadata.sourceFormat,
                updateTime: new Date(),
              },
            });
          },
        );
        await context.checkpoint({
          metadata: {
            ...context.metadata,
            stage: ImageImportStage.IMAGE_IMPORT_STAGE_REGISTERING,
            sourceFormat: agentResult.sourceFormat || context.metadata.sourceFormat,
            updateTime: new Date(),
          },
        });
        const imported = agentResult.image;
        const files = imported?.files ?? [];
        const image = await deps.images.mutate(key, (current) =>
          Image.fromPartial({
            ...current,
            name,
            version: String(version),
            state: Image_State.STATE_AVAILABLE,
            files,
            domainTemplate: imported?.domainTemplate ?? '',
            ...(imported?.torrent ? { torrent: imported.torrent } : {}),
            hypervisor: host.hypervisor,
            updateTime: new Date(),
          }),
        );
        await deps.replicas.put(
          replicaKey,
          ImageReplica.fromPartial({
            ...agentResult.replica,
            name: HOST_IMAGE_NAME.format({ host: hostId, image: key }),
            image: imageNameOfKey(key),
            imageVersion: imageVersionNameOfKey(key),
            host: host.name,
            state: ImageReplica_State.STATE_AVAILABLE,
            origin: true,
            generation: '1',
            createTime: new Date(),
            updateTime: new Date(),
          }),
        );
        await setLatest(deps, parseImageKey(key)?.id ?? request.imageId, version);
        const totalBytes = String(files.reduce((sum, file) => sum + Number(file.sizeBytes), 0));
        await deps.events.publish(
          IMAGE_PUBLISHED,
          {
            image: name,
            originHost: host.name,
            sourceVirtualMachine: '',
            hypervisor: host.hypervisor,
            totalBytes,
            infoHash: imported?.torrent?.infoHash ?? '',
            operation: context.name,
            occurTime: new Date(),
          },
          { host: hostId, id: `image.published/${key}/${context.name}` },
        );
        // The origin's replica is available from the start: generation 1, as a fetched replica's first.
        await deps.events.publish(
          IMAGE_AVAILABLE,
          {
            image: name,
            host: host.name,
            replica: HOST_IMAGE_NAME.format({ host: hostId, image: key }),
            totalBytes,
            files,
            origin: true,
            transferDuration: { seconds: '0', nanos: 0 },
            operation: context.name,
            occurTime: new Date(),
            generation: '1',
          },
          { host: hostId, id: `image.available/${key}/${hostId}/${context.name}` },
        );
        await context.checkpoint({ metadata: { ...context.metadata, stage: ImageImportStage.IMAGE_IMPORT_STAGE_DONE, updateTime: new Date() } });
        return image!.value;
      } catch (error) {
        const relayed = relayImportError(error, host.name);
        // Leave nothing: the agent's replica (if it finished), its record, the catalog entry.
        if (agentResult) {
          const replicaName = HOST_IMAGE_NAME.format({ host: hostId, image: key });
          await new Promise<void>((resolve) =>
            deps.agents.clientFor(host).deleteImageReplica({ name: replicaName }, (cleanupError) => {
              if (cleanupError) context.log.error({ err: cleanupError, replica: replicaName }, 'import: removing the replica of a failed import failed');
              resolve();
            }),
          );
          await deps.replicas.delete(replicaKey).catch(() => undefined);
        }
        // The catalog entry is this operation's (claimed above): PUBLISHING, or already AVAILABLE with the
        // torrent of this import when a later step failed.
        const current = await deps.images.get(key).catch(() => undefined);
        const ours =
          current?.value.state === Image_State.STATE_PUBLISHING ||
          (current?.value.state === Image_State.STATE_AVAILABLE &&
            agentResult?.image?.torrent?.infoHash !== undefined &&
            current.value.torrent?.infoHash === agentResult.image.torrent.infoHash);
        if (current && ours) {
          await deps.images.delete(key, current.revision).catch(() => undefined);
          // Only this version's record goes; the head forgets it (latest moves back if it had moved).
          if (version > 1 || current.value.state === Image_State.STATE_AVAILABLE)
            await forgetVersion(deps, parseImageKey(key)?.id ?? request.imageId, version).catch(() => undefined);
        }
        throw relayed;
      }
    },
  };
}

/**
 * The agent's error as the operation's: relayed as for any agent call, except that a failed download
 * (UNAVAILABLE, TRANSFER_FAILED: the URL's server, not the host) stays what it is instead of reading as an
 * unreachable host.
 */
function relayImportError(error: unknown, host: string): CowherdError {
  if (!(error instanceof CowherdError) && error && typeof error === 'object' && 'code' in error) {
    const received = readServiceError(error as Parameters<typeof readServiceError>[0]);
    if (received.reason === 'ERROR_REASON_TRANSFER_FAILED')
      return new CowherdError(received.code, received.message, { reason: ErrorReason.ERROR_REASON_TRANSFER_FAILED, metadata: received.metadata, cause: error });
  }
  return relayServiceError(error, host);
}

interface ImportProgressUpdate {
  readonly stage: ImageImportStage;
  readonly progress: TransferProgress | undefined;
  readonly sourceFormat: string;
}

/** ImportImage on the host's agent: progress messages, then one result; a cancel ends the stream, and the agent removes its work. */
export function importOnAgent(
  deps: PublishDeps,
  host: Host,
  request: {
    image: string;
    source: ImportImageRequest['source'];
    template: ImportImageRequest['template'];
    trackerAnnounceUrl: string;
    operation: string;
  },
  signal: AbortSignal | undefined,
  onProgress: (progress: ImportProgressUpdate) => Promise<void>,
): Promise<{ image: Image | undefined; replica: ImageReplica | undefined; sourceFormat: string }> {
  return new Promise((resolve, reject) => {
    let sourceFormat = '';
    const stream = deps.agents.clientFor(host).importImage(request, { deadline: Date.now() + IMPORT_MAX_MS });
    let result: { image: Image | undefined; replica: ImageReplica | undefined; sourceFormat: string } | undefined;
    let lastProgress = 0;
    let pending: Promise<void> = Promise.resolve();
    const stallMs = deps.exportStallMs ?? IMPORT_STALL_MS;
    let watchdog: NodeJS.Timeout | undefined;
    let settled = false;
    const fail = (error: unknown) => {
      if (settled) return;
      settled = true;
      clearTimeout(watchdog);
      signal?.removeEventListener('abort', onAbort);
      reject(error);
    };
    const onAbort = () => {
      fail(new CowherdError(GrpcStatus.CANCELLED, 'the import was cancelled', { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT }));
      stream.cancel();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    if (signal?.aborted) onAbort();
    const armWatchdog = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => {
        fail(
          new CowherdError(GrpcStatus.DEADLINE_EXCEEDED, `${host.name} sent no import progress for ${Math.round(stallMs / 1000)} s`, {
            reason: ErrorReason.ERROR_REASON_PROGRESS_DEADLINE_EXCEEDED,
            metadata: { host: host.name },
          }),
        );
        stream.cancel();
      }, stallMs);
    };
    armWatchdog();
    stream.on('data', (message: ImportImageResponse) => {
      armWatchdog();
      const response = message.response;
      if (response?.$case === 'result') result = { image: response.value.image, replica: response.value.replica, sourceFormat };
      if (response?.$case === 'progress' && response.value.sourceFormat !== '') sourceFormat = response.value.sourceFormat;
      if (response?.$case === 'progress' && Date.now() - lastProgress > 1000) {
        // At most one checkpoint a second, in order.
        lastProgress = Date.now();
        const update = { stage: response.value.stage, progress: response.value.progress, sourceFormat: response.value.sourceFormat };
        pending = pending.then(() => onProgress(update)).catch(() => undefined);
      }
    });
    stream.on('error', fail);
    stream.on('end', () => {
      clearTimeout(watchdog);
      void pending.then(() => {
        if (settled) return;
        settled = true;
        signal?.removeEventListener('abort', onAbort);
        if (result) resolve(result);
        else reject(new CowherdError(GrpcStatus.INTERNAL, `${host.name} ended the import without a result`, { reason: ErrorReason.ERROR_REASON_INTERNAL }));
      });
    });
  });
}
