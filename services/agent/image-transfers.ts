/**
 * This host's image replicas as the swarm sees them (job 2): the one {@link ImageSwarm} and the origin's
 * {@link WebSeedServer}, the replica states behind FetchImage / GetImageReplica / ListImageReplicas, the
 * image.transfer_progress / image.available / image.transfer_failed events, and recovery after a restart.
 *
 * Decisions:
 * - Each replica has a small state file beside it, `<image dir>/images/.<id>.replica.json`, written
 *   atomically before anything else happens: the FetchImage request that made it (image record with files,
 *   SHA-256 and torrent; tracker; web seeds), whether it is the origin, and a generation (when the fetch was
 *   first asked for). A restart reads these files and needs no one else: partial replicas resume (webtorrent
 *   re-hashes what is on disk and fetches only the missing pieces), complete ones are verified (whole-file
 *   SHA-256, in the background, ~0.7 s per 512 MiB) and seeded again. The state file goes last on deletion.
 * - A complete replica that fails verification at start is fetched again, unless domains on this host use its
 *   files as backing files: then it turns FAILED (VERIFICATION_FAILED) and stays in place, because moving
 *   it would break those domains, and an operator has to decide.
 * - Events carry a stable id per fact (`image.available/<id>/<host>/<generation>`), so a retry or a restart
 *   after a publish does not make a second image.available; progress events go out at most every
 *   `progressEventIntervalMs` (default 2 s) and at every state change.
 * - Only origin replicas are served by the web seed (it is plain HTTP without client authentication, as
 *   BitTorrent peers are: the image network is trusted, see the agent README).
 * - A tracker announce that fails (the tracker is restarting, or the image is not registered yet: the origin
 *   starts seeding before distribution has stored the info-hash) is retried every 5 s instead of webtorrent's
 *   30 minutes (see swarm.ts).
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { writeAtomically } from '../common/credential-files.js';
import { CowherdError, toStatus } from '../common/errors.js';
import { IMAGE_AVAILABLE, IMAGE_TRANSFER_FAILED, IMAGE_TRANSFER_PROGRESS } from '../common/event-types.js';
import type { EventPublisher } from '../common/events.js';
import type { Logger } from '../common/logger.js';
import { distributionMetrics } from '../common/metrics.js';
import { IMAGE_ID } from '../common/resource-names.js';
import { FetchImageRequest } from '../gen/cowherd/agent/v1/agent_service.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { DiskFormat, Hypervisor, TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { Image, ImageReplica, ImageReplica_State, type TorrentInfo } from '../gen/cowherd/inventory/v1/resources.js';
import type { Status } from '../gen/google/rpc/status.js';
import { fsyncDirectory, pathExists, removeTree } from './file-tree.js';
import { replicaIdOf } from './replicas.js';
import { ImageSwarm, verifyImageFiles, type ExpectedImageFile, type SwarmLimits, type SwarmProgress } from './swarm.js';
import { createImageTorrent, IMAGE_FILE_NAME, type ImageTorrent } from './torrent.js';
import { WebSeedServer } from './web-seed.js';

/** Options of {@link ImageTransfers.start}. */
export interface ImageTransfersOptions {
  readonly host: string;
  readonly imageDirectory: string;
  /** This host's hypervisor: only images of its disk format may come here. */
  readonly hypervisor: 'kvm' | 'xen';
  readonly events: Pick<EventPublisher, 'publish'>;
  readonly log: Logger;
  /** BitTorrent listening port (0 = any). */
  readonly torrentPort: number;
  /** Where the web seed listens. */
  readonly webSeedAddress: { readonly host: string; readonly port: number };
  /** The host name that goes into the web seed URL (the address other hosts reach this one at). */
  readonly advertiseHost: string;
  /** Names of the domains on this host whose disks are backed by the image's files. */
  readonly dependents: (imageId: string) => Promise<string[]>;
  readonly limits?: SwarmLimits;
  /** Default 2000 ms. */
  readonly progressEventIntervalMs?: number;
  /** Passed to the swarm (tests). Default 10 minutes. */
  readonly stallTimeoutMs?: number;
}

/** What the state file holds. */
interface ReplicaStateFile {
  readonly version: 1;
  /** FetchImageRequest, base64 protobuf. */
  readonly request: string;
  readonly origin: boolean;
  readonly generation: string;
  readonly createTime: string;
}

interface LocalReplica {
  readonly id: string;
  readonly request: FetchImageRequest;
  readonly origin: boolean;
  /** Names this replica's becoming AVAILABLE in event ids; a new one when it has to be fetched again. */
  generation: string;
  readonly createTime: Date;
  state: ImageReplica_State;
  error: Status | undefined;
  updateTime: Date;
  /** Set while a fetch or a start-up verification runs. */
  work: Promise<void> | undefined;
}

const STATE_SUFFIX = '.replica.json';
const METRICS_SAMPLE_MS = 2000;
const HYPERVISOR_OF: Readonly<Record<'kvm' | 'xen', Hypervisor>> = { kvm: Hypervisor.HYPERVISOR_KVM, xen: Hypervisor.HYPERVISOR_XEN };
const DISK_FORMATS_OF: Readonly<Record<'kvm' | 'xen', readonly DiskFormat[]>> = {
  kvm: [DiskFormat.DISK_FORMAT_QCOW2, DiskFormat.DISK_FORMAT_RAW],
  xen: [DiskFormat.DISK_FORMAT_VHD],
};

/** The agent's replicas and their swarm. */
export class ImageTransfers {
  private readonly replicas = new Map<string, LocalReplica>();
  private readonly imagesRoot: string;
  private stopped = false;
  private sampler: NodeJS.Timeout | undefined;
  /** Last counters seen per image, for the Prometheus byte counters. */
  private readonly lastCounters = new Map<string, { done: number; uploaded: number; webSeed: number }>();
  /** Download bytes the sampler counted for the running fetch of each image. */
  private readonly downloadCounted = new Map<string, number>();

  private constructor(
    private readonly options: ImageTransfersOptions,
    readonly swarm: ImageSwarm,
    private readonly webSeed: WebSeedServer,
  ) {
    this.imagesRoot = join(options.imageDirectory, 'images');
  }

  /** Starts the swarm and the web seed, then takes up every replica recorded in the image directory. */
  static async start(options: ImageTransfersOptions): Promise<ImageTransfers> {
    const swarm = await ImageSwarm.create({ torrentPort: options.torrentPort, log: options.log.child({ component: 'swarm' }), ...(options.limits ? { limits: options.limits } : {}) });
    const webSeed = new WebSeedServer({ log: options.log.child({ component: 'web-seed' }), uploadBytesPerSecond: options.limits?.uploadBytesPerSecond ?? 0 });
    try {
      await webSeed.listen(options.webSeedAddress);
    } catch (error) {
      await swarm.destroy();
      throw error;
    }
    const transfers = new ImageTransfers(options, swarm, webSeed);
    await transfers.recover();
    transfers.sampler = setInterval(() => transfers.sampleMetrics(), METRICS_SAMPLE_MS);
    transfers.sampler.unref();
    options.log.info({ torrentPort: swarm.port, webSeed: transfers.webSeedUrl() }, 'image transfers ready');
    return transfers;
  }

  /** The BEP 19 web seed root of this host. */
  webSeedUrl(): string {
    return this.webSeed.url(this.options.advertiseHost);
  }

  /** The BitTorrent port. */
  get torrentPort(): number {
    return this.swarm.port;
  }

  /** Applies new limits to the swarm (both directions) and the web seed (upload). */
  setLimits(limits: SwarmLimits): SwarmLimits {
    if (!(limits.uploadBytesPerSecond >= 0) || !(limits.downloadBytesPerSecond >= 0)) throw CowherdError.invalidArgument('transfer_limits', 'must not be negative (0 means unlimited)');
    const current = this.swarm.getLimits();
    if (current.uploadBytesPerSecond !== limits.uploadBytesPerSecond || current.downloadBytesPerSecond !== limits.downloadBytesPerSecond) {
      this.swarm.setLimits(limits);
      this.webSeed.setUploadLimit(limits.uploadBytesPerSecond);
      this.options.log.info({ limits }, 'transfer limits applied');
    }
    return this.swarm.getLimits();
  }

  getLimits(): SwarmLimits {
    return this.swarm.getLimits();
  }

  /**
   * Makes a freshly exported replica the image's origin: creates the private torrent from its files, records
   * the replica, seeds it and serves it on the web seed. Returns the torrent record for the image.
   */
  async seedExported(
    id: string,
    image: Image,
    trackerAnnounceUrl: string,
    onProgress?: (bytesDone: number, bytesTotal: number) => void,
    signal?: AbortSignal,
  ): Promise<TorrentInfo> {
    const directory = join(this.imagesRoot, id);
    const torrent = await createImageTorrent({ directory, files: image.files.map((file) => file.path), announce: trackerAnnounceUrl, name: id, ...(onProgress ? { onProgress } : {}), ...(signal ? { signal } : {}) });
    const info = torrentInfoOf(torrent);
    const request = FetchImageRequest.fromPartial({ image: { ...image, torrent: info }, trackerAnnounceUrl, webSeedUrls: [] });
    const replica = this.newReplica(id, request, true, ImageReplica_State.STATE_AVAILABLE);
    await this.writeState(replica);
    try {
      await this.swarm.seed(id, directory, torrent.infoDictionary, { announce: trackerAnnounceUrl, infoHash: torrent.infoHash, superSeed: true });
      this.webSeed.addImage(id, directory, image.files.map((file) => file.path));
    } catch (error) {
      this.replicas.delete(id);
      await this.removeState(id);
      throw error;
    }
    return info;
  }

  /**
   * FetchImage: checks the request, records the replica and starts the fetch in the background. Idempotent for
   * TRANSFERRING, VERIFYING and AVAILABLE replicas; a FAILED one is retried (keeping its pieces).
   */
  async fetch(request: FetchImageRequest): Promise<ImageReplica> {
    const id = checkFetchRequest(request, this.options.hypervisor);
    const existing = this.replicas.get(id);
    if (existing) {
      if (existing.state === ImageReplica_State.STATE_DELETING) throw CowherdError.failedPrecondition(`${this.replicaName(id)} is being deleted`, ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT);
      if (existing.request.image!.torrent!.infoHash !== request.image!.torrent!.infoHash) {
        throw CowherdError.failedPrecondition(`${this.replicaName(id)} holds another torrent of images/${id}; delete the replica first`, ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT);
      }
      if (existing.state !== ImageReplica_State.STATE_FAILED) return this.toReplica(existing);
      this.replicas.delete(id);
    }
    // A retried FAILED replica keeps its generation: it is the same fetch, asked for again.
    const replica = this.newReplica(id, request, false, ImageReplica_State.STATE_TRANSFERRING, existing?.generation, existing?.createTime);
    await this.writeState(replica);
    this.startFetch(replica);
    return this.toReplica(replica);
  }

  /** One replica with live progress and dependents; NOT_FOUND when this host has none of the image. */
  async get(name: string): Promise<ImageReplica> {
    const id = replicaIdOf(this.options.host, name);
    const replica = this.replicas.get(id);
    if (!replica) throw CowherdError.notFound(name);
    return this.toReplica(replica, await this.options.dependents(id));
  }

  /** Every replica, ordered by name. */
  list(): ImageReplica[] {
    return [...this.replicas.values()].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)).map((replica) => this.toReplica(replica));
  }

  /**
   * Stops seeding or fetching the image and forgets the replica (the caller removes the directory). The
   * state file goes last, after `removeFiles` succeeded, so that a crash in between leaves a replica that
   * is taken up again rather than files nobody knows about.
   */
  async release(id: string, removeFiles: () => Promise<void>): Promise<void> {
    const replica = this.replicas.get(id);
    if (replica) {
      replica.state = ImageReplica_State.STATE_DELETING;
      replica.updateTime = new Date();
    }
    this.webSeed.removeImage(id);
    await this.swarm.remove(id);
    await replica?.work;
    await removeFiles();
    await removeTree(join(this.imagesRoot, `.${id}.partial`));
    await this.removeState(id);
    this.replicas.delete(id);
  }

  /** Stops everything (fetches keep their partial files and resume at the next start). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.sampler);
    await this.swarm.destroy();
    await Promise.allSettled([...this.replicas.values()].map((replica) => replica.work));
    await this.webSeed.close();
  }

  // -------------------------------------------------------------------------------------------------------

  /** Feeds cowherd_distribution_bytes_total and _rate_bytes_per_second from the swarm's counters. */
  private sampleMetrics(): void {
    for (const id of this.replicas.keys()) {
      const progress = this.swarm.progress(id);
      const last = this.lastCounters.get(id) ?? { done: 0, uploaded: 0, webSeed: 0 };
      const webSeed = this.webSeed.bytesSentByImage.get(id) ?? 0;
      // Only while transferring; the end of a fetch settles the rest (settleDownload).
      const done = progress?.stage === 'transferring' ? progress.bytesDone : last.done;
      const uploaded = progress?.bytesUploaded ?? 0;
      // Counters of a torrent restart at 0 (a new round, seeding after fetching): count from there.
      const downloaded = done >= last.done ? done - last.done : done;
      distributionMetrics.addBytes(id, 'download', downloaded);
      this.downloadCounted.set(id, (this.downloadCounted.get(id) ?? 0) + downloaded);
      distributionMetrics.addBytes(id, 'upload', (uploaded >= last.uploaded ? uploaded - last.uploaded : uploaded) + (webSeed - last.webSeed));
      distributionMetrics.setRate(id, 'download', progress?.downloadBytesPerSecond ?? 0);
      distributionMetrics.setRate(id, 'upload', progress?.uploadBytesPerSecond ?? 0);
      this.lastCounters.set(id, { done: progress?.stage === 'transferring' ? done : 0, uploaded, webSeed });
    }
    this.forgetRemoved();
  }

  /** At the end of a fetch: counts what it wrote and the sampler has not counted yet. */
  private settleDownload(id: string, bytesWritten: number): void {
    distributionMetrics.addBytes(id, 'download', Math.max(0, bytesWritten - (this.downloadCounted.get(id) ?? 0)));
    this.downloadCounted.delete(id);
    const last = this.lastCounters.get(id);
    if (last) this.lastCounters.set(id, { ...last, done: 0 });
  }

  private forgetRemoved(): void {
    for (const id of [...this.lastCounters.keys()]) {
      if (!this.replicas.has(id)) {
        this.lastCounters.delete(id);
        distributionMetrics.forget(id);
      }
    }
  }

  private replicaName(id: string): string {
    return `hosts/${this.options.host}/images/${id}`;
  }

  private newReplica(id: string, request: FetchImageRequest, origin: boolean, state: ImageReplica_State, generation?: string, createTime?: Date): LocalReplica {
    const now = new Date();
    const replica: LocalReplica = { id, request, origin, generation: generation ?? now.toISOString(), createTime: createTime ?? now, state, error: undefined, updateTime: now, work: undefined };
    this.replicas.set(id, replica);
    return replica;
  }

  private toReplica(replica: LocalReplica, dependents: readonly string[] = []): ImageReplica {
    const progress = this.swarm.progress(replica.id);
    return ImageReplica.fromPartial({
      name: this.replicaName(replica.id),
      image: `images/${replica.id}`,
      host: `hosts/${this.options.host}`,
      state: replica.state,
      ...(progress ? { progress: toTransferProgress(progress) } : {}),
      ...(replica.error ? { error: replica.error } : {}),
      path: join(this.imagesRoot, replica.id),
      createTime: replica.createTime,
      updateTime: replica.updateTime,
      dependentVirtualMachines: dependents.map((vm) => `hosts/${this.options.host}/virtualMachines/${vm}`),
      origin: replica.origin,
      webSeedUrl: replica.origin ? this.webSeedUrl() : '',
    });
  }

  private setState(replica: LocalReplica, state: ImageReplica_State, error?: Status): void {
    replica.state = state;
    replica.error = error;
    replica.updateTime = new Date();
  }

  /** The fetch in the background, with its events. */
  private startFetch(replica: LocalReplica, options: { verifyOnly?: boolean } = {}): void {
    const { id, request } = replica;
    const image = request.image!;
    const host = this.options.host;
    const replicaName = this.replicaName(id);
    const interval = this.options.progressEventIntervalMs ?? 2000;
    let lastEvent = 0;
    let lastState: ImageReplica_State | undefined;
    let sequence = 0;
    const publishProgress = (progress: SwarmProgress): void => {
      const state = progress.stage === 'verifying' ? ImageReplica_State.STATE_VERIFYING : progress.stage === 'seeding' ? ImageReplica_State.STATE_AVAILABLE : ImageReplica_State.STATE_TRANSFERRING;
      if (state === ImageReplica_State.STATE_AVAILABLE) return; // image.available says that
      if (replica.state !== ImageReplica_State.STATE_DELETING && replica.state !== state) this.setState(replica, state);
      const now = performance.now();
      if (state === lastState && now - lastEvent < interval) return;
      lastState = state;
      lastEvent = now;
      sequence += 1;
      void this.options.events
        .publish(IMAGE_TRANSFER_PROGRESS, { image: image.name, host: `hosts/${host}`, replica: replicaName, state, progress: toTransferProgress(progress), operation: request.operation, occurTime: new Date() }, { host, id: `image.transfer_progress/${id}/${host}/${replica.generation}/${process.pid}-${sequence}` })
        .catch(() => undefined);
    };
    const files = expectedFiles(image);
    const started = performance.now();
    replica.work = (async () => {
      try {
        if (options.verifyOnly) {
          this.setState(replica, ImageReplica_State.STATE_VERIFYING);
          const bad = await verifyImageFiles(join(this.imagesRoot, id), files);
          if (bad.length === 0) {
            await this.swarm.seed(id, join(this.imagesRoot, id), image.torrent!.metainfo, { announce: request.trackerAnnounceUrl, infoHash: image.torrent!.infoHash, superSeed: replica.origin });
            if (replica.origin) this.webSeed.addImage(id, join(this.imagesRoot, id), files.map((file) => file.path));
            this.setState(replica, ImageReplica_State.STATE_AVAILABLE);
            this.options.log.info({ replica: replicaName }, 'replica verified and seeding again');
            return;
          }
          const dependents = await this.options.dependents(id);
          if (dependents.length > 0) {
            throw new CowherdError(GrpcStatus.DATA_LOSS, `${replicaName}: ${bad.join(', ')} changed on disk, and ${dependents.length} domains use these files as backing files; left in place for an operator`, {
              reason: ErrorReason.ERROR_REASON_VERIFICATION_FAILED,
              metadata: { files: bad.join(','), dependents: dependents.slice(0, 50).join(',') },
            });
          }
          this.options.log.warn({ replica: replicaName, files: bad }, 'replica changed on disk: fetching it again');
          // Becoming AVAILABLE again is a new fact: a new generation, so a new image.available.
          replica.generation = new Date().toISOString();
          await this.writeState(replica);
          this.setState(replica, ImageReplica_State.STATE_TRANSFERRING);
        }
        const result = await this.swarm.fetch(id, {
          metainfo: image.torrent!.metainfo,
          infoHash: image.torrent!.infoHash,
          announce: request.trackerAnnounceUrl,
          directory: join(this.imagesRoot, id),
          webSeedUrls: request.webSeedUrls,
          files,
          onProgress: publishProgress,
          ...(this.options.stallTimeoutMs === undefined ? {} : { stallTimeoutMs: this.options.stallTimeoutMs }),
        });
        if (replica.origin) this.webSeed.addImage(id, join(this.imagesRoot, id), files.map((file) => file.path));
        this.settleDownload(id, result.bytesWritten);
        this.setState(replica, ImageReplica_State.STATE_AVAILABLE);
        const seconds = (performance.now() - started) / 1000;
        this.options.log.info({ replica: replicaName, bytes: result.bytesTotal, presentAtStart: result.bytesPresentAtStart, received: result.bytesReceived, seconds: Number(seconds.toFixed(2)) }, 'replica available');
        await this.publishAvailable(replica, seconds);
      } catch (error) {
        if (this.stopped || replica.state === ImageReplica_State.STATE_DELETING) return;
        const status = toStatus(error);
        this.setState(replica, ImageReplica_State.STATE_FAILED, status);
        this.options.log.warn({ replica: replicaName, err: error }, 'replica failed');
        await this.options.events
          .publish(IMAGE_TRANSFER_FAILED, { image: image.name, host: `hosts/${host}`, replica: replicaName, status, operation: request.operation, occurTime: new Date() }, { host, id: `image.transfer_failed/${id}/${host}/${replica.generation}/${Date.now()}` })
          .catch(() => undefined);
      } finally {
        replica.work = undefined;
      }
    })();
  }

  private async publishAvailable(replica: LocalReplica, seconds: number): Promise<void> {
    const image = replica.request.image!;
    const host = this.options.host;
    const total = image.files.reduce((sum, file) => sum + Number(file.sizeBytes), 0);
    // Retried until NATS takes it: distribution waits for this event. The id makes retries one event.
    for (let attempt = 0; !this.stopped; attempt += 1) {
      try {
        await this.options.events.publish(
          IMAGE_AVAILABLE,
          { image: image.name, host: `hosts/${host}`, replica: this.replicaName(replica.id), totalBytes: String(total), files: image.files, origin: replica.origin, transferDuration: { seconds: String(Math.floor(seconds)), nanos: Math.round((seconds % 1) * 1e9) }, operation: replica.request.operation, occurTime: new Date() },
          { host, id: `image.available/${replica.id}/${host}/${replica.generation}` },
        );
        return;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, Math.min(30_000, 500 * 2 ** attempt)).unref());
      }
    }
  }

  /** Takes up the replicas recorded in the image directory. */
  private async recover(): Promise<void> {
    const names = await readdir(this.imagesRoot).catch(() => [] as string[]);
    for (const name of names) {
      if (!name.startsWith('.') || !name.endsWith(STATE_SUFFIX)) continue;
      const id = name.slice(1, -STATE_SUFFIX.length);
      if (!IMAGE_ID.test(id)) continue;
      let state: ReplicaStateFile;
      let request: FetchImageRequest;
      try {
        state = JSON.parse(await readFile(join(this.imagesRoot, name), 'utf8')) as ReplicaStateFile;
        request = FetchImageRequest.decode(Buffer.from(state.request, 'base64'));
        checkFetchRequest(request, this.options.hypervisor);
      } catch (error) {
        this.options.log.warn({ file: join(this.imagesRoot, name), err: error }, 'unreadable replica state file: ignored');
        continue;
      }
      const complete = await pathExists(join(this.imagesRoot, id));
      const replica = this.newReplica(id, request, state.origin, complete ? ImageReplica_State.STATE_VERIFYING : ImageReplica_State.STATE_TRANSFERRING, state.generation, new Date(state.createTime));
      this.options.log.info({ replica: this.replicaName(id), complete }, complete ? 'verifying replica found at start' : 'resuming replica found at start');
      this.startFetch(replica, { verifyOnly: complete });
    }
  }

  private async writeState(replica: LocalReplica): Promise<void> {
    const state: ReplicaStateFile = {
      version: 1,
      request: Buffer.from(FetchImageRequest.encode(replica.request).finish()).toString('base64'),
      origin: replica.origin,
      generation: replica.generation,
      createTime: replica.createTime.toISOString(),
    };
    await writeAtomically(join(this.imagesRoot, `.${replica.id}${STATE_SUFFIX}`), JSON.stringify(state), 0o600, { sync: true });
    await fsyncDirectory(this.imagesRoot);
  }

  private async removeState(id: string): Promise<void> {
    await removeTree(join(this.imagesRoot, `.${id}${STATE_SUFFIX}`)).catch(() => undefined);
  }
}

/** The TorrentInfo of a torrent (metainfo = the bencoded info dictionary). */
export function torrentInfoOf(torrent: ImageTorrent): TorrentInfo {
  return {
    infoHash: torrent.infoHash,
    pieceLengthBytes: String(torrent.pieceLengthBytes),
    totalBytes: String(torrent.totalBytes),
    pieceCount: torrent.pieceCount,
    metainfo: torrent.infoDictionary,
  };
}

/** A snapshot in the proto's form. */
export function toTransferProgress(progress: SwarmProgress): TransferProgress {
  return TransferProgress.fromPartial({
    bytesDone: String(progress.bytesDone),
    bytesTotal: String(progress.bytesTotal),
    rateBytesPerSecond: String(progress.downloadBytesPerSecond),
    uploadRateBytesPerSecond: String(progress.uploadBytesPerSecond),
    peers: progress.peers,
    ...(progress.etaSeconds === undefined ? {} : { eta: { seconds: String(progress.etaSeconds), nanos: 0 } }),
  });
}

function expectedFiles(image: Image): ExpectedImageFile[] {
  return image.files.map((file) => ({ path: file.path, sizeBytes: Number(file.sizeBytes), sha256: file.sha256.toLowerCase() }));
}

/** Checks a FetchImage request and returns the image id. Changes nothing. */
function checkFetchRequest(request: FetchImageRequest, hypervisor: 'kvm' | 'xen'): string {
  const image = request.image;
  if (!image) throw CowherdError.invalidArgument('image', 'is required (the full image record)');
  const id = /^images\/([^/]+)$/.exec(image.name)?.[1];
  if (!id || !IMAGE_ID.test(id)) throw CowherdError.invalidArgument('image.name', 'must be images/{image} with an image id (no path separators, no dots)');
  if (!image.torrent || !/^[0-9a-f]{40}$/.test(image.torrent.infoHash) || image.torrent.metainfo.length === 0) throw CowherdError.invalidArgument('image.torrent', 'must carry the info-hash and the metainfo (IMAGE_VIEW_FULL)');
  if (image.files.length === 0) throw CowherdError.invalidArgument('image.files', 'must list the image files');
  for (const [index, file] of image.files.entries()) {
    if (!IMAGE_FILE_NAME.test(file.path)) throw CowherdError.invalidArgument(`image.files[${index}].path`, 'must be a single path segment inside the image directory', ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY);
    if (!/^[0-9a-fA-F]{64}$/.test(file.sha256)) throw CowherdError.invalidArgument(`image.files[${index}].sha256`, 'must be 64 hex characters');
    if (!(Number(file.sizeBytes) >= 0)) throw CowherdError.invalidArgument(`image.files[${index}].size_bytes`, 'must not be negative');
  }
  if (image.hypervisor !== Hypervisor.HYPERVISOR_UNSPECIFIED && image.hypervisor !== HYPERVISOR_OF[hypervisor]) {
    throw CowherdError.failedPrecondition(`images/${id} is an image for another hypervisor than this ${hypervisor} host`, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH);
  }
  for (const file of image.files) {
    if (file.format !== DiskFormat.DISK_FORMAT_UNSPECIFIED && !DISK_FORMATS_OF[hypervisor].includes(file.format)) {
      throw CowherdError.failedPrecondition(`images/${id} has a disk in a format this ${hypervisor} host cannot clone (${file.path})`, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH);
    }
  }
  let url: URL;
  try {
    url = new URL(request.trackerAnnounceUrl);
  } catch {
    throw CowherdError.invalidArgument('tracker_announce_url', 'must be the http(s) URL of the cowherd tracker');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw CowherdError.invalidArgument('tracker_announce_url', 'must be an http(s) URL');
  for (const [index, seed] of request.webSeedUrls.entries()) {
    if (!/^https?:\/\/[^/\s]+\/\S*$/.test(seed)) throw CowherdError.invalidArgument(`web_seed_urls[${index}]`, 'must be an http(s) URL');
  }
  return id;
}
