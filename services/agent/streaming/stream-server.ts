/**
 * The host's streaming server: a small process of its own that serves replicas still arriving to qemu over NBD
 * (one socket, one export per replica file), started by the agent and outliving the agent's restarts.
 *
 * Why a process of its own: qemu's NBD client fails a guest's read at once when its server is gone (libvirt 9.0
 * drops the `reconnect-delay` that would make it wait, see the agent README), and the agent restarts (upgrades,
 * crashes, the fault suite's kills). The server holds qemu's connections and keeps answering; a read of a
 * range that is not here yet waits, through an agent restart, until the agent has fetched it.
 *
 * Why it checks pieces itself: every byte a guest sees must come from a piece whose SHA-1 matches the torrent's.
 * The server is given each export's piece hashes and verifies a piece from the replica's files on disk the first
 * time a read needs it (SHA-1 runs at ~1.7 GB/s here: ~0.6 ms for a 1 MiB piece), so it needs nobody's word
 * for what is there, and a piece half-written when it is read simply does not match yet. What it needs the agent
 * for is speed: it tells the agent (over the control socket) which ranges a guest waits for, the agent makes
 * exactly those pieces critical in the swarm and says `ready` when they are in, and the read looks again.
 * Without an agent (restarting) it looks again every {@link RECHECK_MS}.
 *
 * Control protocol (JSON lines on `control.sock`, 0600, root only; the agent is the only client):
 *   agent -> server  {"type":"export", ...ExportSpec}      serve a file (idempotent); answered {"type":"exported","name"}
 *                    {"type":"ready"}                      pieces arrived: look again now
 *                    {"type":"status"}                     answered {"type":"status", statistics, exports}
 *   server -> agent  {"type":"want","name","offset","length"}   a guest waits for this range
 *                    {"type":"reads","name","connection","reads":[[offset,length],...],"final"}  a connection's first minute of
 *                    progress (waits for pieces not counted), in order; `final` once the window is over or it closed
 *
 * A guest may wait up to `maxStallMs` (default 15 minutes) for one read; after that the read fails (EIO), as a
 * disk that stopped answering would. The server exits once it has had no NBD connection and no agent for
 * `idleExitMs` (default 10 s): nothing to serve, and the agent starts it again when it needs it.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, open, rm, writeFile } from 'node:fs/promises';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { startNbdServer, type NbdServer, type StreamedFile } from './nbd-server.js';

/** How often a waiting read looks again without being told (an agent restarting, a `ready` lost). */
export const RECHECK_MS = 500;
/** How long the reads of an export are recorded for its read profile after its first read. */
export const PROFILE_WINDOW_MS = 60_000;
/** The most reads one profile holds. */
const MAX_PROFILE_READS = 4096;
/** The most connections of one export whose reads are recorded (the first ones: a guest's boot is among them). */
const MAX_PROFILED_CONNECTIONS = 64;

/** One exported file of a replica, as the agent describes it. */
export interface ExportSpec {
  /** The export name (`<image key>.<file>`). */
  readonly name: string;
  /** Where the torrent's files are, in the order to look: the fetch's partial directory, then the replica's. */
  readonly directories: readonly string[];
  /** The torrent's files in torrent order (pieces run across them). */
  readonly files: ReadonlyArray<{ readonly path: string; readonly length: number }>;
  /** The exported file (one of `files`). */
  readonly file: string;
  readonly pieceLength: number;
  /** The pieces' SHA-1 hashes, 20 bytes each, base64. */
  readonly pieceHashes: string;
}

/** The server's files: sockets, pid file and log, in the image directory's `.streaming/`. */
export function streamServerPaths(directory: string): { nbdSocket: string; controlSocket: string; pidFile: string; logFile: string } {
  return {
    nbdSocket: join(directory, 'nbd.sock'),
    controlSocket: join(directory, 'control.sock'),
    pidFile: join(directory, 'server.pid'),
    logFile: join(directory, 'server.log'),
  };
}

/** Options of {@link runStreamServer}. */
export interface StreamServerOptions {
  /** The directory of its sockets (`<image dir>/.streaming`). */
  readonly directory: string;
  readonly idleExitMs?: number;
  readonly maxStallMs?: number;
  /** How long after an export's first read its reads are recorded as its profile; default PROFILE_WINDOW_MS. */
  readonly profileWindowMs?: number;
  /** Told what happens (one line each); never data. */
  readonly log?: (message: string) => void;
}

/** A running server (the process's whole life; tests run it in-process). */
export interface RunningStreamServer {
  /** Resolves when the server has stopped (idle, or {@link close}). */
  readonly stopped: Promise<void>;
  close(): Promise<void>;
}

/** A file served while it arrives: its pieces are checked against their hashes on first use. */
class ServedExport implements StreamedFile {
  readonly size: number;
  /** Where the file starts in the torrent's byte stream. */
  private readonly start: number;
  private readonly total: number;
  private readonly hashes: Buffer;
  private readonly verified: Uint8Array;
  private readonly checking = new Map<number, Promise<boolean>>();
  private remaining: number;
  /**
   * The reads of each connection's first PROFILE_WINDOW_MS of progress, in order: a booting guest is one connection
   * (qemu keeps it open), while qemu-img's look at a header (an overlay made, a disk inspected) is one of its own.
   * Time the connection spent waiting for pieces does not count: a guest stalled on its disk is not booting, and
   * its profile should cover the same part of the boot however slowly the pieces came.
   */
  readonly profiles = new Map<
    number,
    { firstAt: number; waitedMs: number; reads: Array<[number, number]>; sent: number; final: boolean; finalSent: boolean }
  >();

  constructor(
    readonly spec: ExportSpec,
    private readonly server: StreamServer,
  ) {
    let start = 0;
    let size: number | undefined;
    for (const file of spec.files) {
      if (file.path === spec.file) {
        size = file.length;
        break;
      }
      start += file.length;
    }
    if (size === undefined) throw new Error(`${spec.file} is not a file of export ${spec.name}`);
    this.size = size;
    this.start = start;
    this.total = spec.files.reduce((sum, file) => sum + file.length, 0);
    this.hashes = Buffer.from(spec.pieceHashes, 'base64');
    const pieces = Math.ceil(this.total / spec.pieceLength);
    if (this.hashes.length !== pieces * 20) throw new Error(`export ${spec.name}: ${this.hashes.length / 20} hashes for ${pieces} pieces`);
    this.verified = new Uint8Array(pieces);
    const [first, last] = this.piecesOf(0, Math.max(1, size));
    this.remaining = size === 0 ? 0 : last - first + 1;
  }

  /** The path to open: where the fetch writes it, or the replica's directory once it was moved there. */
  get path(): string {
    for (const directory of this.spec.directories) {
      const candidate = join(directory, this.spec.file);
      if (existsSync(candidate)) return candidate;
    }
    return join(this.spec.directories.at(-1)!, this.spec.file);
  }

  /** Whether every piece of the file has been verified here. */
  get complete(): boolean {
    return this.remaining === 0;
  }

  async whenAvailable(offset: number, length: number): Promise<void> {
    if (this.complete) return;
    const [first, last] = this.piecesOf(offset, length);
    const deadline = performance.now() + this.server.maxStallMs;
    for (;;) {
      let missing = false;
      for (let piece = first; piece <= last; piece += 1) if (!(await this.check(piece))) missing = true;
      if (!missing) return;
      if (performance.now() > deadline)
        throw new Error(`bytes ${offset}-${offset + length} of ${this.spec.name} did not arrive within ${this.server.maxStallMs} ms`);
      this.server.want(this.spec.name, offset, length);
      await this.server.nextChange(RECHECK_MS);
    }
  }

  /** Records a read for its connection's profile while the connection's first minute of progress lasts. */
  recordRead(connection: number, offset: number, length: number, waitedMs: number): void {
    let profile = this.profiles.get(connection);
    if (!profile) {
      if (this.profiles.size >= MAX_PROFILED_CONNECTIONS) return;
      profile = { firstAt: performance.now(), waitedMs: 0, reads: [], sent: 0, final: false, finalSent: false };
      this.profiles.set(connection, profile);
    }
    if (profile.final) return;
    profile.waitedMs += waitedMs;
    if (this.windowOver(profile)) profile.final = true;
    else if (profile.reads.length < MAX_PROFILE_READS) profile.reads.push([offset, length]);
  }

  /** Whether a profile's window of progress is over. */
  windowOver(profile: { firstAt: number; waitedMs: number }): boolean {
    return performance.now() - profile.firstAt - profile.waitedMs > this.server.profileWindowMs;
  }

  /** Ends the profile of a connection that closed (the guest shut down, qemu-img finished). */
  endProfile(connection: number): void {
    const profile = this.profiles.get(connection);
    if (profile) profile.final = true;
  }

  private piecesOf(offset: number, length: number): [number, number] {
    const first = Math.floor((this.start + offset) / this.spec.pieceLength);
    const last = Math.floor((this.start + offset + length - 1) / this.spec.pieceLength);
    return [first, last];
  }

  /** Whether piece `index` is on disk and matches its hash (checked once; concurrent readers share the check). */
  private check(index: number): Promise<boolean> {
    if (this.verified[index] === 1) return Promise.resolve(true);
    const running = this.checking.get(index);
    if (running) return running;
    const check = this.hashMatches(index)
      .catch(() => false)
      .then((matches) => {
        this.checking.delete(index);
        if (matches && this.verified[index] === 0) {
          this.verified[index] = 1;
          const [first, last] = this.piecesOf(0, Math.max(1, this.size));
          if (index >= first && index <= last) this.remaining -= 1;
        }
        return matches;
      });
    this.checking.set(index, check);
    return check;
  }

  private async hashMatches(index: number): Promise<boolean> {
    const pieceStart = index * this.spec.pieceLength;
    const pieceEnd = Math.min(pieceStart + this.spec.pieceLength, this.total);
    const data = Buffer.alloc(pieceEnd - pieceStart);
    let fileStart = 0;
    for (const file of this.spec.files) {
      const fileEnd = fileStart + file.length;
      const from = Math.max(pieceStart, fileStart);
      const to = Math.min(pieceEnd, fileEnd);
      if (from < to) {
        const path = this.pathOf(file.path);
        if (path === undefined) return false;
        const handle = await open(path, 'r');
        try {
          let filled = 0;
          while (filled < to - from) {
            const { bytesRead } = await handle.read(data, from - pieceStart + filled, to - from - filled, from - fileStart + filled);
            if (bytesRead === 0) return false;
            filled += bytesRead;
          }
        } finally {
          await handle.close();
        }
      }
      fileStart = fileEnd;
    }
    return createHash('sha1')
      .update(data)
      .digest()
      .equals(this.hashes.subarray(index * 20, index * 20 + 20));
  }

  private pathOf(file: string): string | undefined {
    for (const directory of this.spec.directories) {
      const candidate = join(directory, file);
      if (existsSync(candidate)) return candidate;
    }
    return undefined;
  }
}

/** The server's state: exports, the NBD listener, the agents connected, the waiting reads. */
class StreamServer {
  readonly exports = new Map<string, ServedExport>();
  /** Exports replaced by a newer one of the same name, while their connections' profiles may still grow. */
  private readonly retired: ServedExport[] = [];
  readonly agents = new Set<Socket>();
  private waiters: Array<() => void> = [];
  private readonly lastWant = new Map<string, number>();

  constructor(
    readonly maxStallMs: number,
    readonly profileWindowMs: number,
    private readonly log: (message: string) => void,
  ) {}

  /** Resolves at the next change (a `ready`, a new export) or after `ms`. */
  nextChange(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
      this.waiters.push(done);
    });
  }

  changed(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /** Tells the agents a guest waits for a range (at most once per RECHECK_MS per range: the read loops). */
  want(name: string, offset: number, length: number): void {
    const key = `${name}:${offset}:${length}`;
    const now = performance.now();
    if (now - (this.lastWant.get(key) ?? -Infinity) < RECHECK_MS - 50) return;
    this.lastWant.set(key, now);
    if (this.lastWant.size > 10_000) this.lastWant.clear();
    this.send({ type: 'want', name, offset, length });
  }

  send(message: object): void {
    const line = `${JSON.stringify(message)}\n`;
    for (const agent of this.agents) if (!agent.destroyed) agent.write(line);
  }

  addExport(spec: ExportSpec, nbd: NbdServer): void {
    // Always a fresh export, whose pieces are checked again: the files behind the name may be a new fetch of the
    // same image (its replica deleted and fetched again), and what was verified was the old files. Connections
    // that have the old export open keep it (and the file they opened).
    const served = new ServedExport(spec, this);
    const previous = this.exports.get(spec.name);
    if (previous) {
      // Its connections' reads are still sent (their profile window may not be over).
      this.retired.push(previous);
    }
    this.exports.set(spec.name, served);
    nbd.addExport(spec.name, served);
    this.log(`export ${spec.name} (${served.size} bytes)`);
    this.changed();
  }

  /** Sends the reads recorded since the last call, per export and connection. */
  flushProfiles(): void {
    for (const served of [...this.exports.values(), ...this.retired])
      for (const [connection, profile] of served.profiles) {
        const name = served.spec.name;
        if (!profile.final && served.windowOver(profile)) profile.final = true;
        if (profile.reads.length === profile.sent && (!profile.final || profile.finalSent)) continue;
        this.send({ type: 'reads', name, connection, reads: profile.reads.slice(profile.sent), final: profile.final });
        profile.sent = profile.reads.length;
        profile.finalSent = profile.final;
      }
    // A replaced export is forgotten once every profile of its connections was sent whole.
    for (let index = this.retired.length - 1; index >= 0; index -= 1)
      if ([...this.retired[index]!.profiles.values()].every((profile) => profile.finalSent)) this.retired.splice(index, 1);
  }

  /** Ends the profiles of a connection that closed, in every export it may have read. */
  endProfiles(connection: number): void {
    for (const served of [...this.exports.values(), ...this.retired]) served.endProfile(connection);
  }
}

/** Whether a streaming server answers on `controlSocket`. */
export function serverAnswers(controlSocket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection(controlSocket);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/**
 * Runs the server until it is idle for `idleExitMs` (or closed). Refuses to start when another answers on the
 * control socket; removes stale sockets of a server that died.
 */
export async function runStreamServer(options: StreamServerOptions): Promise<RunningStreamServer> {
  const log = options.log ?? (() => undefined);
  const paths = streamServerPaths(options.directory);
  await mkdir(options.directory, { recursive: true, mode: 0o711 });
  if (await serverAnswers(paths.controlSocket)) throw new Error(`a streaming server already answers on ${paths.controlSocket}`);
  await rm(paths.controlSocket, { force: true });
  await rm(paths.nbdSocket, { force: true });
  const state = new StreamServer(options.maxStallMs ?? 15 * 60_000, options.profileWindowMs ?? PROFILE_WINDOW_MS, log);
  const idleExitMs = options.idleExitMs ?? 10_000;
  let idleTimer: NodeJS.Timeout | undefined;
  let stop: () => void = () => undefined;
  const stopped = new Promise<void>((resolve) => {
    stop = resolve;
  });
  let nbd: NbdServer | undefined;
  const idleCheck = (): void => {
    clearTimeout(idleTimer);
    if (state.agents.size > 0 || (nbd?.statistics.openConnections ?? 0) > 0) return;
    idleTimer = setTimeout(() => void close(), idleExitMs);
  };
  nbd = await startNbdServer({
    socketPath: paths.nbdSocket,
    onError: (error) => log(`nbd: ${error.message}`),
    onRead: (read) => state.exports.get(read.exportName)?.recordRead(read.connection, read.offset, read.length, read.waitedMs),
    onClose: (connection) => {
      state.endProfiles(connection);
      idleCheck();
    },
  });
  // qemu runs as root here (scripts/libvirtd.sh); with an unprivileged qemu user the socket's group must be qemu's.
  await chmod(paths.nbdSocket, 0o660);
  const control: Server = createServer((socket) => {
    state.agents.add(socket);
    clearTimeout(idleTimer);
    socket.setEncoding('utf8');
    let buffered = '';
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      if (buffered.length > 16 * 1024 * 1024) socket.destroy();
      let newline = buffered.indexOf('\n');
      while (newline >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        handle(socket, line);
        newline = buffered.indexOf('\n');
      }
    });
    socket.on('error', () => undefined);
    socket.once('close', () => {
      state.agents.delete(socket);
      idleCheck();
    });
  });
  const handle = (socket: Socket, line: string): void => {
    let message: { type?: string } & Record<string, unknown>;
    try {
      message = JSON.parse(line) as typeof message;
    } catch {
      log('control: a line that is not JSON');
      return;
    }
    try {
      if (message.type === 'export') {
        state.addExport(message as unknown as ExportSpec, nbd!);
        socket.write(`${JSON.stringify({ type: 'exported', name: message['name'] })}\n`);
      } else if (message.type === 'ready') state.changed();
      else if (message.type === 'status') {
        const exports = [...state.exports.entries()].map(([name, served]) => ({ name, complete: served.complete, path: served.path }));
        socket.write(`${JSON.stringify({ type: 'status', pid: process.pid, statistics: nbd!.statistics, exports })}\n`);
      }
    } catch (error) {
      log(`control: ${(error as Error).message}`);
      socket.write(`${JSON.stringify({ type: 'error', name: message['name'], message: (error as Error).message })}\n`);
    }
  };
  await new Promise<void>((resolve, reject) => {
    control.once('error', reject);
    control.listen(paths.controlSocket, () => {
      control.off('error', reject);
      resolve();
    });
  });
  await chmod(paths.controlSocket, 0o600);
  await writeFile(paths.pidFile, `${process.pid}\n`, { mode: 0o644 });
  const profiles = setInterval(() => state.flushProfiles(), 2000);
  log(`serving on ${paths.nbdSocket} (pid ${process.pid})`);
  idleCheck();
  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      clearTimeout(idleTimer);
      clearInterval(profiles);
      state.flushProfiles();
      for (const agent of state.agents) agent.destroy();
      await new Promise<void>((resolve) => control.close(() => resolve()));
      await nbd!.close();
      await rm(paths.pidFile, { force: true });
      log('stopped');
      stop();
    })();
    return closing;
  };
  return { stopped, close };
}
