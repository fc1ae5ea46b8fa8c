/**
 * The origin's BEP 19 web seed: a small read-only HTTP server for the files of registered image replicas,
 * `GET|HEAD /<image id>/<file name>`. The web seed URL to hand to receivers is the server's root
 * (`http://<host>:<port>/`): webtorrent requests `<url>/<torrent name>/<file path>` for multi-file torrents,
 * and every image torrent is multi-file and named after the image id (torrent.ts).
 *
 * - Range requests are required: webtorrent asks for `bytes=a-b` of one file per request and, if it gets
 *   200 with the whole file instead, loops and grows in memory (MACHINE.md). A single satisfiable range gets
 *   206 with Content-Range; no Range gets 200 with the whole file; a Range that is malformed, unsatisfiable,
 *   or asks for several ranges gets 416 with `Content-Range: bytes *\/<size>`.
 * - Only the exact file names registered with {@link WebSeedServer.addImage} are served; anything else
 *   (other paths, `..`, encoded slashes, directories, query-only variations of unknown paths) is 404, and
 *   files are opened O_RDONLY|O_NOFOLLOW. No listings.
 * - Bodies stream from disk (a FileHandle read stream with start/end), never buffered whole.
 * - An optional upload limit (bytes per second, shared by all responses) so that the host's transfer limit
 *   covers the web seed too: webtorrent's throttle only covers its own peer wires.
 */
import { constants as fsConstants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Logger } from '../../common/platform/logger.js';
import { IMAGE_KEY } from '../../common/domain/resource-names.js';
import { IMAGE_FILE_NAME } from './torrent.js';
import { replicaFile } from '../image-directory/index.js';

/** Options of {@link WebSeedServer}. */
export interface WebSeedServerOptions {
  /** Bytes per second over all responses; 0 or unset = unlimited. */
  readonly uploadBytesPerSecond?: number;
  readonly log?: Logger;
  /**
   * Asked before each response whether the image may be served (image-transfers.ts: its files still match
   * the fingerprint taken at verification, re-verified when they do not); false answers 503, so a receiver
   * takes the piece elsewhere rather than fetch bytes that fail SHA-1.
   */
  readonly servable?: (id: string) => Promise<boolean>;
}

interface RegisteredImage {
  readonly directory: string;
  readonly files: ReadonlySet<string>;
}

/** A BEP 19 web seed for image replicas. */
export class WebSeedServer {
  private readonly images = new Map<string, RegisteredImage>();
  private readonly server: Server;
  private readonly limiter = new RateLimiter();
  private readonly log: Logger | undefined;
  private readonly servable: ((id: string) => Promise<boolean>) | undefined;
  /** Bytes of response bodies sent. */
  bytesSent = 0;
  /** Bytes of response bodies sent, per image id. */
  readonly bytesSentByImage = new Map<string, number>();

  constructor(options: WebSeedServerOptions = {}) {
    this.log = options.log;
    this.servable = options.servable;
    this.limiter.setRate(options.uploadBytesPerSecond ?? 0);
    this.server = createServer((request, response) => {
      this.handle(request, response).catch((error: unknown) => {
        this.log?.warn({ err: error, url: request.url }, 'web seed request failed');
        if (!response.headersSent) {
          response.writeHead(500, { 'Content-Type': 'text/plain' }).end('internal error\n');
        } else {
          response.destroy();
        }
      });
    });
    // Peers may keep connections open between piece requests.
    this.server.keepAliveTimeout = 30_000;
  }

  /** Serves `fileNames` of `directory` under `/<id>/`; replaces an earlier registration of the same id. */
  addImage(id: string, directory: string, fileNames: readonly string[]): void {
    if (!IMAGE_KEY.test(id)) throw new Error(`image storage key ${JSON.stringify(id)} is invalid`);
    for (const name of fileNames) {
      if (!IMAGE_FILE_NAME.test(name)) throw new Error(`file name ${JSON.stringify(name)} is not a single path segment of [A-Za-z0-9._-]`);
    }
    this.images.set(id, { directory, files: new Set(fileNames) });
  }

  /** Stops serving the image (requests in flight finish). */
  removeImage(id: string): void {
    this.images.delete(id);
  }

  /** Bytes per second over all responses; 0 = unlimited. Applies at once, also to responses in flight. */
  setUploadLimit(bytesPerSecond: number): void {
    if (!(bytesPerSecond >= 0)) throw new Error(`upload limit ${bytesPerSecond} is negative`);
    this.limiter.setRate(bytesPerSecond);
  }

  /** Listens on `host:port` (port 0 = any) and returns the bound port. */
  async listen(address: { readonly host: string; readonly port: number }): Promise<number> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(address.port, address.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    return (this.server.address() as AddressInfo).port;
  }

  /** The web seed URL for receivers: `http://<host>:<port>/`. */
  url(host?: string): string {
    const address = this.server.address() as AddressInfo | null;
    if (!address) throw new Error('the web seed is not listening');
    const name = host ?? address.address;
    return `http://${name.includes(':') ? `[${name}]` : name}:${address.port}/`;
  }

  /** Stops listening and drops open connections. */
  async close(): Promise<void> {
    if (!this.server.listening) return;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeAllConnections();
    await closed;
  }

  private async handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      response.writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    const resolved = this.resolve(request.url ?? '');
    if (!resolved) {
      notFound(response);
      return;
    }
    if (this.servable && !(await this.servable(resolved.id))) {
      response.writeHead(503, { 'Content-Type': 'text/plain', 'Retry-After': '30' }).end('replica unavailable\n');
      return;
    }
    let handle: FileHandle;
    try {
      handle = await open(resolved.path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
    } catch {
      notFound(response);
      return;
    }
    let streaming = false;
    try {
      const info = await handle.stat();
      if (!info.isFile()) {
        notFound(response);
        return;
      }
      const size = info.size;
      const headers: Record<string, string | number> = {
        'Accept-Ranges': 'bytes',
        'Content-Type': 'application/octet-stream',
        'Cache-Control': 'no-store',
        'Last-Modified': info.mtime.toUTCString(),
      };
      const rangeHeader = request.headers.range;
      let start = 0;
      let end = size - 1;
      let status = 200;
      if (rangeHeader !== undefined) {
        const range = parseRange(rangeHeader, size);
        if (!range) {
          response.writeHead(416, { ...headers, 'Content-Range': `bytes */${size}`, 'Content-Length': 0 }).end();
          return;
        }
        [start, end] = range;
        status = 206;
        headers['Content-Range'] = `bytes ${start}-${end}/${size}`;
      }
      const length = size === 0 ? 0 : end - start + 1;
      headers['Content-Length'] = length;
      response.writeHead(status, headers);
      if (request.method === 'HEAD' || length === 0) {
        response.end();
        return;
      }
      streaming = true;
      const body = handle.createReadStream({ start, end, highWaterMark: 256 * 1024, autoClose: true });
      const counter = new Transform({
        transform: (chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback) => {
          this.limiter.take(chunk.length).then(() => {
            this.bytesSent += chunk.length;
            this.bytesSentByImage.set(resolved.id, (this.bytesSentByImage.get(resolved.id) ?? 0) + chunk.length);
            callback(null, chunk);
          }, callback);
        },
      });
      // A client that goes away rejects the pipeline; that is not the server's failure.
      await pipeline(body, counter, response).catch((error: unknown) => {
        if (!response.destroyed) response.destroy();
        this.log?.debug({ err: error, url: request.url }, 'web seed response aborted');
      });
    } finally {
      if (!streaming) await handle.close();
    }
  }

  /** The absolute file for `/<id>/<name>`, or undefined. */
  private resolve(rawUrl: string): { path: string; id: string } | undefined {
    let pathname: string;
    try {
      pathname = new URL(rawUrl, 'http://web-seed').pathname;
    } catch {
      return undefined;
    }
    const segments = pathname.split('/');
    if (segments.length !== 3 || segments[0] !== '') return undefined;
    let id: string;
    let name: string;
    try {
      id = decodeURIComponent(segments[1]!);
      name = decodeURIComponent(segments[2]!);
    } catch {
      return undefined;
    }
    const image = this.images.get(id);
    if (!image || !IMAGE_FILE_NAME.test(name) || !image.files.has(name)) return undefined;
    return { path: replicaFile(image.directory, name), id };
  }
}

/**
 * One `bytes=` range of a file of `size` bytes as [start, end] (inclusive), clamped to the file; undefined
 * when it is malformed, unsatisfiable, or asks for several ranges.
 */
export function parseRange(header: string, size: number): [number, number] | undefined {
  const match = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(header);
  if (!match) return undefined;
  const [, first, last] = match;
  if (first === '' && last === '') return undefined;
  if (first === '') {
    // Suffix range: the last N bytes.
    const suffix = Number(last);
    if (!Number.isSafeInteger(suffix) || suffix === 0 || size === 0) return undefined;
    return [Math.max(0, size - suffix), size - 1];
  }
  const start = Number(first);
  const end = last === '' ? size - 1 : Math.min(Number(last), size - 1);
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start >= size || start > end) return undefined;
  return [start, end];
}

function notFound(response: ServerResponse): void {
  response.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found\n');
}

/** A shared byte-rate limit: each caller waits until its bytes fit into the rate. 0 = unlimited. */
class RateLimiter {
  private rate = 0;
  /** When the bytes granted so far will have been sent at the rate (performance.now() ms). */
  private nextFree = 0;

  setRate(bytesPerSecond: number): void {
    this.rate = bytesPerSecond;
    this.nextFree = performance.now();
  }

  async take(bytes: number): Promise<void> {
    if (this.rate <= 0) return;
    const now = performance.now();
    // Allow a burst of up to 100 ms worth of bytes.
    this.nextFree = Math.max(this.nextFree, now - 100) + (bytes / this.rate) * 1000;
    const wait = this.nextFree - now;
    if (wait > 1) await new Promise((resolve) => setTimeout(resolve, Math.min(wait, 10_000)));
  }
}
