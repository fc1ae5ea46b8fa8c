/**
 * A read-only NBD server (the fixed-newstyle protocol, https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
 * on a unix socket: the way a replica that is still arriving is served to qemu as a block device, so that a
 * clone's overlay can name it as its backing file (`nbd+unix:///<export>?socket=<path>`) and boot before the
 * whole image is here. Every read first waits for its byte range to be available (`StreamedFile.whenAvailable`,
 * which is where a swarm raises the priority of exactly those pieces) and is then served from the file; the
 * guest never sees a byte that was not verified.
 *
 * What it speaks: the fixed-newstyle handshake with NO_ZEROES; NBD_OPT_GO, NBD_OPT_INFO (export and block-size
 * information), NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT; simple replies only (structured replies, meta
 * contexts, TLS and extended headers are answered NBD_REP_ERR_UNSUP, which qemu accepts); the commands READ,
 * FLUSH (a no-op: nothing is written) and DISC. WRITE, TRIM, WRITE_ZEROES and the rest get EPERM or EINVAL:
 * the export is read-only (a base is never written). A request beyond the export's end or longer than
 * {@link MAX_REQUEST_BYTES} gets EINVAL; a read whose range cannot be had gets EIO.
 *
 * Nothing here knows about swarms, images or libvirt: it serves `StreamedFile`s by export name.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_INFO = 6;
const OPT_GO = 7;

const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_ERR_UNSUP = 0x80000001;
const REP_ERR_INVALID = 0x80000003;
const REP_ERR_UNKNOWN = 0x80000006;

const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

/** Transmission flags: HAS_FLAGS, READ_ONLY, SEND_FLUSH, CAN_MULTI_CONN (reads are the same on every connection). */
const TRANSMISSION_FLAGS = 1 | 2 | 4 | 256;

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_WRITE_ZEROES = 6;

const EPERM = 1;
const EIO = 5;
const EINVAL = 22;

/** The longest read served in one request (qemu splits larger ones; advertised as the maximum block size). */
export const MAX_REQUEST_BYTES = 32 * 1024 * 1024;
/** The longest option a client may send (export names are short). */
const MAX_OPTION_BYTES = 4096;

/** A file served while it may still be arriving. */
export interface StreamedFile {
  /** The path the bytes are read from, looked up at a connection's first read (after its range is available). */
  readonly path: string;
  /** Its size in bytes. */
  readonly size: number;
  /**
   * Resolves once bytes [offset, offset + length) are in the file and verified (at once when they are); the
   * place to ask for them first. Rejects when they cannot be had (the read then fails with EIO).
   */
  whenAvailable(offset: number, length: number): Promise<void>;
}

/** Counters of what the server did, for logs and metrics. */
export interface NbdStatistics {
  connections: number;
  /** Connections open now (qemu holds one per open backing). */
  openConnections: number;
  reads: number;
  bytesRead: number;
  /** Reads that had to wait for their range, and the longest such wait. */
  waitedReads: number;
  longestWaitMs: number;
  failedReads: number;
}

/** A running server: add and remove exports, then close. */
export interface NbdServer {
  /** The unix socket it listens on. */
  readonly socketPath: string;
  readonly statistics: NbdStatistics;
  /** Serves `file` under `name` from now on (a name already served is replaced for new connections). */
  addExport(name: string, file: StreamedFile): void;
  /** Stops offering `name`; connections that have it open keep it until they end. */
  removeExport(name: string): void;
  /** The URI qemu opens for an export: `nbd+unix:///<name>?socket=<socket>`. */
  uri(name: string): string;
  /** Stops listening and ends every connection. */
  close(): Promise<void>;
}

/** Options of {@link startNbdServer}. */
export interface NbdServerOptions {
  /** Where to listen; the caller chooses a directory only qemu and the agent can reach. */
  readonly socketPath: string;
  /** Told about protocol errors and failed reads (never about data). */
  readonly onError?: (error: Error) => void;
  /**
   * Told about every read served, in the order served: which export, which range, how long it waited for its
   * range. What a booting guest reads first, recorded, is the profile later streams of the image fetch first.
   */
  readonly onRead?: (read: NbdRead) => void;
  /** Told when a connection ends, with its number (the streaming server ends its profile, and exits once idle). */
  readonly onClose?: (connection: number) => void;
}

/** One read as {@link NbdServerOptions.onRead} sees it. */
export interface NbdRead {
  /** Which connection read (numbered from 1 in the order they came): one per qemu process that opened the export. */
  readonly connection: number;
  readonly exportName: string;
  readonly offset: number;
  readonly length: number;
  readonly waitedMs: number;
}

/** Export names as cowherd makes them (file names of a replica): no separators a URI would need to escape. */
const EXPORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/;

/** Starts a read-only NBD server on a unix socket. */
export async function startNbdServer(options: NbdServerOptions): Promise<NbdServer> {
  const exports = new Map<string, StreamedFile>();
  const sockets = new Set<Socket>();
  const statistics: NbdStatistics = { connections: 0, openConnections: 0, reads: 0, bytesRead: 0, waitedReads: 0, longestWaitMs: 0, failedReads: 0 };
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    statistics.connections += 1;
    statistics.openConnections += 1;
    const connection = new Connection(socket, exports, statistics, options);
    socket.once('close', () => {
      sockets.delete(socket);
      statistics.openConnections -= 1;
      options.onClose?.(connection.id);
    });
    socket.on('error', () => undefined);
    void connection.run();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.socketPath, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return {
    socketPath: options.socketPath,
    statistics,
    addExport: (name, file) => {
      if (!EXPORT_NAME.test(name)) throw new Error(`export name ${JSON.stringify(name)} must match ${EXPORT_NAME.source}`);
      exports.set(name, file);
    },
    removeExport: (name) => {
      exports.delete(name);
    },
    uri: (name) => `nbd+unix:///${name}?socket=${options.socketPath}`,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Reads exact byte counts from a socket, in order. */
class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { bytes: number; resolve: (data: Buffer | undefined) => void } | undefined;
  private ended = false;

  constructor(socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      this.wake();
    });
    const end = (): void => {
      this.ended = true;
      this.wake();
    };
    socket.once('end', end);
    socket.once('close', end);
  }

  /** Exactly `bytes` bytes, or undefined when the connection ended first. */
  read(bytes: number): Promise<Buffer | undefined> {
    return new Promise((resolve) => {
      this.waiter = { bytes, resolve };
      this.wake();
    });
  }

  private wake(): void {
    const waiter = this.waiter;
    if (!waiter) return;
    if (this.buffered >= waiter.bytes) {
      this.waiter = undefined;
      const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
      const data = all.subarray(0, waiter.bytes);
      const rest = all.subarray(waiter.bytes);
      this.chunks = rest.length > 0 ? [rest] : [];
      this.buffered = rest.length;
      waiter.resolve(data);
    } else if (this.ended) {
      this.waiter = undefined;
      waiter.resolve(undefined);
    }
  }
}

class ProtocolError extends Error {}

/** One client: the handshake, then requests until DISC or the end of the connection. */
class Connection {
  private static count = 0;
  readonly id = ++Connection.count;
  private readonly reader: SocketReader;
  private noZeroes = false;
  private handle: FileHandle | undefined;
  private opening: Promise<FileHandle> | undefined;

  constructor(
    private readonly socket: Socket,
    private readonly exports: ReadonlyMap<string, StreamedFile>,
    private readonly statistics: NbdStatistics,
    private readonly options: Pick<NbdServerOptions, 'onError' | 'onRead'>,
  ) {
    this.reader = new SocketReader(socket);
  }

  async run(): Promise<void> {
    try {
      const chosen = await this.handshake();
      if (chosen) await this.transmission(chosen.name, chosen.file);
    } catch (error) {
      if (!(error instanceof ProtocolError) || !this.socket.destroyed) this.options.onError?.(error as Error);
    } finally {
      await (this.handle ?? (await this.opening?.catch(() => undefined)))?.close().catch(() => undefined);
      this.socket.destroy();
    }
  }

  private async need(bytes: number): Promise<Buffer> {
    const data = await this.reader.read(bytes);
    if (!data) throw new ProtocolError('the client went away');
    return data;
  }

  /** The option haggling; the export chosen, or undefined when the client aborted. */
  private async handshake(): Promise<{ name: string; file: StreamedFile } | undefined> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBDMAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.socket.write(greeting);
    const clientFlags = (await this.need(4)).readUInt32BE(0);
    if ((clientFlags & FLAG_FIXED_NEWSTYLE) === 0) throw new ProtocolError('the client does not speak fixed newstyle');
    this.noZeroes = (clientFlags & FLAG_NO_ZEROES) !== 0;
    for (;;) {
      const header = await this.need(16);
      if (header.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolError('bad option magic');
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) throw new ProtocolError(`option ${option} of ${length} bytes`);
      const data = length > 0 ? await this.need(length) : Buffer.alloc(0);
      switch (option) {
        case OPT_EXPORT_NAME: {
          const name = data.toString('utf8');
          const file = this.exports.get(name);
          // No way to refuse politely here: the protocol says to drop the connection.
          if (!file) throw new ProtocolError(`no export ${JSON.stringify(name)}`);
          const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
          reply.writeBigUInt64BE(BigInt(file.size), 0);
          reply.writeUInt16BE(TRANSMISSION_FLAGS, 8);
          this.socket.write(reply);
          return { name, file };
        }
        case OPT_ABORT:
          this.optionReply(option, REP_ACK);
          return undefined;
        case OPT_LIST: {
          if (length !== 0) {
            this.optionReply(option, REP_ERR_INVALID);
            break;
          }
          for (const name of this.exports.keys()) {
            const entry = Buffer.alloc(4 + Buffer.byteLength(name));
            entry.writeUInt32BE(Buffer.byteLength(name), 0);
            entry.write(name, 4);
            this.optionReply(option, REP_SERVER, entry);
          }
          this.optionReply(option, REP_ACK);
          break;
        }
        case OPT_INFO:
        case OPT_GO: {
          const request = parseInfoRequest(data);
          if (!request) {
            this.optionReply(option, REP_ERR_INVALID);
            break;
          }
          const file = this.exports.get(request.name);
          if (!file) {
            this.optionReply(option, REP_ERR_UNKNOWN, Buffer.from(`no export named ${request.name}`));
            break;
          }
          const exportInfo = Buffer.alloc(12);
          exportInfo.writeUInt16BE(INFO_EXPORT, 0);
          exportInfo.writeBigUInt64BE(BigInt(file.size), 2);
          exportInfo.writeUInt16BE(TRANSMISSION_FLAGS, 10);
          this.optionReply(option, REP_INFO, exportInfo);
          const blockSize = Buffer.alloc(14);
          blockSize.writeUInt16BE(INFO_BLOCK_SIZE, 0);
          blockSize.writeUInt32BE(1, 2);
          blockSize.writeUInt32BE(4096, 6);
          blockSize.writeUInt32BE(MAX_REQUEST_BYTES, 10);
          this.optionReply(option, REP_INFO, blockSize);
          this.optionReply(option, REP_ACK);
          if (option === OPT_GO) return { name: request.name, file };
          break;
        }
        default:
          // STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers, anything newer: simple replies only.
          this.optionReply(option, REP_ERR_UNSUP);
      }
    }
  }

  private optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.alloc(20);
    header.writeBigUInt64BE(REPLY_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(data.length, 16);
    this.socket.write(data.length > 0 ? Buffer.concat([header, data]) : header);
  }

  /** Requests until DISC. Reads are answered as they complete (a waiting read does not hold up the others). */
  private async transmission(name: string, file: StreamedFile): Promise<void> {
    for (;;) {
      const request = await this.reader.read(28);
      if (!request) return;
      if (request.readUInt32BE(0) !== REQUEST_MAGIC) throw new ProtocolError('bad request magic');
      const type = request.readUInt16BE(6);
      const cookie = request.subarray(8, 16);
      const offset = Number(request.readBigUInt64BE(16));
      const length = request.readUInt32BE(24);
      if (type === CMD_DISC) return;
      if (type === CMD_WRITE) {
        // The payload follows the header: read it away, then refuse (read-only export).
        if (length > MAX_REQUEST_BYTES) throw new ProtocolError(`a write of ${length} bytes`);
        await this.need(length);
        this.simpleReply(cookie, EPERM);
        continue;
      }
      if (type === CMD_FLUSH) {
        this.simpleReply(cookie, 0);
        continue;
      }
      if (type === CMD_TRIM || type === CMD_WRITE_ZEROES) {
        this.simpleReply(cookie, EPERM);
        continue;
      }
      if (type !== CMD_READ) {
        this.simpleReply(cookie, EINVAL);
        continue;
      }
      if (length === 0 || length > MAX_REQUEST_BYTES || offset + length > file.size) {
        this.simpleReply(cookie, EINVAL);
        continue;
      }
      void this.serveRead(name, file, Buffer.from(cookie), offset, length);
    }
  }

  private async serveRead(name: string, file: StreamedFile, cookie: Buffer, offset: number, length: number): Promise<void> {
    const started = performance.now();
    let data: Buffer;
    let waitedMs: number;
    try {
      await file.whenAvailable(offset, length);
      waitedMs = performance.now() - started;
      // Under a millisecond: the range was there (a settled promise and a turn of the event loop).
      if (waitedMs >= 1) {
        this.statistics.waitedReads += 1;
        this.statistics.longestWaitMs = Math.max(this.statistics.longestWaitMs, waitedMs);
      }
      // Opened at the first read, once bytes are there (a fetch creates its files as pieces arrive); the path is
      // read then, so a file served from where it is being fetched keeps its inode when it is renamed.
      if (!this.handle) {
        this.opening ??= open(file.path, 'r');
        try {
          this.handle = await this.opening;
        } catch (error) {
          this.opening = undefined;
          throw error;
        }
      }
      data = Buffer.allocUnsafe(length);
      let filled = 0;
      while (filled < length) {
        const { bytesRead } = await this.handle.read(data, filled, length - filled, offset + filled);
        if (bytesRead === 0) throw new Error(`${file.path} ends before byte ${offset + length}`);
        filled += bytesRead;
      }
    } catch (error) {
      this.statistics.failedReads += 1;
      this.options.onError?.(new Error(`read of ${length} bytes at ${offset} of ${file.path} failed: ${(error as Error).message}`));
      if (!this.socket.destroyed) this.simpleReply(cookie, EIO);
      return;
    }
    this.statistics.reads += 1;
    this.statistics.bytesRead += length;
    this.options.onRead?.({ connection: this.id, exportName: name, offset, length, waitedMs });
    if (!this.socket.destroyed) this.simpleReply(cookie, 0, data);
  }

  private simpleReply(cookie: Buffer, error: number, data?: Buffer): void {
    const header = Buffer.alloc(16);
    header.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    header.writeUInt32BE(error, 4);
    cookie.copy(header, 8);
    this.socket.write(header);
    if (data) this.socket.write(data);
  }
}

/** NBD_OPT_GO / NBD_OPT_INFO data: the export name and the information requests (ignored: we send ours). */
function parseInfoRequest(data: Buffer): { name: string } | undefined {
  if (data.length < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (4 + nameLength + 2 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  const requests = data.readUInt16BE(4 + nameLength);
  if (4 + nameLength + 2 + requests * 2 !== data.length) return undefined;
  return { name };
}
