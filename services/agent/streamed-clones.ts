/**
 * Streaming clones (CreateClonesRequest.stream): clones made on a replica that is still arriving. This job puts
 * the swarm (what has arrived, which pieces to fetch first), the streaming server (serving the replica's disk
 * files to qemu over NBD) and the hypervisor (overlays, domains) together:
 *
 * - {@link StreamedClones.source}: for a replica still arriving, the template (waited for whole and read from the
 *   fetch's partial directory), each disk file exported by the streaming server (the overlay's backing is its
 *   `nbd+unix://` URI), and the direct-boot files waited for whole (the clone links them into its directory: qemu
 *   opens them by path when it starts, and the replica's directory only exists once the replica is complete).
 * - The server's wants (a guest waits for a range) become `whenAvailable` calls on the swarm (those pieces
 *   critical, asked of every peer), answered with `ready` once they are in.
 * - Settling: a streaming clone that is shut off while its replica is AVAILABLE gets its overlay pointed at the
 *   replica's file (`qemu-img rebase -u`: the same bytes, only the header changes), checked every few seconds and
 *   before the agent starts it. A clone that runs keeps reading through the server (from the complete file) until
 *   its next shutdown: qemu cannot switch a running disk's backing safely from outside with this libvirt.
 */
import { link, mkdir, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../common/platform/errors.js';
import type { Logger } from '../common/platform/logger.js';
import type { EventPublisher } from '../common/platform/events.js';
import { IMAGE_READ_PROFILE } from '../common/domain/event-types.js';
import { HOST_NAME, imageNameOfKey } from '../common/domain/resource-names.js';
import { protectBase, readBackingFileName, repointOverlay, templateBootFiles, templateDisks, type DomainInfo, type Libvirt } from './hypervisor/index.js';
import { parseStreamBackingUri, streamBackingUri, streamExportName, streamExportOf, streamingDirectory, TEMPLATE_FILE } from './image-directory/index.js';
import { StreamServerClient } from './streaming/index.js';
import type { ImageTransfers } from './swarm/index.js';

/** How often shut-off streaming clones are looked at for settling. */
const SETTLE_INTERVAL_MS = 3000;
/** How long a replica that a clone was just streamed from stays on the settling list without a domain found on it. */
const SETTLE_GRACE_MS = 60_000;
/** A connection that read fewer pieces in its first minute was a look at a header, not a boot. */
const MIN_PROFILE_PIECES = 4;
/** Pieces asked of the swarm at once when a list of them is fetched (a read profile, the boot files). */
const FETCH_CONCURRENCY = 8;
/** How far ahead in a read profile the rarest piece is looked for (16 MiB of 512 KiB pieces). */
const PREFETCH_LOOKAHEAD = 32;
/** The longest the agent waits for one range (a want, a boot file, a window of the profile). */
const WAIT_LIMIT_MS = 15 * 60_000;
/** How long a `source` waits for the fetch to have its torrent (FetchImage was just called). */
const SOURCE_WAIT_MS = 60_000;

/** A replica still arriving, as ImageTransfers.streamSource describes it. */
type ArrivingReplica = Extract<ReturnType<ImageTransfers['streamSource']>, { kind: 'arriving' }>;

/** What a streaming clone is made from. */
export interface StreamedSource {
  readonly template: string;
  /** One per template disk: the base is the NBD URI of the replica's file. */
  readonly disks: ReadonlyArray<{ target: string; base: string; format: 'qcow2' | 'raw' | 'vpc' }>;
  /** Direct-boot files, whole and verified: link them into the clone (see {@link linkBootFiles}). */
  readonly bootFiles: readonly string[];
  /** Where the files are now, in order of preference (partial directory, then replica directory). */
  readonly directories: readonly string[];
}

/** Options of {@link StreamedClones}. */
export interface StreamedClonesOptions {
  readonly imageDirectory: string;
  readonly hypervisor: 'kvm' | 'xen';
  readonly transfers: Pick<ImageTransfers, 'streamSource' | 'whenAvailable' | 'pieceHolders' | 'isAvailable'>;
  readonly libvirt: Pick<Libvirt, 'listDomains'>;
  readonly log: Logger;
  /** Where image.read_profile goes (the agent's event outbox). */
  readonly events?: Pick<EventPublisher, 'publish'>;
  /** This host's id (the profile's recorder). */
  readonly host?: string;
  /** The streaming server's environment (tests shorten its idle exit). */
  readonly serverEnvironment?: Readonly<Record<string, string>>;
  /** How long a replica a clone was just streamed from is looked at for settling without a domain on it (60 s). */
  readonly settleGraceMs?: number;
}

/** The agent's streaming clones. */
export class StreamedClones {
  private readonly client: StreamServerClient;
  private readonly wanted = new Map<string, Promise<void>>();
  /** Read profiles being recorded, per export: torrent pieces in the order first read. */
  private readonly recording = new Map<string, { pieces: number[]; seen: Set<number>; bytes: number }>();
  /** Exports whose profile this process published. */
  private readonly published = new Set<string>();
  /** Replicas whose profile is being (or was) prefetched by this process. */
  private readonly prefetching = new Set<string>();
  /** What this process learnt of the replicas it streams: where each file starts in its torrent, its pieces' length. */
  private readonly layouts = new Map<string, TorrentLayout & { profiled: boolean }>();
  private settleTimer: NodeJS.Timeout | undefined;
  private settling: Promise<void> | undefined;
  /**
   * Replicas that streaming clones here may be backed by, with when that was last seen (a source made, a domain
   * found on it); undefined until the first look at libvirt (an agent that restarted may have any). Settling looks
   * at libvirt only once one of them is AVAILABLE: every look lists and dumps every domain, which an agent polling
   * every few seconds for nothing would pay on every host.
   */
  private streamedReplicas: Map<string, number> | undefined;
  private stopped = false;

  constructor(private readonly options: StreamedClonesOptions) {
    this.client = new StreamServerClient({
      directory: streamingDirectory(options.imageDirectory),
      onWant: (name, offset, length) => this.want(name, offset, length),
      onReads: (name, connection, reads, final) => this.recordReads(name, connection, reads, final),
      log: (message, error) => options.log.info({ err: error }, message),
      ...(options.serverEnvironment ? { serverEnvironment: options.serverEnvironment } : {}),
    });
  }

  /** Attaches to a streaming server that outlived the agent (its guests' wants come here) and starts settling. */
  async start(): Promise<void> {
    if (await this.client.attach().catch(() => false)) this.options.log.info('attached to the running streaming server');
    const tick = (): void => {
      this.settleTimer = setTimeout(() => {
        void this.settleAll()
          .catch((error: unknown) => this.options.log.warn({ err: error }, 'settling streaming clones failed'))
          .finally(() => {
            if (!this.stopped) tick();
          });
      }, SETTLE_INTERVAL_MS);
      this.settleTimer.unref();
    };
    tick();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.settleTimer);
    this.client.close();
  }

  /** The server's statistics and exports (tests, diagnostics); undefined when none runs. */
  status(): ReturnType<StreamServerClient['status']> {
    return this.client.status();
  }

  /**
   * The source of streaming clones of replica `key`, or undefined when the replica is AVAILABLE (clone from it as
   * usual). FAILED_PRECONDITION (IMAGE_NOT_ON_HOST) without a replica arriving; (HYPERVISOR_MISMATCH) on Xen.
   */
  async source(key: string): Promise<StreamedSource | undefined> {
    const started = performance.now();
    const arriving = this.options.transfers.streamSource(key);
    if (arriving.kind === 'available') return undefined;
    if (this.options.hypervisor !== 'kvm')
      throw CowherdError.failedPrecondition(
        'streaming clones need KVM: their base is read through qemu’s NBD client, which Xen’s blktap does not have',
        ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
      );
    const sizeOf = (file: string): number => {
      const found = arriving.files.find((candidate) => candidate.path === file);
      if (!found) throw CowherdError.failedPrecondition(`the image has no file ${file}`, ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST);
      return found.length;
    };
    await this.whole(key, TEMPLATE_FILE, sizeOf(TEMPLATE_FILE));
    const templateMs = Math.round(performance.now() - started);
    const template = await this.readArrived(arriving.directories, TEMPLATE_FILE);
    const bootFiles = templateBootFiles(template);
    const disks = templateDisks(template);
    for (const disk of disks) {
      sizeOf(disk.fileName);
      await this.serve(key, disk.fileName, arriving);
    }
    this.rememberLayout(key, arriving);
    this.streamedReplicas?.set(key, performance.now());
    // What earlier clones of this version read first, fetched first (in the background, in order).
    if (arriving.profile.length > 0) this.prefetch(key, arriving.profile);
    // Boot files first and whole (all their pieces at once, the rarest first): the guest cannot start without them.
    // With them each disk's first piece: its qcow2 header, refcount and L1 tables, which qemu-img create (the
    // overlay) and qemu (the start) read before anything else, one wait each when fetched on demand.
    const layout = this.layouts.get(key)!;
    const bootPieces = [
      ...new Set([...bootFiles.flatMap((file) => piecesOf(layout, file)), ...disks.flatMap((disk) => piecesOf(layout, disk.fileName).slice(0, 1))]),
    ];
    await this.fetchPieces(key, bootPieces, 'read', Number.POSITIVE_INFINITY);
    await Promise.all(bootFiles.map((file) => this.whole(key, file, sizeOf(file))));
    // How long a streamed boot waits before qemu can start (bench:boot reads it from the agents' logs).
    this.options.log.info(
      { image: key, template_ms: templateMs, boot_files_ms: Math.round(performance.now() - started), boot_pieces: bootPieces.length },
      'streaming source ready',
    );
    return {
      template,
      disks: disks.map((disk) => ({ target: disk.target, base: streamBackingUri(this.options.imageDirectory, key, disk.fileName), format: disk.format })),
      bootFiles,
      directories: arriving.directories,
    };
  }

  /** Has the streaming server export file `file` of replica `key`, which is still arriving (started if none runs). */
  private serve(key: string, file: string, arriving: ArrivingReplica): Promise<void> {
    return this.client.export({
      name: streamExportName(key, file),
      directories: arriving.directories,
      files: arriving.files,
      file,
      pieceLength: arriving.pieceLength,
      pieceHashes: arriving.pieceHashes.toString('base64'),
    });
  }

  /**
   * Hard-links the source's boot files into `directory` (the same inode: no copy, and it stays valid when the
   * partial directory is renamed into the replica's). Returns the directory, to render the clone's boot paths in.
   */
  async linkBootFiles(source: StreamedSource, directory: string): Promise<string> {
    await mkdir(directory, { recursive: true, mode: 0o755 });
    for (const file of source.bootFiles) {
      let linked = false;
      for (const from of source.directories) {
        try {
          await link(join(from, file), join(directory, file));
          linked = true;
          break;
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
        }
      }
      if (!linked)
        throw new CowherdError(GrpcStatus.UNAVAILABLE, `boot file ${file} vanished while the replica moved; retry`, {
          reason: ErrorReason.ERROR_REASON_INTERNAL,
        });
    }
    return directory;
  }

  /**
   * Before the agent starts `domain`: a streaming clone whose replica is AVAILABLE is settled (its overlay pointed
   * at the replica's file); one whose replica still arrives gets its exports served again (the server may have
   * exited while nothing ran).
   */
  async beforeStart(domain: DomainInfo): Promise<void> {
    for (const stream of await this.streamedDisks(domain)) {
      const arriving = this.options.transfers.streamSource(stream.key);
      if (arriving.kind === 'available') {
        await this.repoint(stream);
        this.options.log.info({ domain: domain.name, overlay: stream.overlay, base: stream.replicaPath }, 'streaming clone settled on its local replica');
      } else {
        await this.serve(stream.key, stream.file, arriving);
      }
    }
  }

  /**
   * Settles every shut-off streaming clone whose replica is AVAILABLE. Looks at libvirt only when a replica that
   * streaming clones may be backed by has become AVAILABLE (or after a start, once). A streaming clone that keeps
   * running on a complete replica keeps the look going (every SETTLE_INTERVAL_MS) until its shutdown is seen.
   */
  async settleAll(): Promise<void> {
    const known = this.streamedReplicas;
    if (known !== undefined && ![...known.keys()].some((key) => this.options.transfers.isAvailable(key))) return;
    this.settling ??= (async () => {
      const found = new Set<string>();
      for (const domain of await this.options.libvirt.listDomains()) {
        for (const stream of await this.streamedDisks(domain)) {
          found.add(stream.key);
          if (domain.state !== 'shut off' || !this.options.transfers.isAvailable(stream.key)) continue;
          await this.repoint(stream).then(
            () =>
              this.options.log.info({ domain: domain.name, overlay: stream.overlay, base: stream.replicaPath }, 'streaming clone settled on its local replica'),
            (error: unknown) => this.options.log.warn({ domain: domain.name, err: error }, 'settling a streaming clone failed; tried again later'),
          );
        }
      }
      // Kept: replicas with a streamed disk still on them (running clones, failed repoints), and replicas a source
      // was just made of (the clone may not be defined yet). Dropped: complete replicas nothing here streams from.
      const now = performance.now();
      const replicas = this.streamedReplicas ?? new Map<string, number>();
      for (const key of found) replicas.set(key, now);
      for (const [key, seen] of replicas)
        if (!found.has(key) && now - seen > (this.options.settleGraceMs ?? SETTLE_GRACE_MS) && this.options.transfers.isAvailable(key)) replicas.delete(key);
      this.streamedReplicas = replicas;
    })().finally(() => {
      this.settling = undefined;
    });
    return this.settling;
  }

  /** Points the overlay at the complete replica's file, which from now on is a base like any other (read-only). */
  private async repoint(stream: { overlay: string; replicaPath: string }): Promise<void> {
    await protectBase(stream.replicaPath);
    await repointOverlay(stream.overlay, stream.replicaPath, await this.formatOf(stream.overlay));
  }

  /** The domain's overlays whose backing is a streamed replica file of this image directory. */
  private async streamedDisks(domain: DomainInfo): Promise<Array<{ overlay: string; key: string; file: string; replicaPath: string }>> {
    const found: Array<{ overlay: string; key: string; file: string; replicaPath: string }> = [];
    for (const disk of domain.disks) {
      if (disk.type !== 'file' || !disk.sourcePath) continue;
      const backing = await readBackingFileName(disk.sourcePath).catch(() => undefined);
      const stream = backing === undefined ? undefined : parseStreamBackingUri(backing);
      if (!stream || stream.root !== this.options.imageDirectory) continue;
      found.push({ overlay: disk.sourcePath, key: stream.key, file: stream.file, replicaPath: stream.replicaPath });
    }
    return found;
  }

  /** The backing format recorded in the overlay (qcow2's backing format header extension); raw when absent. */
  private async formatOf(overlay: string): Promise<'qcow2' | 'raw'> {
    const handle = await open(overlay, 'r');
    const header = Buffer.alloc(64 * 1024);
    try {
      await handle.read(header, 0, header.length, 0);
    } finally {
      await handle.close();
    }
    // Header extension 0xE2792ACA holds the backing format name.
    const magic = Buffer.from([0xe2, 0x79, 0x2a, 0xca]);
    const at = header.indexOf(magic);
    if (at < 0) return 'raw';
    const length = header.readUInt32BE(at + 4);
    return header.toString('latin1', at + 8, at + 8 + length) === 'qcow2' ? 'qcow2' : 'raw';
  }

  private rememberLayout(key: string, arriving: { files: ReadonlyArray<{ path: string; length: number }>; pieceLength: number; profiled: boolean }): void {
    const starts = new Map<string, number>();
    let start = 0;
    for (const file of arriving.files) {
      starts.set(file.path, start);
      start += file.length;
    }
    this.layouts.set(key, { starts, files: arriving.files, pieceLength: arriving.pieceLength, profiled: arriving.profiled });
  }

  /**
   * Fetches a read profile's pieces ahead of the rest of the image, in its order give or take
   * {@link PREFETCH_LOOKAHEAD} (the rarest first within it: {@link nextWanted}), {@link FETCH_CONCURRENCY} at a
   * time (the guest's own wants come first all the same). Once per replica and process.
   */
  private prefetch(key: string, pieces: readonly number[]): void {
    if (this.prefetching.has(key)) return;
    this.prefetching.add(key);
    const started = performance.now();
    this.options.log.info({ image: key, pieces: pieces.length }, 'prefetching the read profile');
    void this.fetchPieces(key, pieces, 'prefetch', PREFETCH_LOOKAHEAD)
      .then(() => this.options.log.info({ image: key, pieces: pieces.length, ms: Math.round(performance.now() - started) }, 'read profile prefetched'))
      .catch((error: unknown) => this.options.log.warn({ err: error, image: key }, 'prefetching the read profile stopped'));
  }

  /**
   * Waits until every one of `pieces` (torrent piece indices, in the order they are wanted) is verified here,
   * asking the swarm for {@link FETCH_CONCURRENCY} at a time, each time the one of the next `lookahead` that the
   * fewest peers hold. Every piece that arrives is told to the streaming server (a read may wait for it).
   */
  private async fetchPieces(key: string, pieces: readonly number[], priority: 'read' | 'prefetch', lookahead: number): Promise<void> {
    const layout = this.layouts.get(key);
    if (!layout) return;
    const pending = [...pieces];
    const fetchNext = async (): Promise<void> => {
      while (pending.length > 0 && !this.stopped) {
        const window = pending.slice(0, lookahead);
        const index = nextWanted(window, this.options.transfers.pieceHolders(key, window));
        const piece = pending.splice(index, 1)[0]!;
        const range = pieceRange(layout, piece);
        if (!range) continue;
        await this.options.transfers.whenAvailable(key, range.file, range.offset, range.length, { priority, signal: AbortSignal.timeout(WAIT_LIMIT_MS) });
        this.client.ready();
      }
    };
    await Promise.all(Array.from({ length: Math.min(FETCH_CONCURRENCY, pending.length) }, fetchNext));
  }

  /**
   * Adds a connection's reads of an export to its profile; once the connection's window is over (the server says
   * `final`), publishes it if it is the first of the export with at least MIN_PROFILE_PIECES pieces (a guest's boot;
   * qemu-img's look at a header reads one or two).
   */
  private recordReads(name: string, connection: number, reads: ReadonlyArray<readonly [number, number]>, final: boolean): void {
    const exported = streamExportOf(name);
    const layout = exported && this.layouts.get(exported.key);
    // A version that has a profile needs no other; a replica this process did not stream (restarted) is not recorded.
    if (!exported || !layout || layout.profiled || this.published.has(name) || !this.options.events || !this.options.host) return;
    const key = `${name}#${connection}`;
    let entry = this.recording.get(key);
    if (!entry) {
      entry = { pieces: [], seen: new Set(), bytes: 0 };
      this.recording.set(key, entry);
    }
    const start = layout.starts.get(exported.file) ?? 0;
    for (const [offset, length] of reads) {
      entry.bytes += length;
      const first = Math.floor((start + offset) / layout.pieceLength);
      const last = Math.floor((start + offset + length - 1) / layout.pieceLength);
      for (let piece = first; piece <= last; piece += 1) {
        if (entry.seen.has(piece)) continue;
        entry.seen.add(piece);
        entry.pieces.push(piece);
      }
    }
    if (!final) return;
    this.recording.delete(key);
    if (entry.pieces.length < MIN_PROFILE_PIECES) return;
    this.published.add(name);
    void this.publishProfile(exported.key, name, entry);
  }

  private async publishProfile(key: string, name: string, entry: { pieces: number[]; bytes: number }): Promise<void> {
    if (entry.pieces.length === 0 || !this.options.events || !this.options.host) return;
    const host = HOST_NAME.format({ host: this.options.host });
    await this.options.events
      .publish(
        IMAGE_READ_PROFILE,
        {
          image: imageNameOfKey(key),
          host,
          profile: { pieces: entry.pieces, host, bytesRead: String(entry.bytes), recordTime: new Date() },
          occurTime: new Date(),
        },
        { host: this.options.host, id: `image.read_profile/${key}/${this.options.host}/${name}` },
      )
      .then(
        () => this.options.log.info({ image: key, export: name, pieces: entry.pieces.length, bytes: entry.bytes }, 'read profile published'),
        (error: unknown) => this.options.log.warn({ err: error, image: key }, 'the read profile could not be recorded'),
      );
  }

  private want(name: string, offset: number, length: number): void {
    const exported = streamExportOf(name);
    if (!exported) return;
    const key = `${name}:${offset}:${length}`;
    if (this.wanted.has(key)) return;
    // Bounded like the guest's wait (the server fails the read after its stall limit): a range that never comes must
    // not hold the rest of the image back for good (the swarm holds the background fill while ranges are waited for).
    const wait = this.options.transfers
      .whenAvailable(exported.key, exported.file, offset, length, { signal: AbortSignal.timeout(WAIT_LIMIT_MS) })
      .then(() => this.client.ready())
      .catch((error: unknown) => this.options.log.debug({ err: error, export: name }, 'a wanted range is not available yet'))
      .finally(() => this.wanted.delete(key));
    this.wanted.set(key, wait);
  }

  /** Waits until the whole of `file` is here and verified (the swarm fetching it first). */
  private async whole(key: string, file: string, size: number): Promise<void> {
    if (size === 0) return;
    const deadline = performance.now() + SOURCE_WAIT_MS;
    for (;;) {
      try {
        await this.options.transfers.whenAvailable(key, file, 0, size, { signal: AbortSignal.timeout(WAIT_LIMIT_MS) });
        return;
      } catch (error) {
        // The swarm may not have the fetch yet right after FetchImage: look again until the deadline.
        if (!(error instanceof CowherdError && error.code === GrpcStatus.NOT_FOUND) || performance.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  }

  private async readArrived(directories: readonly string[], file: string): Promise<string> {
    for (const directory of directories) {
      try {
        return await readFile(join(directory, file), 'utf8');
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
      }
    }
    throw new CowherdError(GrpcStatus.UNAVAILABLE, `${file} vanished while the replica moved; retry`, { reason: ErrorReason.ERROR_REASON_INTERNAL });
  }
}

/** Where a replica's files lie in its torrent (StreamedClones' layouts). */
interface TorrentLayout {
  readonly starts: ReadonlyMap<string, number>;
  readonly files: ReadonlyArray<{ path: string; length: number }>;
  readonly pieceLength: number;
}

/** The torrent pieces that hold `file` (none for an empty or unknown file). */
export function piecesOf(layout: TorrentLayout, file: string): number[] {
  const start = layout.starts.get(file);
  const length = layout.files.find((candidate) => candidate.path === file)?.length ?? 0;
  if (start === undefined || length === 0) return [];
  const first = Math.floor(start / layout.pieceLength);
  const last = Math.floor((start + length - 1) / layout.pieceLength);
  return Array.from({ length: last - first + 1 }, (_, index) => first + index);
}

/** A range of one file inside torrent piece `piece` (its first file's part of it), to wait for the piece by. */
export function pieceRange(layout: TorrentLayout, piece: number): { file: string; offset: number; length: number } | undefined {
  const start = piece * layout.pieceLength;
  for (const file of layout.files) {
    const fileStart = layout.starts.get(file.path)!;
    if (start < fileStart + file.length)
      return { file: file.path, offset: start - fileStart, length: Math.min(layout.pieceLength, fileStart + file.length - start) };
  }
  return undefined;
}

/**
 * Which of `window` (wanted pieces, most urgent first) to ask the swarm for next: the one the fewest peers hold
 * (`holders`, per piece), ties at random; the first when the holders are not known. Hosts that start the same boot
 * at the same moment (a fleet's clones of one image) then take different pieces from the origin and trade them,
 * instead of all asking it for the same piece at once (bench:boot: six hosts, one origin, each urgent piece served
 * by the origin to several hosts).
 */
export function nextWanted(window: readonly number[], holders: readonly number[] | undefined, random: () => number = Math.random): number {
  if (!holders || holders.length !== window.length || window.length === 0) return 0;
  const fewest = Math.min(...holders);
  const rarest = holders.flatMap((count, index) => (count === fewest ? [index] : []));
  return rarest[Math.floor(random() * rarest.length)] ?? 0;
}
