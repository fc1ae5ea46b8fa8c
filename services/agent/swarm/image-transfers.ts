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
 * - Bases are never rewritten (issue 12). A verified replica's files get a fingerprint (replica-scrub.ts);
 *   before the replica is seeded, cloned from or answered AVAILABLE to a FetchImage, and on any inotify
 *   event in its directory, the fingerprint is compared and a change triggers a re-verification; a background
 *   scrub re-reads every AVAILABLE replica at a bounded rate. Damage found either way (or at start) stops
 *   seeding and serving it, marks it FAILED (VERIFICATION_FAILED) and publishes image.replica_damaged.
 *   Without dependents (no domain's disks chain to its files) it is repaired in place at once: webtorrent
 *   re-hashes the pieces and fetches only the bad ones. With dependents its files are never touched again:
 *   the next FetchImage repairs it into a new generation beside it (`images/<id>.generation-<n>`, seeded
 *   with a copy of the old bytes so again only bad pieces travel), new clones use the new generation,
 *   existing clones keep the old files, and the replica lists the kept damaged generation.
 * - Events carry a stable id per occurrence (`image.available/<id>/<host>/<generation>`), so a restart after
 *   a publish does not make a second image.available, while a retry after a failure or damage is a new
 *   generation and a new event; progress events go out at most every `progressEventIntervalMs` (default
 *   2 s) and at every state change.
 * - Only origin replicas are served by the web seed (it is plain HTTP without client authentication, as
 *   BitTorrent peers are: the image network is trusted, see the agent README).
 * - A tracker announce that fails (the tracker is restarting, or the image is not registered yet: the origin
 *   starts seeding before distribution has stored the info-hash) is retried every 5 s instead of webtorrent's
 *   30 minutes (see swarm.ts).
 */
import { constants as fsConstants, watch, type FSWatcher } from 'node:fs';
import { chmod, copyFile, mkdir, readdir, readFile } from 'node:fs/promises';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { writeAtomically } from '../../common/platform/credential-files.js';
import { CowherdError, toStatus } from '../../common/platform/errors.js';
import { IMAGE_AVAILABLE, IMAGE_REPLICA_DAMAGED, IMAGE_TRANSFER_FAILED, IMAGE_TRANSFER_PROGRESS } from '../../common/domain/event-types.js';
import type { EventPublisher } from '../../common/platform/events.js';
import type { Logger } from '../../common/platform/logger.js';
import { distributionMetrics } from '../../common/platform/metrics.js';
import {
  HOST_IMAGE_NAME,
  HOST_NAME,
  IMAGE_KEY,
  IMAGE_NAME,
  imageNameOfKey,
  imageVersionNameOfKey,
  VIRTUAL_MACHINE_ID,
  VIRTUAL_MACHINE_NAME,
} from '../../common/domain/resource-names.js';
import { FetchImageRequest } from '../../gen/cowherd/agent/v1/agent_service.js';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { DiskFormat, Hypervisor, TransferProgress } from '../../gen/cowherd/common/v1/types.js';
import { Image, ImageReplica, ImageReplica_State, type TorrentInfo } from '../../gen/cowherd/inventory/v1/resources.js';
import type { Status } from '../../gen/google/rpc/status.js';
import {
  fsyncDirectory,
  imagesDirectory,
  pathExists,
  removeTree,
  replicaDirectory,
  replicaFile,
  replicaPartialDirectory,
  replicaStateFile,
  replicaStateFileId,
} from '../image-directory/index.js';
import { changedFiles, fingerprintFiles, scanReplica, scrubMetrics, type FileFingerprint, type ScanResult } from './replica-scrub.js';
import { replicaIdOf, type ReplicaDependents } from './replicas.js';
import { ImageSwarm, type ExpectedImageFile, type SwarmLimits, type SwarmProgress } from './swarm.js';
import { createImageTorrent, IMAGE_FILE_NAME, parseImageTorrent, type ImageTorrent } from './torrent.js';
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
  /**
   * The domains on this host that use a replica: cloned from the image (GetImageReplica's dependents), and
   * those whose disks' backing chains reach one generation's files (the damage rules).
   */
  readonly dependents: ReplicaDependents;
  /** Background scrub rate in bytes per second; 0 = no scrub. Default 0. */
  readonly scrubBytesPerSecond?: number;
  /** Pause between two scrub passes. Default 1 hour. */
  readonly scrubIntervalMs?: number;
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
  /** When a clone was last made from (or rebased onto) the replica; absent before the first (ImageReplica.last_use_time). */
  readonly lastUseTime?: string;
  /** The files' generation (ImageReplica.generation); absent in older files: 1. */
  readonly filesGeneration?: number;
  /** The files as verified; absent while not verified. */
  readonly fingerprints?: FileFingerprint[];
  /** Damage found in the current generation, until it is repaired. */
  readonly damage?: DamageRecord;
  /** Damaged generations kept for their dependents. */
  readonly damagedGenerations?: DamageRecord[];
}

/** A generation found damaged. */
interface DamageRecord {
  readonly filesGeneration: number;
  readonly files: string[];
  readonly badPieces: number;
  /** Domain names whose disks chain to its files when the damage was found. */
  readonly dependents: string[];
  readonly time: string;
}

interface LocalReplica {
  readonly id: string;
  request: FetchImageRequest;
  readonly origin: boolean;
  /** Names this replica's becoming AVAILABLE in event ids; a new one each time it is fetched or repaired again. */
  generation: string;
  /** Which directory holds the files: 1 = `images/<id>`, n = `images/<id>.generation-<n>`. */
  filesGeneration: number;
  fingerprints: FileFingerprint[] | undefined;
  damage: DamageRecord | undefined;
  damagedGenerations: DamageRecord[];
  readonly createTime: Date;
  /** When a clone was last made from (or rebased onto) it; undefined before the first. */
  lastUseTime: Date | undefined;
  state: ImageReplica_State;
  error: Status | undefined;
  updateTime: Date;
  /** Set while a fetch or a start-up verification runs. */
  work: Promise<void> | undefined;
  /** Set while a fingerprint check (and the re-verification it may need) runs: callers share it. */
  checking: Promise<boolean> | undefined;
  /** inotify on the replica's directory while it is AVAILABLE. */
  watcher: FSWatcher | undefined;
}

/** Who found damage (label of cowherd_replica_damaged_total). */
type FoundBy = 'start' | 'scrub' | 'watch' | 'clone' | 'fetch' | 'serve';

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
  /** Stops the background scrub. */
  private readonly scrubStop = new AbortController();
  private scrubLoop: Promise<void> | undefined;

  private constructor(
    private readonly options: ImageTransfersOptions,
    readonly swarm: ImageSwarm,
    private readonly webSeed: WebSeedServer,
  ) {
    this.imagesRoot = imagesDirectory(options.imageDirectory);
  }

  /** Starts the swarm and the web seed, then takes up every replica recorded in the image directory. */
  static async start(options: ImageTransfersOptions): Promise<ImageTransfers> {
    const swarm = await ImageSwarm.create({
      torrentPort: options.torrentPort,
      log: options.log.child({ component: 'swarm' }),
      ...(options.limits ? { limits: options.limits } : {}),
    });
    // The transfers exist only after the web seed listens: the check reaches them through this late binding.
    let transfers: ImageTransfers | undefined;
    const servable = async (id: string): Promise<boolean> => (transfers ? transfers.servable(id) : false);
    const webSeed = new WebSeedServer({
      log: options.log.child({ component: 'web-seed' }),
      uploadBytesPerSecond: options.limits?.uploadBytesPerSecond ?? 0,
      servable,
    });
    try {
      await webSeed.listen(options.webSeedAddress);
    } catch (error) {
      await swarm.destroy();
      throw error;
    }
    transfers = new ImageTransfers(options, swarm, webSeed);
    await transfers.recover();
    transfers.sampler = setInterval(() => transfers.sampleMetrics(), METRICS_SAMPLE_MS);
    transfers.sampler.unref();
    if ((options.scrubBytesPerSecond ?? 0) > 0) transfers.scrubLoop = transfers.scrub(options.scrubBytesPerSecond!, options.scrubIntervalMs ?? 3_600_000);
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
    if (!(limits.uploadBytesPerSecond >= 0) || !(limits.downloadBytesPerSecond >= 0))
      throw CowherdError.invalidArgument('transfer_limits', 'must not be negative (0 means unlimited)');
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
    const directory = replicaDirectory(this.options.imageDirectory, id);
    const torrent = await createImageTorrent({
      directory,
      files: image.files.map((file) => file.path),
      announce: trackerAnnounceUrl,
      name: id,
      ...(onProgress ? { onProgress } : {}),
      ...(signal ? { signal } : {}),
    });
    const info = torrentInfoOf(torrent);
    const request = FetchImageRequest.fromPartial({ image: { ...image, torrent: info }, trackerAnnounceUrl, webSeedUrls: [] });
    const replica = this.newReplica(id, request, true, ImageReplica_State.STATE_AVAILABLE);
    // The export hashed these files (SHA-256) a moment ago: what is on disk now is what was verified.
    replica.fingerprints = await fingerprintFiles(directory, image.files);
    await this.writeState(replica);
    try {
      await this.swarm.seed(id, directory, torrent.infoDictionary, { announce: trackerAnnounceUrl, infoHash: torrent.infoHash, superSeed: true });
      this.webSeed.addImage(
        id,
        directory,
        image.files.map((file) => file.path),
      );
      this.watch(replica);
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
      if (existing.state === ImageReplica_State.STATE_DELETING)
        throw CowherdError.failedPrecondition(`${this.replicaName(id)} is being deleted`, ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT);
      if (existing.request.image!.torrent!.infoHash !== request.image!.torrent!.infoHash) {
        throw CowherdError.failedPrecondition(
          `${this.replicaName(id)} holds another torrent of ${IMAGE_NAME.format({ image: id })}; delete the replica first`,
          ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        );
      }
      // A redistribute must not answer AVAILABLE for files that changed since they were verified.
      if (existing.state === ImageReplica_State.STATE_AVAILABLE && (await this.checkIntact(existing, 'fetch'))) return this.toReplica(existing);
      if (existing.state !== ImageReplica_State.STATE_FAILED) return this.toReplica(existing);
      if (existing.work) return this.toReplica(existing);
      existing.request = FetchImageRequest.fromPartial({ ...request, image: request.image });
      await this.beginRepair(existing);
      return this.toReplica(existing);
    }
    const replica = this.newReplica(id, request, false, ImageReplica_State.STATE_TRANSFERRING);
    await this.writeState(replica);
    this.startFetch(replica);
    return this.toReplica(replica);
  }

  /**
   * The directory of the verified replica to clone `imageId` from (the clone engine's base): after a
   * fingerprint check (and a re-verification when a file changed). FAILED_PRECONDITION (VERIFICATION_FAILED)
   * when the replica is damaged, IMAGE_NOT_ON_HOST while it is not AVAILABLE. A replica this host does not
   * track (laid out by hand) is `images/<id>` as it is.
   */
  async cloneBase(imageId: string): Promise<string> {
    const replica = this.replicas.get(imageId);
    if (!replica) return replicaDirectory(this.options.imageDirectory, imageId);
    if (replica.state === ImageReplica_State.STATE_AVAILABLE && (await this.checkIntact(replica, 'clone'))) return this.directoryOf(replica);
    const damage = replica.damage;
    if (damage) {
      throw new CowherdError(
        GrpcStatus.FAILED_PRECONDITION,
        `${this.replicaName(imageId)} is damaged (${damage.files.join(', ')}: ${damage.badPieces} bad pieces); no clone is made on it until a DistributeImage repairs it`,
        {
          reason: ErrorReason.ERROR_REASON_VERIFICATION_FAILED,
          metadata: {
            replica: this.replicaName(imageId),
            files: damage.files.join(','),
            badPieces: String(damage.badPieces),
            dependents: damage.dependents.slice(0, 50).join(','),
          },
        },
      );
    }
    throw CowherdError.failedPrecondition(
      `${this.replicaName(imageId)} is not available yet (${ImageReplica_State[replica.state]})`,
      ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST,
    );
  }

  /**
   * Records that a clone was made from (or rebased onto) the replica `key` at `when` (ImageReplica.last_use_time,
   * which garbage collection at a host's high watermark orders by), in its state file. A replica this host does
   * not track is left alone; a state file that cannot be written is logged, never fails the clone.
   */
  async markUsed(key: string, when: Date = new Date()): Promise<void> {
    const replica = this.replicas.get(key);
    if (!replica || (replica.lastUseTime && replica.lastUseTime >= when)) return;
    replica.lastUseTime = when;
    await this.writeState(replica).catch((error: unknown) =>
      this.options.log.warn({ err: error, replica: this.replicaName(key) }, 'recording the last use of a replica failed'),
    );
  }

  /**
   * The verified directory of the replica `key` to rebase clones onto (RebaseClones): undefined when this host
   * does not track it (the caller looks for `images/<key>` as laid out by hand); FAILED_PRECONDITION
   * (RESOURCE_STATE_CONFLICT) while it is not AVAILABLE; then as {@link cloneBase}.
   */
  async rebaseBase(key: string): Promise<string | undefined> {
    const replica = this.replicas.get(key);
    if (!replica) return undefined;
    if (replica.state !== ImageReplica_State.STATE_AVAILABLE)
      throw CowherdError.failedPrecondition(
        `${this.replicaName(key)} is ${ImageReplica_State[replica.state]}, not AVAILABLE`,
        ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        { replica: this.replicaName(key) },
      );
    return this.cloneBase(key);
  }

  /** The web seed's check before it serves an origin replica's bytes: AVAILABLE and its files as verified. */
  async servable(id: string): Promise<boolean> {
    const replica = this.replicas.get(id);
    return replica !== undefined && replica.state === ImageReplica_State.STATE_AVAILABLE && (await this.checkIntact(replica, 'serve'));
  }

  /** Whether this host's replica `id` is AVAILABLE (false while it arrives, when it failed, and when there is none). */
  isAvailable(id: string): boolean {
    return this.replicas.get(id)?.state === ImageReplica_State.STATE_AVAILABLE;
  }

  /**
   * What a streaming clone needs of a replica that is still arriving: the torrent's files and piece hashes and the
   * directories its files are in (the fetch's partial directory, then the replica's). `available` when the
   * replica is AVAILABLE (clone from it as usual). FAILED_PRECONDITION IMAGE_NOT_ON_HOST when this host has no
   * replica of the image, or one that is FAILED or being deleted (nothing to stream from).
   */
  streamSource(id: string):
    | { readonly kind: 'available' }
    | {
        readonly kind: 'arriving';
        readonly directories: readonly string[];
        readonly files: ReadonlyArray<{ readonly path: string; readonly length: number }>;
        readonly pieceLength: number;
        readonly pieceHashes: Buffer;
        /** The image version's read profile (pieces a booting clone read first, in order); [] when none was recorded. */
        readonly profile: readonly number[];
        /** Whether the image record the fetch was given already had a profile (then none needs recording). */
        readonly profiled: boolean;
      } {
    const replica = this.replicas.get(id);
    if (replica?.state === ImageReplica_State.STATE_AVAILABLE) return { kind: 'available' };
    if (!replica || (replica.state !== ImageReplica_State.STATE_TRANSFERRING && replica.state !== ImageReplica_State.STATE_VERIFYING))
      throw CowherdError.failedPrecondition(
        `${IMAGE_NAME.format({ image: id })} has no replica arriving on ${HOST_NAME.format({ host: this.options.host })} (${replica ? ImageReplica_State[replica.state] : 'none'}); distribute it first`,
        ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST,
      );
    const torrent = parseImageTorrent(replica.request.image!.torrent!.metainfo, replica.request.image!.torrent!.infoHash);
    return {
      kind: 'arriving',
      directories: [this.partialOf(replica), this.directoryOf(replica)],
      files: torrent.files,
      pieceLength: torrent.pieceLengthBytes,
      pieceHashes: torrent.pieceHashes,
      profile: replica.request.image!.readProfile?.pieces.filter((piece) => piece < torrent.pieceCount) ?? [],
      profiled: (replica.request.image!.readProfile?.pieces.length ?? 0) > 0,
    };
  }

  /**
   * Resolves once bytes [offset, offset + length) of `file` of the replica are here and verified, fetching exactly
   * those pieces first (ImageSwarm.whenAvailable); at once for a replica that is not transferring.
   */
  async whenAvailable(
    id: string,
    file: string,
    offset: number,
    length: number,
    options: { signal?: AbortSignal; priority?: 'read' | 'prefetch' } = {},
  ): Promise<void> {
    const replica = this.replicas.get(id);
    if (!replica) throw CowherdError.notFound(this.replicaName(id));
    if (replica.state === ImageReplica_State.STATE_AVAILABLE) return;
    await this.swarm.whenAvailable(id, file, offset, length, options.signal, options.priority);
  }

  /** How many peers hold each of `pieces` of a replica still transferring (ImageSwarm.pieceHolders); else undefined. */
  pieceHolders(id: string, pieces: readonly number[]): number[] | undefined {
    const replica = this.replicas.get(id);
    if (!replica || replica.state !== ImageReplica_State.STATE_TRANSFERRING) return undefined;
    return this.swarm.pieceHolders(id, pieces);
  }

  /** One replica with live progress and dependents; NOT_FOUND when this host has none of the image. */
  async get(name: string): Promise<ImageReplica> {
    const id = replicaIdOf(this.options.host, name);
    const replica = this.replicas.get(id);
    if (!replica) throw CowherdError.notFound(name);
    return this.toReplica(replica, await this.options.dependents.clonedFrom(id));
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
    replica?.watcher?.close();
    await this.swarm.remove(id);
    await replica?.work;
    try {
      await removeFiles();
      await removeTree(replicaPartialDirectory(this.options.imageDirectory, id));
      // Every generation goes (the caller refused the removal while any domain uses the image as a base).
      for (const generation of new Set([replica?.filesGeneration ?? 1, ...(replica?.damagedGenerations.map((damage) => damage.filesGeneration) ?? [])])) {
        if (generation === 1) continue;
        await removeTree(this.directoryOf({ id, filesGeneration: generation }));
        await removeTree(this.partialOf({ id, filesGeneration: generation }));
      }
    } catch (error) {
      // Some files stay: say so, keep the state file (a restart takes the replica up again) and leave the
      // replica FAILED rather than DELETING, so that a DeleteImageReplica or FetchImage can try again.
      const failure = new CowherdError(
        GrpcStatus.INTERNAL,
        `${this.replicaName(id)}: removing its files failed (${(error as Error).message}); what was not removed stays on disk`,
        {
          reason: ErrorReason.ERROR_REASON_INTERNAL,
          metadata: { replica: this.replicaName(id), removed: 'false' },
          cause: error,
        },
      );
      this.options.log.error({ replica: this.replicaName(id), err: error }, 'replica files could not all be removed; they stay');
      if (replica) this.setState(replica, ImageReplica_State.STATE_FAILED, toStatus(failure));
      throw failure;
    }
    await this.removeState(id);
    this.replicas.delete(id);
  }

  /** Stops everything (fetches keep their partial files and resume at the next start). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.sampler);
    this.scrubStop.abort(new Error('the agent is stopping'));
    for (const replica of this.replicas.values()) replica.watcher?.close();
    await this.scrubLoop;
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

  /**
   * The resource names of dependents' `{virtualMachine}` ids; a state file from before ids were recorded may
   * hold a domain name that is no id (a hand-made domain): it is left out rather than named wrongly.
   */
  private virtualMachineNames(ids: readonly string[]): string[] {
    return ids.filter((id) => VIRTUAL_MACHINE_ID.test(id)).map((id) => VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: id }));
  }

  private replicaName(id: string): string {
    return HOST_IMAGE_NAME.format({ host: this.options.host, image: id });
  }

  private newReplica(id: string, request: FetchImageRequest, origin: boolean, state: ImageReplica_State, generation?: string, createTime?: Date): LocalReplica {
    const now = new Date();
    const replica: LocalReplica = {
      id,
      request,
      origin,
      generation: generation ?? now.toISOString(),
      filesGeneration: 1,
      fingerprints: undefined,
      damage: undefined,
      damagedGenerations: [],
      createTime: createTime ?? now,
      lastUseTime: undefined,
      state,
      error: undefined,
      updateTime: now,
      work: undefined,
      checking: undefined,
      watcher: undefined,
    };
    this.replicas.set(id, replica);
    return replica;
  }

  /** The directory of a replica's files: `images/<id>` (generation 1) or `images/<id>.generation-<n>`. */
  private directoryOf(replica: Pick<LocalReplica, 'id' | 'filesGeneration'>): string {
    return replicaDirectory(this.options.imageDirectory, replica.id, replica.filesGeneration);
  }

  private partialOf(replica: Pick<LocalReplica, 'id' | 'filesGeneration'>): string {
    return replicaPartialDirectory(this.options.imageDirectory, replica.id, replica.filesGeneration);
  }

  /** The domains whose disks chain to the files of the replica's current generation. */
  private async dependentsOf(replica: LocalReplica): Promise<string[]> {
    return this.options.dependents.backedBy(replica.id, [this.directoryOf(replica)]);
  }

  /**
   * Compares the files with their fingerprint; a change triggers a re-verification. True when the replica is
   * intact (the fingerprint is refreshed when only metadata changed); false when it was damaged (and is now
   * FAILED). Concurrent callers share one check.
   */
  private checkIntact(replica: LocalReplica, foundBy: FoundBy): Promise<boolean> {
    if (replica.checking) return replica.checking;
    const check = (async (): Promise<boolean> => {
      if (replica.state !== ImageReplica_State.STATE_AVAILABLE) return false;
      const files = replica.request.image!.files;
      const current = await fingerprintFiles(this.directoryOf(replica), files);
      const changed = replica.fingerprints ? changedFiles(replica.fingerprints, current) : files.map((file) => file.path);
      if (changed.length === 0) return true;
      this.options.log.warn(
        { replica: this.replicaName(replica.id), files: changed, by: foundBy },
        'replica files changed since they were verified: verifying them again',
      );
      const result = await this.scan(replica);
      if (replica.state !== ImageReplica_State.STATE_AVAILABLE) return false;
      if (result.badFiles.length === 0) {
        replica.fingerprints = current;
        await this.writeState(replica);
        this.options.log.info({ replica: this.replicaName(replica.id) }, 'replica verified again: unchanged content');
        return true;
      }
      await this.markDamaged(replica, result, foundBy);
      return false;
    })().finally(() => {
      replica.checking = undefined;
    });
    replica.checking = check;
    return check;
  }

  /** Reads the replica's files once, at full speed (a re-verification someone waits for). */
  private async scan(replica: LocalReplica, options: { bytesPerSecond?: number; signal?: AbortSignal } = {}): Promise<ScanResult> {
    const image = replica.request.image!;
    const torrent = parseImageTorrent(image.torrent!.metainfo, image.torrent!.infoHash);
    const result = await scanReplica(this.directoryOf(replica), torrent, expectedFiles(image), options);
    scrubMetrics.bytes.inc(result.bytesRead);
    return result;
  }

  /**
   * Damage found in an AVAILABLE (or just re-verified) replica: stop seeding and serving it, mark it FAILED,
   * record and publish the damage; without dependents, repair it in place at once (only bad pieces travel).
   */
  private async markDamaged(replica: LocalReplica, result: ScanResult, foundBy: FoundBy): Promise<void> {
    const { id } = replica;
    // Being deleted (or already replaced): the damage no longer matters to anyone.
    if (replica.state === ImageReplica_State.STATE_DELETING || this.replicas.get(id) !== replica) return;
    const replicaName = this.replicaName(id);
    const host = this.options.host;
    replica.watcher?.close();
    replica.watcher = undefined;
    this.webSeed.removeImage(id);
    await this.swarm.remove(id);
    const dependents = await this.dependentsOf(replica);
    const now = new Date();
    const damage: DamageRecord = {
      filesGeneration: replica.filesGeneration,
      files: result.badFiles,
      badPieces: result.badPieces,
      dependents,
      time: now.toISOString(),
    };
    replica.damage = damage;
    const status = toStatus(
      new CowherdError(
        GrpcStatus.DATA_LOSS,
        `${replicaName}: ${result.badFiles.join(', ')} changed on disk after verification (${result.badPieces} bad pieces)${dependents.length > 0 ? `; ${dependents.length} domains use these files as backing files, so they stay as they are and a DistributeImage repairs the replica into a new generation` : '; repaired in place'}`,
        {
          reason: ErrorReason.ERROR_REASON_VERIFICATION_FAILED,
          metadata: {
            files: result.badFiles.join(','),
            badPieces: String(result.badPieces),
            dependents: dependents.slice(0, 50).join(','),
            path: this.directoryOf(replica),
          },
        },
      ),
    );
    this.setState(replica, ImageReplica_State.STATE_FAILED, status);
    await this.writeState(replica);
    scrubMetrics.damaged.inc({ found_by: foundBy });
    this.options.log.error({ replica: replicaName, files: result.badFiles, badPieces: result.badPieces, dependents, by: foundBy }, 'replica damaged');
    await this.options.events
      .publish(
        IMAGE_REPLICA_DAMAGED,
        {
          image: replica.request.image!.name,
          host: HOST_NAME.format({ host }),
          replica: replicaName,
          generation: String(replica.filesGeneration),
          path: this.directoryOf(replica),
          damagedFiles: result.badFiles,
          badPieces: result.badPieces,
          dependentVirtualMachines: this.virtualMachineNames(dependents),
          occurTime: now,
        },
        // One damage event per verified occurrence of the replica: the generation names it.
        { host, id: `image.replica_damaged/${id}/${host}/${replica.generation}` },
      )
      .catch((error: unknown) => this.options.log.error({ err: error, replica: replicaName }, 'image.replica_damaged not published'));
    // A FetchImage may have started the repair while the event was being recorded.
    if (dependents.length === 0 && !this.stopped && replica.state === ImageReplica_State.STATE_FAILED && !replica.work) {
      await this.beginRepair(replica).catch((error: unknown) =>
        this.options.log.error({ err: error, replica: replicaName }, 'in-place repair could not start'),
      );
    }
  }

  /**
   * Fetches a FAILED replica again (a retry, or the repair of damage) as a new occurrence: a new generation
   * id, so its image.available is a new event (the stream dropped a retry's image.available as a duplicate
   * when it kept the id). The state leaves FAILED before the first await, so that a concurrent FetchImage
   * or check sees the repair under way and starts no second one.
   */
  private async beginRepair(replica: LocalReplica): Promise<void> {
    this.setState(replica, ImageReplica_State.STATE_TRANSFERRING);
    replica.generation = newGeneration(replica.generation);
    try {
      await this.prepareRepair(replica);
      await this.writeState(replica);
    } catch (error) {
      this.setState(replica, ImageReplica_State.STATE_FAILED, toStatus(error));
      throw error;
    }
    this.startFetch(replica);
  }

  /**
   * Before a FAILED replica is fetched again: when its files are damaged and domains use them (now, or when
   * the damage was found), they stay untouched and the fetch goes to a new generation's directory, seeded
   * with a copy of the old bytes so that webtorrent keeps every good piece. Otherwise the fetch repairs the
   * files in place (swarm.ts moves them back to the partial directory and fetches only the bad pieces).
   */
  private async prepareRepair(replica: LocalReplica): Promise<void> {
    const damage = replica.damage;
    if (!damage) return;
    const dependents = await this.dependentsOf(replica);
    if (dependents.length === 0 && damage.dependents.length === 0) {
      replica.damage = undefined;
      replica.fingerprints = undefined;
      return;
    }
    const old = this.directoryOf(replica);
    const kept: DamageRecord = { ...damage, dependents: [...new Set([...damage.dependents, ...dependents])] };
    replica.damagedGenerations = [...replica.damagedGenerations.filter((entry) => entry.filesGeneration !== kept.filesGeneration), kept];
    replica.filesGeneration = Math.max(replica.filesGeneration, ...replica.damagedGenerations.map((entry) => entry.filesGeneration)) + 1;
    replica.damage = undefined;
    replica.fingerprints = undefined;
    const partial = this.partialOf(replica);
    await removeTree(partial);
    await mkdir(partial, { recursive: true, mode: 0o755 });
    // Copies (reflinks where the file system has them): the old files are only read.
    for (const file of replica.request.image!.files) {
      await copyFile(replicaFile(old, file.path), replicaFile(partial, file.path), fsConstants.COPYFILE_FICLONE).catch(() => undefined);
      await chmod(replicaFile(partial, file.path), 0o644).catch(() => undefined);
    }
    this.options.log.warn(
      { replica: this.replicaName(replica.id), kept: old, next: this.directoryOf(replica), dependents: kept.dependents },
      'damaged replica has dependents: repairing it into a new generation beside it',
    );
  }

  /** Becoming AVAILABLE: fingerprints of the files as verified, recorded, and an inotify watch on them. */
  private async markVerified(replica: LocalReplica): Promise<void> {
    replica.fingerprints = await fingerprintFiles(this.directoryOf(replica), replica.request.image!.files);
    replica.damage = undefined;
    await this.writeState(replica);
    this.watch(replica);
  }

  /**
   * inotify on the replica's directory: any write, chmod or rename in it checks the fingerprint within
   * 200 ms, so damage is noticed (and the record leaves AVAILABLE) before anyone asks.
   */
  private watch(replica: LocalReplica): void {
    replica.watcher?.close();
    let timer: NodeJS.Timeout | undefined;
    try {
      replica.watcher = watch(this.directoryOf(replica), { persistent: false }, () => {
        if (timer) return;
        timer = setTimeout(() => {
          timer = undefined;
          if (this.stopped || replica.state !== ImageReplica_State.STATE_AVAILABLE) return;
          void this.checkIntact(replica, 'watch').catch((error: unknown) =>
            this.options.log.warn({ err: error, replica: this.replicaName(replica.id) }, 'fingerprint check failed'),
          );
        }, 200);
        timer.unref();
      });
      replica.watcher.on('error', () => undefined);
    } catch (error) {
      this.options.log.warn({ err: error, replica: this.replicaName(replica.id) }, 'cannot watch the replica directory; the scrub still checks it');
    }
  }

  /** The background scrub: every AVAILABLE replica re-read at `bytesPerSecond`, then a pause, for ever. */
  private async scrub(bytesPerSecond: number, intervalMs: number): Promise<void> {
    const signal = this.scrubStop.signal;
    const pause = (ms: number): Promise<void> =>
      new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        signal.addEventListener('abort', () => (clearTimeout(timer), resolve()), { once: true });
      });
    // A start already re-checked every replica (fingerprints, or a full read): the first pass can wait too.
    await pause(intervalMs);
    while (!signal.aborted) {
      for (const replica of [...this.replicas.values()]) {
        if (signal.aborted) return;
        if (replica.state !== ImageReplica_State.STATE_AVAILABLE || replica.checking) continue;
        const generation = replica.generation;
        try {
          const result = await this.scan(replica, { bytesPerSecond, signal });
          // Changed meanwhile (deleted, repaired, found damaged by another check): this pass's result is stale.
          if (replica.state !== ImageReplica_State.STATE_AVAILABLE || replica.generation !== generation || this.replicas.get(replica.id) !== replica) continue;
          if (result.badFiles.length > 0 || result.badPieces > 0) await this.markDamaged(replica, result, 'scrub');
        } catch (error) {
          if (signal.aborted) return;
          this.options.log.warn({ err: error, replica: this.replicaName(replica.id) }, 'scrub of a replica failed');
        }
      }
      await pause(intervalMs);
    }
  }

  private toReplica(replica: LocalReplica, dependents: readonly string[] = []): ImageReplica {
    const progress = this.swarm.progress(replica.id);
    return ImageReplica.fromPartial({
      name: this.replicaName(replica.id),
      image: imageNameOfKey(replica.id),
      imageVersion: imageVersionNameOfKey(replica.id),
      host: HOST_NAME.format({ host: this.options.host }),
      state: replica.state,
      ...(progress ? { progress: toTransferProgress(progress) } : {}),
      ...(replica.error ? { error: replica.error } : {}),
      path: this.directoryOf(replica),
      generation: String(replica.filesGeneration),
      damagedGenerations: replica.damagedGenerations.map((damage) => ({
        generation: String(damage.filesGeneration),
        path: this.directoryOf({ id: replica.id, filesGeneration: damage.filesGeneration }),
        damagedFiles: damage.files,
        badPieces: damage.badPieces,
        dependentVirtualMachines: this.virtualMachineNames(damage.dependents),
        damageTime: new Date(damage.time),
      })),
      createTime: replica.createTime,
      updateTime: replica.updateTime,
      lastUseTime: replica.lastUseTime ?? replica.createTime,
      dependentVirtualMachines: this.virtualMachineNames(dependents),
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
      const state =
        progress.stage === 'verifying'
          ? ImageReplica_State.STATE_VERIFYING
          : progress.stage === 'seeding'
            ? ImageReplica_State.STATE_AVAILABLE
            : ImageReplica_State.STATE_TRANSFERRING;
      if (state === ImageReplica_State.STATE_AVAILABLE) return; // image.available says that
      if (replica.state !== ImageReplica_State.STATE_DELETING && replica.state !== state) this.setState(replica, state);
      const now = performance.now();
      if (state === lastState && now - lastEvent < interval) return;
      lastState = state;
      lastEvent = now;
      sequence += 1;
      void this.options.events
        .publish(
          IMAGE_TRANSFER_PROGRESS,
          {
            image: image.name,
            host: HOST_NAME.format({ host }),
            replica: replicaName,
            state,
            progress: toTransferProgress(progress),
            operation: request.operation,
            occurTime: new Date(),
          },
          { host, id: `image.transfer_progress/${id}/${host}/${replica.generation}/${process.pid}-${sequence}` },
        )
        .catch(() => undefined);
    };
    const files = expectedFiles(image);
    const started = performance.now();
    let work: Promise<void> | undefined;
    work = (async () => {
      await Promise.resolve();
      try {
        if (options.verifyOnly) {
          this.setState(replica, ImageReplica_State.STATE_VERIFYING);
          const directory = this.directoryOf(replica);
          // Unchanged since verified (a plain restart): the fingerprint vouches; the scrub re-reads it later.
          const intact = replica.fingerprints && !replica.damage && changedFiles(replica.fingerprints, await fingerprintFiles(directory, files)).length === 0;
          const result = intact ? { badFiles: [], badPieces: 0, bytesRead: 0 } : await this.scan(replica);
          if (result.badFiles.length === 0 && result.badPieces === 0) {
            await this.swarm.seed(id, directory, image.torrent!.metainfo, {
              announce: request.trackerAnnounceUrl,
              infoHash: image.torrent!.infoHash,
              superSeed: replica.origin,
            });
            if (replica.origin)
              this.webSeed.addImage(
                id,
                directory,
                files.map((file) => file.path),
              );
            this.setState(replica, ImageReplica_State.STATE_AVAILABLE);
            await this.markVerified(replica);
            this.options.log.info({ replica: replicaName, reread: !intact }, 'replica verified and seeding again');
            return;
          }
          if (result.badFiles.length > 0) this.options.log.warn({ replica: replicaName, files: result.badFiles }, 'replica changed on disk: fetching it again');
          // markDamaged repairs in place at once when no domain uses the files, and leaves them FAILED otherwise;
          // this verification is over, so it must not count as a fetch under way.
          replica.work = undefined;
          await this.markDamaged(replica, result, 'start');
          return;
        }
        const result = await this.swarm.fetch(id, {
          metainfo: image.torrent!.metainfo,
          infoHash: image.torrent!.infoHash,
          announce: request.trackerAnnounceUrl,
          directory: this.directoryOf(replica),
          webSeedUrls: request.webSeedUrls,
          files,
          onProgress: publishProgress,
          ...(this.options.stallTimeoutMs === undefined ? {} : { stallTimeoutMs: this.options.stallTimeoutMs }),
        });
        if (replica.origin)
          this.webSeed.addImage(
            id,
            this.directoryOf(replica),
            files.map((file) => file.path),
          );
        this.settleDownload(id, result.bytesWritten);
        this.setState(replica, ImageReplica_State.STATE_AVAILABLE);
        await this.markVerified(replica);
        const seconds = (performance.now() - started) / 1000;
        this.options.log.info(
          {
            replica: replicaName,
            path: this.directoryOf(replica),
            generation: replica.filesGeneration,
            bytes: result.bytesTotal,
            presentAtStart: result.bytesPresentAtStart,
            received: result.bytesReceived,
            written: result.bytesWritten,
            seconds: Number(seconds.toFixed(2)),
          },
          'replica available',
        );
        await this.publishAvailable(replica, seconds);
      } catch (error) {
        if (this.stopped || replica.state === ImageReplica_State.STATE_DELETING) return;
        const status = toStatus(error);
        this.setState(replica, ImageReplica_State.STATE_FAILED, status);
        this.options.log.warn({ replica: replicaName, err: error }, 'replica failed');
        await this.options.events
          .publish(
            IMAGE_TRANSFER_FAILED,
            { image: image.name, host: HOST_NAME.format({ host }), replica: replicaName, status, operation: request.operation, occurTime: new Date() },
            { host, id: `image.transfer_failed/${id}/${host}/${replica.generation}/${Date.now()}` },
          )
          .catch(() => undefined);
      } finally {
        if (replica.work === work) replica.work = undefined;
      }
    })();
    replica.work = work;
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
          {
            image: image.name,
            host: HOST_NAME.format({ host }),
            replica: this.replicaName(replica.id),
            totalBytes: String(total),
            files: image.files,
            origin: replica.origin,
            transferDuration: { seconds: String(Math.floor(seconds)), nanos: Math.round((seconds % 1) * 1e9) },
            operation: replica.request.operation,
            occurTime: new Date(),
            generation: String(replica.filesGeneration),
          },
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
      const id = replicaStateFileId(name);
      if (id === undefined || !IMAGE_KEY.test(id)) continue;
      let state: ReplicaStateFile;
      let request: FetchImageRequest;
      try {
        state = JSON.parse(await readFile(replicaStateFile(this.options.imageDirectory, id), 'utf8')) as ReplicaStateFile;
        request = FetchImageRequest.decode(Buffer.from(state.request, 'base64'));
        checkFetchRequest(request, this.options.hypervisor);
      } catch (error) {
        this.options.log.warn({ file: replicaStateFile(this.options.imageDirectory, id), err: error }, 'unreadable replica state file: ignored');
        continue;
      }
      const replica = this.newReplica(id, request, state.origin, ImageReplica_State.STATE_TRANSFERRING, state.generation, new Date(state.createTime));
      replica.filesGeneration = state.filesGeneration ?? 1;
      replica.lastUseTime = state.lastUseTime === undefined ? undefined : new Date(state.lastUseTime);
      replica.fingerprints = state.fingerprints;
      replica.damage = state.damage;
      replica.damagedGenerations = state.damagedGenerations ?? [];
      const complete = await pathExists(this.directoryOf(replica));
      if (complete) replica.state = ImageReplica_State.STATE_VERIFYING;
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
      ...(replica.lastUseTime ? { lastUseTime: replica.lastUseTime.toISOString() } : {}),
      filesGeneration: replica.filesGeneration,
      ...(replica.fingerprints ? { fingerprints: replica.fingerprints } : {}),
      ...(replica.damage ? { damage: replica.damage } : {}),
      damagedGenerations: replica.damagedGenerations,
    };
    await writeAtomically(replicaStateFile(this.options.imageDirectory, replica.id), JSON.stringify(state), 0o600, { sync: true });
    await fsyncDirectory(this.imagesRoot);
  }

  private async removeState(id: string): Promise<void> {
    await removeTree(replicaStateFile(this.options.imageDirectory, id)).catch(() => undefined);
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

/** A generation id that sorts after `previous` and differs from it even within one millisecond. */
function newGeneration(previous: string): string {
  const now = new Date().toISOString();
  return now > previous ? now : `${previous}+`;
}

function expectedFiles(image: Image): ExpectedImageFile[] {
  return image.files.map((file) => ({ path: file.path, sizeBytes: Number(file.sizeBytes), sha256: file.sha256.toLowerCase() }));
}

/** Checks a FetchImage request and returns the image id. Changes nothing. */
function checkFetchRequest(request: FetchImageRequest, hypervisor: 'kvm' | 'xen'): string {
  const image = request.image;
  if (!image) throw CowherdError.invalidArgument('image', 'is required (the full image record)');
  const id = IMAGE_NAME.parse(image.name)?.image;
  if (!id) throw CowherdError.invalidArgument('image.name', 'must be images/{image} or images/{image}/versions/{version} (no path separators, no dots)');
  if (!image.torrent || !/^[0-9a-f]{40}$/.test(image.torrent.infoHash) || image.torrent.metainfo.length === 0)
    throw CowherdError.invalidArgument('image.torrent', 'must carry the info-hash and the metainfo (IMAGE_VIEW_FULL)');
  if (image.files.length === 0) throw CowherdError.invalidArgument('image.files', 'must list the image files');
  for (const [index, file] of image.files.entries()) {
    if (!IMAGE_FILE_NAME.test(file.path))
      throw CowherdError.invalidArgument(
        `image.files[${index}].path`,
        'must be a single path segment inside the image directory',
        ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY,
      );
    if (!/^[0-9a-fA-F]{64}$/.test(file.sha256)) throw CowherdError.invalidArgument(`image.files[${index}].sha256`, 'must be 64 hex characters');
    if (!(Number(file.sizeBytes) >= 0)) throw CowherdError.invalidArgument(`image.files[${index}].size_bytes`, 'must not be negative');
  }
  if (image.hypervisor !== Hypervisor.HYPERVISOR_UNSPECIFIED && image.hypervisor !== HYPERVISOR_OF[hypervisor]) {
    throw CowherdError.failedPrecondition(
      `${IMAGE_NAME.format({ image: id })} is an image for another hypervisor than this ${hypervisor} host`,
      ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
    );
  }
  for (const file of image.files) {
    if (file.format !== DiskFormat.DISK_FORMAT_UNSPECIFIED && !DISK_FORMATS_OF[hypervisor].includes(file.format)) {
      throw CowherdError.failedPrecondition(
        `${IMAGE_NAME.format({ image: id })} has a disk in a format this ${hypervisor} host cannot clone (${file.path})`,
        ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
      );
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
