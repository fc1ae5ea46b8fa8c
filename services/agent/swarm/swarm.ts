/**
 * The agent's part of the image swarm (job 2): one webtorrent client per agent that seeds verified replicas
 * and fetches new ones, behind a small interface ({@link ImageSwarm}).
 *
 * Decisions (MACHINE.md, "BitTorrent"; measured on loopback, see the report in the agent README):
 * - Every public feature off: `dht:false, lsd:false, utPex:false, natUpnp:false, natPmp:false`; uTP off
 *   (datacenter TCP is enough, and uTP doubles the connections between two hosts); torrents private and
 *   re-wrapped (torrent.ts `torrentFile`) so the only tracker they name is the cowherd tracker of the call.
 *   Web seeds on (BEP 19), given per fetch.
 * - Files are read and written by cowherd's own chunk store ({@link imageStore}), not webtorrent's default
 *   fs-chunk-store: it maps the torrent's files (`<image id>/<file>`) straight into the directory the agent
 *   chooses (`images/.<id>.partial/<file>` while fetching, `images/<id>/<file>` when seeding), opens seeded
 *   replicas O_RDONLY (fs-chunk-store opens every file read-write, even read-only replicas, and creates
 *   missing files when it closes), never follows symlinks, and reports ENOSPC as such.
 * - Seeding an existing replica: from its files (never streams; `client.seed(stream)` buffers the whole image
 *   in memory), with `skipVerify` because the caller has verified it (SHA-256) already.
 * - Fetching: into `<image dir>/images/.<id>.partial`. webtorrent re-hashes (SHA-1) whatever is there when a
 *   torrent is added, so a fetch interrupted in any way (process killed, client destroyed) resumes with only
 *   the missing pieces. When every piece is in, the torrent is closed, every file is fsynced and its
 *   whole-file SHA-256 and size are checked against the image record (SHA-1 pieces come from the metainfo,
 *   which must not be the only thing vouching for the files). A fetch from nothing computes that SHA-256
 *   while the pieces are written (running-digest.ts) and reads a file again only if it changed since; a
 *   resumed fetch reads every file. A wrong file is deleted and fetched again, at
 *   most `maxVerifyAttempts` rounds, then the fetch fails with DATA_LOSS (VERIFICATION_FAILED). Verified
 *   files become 0444, the directory 0555, and it is renamed to the final directory and seeded.
 * - A write failing with ENOSPC/EDQUOT fails the fetch with RESOURCE_EXHAUSTED (INSUFFICIENT_SPACE) and
 *   removes the partial directory; free space is also checked before starting.
 * - Limits: webtorrent's global throttles (`throttleUpload`/`throttleDownload`, -1 = off), which shape the
 *   peer wires and the web seed connections of this client. The web seed *server* is shaped separately
 *   (web-seed.ts `setUploadLimit`).
 */
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { chmod, mkdir, open, readdir, rename, stat, statfs, unlink, type FileHandle } from 'node:fs/promises';
import { networkInterfaces } from 'node:os';
import { basename, dirname, resolve } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import Piece from 'torrent-piece';
import WebTorrent, { type ChunkStore, type ChunkStoreConstructor, type ChunkStoreOptions, type Torrent, type Wire } from 'webtorrent';
import { CowherdError } from '../../common/platform/errors.js';
import type { Logger } from '../../common/platform/logger.js';
import { IMAGE_KEY, IMAGE_NAME } from '../../common/domain/resource-names.js';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { RunningDigests, type WrittenDigest } from './running-digest.js';
import { parseImageTorrent, torrentFile, type ImageTorrent } from './torrent.js';
import { fsyncDirectory, partialDirectoryOf, pathExists, removeTree, replicaFile, replicaGenerationOf } from '../image-directory/index.js';
import { PeerGuard } from './peer-guard.js';
import { superSeed } from './super-seed.js';
import { sendWants, usePieceWants } from './piece-wants.js';

/** Bandwidth limits in bytes per second; 0 = unlimited. */
export interface SwarmLimits {
  readonly uploadBytesPerSecond: number;
  readonly downloadBytesPerSecond: number;
}

/** What a replica's swarm is doing. */
export type SwarmStage = 'transferring' | 'verifying' | 'seeding';

/** A progress snapshot (TransferProgress in the proto). */
export interface SwarmProgress {
  readonly stage: SwarmStage;
  /** Transferring: bytes of verified pieces (and pieces in progress); verifying: bytes hashed; seeding: total. */
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly downloadBytesPerSecond: number;
  readonly uploadBytesPerSecond: number;
  /** Connected peers, web seeds included. */
  readonly peers: number;
  /** Bytes uploaded to peers since this torrent was added (this fetch round, or since seeding started). */
  readonly bytesUploaded: number;
  /** Seconds to bytesTotal at the current rate; undefined when unknown. */
  readonly etaSeconds: number | undefined;
}

/** One file of the image record (Image.files). */
export interface ExpectedImageFile {
  readonly path: string;
  readonly sizeBytes: number;
  /** Lowercase hex. */
  readonly sha256: string;
}

/** Options of {@link ImageSwarm.fetch}. */
export interface FetchImageOptions {
  /** A .torrent or the bare info dictionary (TorrentInfo.metainfo). */
  readonly metainfo: Uint8Array;
  /** TorrentInfo.info_hash; the metainfo must hash to it. */
  readonly infoHash?: string;
  /** The tracker's announce URL; default the swarm's. */
  readonly announce?: string;
  /** The final replica directory, `<image dir>/images/<id>`; the partial one is its sibling `.<id>.partial`. */
  readonly directory: string;
  /** BEP 19 web seed URLs (the origin's web seed root). */
  readonly webSeedUrls?: readonly string[];
  /** The image record's files, in torrent order. */
  readonly files: readonly ExpectedImageFile[];
  /** Called at most every `progressIntervalMs` (default 1 s), and at each stage's start and end. */
  readonly onProgress?: (progress: SwarmProgress) => void;
  /** Rounds of download + whole-file verification before VERIFICATION_FAILED. Default 3. */
  readonly maxVerifyAttempts?: number;
  /** Fail with TRANSFER_FAILED (partial kept) when no byte arrives for this long. Default 10 minutes. */
  readonly stallTimeoutMs?: number;
  /** Web seeds join when no peer has sent a block for this long; 0 = from the start. Default 5 s. */
  readonly webSeedDelayMs?: number;
  /** Test seam: runs after every piece is in and before the whole-file verification. */
  readonly beforeVerify?: (partialDirectory: string) => Promise<void> | void;
}

/** What a fetch did. */
export interface FetchImageResult {
  readonly directory: string;
  readonly bytesTotal: number;
  /** Bytes that were already in the partial directory (valid pieces) when the fetch started. */
  readonly bytesPresentAtStart: number;
  /** Bytes this fetch wrote to disk (all rounds). */
  readonly bytesWritten: number;
  /** Bytes received from peers and web seeds, protocol overhead included (all rounds). */
  readonly bytesReceived: number;
  /** Download + verification rounds. */
  readonly attempts: number;
  /** Pieces that failed SHA-1 (sent corrupt by a peer or web seed) and were fetched again. */
  readonly piecesFailed: number;
  /** Peers banned for sending corrupt pieces (peer-guard.ts). */
  readonly peersBanned: number;
  /** Files whose SHA-256 was computed while they were written rather than read again (running-digest.ts). */
  readonly filesHashedWhileWritten: number;
  readonly durationMs: number;
}

/** Options of {@link ImageSwarm.create}. */
export interface ImageSwarmOptions {
  /** The cowherd tracker's announce URL, unless each call gives one. */
  readonly announce?: string;
  /** BitTorrent listening port; 0 = any. Default 0. */
  readonly torrentPort?: number;
  readonly limits?: SwarmLimits;
  /** Default 1000 ms. */
  readonly progressIntervalMs?: number;
  /** Connections per client; default 55 (webtorrent's). */
  readonly maxConnections?: number;
  readonly log?: Logger;
}

interface Entry {
  readonly image: string;
  stage: SwarmStage;
  torrent: Torrent | undefined;
  bytesTotal: number;
  bytesDone: number;
  /** Set while a fetch runs: stops it. */
  cancel: ((error: Error) => void) | undefined;
  /** Settles when the running fetch has stopped touching files. */
  running: Promise<unknown> | undefined;
}

const DEFAULT_MAX_VERIFY_ATTEMPTS = 3;
const DEFAULT_STALL_TIMEOUT_MS = 10 * 60_000;
const DEFAULT_WEB_SEED_DELAY_MS = 5_000;
/** Bytes written to a file between background fdatasyncs while fetching. */
const FLUSH_EVERY_BYTES = 32 * 1024 * 1024;
/**
 * webtorrent's piece cache in front of the chunk store: off. It keeps the last 20 whole pieces it read, so that
 * it serves a peer's requests for one piece with one read; but every cached piece outlives V8's young
 * generation, and only a full GC frees it. On bench:distribution (1 Gbit/s, 2 receivers, 512 MiB) the origin's
 * CPU halved without it (2.4 -> 1.2 CPU-s) and the receivers' fell by a sixth: a block read from the page cache
 * costs less than the garbage collection of a cached piece.
 */
const STORE_CACHE_SLOTS = 0;

/** One webtorrent client seeding and fetching image replicas. */
export class ImageSwarm {
  private readonly entries = new Map<string, Entry>();
  private limits: SwarmLimits = { uploadBytesPerSecond: 0, downloadBytesPerSecond: 0 };
  private readonly log: Logger | undefined;
  private readonly progressIntervalMs: number;
  private destroyed = false;
  private readonly guard: PeerGuard;

  private constructor(
    private readonly client: WebTorrent,
    private readonly options: ImageSwarmOptions,
  ) {
    this.log = options.log;
    this.progressIntervalMs = options.progressIntervalMs ?? 1000;
    this.guard = new PeerGuard(options.log, () => client.peerId);
    // Torrent errors without a torrent listener end up here; never let them crash the agent.
    client.on('error', (error: Error) => this.log?.error({ err: error }, 'webtorrent client error'));
    if (options.limits) this.setLimits(options.limits);
  }

  /** Starts the client and waits until it listens. */
  static async create(options: ImageSwarmOptions = {}): Promise<ImageSwarm> {
    const client = new WebTorrent({
      dht: false,
      lsd: false,
      utPex: false,
      natUpnp: false,
      natPmp: false,
      utp: false,
      // No BitTorrent protocol encryption (MSE/PE): it only obfuscates (no authentication, plaintext is
      // chosen after a Diffie-Hellman exchange anyway) and costs a DH and two round trips per connection.
      secure: 0,
      webSeeds: true,
      tracker: {},
      torrentPort: options.torrentPort ?? 0,
      ...(options.maxConnections === undefined ? {} : { maxConns: options.maxConnections }),
    });
    if (!client.listening) {
      await new Promise<void>((resolve, reject) => {
        client.once('listening', () => resolve());
        client.once('error', reject);
      });
    }
    return new ImageSwarm(client, options);
  }

  /** The BitTorrent port this client listens on. */
  get port(): number {
    return this.client.address()?.port ?? 0;
  }

  /** Applies new limits to every transfer at once. */
  setLimits(limits: SwarmLimits): void {
    if (!(limits.uploadBytesPerSecond >= 0) || !(limits.downloadBytesPerSecond >= 0)) throw new Error('transfer limits must not be negative');
    this.limits = { ...limits };
    this.client.throttleUpload(limits.uploadBytesPerSecond > 0 ? limits.uploadBytesPerSecond : -1);
    this.client.throttleDownload(limits.downloadBytesPerSecond > 0 ? limits.downloadBytesPerSecond : -1);
  }

  getLimits(): SwarmLimits {
    return this.limits;
  }

  /** A snapshot of the image's transfer or seeding; undefined when the swarm does not know the image. */
  progress(image: string): SwarmProgress | undefined {
    const entry = this.entries.get(image);
    return entry ? this.snapshot(entry) : undefined;
  }

  /** The images this swarm is seeding or fetching. */
  images(): string[] {
    return [...this.entries.keys()].sort();
  }

  /**
   * Seeds a complete, verified replica from its files (opened read-only; pieces are not re-checked). The
   * directory may be anywhere; the metainfo's name must be the image id.
   */
  async seed(
    image: string,
    directory: string,
    metainfo: Uint8Array,
    options: { announce?: string; infoHash?: string; superSeed?: boolean } = {},
  ): Promise<void> {
    this.checkUsable(image);
    const torrent = parseOrInvalid(metainfo, image, options.infoHash);
    const announce = this.announceUrl(options.announce);
    const entry = this.newEntry(image, torrent.totalBytes);
    try {
      await this.startSeeding(entry, torrent, resolve(directory), announce, options.superSeed === true);
    } catch (error) {
      this.entries.delete(image);
      throw error;
    }
  }

  /**
   * Fetches (or resumes, or repairs) the replica into `options.directory` and seeds it. Resolves once the
   * replica is verified, in place and seeding. A final directory that exists already is verified: if every
   * file is right it is just seeded, otherwise it is moved back to the partial directory, its wrong files
   * deleted, and fetched like a partial one.
   */
  async fetch(image: string, options: FetchImageOptions): Promise<FetchImageResult> {
    this.checkUsable(image);
    const torrent = parseOrInvalid(options.metainfo, image, options.infoHash);
    checkExpectedFiles(torrent, options.files);
    const announce = this.announceUrl(options.announce);
    const finalDirectory = resolve(options.directory);
    const directoryName = basename(finalDirectory);
    if (replicaGenerationOf(image, directoryName) === undefined) {
      throw CowherdError.invalidArgument(
        'directory',
        `must end in the image id ${image} (or ${image}.generation-<n>)`,
        ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY,
      );
    }
    const imagesRoot = dirname(finalDirectory);
    const partial = partialDirectoryOf(finalDirectory);
    const entry = this.newEntry(image, torrent.totalBytes);
    const started = performance.now();
    const totals = { present: -1, written: 0, received: 0, attempts: 0, piecesFailed: 0, peersBanned: 0, hashedWhileWritten: 0 };
    const report = (): void => options.onProgress?.(this.snapshot(entry));
    let cancelled: Error | undefined;
    entry.cancel = (error) => {
      cancelled ??= error;
    };
    const run = (async (): Promise<FetchImageResult> => {
      try {
        if (await pathExists(finalDirectory)) {
          entry.stage = 'verifying';
          const bad = await verifyImageFiles(finalDirectory, options.files, { onBytes: (done) => ((entry.bytesDone = done), undefined) });
          if (bad.length === 0) {
            await this.startSeeding(entry, torrent, finalDirectory, announce);
            report();
            return {
              directory: finalDirectory,
              bytesTotal: torrent.totalBytes,
              bytesPresentAtStart: torrent.totalBytes,
              bytesWritten: 0,
              bytesReceived: 0,
              attempts: 0,
              piecesFailed: 0,
              peersBanned: 0,
              filesHashedWhileWritten: 0,
              durationMs: performance.now() - started,
            };
          }
          // The caller (image-transfers.ts) repairs in place only a replica that no domain uses as a base. The
          // files stay: webtorrent re-hashes every piece and fetches only the bad ones (a few damaged bytes
          // cost one piece, not the file).
          this.log?.warn({ image, files: bad }, 'replica has wrong files: moving it back to fetch its bad pieces again');
          await removeTree(partial);
          await chmod(finalDirectory, 0o755);
          await rename(finalDirectory, partial);
          await makeWritable(partial);
        }
        await this.checkSpace(imagesRoot, partial, torrent);
        await mkdir(partial, { recursive: true, mode: 0o755 });
        const maxAttempts = Math.max(1, options.maxVerifyAttempts ?? DEFAULT_MAX_VERIFY_ATTEMPTS);
        for (;;) {
          if (cancelled) throw cancelled;
          totals.attempts += 1;
          entry.stage = 'transferring';
          const empty = await hasNoData(partial, torrent);
          const round = await this.download(entry, torrent, partial, announce, options, report, () => cancelled, empty);
          if (totals.present < 0) totals.present = round.present;
          totals.written += round.written;
          totals.received += round.received;
          totals.piecesFailed += round.piecesFailed;
          totals.peersBanned += round.peersBanned;
          await options.beforeVerify?.(partial);
          if (cancelled) throw cancelled;
          entry.stage = 'verifying';
          entry.bytesDone = 0;
          this.log?.info({ image, attempt: totals.attempts }, 'every piece is in: verifying the files');
          report();
          let lastReport = performance.now();
          const bad = await verifyImageFiles(partial, options.files, {
            sync: true,
            ...(round.digests ? { written: round.digests } : {}),
            onHashedWhileWritten: () => (totals.hashedWhileWritten += 1),
            onBytes: (done) => {
              entry.bytesDone = done;
              if (performance.now() - lastReport >= this.progressIntervalMs) {
                lastReport = performance.now();
                report();
              }
            },
          });
          if (bad.length === 0) break;
          // Every piece passed SHA-1 and the file still fails SHA-256: only deleting it makes webtorrent fetch it again.
          const kept: string[] = [];
          for (const file of bad)
            await unlink(replicaFile(partial, file)).catch((error: NodeJS.ErrnoException) => (error.code === 'ENOENT' ? undefined : kept.push(file)));
          if (kept.length > 0)
            this.log?.error(
              { image, files: bad, notDeleted: kept, attempt: totals.attempts },
              'files failed whole-file SHA-256 verification and could not all be deleted; they stay',
            );
          else
            this.log?.warn({ image, files: bad, attempt: totals.attempts }, 'files failed whole-file SHA-256 verification; deleted them to fetch them again');
          if (totals.attempts >= maxAttempts) {
            throw new CowherdError(
              GrpcStatus.DATA_LOSS,
              `${IMAGE_NAME.format({ image })}: ${bad.join(', ')} failed SHA-256 verification ${totals.attempts} times`,
              {
                reason: ErrorReason.ERROR_REASON_VERIFICATION_FAILED,
                metadata: { image: IMAGE_NAME.format({ image }), files: bad.join(',') },
              },
            );
          }
        }
        entry.bytesDone = torrent.totalBytes;
        report();
        for (const file of options.files) await chmod(replicaFile(partial, file.path), 0o444);
        await chmod(partial, 0o555);
        if (cancelled) throw cancelled;
        await rename(partial, finalDirectory);
        await fsyncDirectory(imagesRoot);
        await this.startSeeding(entry, torrent, finalDirectory, announce);
        report();
        return {
          directory: finalDirectory,
          bytesTotal: torrent.totalBytes,
          bytesPresentAtStart: Math.max(0, totals.present),
          bytesWritten: totals.written,
          bytesReceived: totals.received,
          attempts: totals.attempts,
          piecesFailed: totals.piecesFailed,
          peersBanned: totals.peersBanned,
          filesHashedWhileWritten: totals.hashedWhileWritten,
          durationMs: performance.now() - started,
        };
      } catch (error) {
        if (this.entries.get(image) === entry) this.entries.delete(image);
        if (isNoSpace(error)) {
          // Say what happened to the partial files: an operator frees space by hand when they could not go.
          const removal = await removeTree(partial).then(
            () => undefined,
            (removeError: unknown) => removeError as Error,
          );
          if (removal) this.log?.error({ image, partial, err: removal }, 'no space left, and the partial replica could not be removed: it stays');
          const outcome = removal ? `the partial replica at ${partial} could not be removed (${removal.message}) and stays` : 'removed the partial replica';
          throw new CowherdError(GrpcStatus.RESOURCE_EXHAUSTED, `no space left in ${imagesRoot} while fetching ${IMAGE_NAME.format({ image })}; ${outcome}`, {
            reason: ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE,
            metadata: {
              image: IMAGE_NAME.format({ image }),
              requiredBytes: String(torrent.totalBytes),
              partialRemoved: String(!removal),
              ...(removal ? { partial } : {}),
            },
            cause: error,
          });
        }
        throw error;
      } finally {
        entry.cancel = undefined;
      }
    })();
    entry.running = run.catch(() => undefined);
    return run;
  }

  /** Stops seeding or fetching the image (a fetch rejects with CANCELLED); files are left to the caller. */
  async remove(image: string): Promise<void> {
    const entry = this.entries.get(image);
    if (!entry) return;
    this.entries.delete(image);
    entry.cancel?.(cancelledError(image));
    await destroyTorrent(entry.torrent);
    await entry.running;
  }

  /**
   * Resolves once bytes [offset, offset + length) of `file` (a file of `image`'s torrent, e.g. `vda.qcow2`) are
   * written and their pieces' SHA-1 verified on this host: at once when they are, or when the replica is
   * complete (verifying or seeding). While a fetch runs, exactly those pieces get a webtorrent selection of
   * `priority` (a guest's read 3, a profile's prefetch 2, the rest of the image 0: requested in that order) and
   * are marked critical, and the rest keep arriving as before.
   * Rejects with NOT_FOUND when `image` is neither fetched nor seeded here (also when its fetch ended without
   * the range: it failed or was removed), INVALID_ARGUMENT for a file or range the torrent does not hold, and
   * with `signal`'s reason when it aborts. Streaming clones read their base through this (streaming/).
   */
  async whenAvailable(
    image: string,
    file: string,
    offset: number,
    length: number,
    signal?: AbortSignal,
    priority: 'read' | 'prefetch' = 'read',
  ): Promise<void> {
    let selected: { torrent: Torrent; first: number; last: number } | undefined;
    try {
      await this.waitForRange(image, file, offset, length, signal, priority, (selection) => {
        selected = selection;
      });
    } finally {
      // A range that arrived was dropped by webtorrent already; one given up on is dropped here.
      if (selected && !selected.torrent.destroyed) selected.torrent._deselect(selected.first, selected.last, true);
      if (selected) this.releaseBackground(selected.torrent);
    }
  }

  /**
   * How many of the image's connected peers (web seeds not counted) announced each of `pieces`; undefined while
   * no fetch of it runs here with its metadata. A super-seeding origin announces only what it revealed, so the
   * counts are mostly the other receivers' pieces. Streaming hosts ask for the rarest of what they want first, so
   * that hosts wanting the same pieces at the same moment take different ones from the origin and trade them.
   */
  pieceHolders(image: string, pieces: readonly number[]): number[] | undefined {
    const entry = this.entries.get(image);
    const torrent = entry?.torrent;
    if (!entry || entry.stage !== 'transferring' || !torrent || torrent.destroyed || !torrent.ready) return undefined;
    const peers = torrent.wires.filter((wire) => wire.type !== 'webSeed');
    return pieces.map((piece) => peers.reduce((count, wire) => count + (wire.peerPieces.get(piece) ? 1 : 0), 0));
  }

  /** Torrents whose background fill is held while ranges are waited for, with how many wait. */
  private readonly urgent = new WeakMap<Torrent, number>();

  /**
   * Holds the rest of the image back while a range is waited for: webtorrent keeps up to about a second of block
   * requests queued on each peer, and a piece selected ahead of the rest still waits behind the background blocks
   * already queued (measured in bench:boot: ~0.5 s per piece for a guest that reads one piece at a time). Without
   * the background selection only waited-for pieces are requested; the fill resumes when nothing waits.
   */
  private holdBackground(torrent: Torrent): void {
    const count = this.urgent.get(torrent) ?? 0;
    this.urgent.set(torrent, count + 1);
    if (count === 0 && !torrent.destroyed && torrent.pieces.length > 0) torrent.deselect(0, torrent.pieces.length - 1);
  }

  private releaseBackground(torrent: Torrent): void {
    const count = (this.urgent.get(torrent) ?? 1) - 1;
    if (count > 0) {
      this.urgent.set(torrent, count);
      return;
    }
    this.urgent.delete(torrent);
    if (!torrent.destroyed && torrent.pieces.length > 0) torrent.select(0, torrent.pieces.length - 1, 0);
  }

  private async waitForRange(
    image: string,
    file: string,
    offset: number,
    length: number,
    signal: AbortSignal | undefined,
    priority: 'read' | 'prefetch',
    onSelected: (selection: { torrent: Torrent; first: number; last: number }) => void,
  ): Promise<void> {
    let selectedOn: Torrent | undefined;
    let askedAt = 0;
    for (;;) {
      signal?.throwIfAborted();
      const entry = this.entries.get(image);
      if (!entry) throw CowherdError.notFound(IMAGE_NAME.format({ image }));
      const torrent = entry.torrent;
      const ready = torrent !== undefined && !torrent.destroyed && torrent.ready;
      const target = ready ? torrent.files.find((candidate) => candidate.path.slice(candidate.path.indexOf('/') + 1) === file) : undefined;
      if (ready) {
        if (!target) throw CowherdError.invalidArgument('file', `is not a file of ${IMAGE_NAME.format({ image })}`);
        if (offset < 0 || length <= 0 || offset + length > target.length)
          throw CowherdError.invalidArgument('length', `is outside ${file} (${target.length} bytes)`);
      }
      if (entry.stage !== 'transferring') return;
      if (ready && target && torrent.bitfield) {
        const first = Math.floor((target.offset + offset) / torrent.pieceLength);
        const last = Math.floor((target.offset + offset + length - 1) / torrent.pieceLength);
        const missing = (): number[] => {
          const pieces: number[] = [];
          for (let index = first; index <= last; index += 1) if (!torrent.bitfield!.get(index)) pieces.push(index);
          return pieces;
        };
        const wanted = missing();
        if (wanted.length === 0) return;
        // Ahead of every other piece: a selection of higher priority (webtorrent requests its pieces first), and
        // critical (their blocks may be taken from a faster peer).
        if (selectedOn !== torrent) {
          selectedOn = torrent;
          torrent._select(first, last, SELECTION_PRIORITY[priority], undefined, true);
          this.holdBackground(torrent);
          onSelected({ torrent, first, last });
        }
        torrent.critical(first, last);
        // A super-seeding origin hides what it holds: ask every peer for the missing pieces (piece-wants.ts), again
        // each second while they are missing (a peer may have joined since).
        if (performance.now() - askedAt >= 1000) {
          askedAt = performance.now();
          for (const wire of torrent.wires) if (wire.type !== 'webSeed') sendWants(wire, wanted);
        }
        // Woken by each verified piece, by the torrent's end, and every 250 ms (a new round's torrent, a stage change).
        await new Promise<void>((resolve) => {
          const done = (): void => {
            clearTimeout(timer);
            torrent.off('verified', onVerified);
            torrent.off('close', done);
            torrent.off('done', done);
            signal?.removeEventListener('abort', done);
            resolve();
          };
          const onVerified = (index: number): void => {
            if (index >= first && index <= last && missing().length === 0) done();
          };
          const timer = setTimeout(done, 250);
          torrent.on('verified', onVerified);
          torrent.once('close', done);
          torrent.once('done', done);
          signal?.addEventListener('abort', done, { once: true });
        });
        continue;
      }
      // No torrent yet (a fetch starting, or between rounds): look again shortly.
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  /** Stops everything and closes the client. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    await Promise.all([...this.entries.keys()].map((image) => this.remove(image)));
    await new Promise<void>((resolve) => this.client.destroy(() => resolve()));
  }

  // -------------------------------------------------------------------------------------------------------

  private checkUsable(image: string): void {
    if (this.destroyed) throw new CowherdError(GrpcStatus.UNAVAILABLE, 'the swarm is shut down', { reason: ErrorReason.ERROR_REASON_TRANSFER_FAILED });
    if (!IMAGE_KEY.test(image)) throw CowherdError.invalidArgument('image', 'is not an image storage key');
    if (this.entries.has(image)) {
      throw CowherdError.failedPrecondition(
        `${IMAGE_NAME.format({ image })} is already ${this.entries.get(image)!.stage} on this host`,
        ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        { image: IMAGE_NAME.format({ image }) },
      );
    }
  }

  private announceUrl(announce: string | undefined): string {
    const url = announce ?? this.options.announce;
    if (!url) throw CowherdError.invalidArgument('tracker_announce_url', 'is required');
    return url;
  }

  private newEntry(image: string, bytesTotal: number): Entry {
    const entry: Entry = { image, stage: 'transferring', torrent: undefined, bytesTotal, bytesDone: 0, cancel: undefined, running: undefined };
    this.entries.set(image, entry);
    return entry;
  }

  private snapshot(entry: Entry): SwarmProgress {
    const torrent = entry.torrent && !entry.torrent.destroyed ? entry.torrent : undefined;
    const downloadRate = entry.stage === 'transferring' && torrent ? Math.round(torrent.downloadSpeed) : 0;
    const bytesDone =
      entry.stage === 'transferring' && torrent?.ready
        ? Math.min(torrent.downloaded, entry.bytesTotal)
        : entry.stage === 'seeding'
          ? entry.bytesTotal
          : entry.bytesDone;
    if (entry.stage === 'transferring') entry.bytesDone = bytesDone;
    const remaining = entry.bytesTotal - bytesDone;
    return {
      stage: entry.stage,
      bytesDone,
      bytesTotal: entry.bytesTotal,
      downloadBytesPerSecond: downloadRate,
      uploadBytesPerSecond: torrent ? Math.round(torrent.uploadSpeed) : 0,
      peers: torrent?.numPeers ?? 0,
      bytesUploaded: torrent?.uploaded ?? 0,
      etaSeconds: remaining === 0 ? 0 : entry.stage === 'transferring' && downloadRate > 0 ? Math.ceil(remaining / downloadRate) : undefined,
    };
  }

  private async startSeeding(entry: Entry, torrent: ImageTorrent, directory: string, announce: string, origin = false): Promise<void> {
    // remove() or destroy() ran meanwhile: do not leave an orphan torrent behind.
    if (this.destroyed || this.entries.get(entry.image) !== entry) throw cancelledError(entry.image);
    const store = imageStore(directory, torrent, false, { written: 0 });
    const seeding = this.client.add(torrentFile(torrent.infoDictionary, announce), {
      store,
      skipVerify: true,
      private: true,
      path: directory,
      storeCacheSlots: STORE_CACHE_SLOTS,
    });
    skipOwnAddress(seeding, this.client.torrentPort);
    entry.torrent = seeding;
    // The origin reveals pieces one receiver at a time (super-seed.ts), so it sends each about once.
    if (origin)
      superSeed(
        seeding,
        { pieceCount: torrent.pieceCount, pieceLength: torrent.pieceLengthBytes, totalBytes: torrent.totalBytes },
        this.log ? { log: this.log } : {},
      );
    entry.stage = 'seeding';
    entry.bytesDone = torrent.totalBytes;
    seeding.on('warning', (warning: Error) => {
      this.log?.debug({ image: entry.image, err: warning }, 'seeding warning');
      retryAnnounceSoon(seeding);
    });
    await new Promise<void>((resolveReady, reject) => {
      seeding.once('ready', () => resolveReady());
      seeding.once('error', reject);
      seeding.once('close', () => reject(cancelledError(entry.image)));
    });
    seeding.on('error', (error: Error) => this.log?.error({ image: entry.image, err: error }, 'seeding failed'));
    this.log?.info({ image: entry.image, infoHash: torrent.infoHash, directory }, 'seeding');
  }

  /** One round: add the torrent on the partial directory and wait until every piece is on disk. */
  private download(
    entry: Entry,
    torrent: ImageTorrent,
    partial: string,
    announce: string,
    options: FetchImageOptions,
    report: () => void,
    cancelled: () => Error | undefined,
    empty: boolean,
  ): Promise<{ present: number; written: number; received: number; piecesFailed: number; peersBanned: number; digests: StoreCounters['digests'] }> {
    const counters: StoreCounters = { written: 0 };
    // A fetch from nothing hashes each file as it is written (running-digest.ts); a resumed one reads it all.
    const store = imageStore(partial, torrent, true, counters, { runningDigests: empty });
    const added = this.client.add(torrentFile(torrent.infoDictionary, announce), {
      store,
      storeCacheSlots: STORE_CACHE_SLOTS,
      private: true,
      path: partial,
      // Nothing on disk yet (a fresh fetch): an empty startup bitfield tells webtorrent there is nothing to
      // re-hash. It would otherwise try to read every piece before it is ready (~0.9 s for 256 pieces on the
      // bench) and only then announce. (skipVerify would be wrong: it takes every piece as present.)
      ...(empty ? { bitfield: new Uint8Array(Math.ceil(torrent.pieceCount / 8)) } : {}),
    });
    skipOwnAddress(added, this.client.torrentPort);
    // webtorrent asks a one-file torrent's web seed for the URL itself, not <url>/<name>/<file> (BEP 19).
    const webSeeds = (options.webSeedUrls ?? []).map((url) =>
      torrent.files.length === 1 ? `${url}${url.endsWith('/') ? '' : '/'}${torrent.name}/${torrent.files[0]!.path}` : url,
    );
    entry.torrent = added;
    // Every wire speaks cowherd_want, so that a streamed range can be asked of a super-seeding origin.
    added.on('wire', (wire: Wire) => usePieceWants(wire));
    const guarded = this.guard.watch(added, entry.image);
    // Web seeds are the fallback, not a peer like the others: the origin serves them from the same uplink
    // it super-seeds from, and a receiver that takes pieces over HTTP takes them from the origin. They join
    // when no peer has sent a block for `webSeedDelayMs` (no peers, the origin gone, a liar banned).
    let lastPeerBlock = performance.now();
    added.on('wire', (wire: { type: string; on(event: 'download', listener: () => void): void }) => {
      if (wire.type !== 'webSeed') wire.on('download', () => (lastPeerBlock = performance.now()));
    });
    let webSeedsAdded = webSeeds.length === 0;
    const webSeedDelayMs = options.webSeedDelayMs ?? DEFAULT_WEB_SEED_DELAY_MS;
    const addWebSeeds = (): void => {
      if (webSeedsAdded || added.destroyed || added.done) return;
      webSeedsAdded = true;
      this.log?.info({ image: entry.image, webSeeds: webSeeds.length }, 'no peer is sending: adding the web seeds');
      for (const url of webSeeds) added.addWebSeed(url);
    };
    if (webSeedDelayMs === 0) addWebSeeds();
    const stallTimeoutMs = options.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
    return new Promise((resolveRound, rejectRound) => {
      let present = 0;
      let lastBytes = -1;
      let lastChange = performance.now();
      let settled = false;
      const timer = setInterval(
        () => {
          const stop = cancelled();
          if (stop) return finish(stop);
          if (!added.ready) return;
          if (!webSeedsAdded && performance.now() - lastPeerBlock >= webSeedDelayMs) addWebSeeds();
          const received = added.received;
          if (received !== lastBytes) {
            lastBytes = received;
            lastChange = performance.now();
          } else if (performance.now() - lastChange > stallTimeoutMs) {
            return finish(
              new CowherdError(
                GrpcStatus.UNAVAILABLE,
                `${IMAGE_NAME.format({ image: entry.image })}: no data from any peer or web seed for ${Math.round(stallTimeoutMs / 1000)} s (${added.numPeers} connected); the partial replica is kept`,
                {
                  reason: ErrorReason.ERROR_REASON_TRANSFER_FAILED,
                  metadata: { image: IMAGE_NAME.format({ image: entry.image }) },
                },
              ),
            );
          }
          report();
        },
        Math.min(this.progressIntervalMs, 1000),
      );
      timer.unref();
      const finish = (error?: Error): void => {
        if (settled) return;
        settled = true;
        clearInterval(timer);
        const received = added.received ?? 0;
        void destroyTorrent(added).then(() => {
          if (counters.error) return rejectRound(counters.error);
          if (error) return rejectRound(error);
          report();
          resolveRound({
            present,
            written: counters.written,
            received,
            piecesFailed: guarded.piecesFailed,
            peersBanned: guarded.peersBanned,
            digests: counters.digests,
          });
        });
      };
      added.on('warning', (warning: Error) => {
        this.log?.debug({ image: entry.image, err: warning }, 'transfer warning');
        retryAnnounceSoon(added);
      });
      added.once('error', (error: Error) => finish(error));
      added.once('close', () => finish(cancelled() ?? cancelledError(entry.image)));
      added.once('ready', () => {
        present = added.downloaded;
        this.log?.info({ image: entry.image, present, total: torrent.totalBytes }, present > 0 ? 'resuming transfer' : 'starting transfer');
        report();
        if (added.done) finish();
      });
      added.once('done', () => finish());
    });
  }

  private async checkSpace(imagesRoot: string, partial: string, torrent: ImageTorrent): Promise<void> {
    let have = 0;
    for (const file of torrent.files) {
      const size = await stat(replicaFile(partial, file.path)).then(
        (info) => Math.min(info.size, file.length),
        () => 0,
      );
      have += size;
    }
    const space = await statfs(imagesRoot);
    const free = space.bavail * space.bsize;
    const needed = torrent.totalBytes - have;
    if (free < needed) {
      throw new CowherdError(
        GrpcStatus.RESOURCE_EXHAUSTED,
        `${IMAGE_NAME.format({ image: torrent.name })} needs ${needed} more bytes; ${imagesRoot} has ${free} free`,
        {
          reason: ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE,
          metadata: { requiredBytes: String(needed), freeBytes: String(free) },
        },
      );
    }
  }
}

/**
 * The tracker hands every announcer the whole swarm, itself included (bittorrent-tracker leaves out only a
 * WebRTC peer's own entry). Dialling that entry makes two wires to ourselves that cost a handshake and every
 * `have` we send; drop it before it is dialled. (peer-guard.ts also closes a wire whose peer id is ours.)
 */
function skipOwnAddress(torrent: Torrent, ownPort: number): void {
  const own = new Set(
    Object.values(networkInterfaces()).flatMap((addresses) =>
      (addresses ?? []).map((address) => `${address.family === 'IPv6' ? `[${address.address}]` : address.address}:${ownPort}`),
    ),
  );
  const addPeer = torrent.addPeer.bind(torrent);
  torrent.addPeer = (peer: string, ...rest: unknown[]) =>
    typeof peer === 'string' && own.has(peer) ? false : (addPeer as (...args: unknown[]) => boolean)(peer, ...rest);
}

/** True when none of the torrent's files in `directory` holds a byte (a fetch that starts from nothing). */
async function hasNoData(directory: string, torrent: ImageTorrent): Promise<boolean> {
  for (const file of torrent.files) {
    const size = await stat(replicaFile(directory, file.path)).then(
      (info) => info.size,
      () => 0,
    );
    if (size > 0) return false;
  }
  return true;
}

/** The first retry of a failed tracker announce; each further one waits twice as long, up to 30 s. */
export const ANNOUNCE_RETRY_MS = 250;

/** Selection priorities of whenAvailable: a guest's read ahead of a profile's prefetch, both ahead of the rest (0). */
const SELECTION_PRIORITY = { read: 3, prefetch: 2 } as const;
const announceRetries = new WeakMap<Torrent, number>();

/**
 * After a warning (a failed announce among them), announce again soon instead of bittorrent-tracker's 30
 * minutes: 0.25 s, 0.5 s, 1 s ... 30 s. The origin announces before distribution has registered the info-hash
 * (its first announce is refused), and must be in the swarm within moments of the registration: receivers
 * that announce before it do not know it until it announces and dials them; a tracker may also restart. A successful announce sets the tracker's
 * own interval again.
 */
function retryAnnounceSoon(torrent: Torrent): void {
  if (torrent.destroyed) return;
  const retries = announceRetries.get(torrent) ?? 0;
  announceRetries.set(torrent, retries + 1);
  torrent.discovery?.tracker?.setInterval(Math.min(30_000, ANNOUNCE_RETRY_MS * 2 ** retries));
}

// ---------------------------------------------------------------------------------------------------------
// Whole-file verification

/**
 * Checks every file's size and SHA-256 (streamed, node:crypto; with `sync`, fsynced after reading) and returns
 * the names of the files that are missing or wrong. `written` (by file index, from the chunk store's running
 * digests) stands in for reading a file whose size and ctime are still those of the end of the writes.
 */
export async function verifyImageFiles(
  directory: string,
  files: readonly ExpectedImageFile[],
  options: {
    sync?: boolean;
    onBytes?: (bytesDone: number) => void;
    written?: ReadonlyArray<WrittenDigest | undefined>;
    /** Called for each file checked through its `written` digest rather than read. */
    onHashedWhileWritten?: (path: string) => void;
  } = {},
): Promise<string[]> {
  const bad: string[] = [];
  let done = 0;
  const buffer = Buffer.allocUnsafe(1024 * 1024);
  for (const [fileIndex, file] of files.entries()) {
    let handle: FileHandle;
    try {
      handle = await open(replicaFile(directory, file.path), fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
    } catch {
      if (file.sizeBytes === 0 && options.sync) {
        // A zero-length file never receives a piece: create it.
        try {
          const created = await open(replicaFile(directory, file.path), fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_NOFOLLOW, 0o644);
          await created.sync();
          await created.close();
        } catch {
          bad.push(file.path);
          continue;
        }
        if (file.sha256 !== createHash('sha256').digest('hex')) bad.push(file.path);
        continue;
      }
      bad.push(file.path);
      continue;
    }
    try {
      const info = await handle.stat({ bigint: true });
      if (!info.isFile() || info.size !== BigInt(file.sizeBytes)) {
        bad.push(file.path);
        continue;
      }
      const written = options.written?.[fileIndex];
      if (written && written.sizeBytes === file.sizeBytes && written.ctimeNs === info.ctimeNs) {
        // Hashed while it was written, and not changed since.
        if (options.sync) await handle.sync();
        options.onHashedWhileWritten?.(file.path);
        done += file.sizeBytes;
        options.onBytes?.(done);
        if (written.sha256 !== file.sha256.toLowerCase()) bad.push(file.path);
        continue;
      }
      const size = Number(info.size);
      const hash = createHash('sha256');
      let position = 0;
      while (position < size) {
        const { bytesRead } = await handle.read(buffer, 0, Math.min(buffer.length, size - position), position);
        if (bytesRead === 0) break;
        hash.update(buffer.subarray(0, bytesRead));
        position += bytesRead;
        done += bytesRead;
        options.onBytes?.(done);
      }
      if (options.sync) await handle.sync();
      if (position !== file.sizeBytes || hash.digest('hex') !== file.sha256.toLowerCase()) bad.push(file.path);
    } finally {
      await handle.close();
    }
  }
  return bad;
}

// ---------------------------------------------------------------------------------------------------------
// Chunk store

interface StoreCounters {
  written: number;
  error?: Error;
  /** With `runningDigests`: each file's SHA-256 as written, set when the store closes (running-digest.ts). */
  digests?: Array<WrittenDigest | undefined>;
}

/**
 * A webtorrent chunk store over the image's files in `directory` (`<directory>/<file name>`, by position in
 * the verified torrent, whatever path webtorrent computes). Read-only stores open O_RDONLY and refuse puts.
 */
export function imageStore(
  directory: string,
  torrent: ImageTorrent,
  writable: boolean,
  counters: StoreCounters,
  options: { runningDigests?: boolean } = {},
): ChunkStoreConstructor {
  const files = (() => {
    let offset = 0;
    return torrent.files.map((file) => {
      const entry = { path: replicaFile(directory, file.path), length: file.length, offset };
      offset += file.length;
      return entry;
    });
  })();
  const totalLength = torrent.totalBytes;
  const flags = writable ? fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_NOFOLLOW : fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW;

  return class ImageChunkStore implements ChunkStore {
    readonly chunkLength: number;
    private readonly handles = new Map<number, Promise<FileHandle>>();
    private closed = false;
    private readonly unsynced = new Map<number, number>();
    private readonly flushing = new Set<number>();
    private readonly digests: RunningDigests | undefined;

    constructor(chunkLength: number, _options: ChunkStoreOptions) {
      this.chunkLength = chunkLength;
      this.digests =
        writable && options.runningDigests
          ? new RunningDigests(files, chunkLength, totalLength, {
              read: (index, position, buffer) => this.io(files[index]!.offset + position, buffer, false),
              ctimeNs: async (index) => (await (await this.handle(index)).stat({ bigint: true })).ctimeNs,
            })
          : undefined;
    }

    put(index: number, buffer: Uint8Array, callback: (error: Error | null) => void): void {
      if (!writable) return later(callback, new Error('the replica is read-only'));
      if (this.closed) return later(callback, new Error('the store is closed'));
      const start = index * this.chunkLength;
      const expected = Math.min(this.chunkLength, totalLength - start);
      if (buffer.length !== expected) return later(callback, new Error(`chunk ${index} has ${buffer.length} bytes, not ${expected}`));
      const bytes = Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength);
      this.io(start, bytes, true).then(
        () => {
          counters.written += buffer.length;
          const digested = this.digests?.chunkWritten(index, bytes);
          callback(null);
          // webtorrent is done with a piece's buffer once it is put (its immediate store copies what it serves
          // meanwhile): back to the vendored torrent-piece's pool when the digests are done with it too.
          if (digested) void digested.then(() => Piece.release(buffer));
          else Piece.release(buffer);
        },
        (error: Error) => {
          if (isNoSpace(error)) counters.error ??= error;
          callback(error);
        },
      );
    }

    get(index: number, options: { offset?: number; length?: number } | null | undefined, callback: (error: Error | null, buffer?: Uint8Array) => void): void {
      if (typeof options === 'function') return this.get(index, null, options as typeof callback);
      if (this.closed) return later(callback, new Error('the store is closed'));
      const start = index * this.chunkLength;
      const chunkLength = Math.min(this.chunkLength, totalLength - start);
      const offset = options?.offset ?? 0;
      const length = options?.length ?? chunkLength - offset;
      if (chunkLength <= 0 || offset < 0 || length < 0 || offset + length > chunkLength) return later(callback, new Error('invalid offset and/or length'));
      const buffer = Buffer.allocUnsafe(length);
      this.io(start + offset, buffer, false).then(
        () => callback(null, buffer),
        (error: Error) => callback(error),
      );
    }

    close(callback: (error: Error | null) => void): void {
      if (this.closed) return later(callback, null);
      this.closed = true;
      void (async () => {
        // The digests read back chunks and stat the files: before the handles go.
        if (this.digests) counters.digests = await this.digests.finish().catch(() => undefined);
        const handles = [...this.handles.values()];
        this.handles.clear();
        await Promise.allSettled(handles.map(async (handle) => (await handle).close()));
      })().then(() => callback(null));
    }

    destroy(callback: (error: Error | null) => void): void {
      // Files belong to the agent: destroying the store only closes them.
      this.close(callback);
    }

    private handle(index: number): Promise<FileHandle> {
      let handle = this.handles.get(index);
      if (!handle) {
        handle = open(files[index]!.path, flags, 0o644);
        this.handles.set(index, handle);
        handle.catch(() => this.handles.delete(index));
      }
      return handle;
    }

    /** Reads or writes `buffer` at absolute torrent offset `start`, across file boundaries. */
    private async io(start: number, buffer: Buffer, write: boolean): Promise<void> {
      const end = start + buffer.length;
      for (const [index, file] of files.entries()) {
        const from = Math.max(start, file.offset);
        const to = Math.min(end, file.offset + file.length);
        if (from >= to) continue;
        const handle = await this.handle(index);
        let done = 0;
        while (done < to - from) {
          const bufferOffset = from - start + done;
          const position = from - file.offset + done;
          const length = to - from - done;
          const { bytesWritten, bytesRead } = write
            ? { ...(await handle.write(buffer, bufferOffset, length, position)), bytesRead: 0 }
            : { ...(await handle.read(buffer, bufferOffset, length, position)), bytesWritten: 0 };
          const moved = write ? bytesWritten : bytesRead;
          if (moved === 0) throw new Error(`short ${write ? 'write' : 'read'} in ${file.path} at ${position}`);
          done += moved;
        }
        if (write) this.flushSoon(index, handle, to - from);
      }
    }

    /**
     * Every FLUSH_EVERY_BYTES written to a file, an fdatasync in the background (one at a time per file), so
     * that the fsync before the final verification finds little left to write instead of the whole image.
     */
    private flushSoon(index: number, handle: FileHandle, bytes: number): void {
      const unsynced = (this.unsynced.get(index) ?? 0) + bytes;
      if (unsynced < FLUSH_EVERY_BYTES || this.flushing.has(index)) {
        this.unsynced.set(index, unsynced);
        return;
      }
      this.unsynced.set(index, 0);
      this.flushing.add(index);
      void handle
        .datasync()
        .catch(() => undefined)
        .finally(() => this.flushing.delete(index));
    }
  };
}

// ---------------------------------------------------------------------------------------------------------
// Helpers

function parseOrInvalid(metainfo: Uint8Array, image: string, infoHash: string | undefined): ImageTorrent {
  let torrent: ImageTorrent;
  try {
    torrent = parseImageTorrent(metainfo, infoHash);
  } catch (error) {
    throw CowherdError.invalidArgument(
      'image.torrent.metainfo',
      `is not a usable image torrent: ${(error as Error).message}`,
      ErrorReason.ERROR_REASON_INVALID_FIELD,
      error,
    );
  }
  if (torrent.name !== image) throw CowherdError.invalidArgument('image.torrent.metainfo', `names ${torrent.name}, not ${image}`);
  return torrent;
}

function checkExpectedFiles(torrent: ImageTorrent, files: readonly ExpectedImageFile[]): void {
  const described = (list: ReadonlyArray<{ path: string; length: number }>): string => list.map((file) => `${file.path}:${file.length}`).join(',');
  const expected = files.map((file) => ({ path: file.path, length: file.sizeBytes }));
  if (described(expected) !== described(torrent.files)) {
    throw CowherdError.invalidArgument('image.files', `(${described(expected)}) differ from the torrent's files (${described(torrent.files)})`);
  }
  for (const file of files) {
    if (!/^[0-9a-f]{64}$/i.test(file.sha256)) throw CowherdError.invalidArgument('image.files', `${file.path} has no SHA-256`);
  }
}

function cancelledError(image: string): CowherdError {
  return new CowherdError(GrpcStatus.CANCELLED, `the transfer of ${IMAGE_NAME.format({ image })} was stopped`, {
    reason: ErrorReason.ERROR_REASON_TRANSFER_FAILED,
    metadata: { image: IMAGE_NAME.format({ image }) },
  });
}

function isNoSpace(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

function destroyTorrent(torrent: Torrent | undefined): Promise<void> {
  if (!torrent || torrent.destroyed) return Promise.resolve();
  return new Promise((resolveDestroyed) => torrent.destroy({ destroyStore: false }, () => resolveDestroyed()));
}

function later<T extends unknown[]>(callback: (...args: T) => void, ...args: T): void {
  queueMicrotask(() => callback(...args));
}

/** After a verified replica was moved back to be repaired: writable again, every file kept (its good pieces count). */
async function makeWritable(directory: string): Promise<void> {
  for (const name of await readdir(directory)) await chmod(replicaFile(directory, name), 0o644).catch(() => undefined);
}
