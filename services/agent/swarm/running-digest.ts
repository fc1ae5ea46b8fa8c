/**
 * Whole-file SHA-256 of a replica computed while its pieces are written, so that the check before a fetched
 * replica becomes AVAILABLE does not have to read the whole image again.
 *
 * Why: reading back and hashing 256 MiB costs ~0.25 CPU-s per host, and every receiver of a distribution
 * does it in the same second at the end (on the 2-core bench test bed, 6 hosts verifying at once added
 * 0.6-1.0 s to the time until the last replica was AVAILABLE). Hashed as the pieces arrive, the cost is
 * spread over the transfer, where it is hidden behind the network.
 *
 * How: one SHA-256 per file, fed in file order. A file's cursor advances over chunks that are written: the
 * chunks the cursor reaches while their write is fresh are hashed from their buffers; chunks written before
 * the cursor reached them (pieces arrive out of order) are read back from the file (page cache). A chunk written again behind a cursor (webtorrent does not do that) makes
 * that file's digest unusable, and the file is then verified by reading it, as before.
 *
 * What it proves: the bytes that were written, in order, hash to the digest. The verification compares the
 * digest with the image record and also checks that the file has not changed since the writes ended (size
 * and ctime, nanoseconds, taken when the transfer ends; see {@link RunningDigests.finish}). A file changed
 * afterwards is read and hashed whole. The blind spot is a write by another process that races the agent
 * inside its own image directory in the milliseconds between the last piece and the end of the transfer
 * (or, on kernels without multigrain timestamps (before 6.13), within the same clock tick after it); the
 * agent also re-verifies every replica by reading it at each start.
 */
import { createHash, type Hash } from 'node:crypto';

/** The most a file's cursor reads back at once. */
export const READ_BACK_BYTES = 4 * 1024 * 1024;

/** A file's digest as written, and its ctime when the writes ended. */
export interface WrittenDigest {
  /** Lowercase hex. */
  readonly sha256: string;
  readonly sizeBytes: number;
  readonly ctimeNs: bigint;
}

interface FileCursor {
  /** The file's index in the torrent. */
  readonly index: number;
  readonly offset: number;
  readonly length: number;
  readonly hash: Hash;
  /** File-relative bytes hashed so far. */
  next: number;
  broken: boolean;
  /** Buffers of chunks written but not hashed yet, until their own advance has run. */
  readonly fresh: Map<number, Buffer>;
  /** The advances of this file, one after another. */
  queue: Promise<void>;
  /** Where this file's read-backs go (allocated at the first one, reused: advances run one at a time). */
  readBuffer: Buffer | undefined;
}

/** How the digests read back chunks that were written before the cursor reached them. */
export interface DigestFiles {
  /** Fills `buffer` with the bytes of file `index` from file-relative `position`. */
  read(index: number, position: number, buffer: Buffer): Promise<void>;
  /** The file's ctime in nanoseconds (fstat). */
  ctimeNs(index: number): Promise<bigint>;
}

/** Running SHA-256 digests of a torrent's files, fed with chunks (pieces) as they are written. */
export class RunningDigests {
  private readonly cursors: FileCursor[];
  private readonly written: Uint8Array;

  constructor(
    files: ReadonlyArray<{ readonly offset: number; readonly length: number }>,
    private readonly chunkLength: number,
    private readonly totalLength: number,
    private readonly io: DigestFiles,
  ) {
    this.cursors = files.map((file, index) => ({
      index,
      offset: file.offset,
      length: file.length,
      hash: createHash('sha256'),
      next: 0,
      broken: false,
      fresh: new Map(),
      queue: Promise.resolve(),
      readBuffer: undefined,
    }));
    this.written = new Uint8Array(Math.ceil(totalLength / chunkLength));
  }

  /**
   * Chunk `index` is on disk with these bytes (the whole chunk). Resolves once no digest holds `buffer` any more
   * (each file's advance that could hash it from memory has run), so that its owner may reuse it.
   */
  chunkWritten(index: number, buffer: Buffer): Promise<void> {
    const start = index * this.chunkLength;
    const end = start + buffer.length;
    const again = this.written[index] === 1;
    this.written[index] = 1;
    const held: Array<Promise<void>> = [];
    for (const cursor of this.cursors) {
      if (cursor.broken || end <= cursor.offset || start >= cursor.offset + cursor.length) continue;
      if (again || Math.max(start, cursor.offset) < cursor.offset + cursor.next) {
        // Rewritten behind the cursor: what was hashed may not be what is on disk.
        cursor.broken = true;
        continue;
      }
      cursor.fresh.set(index, buffer);
      cursor.queue = cursor.queue
        .then(() => this.advance(cursor))
        .catch(() => {
          cursor.broken = true;
        })
        // Not reached yet (an earlier chunk is missing): read back from the file when it is.
        .finally(() => cursor.fresh.delete(index));
      held.push(cursor.queue);
    }
    return Promise.all(held).then(() => undefined);
  }

  /**
   * Waits for every pending advance and returns, per file (by index), the digest of a file whose every byte
   * was hashed, with its ctime now. Call it once the last chunk is written and before the files are closed.
   */
  async finish(): Promise<Array<WrittenDigest | undefined>> {
    await Promise.all(this.cursors.map((cursor) => cursor.queue));
    return Promise.all(
      this.cursors.map(async (cursor) => {
        if (cursor.broken || cursor.length === 0 || cursor.next !== cursor.length) return undefined;
        const ctimeNs = await this.io.ctimeNs(cursor.index).catch(() => undefined);
        if (ctimeNs === undefined) return undefined;
        return { sha256: cursor.hash.copy().digest('hex'), sizeBytes: cursor.length, ctimeNs };
      }),
    );
  }

  private async advance(cursor: FileCursor): Promise<void> {
    while (!cursor.broken && cursor.next < cursor.length) {
      const absolute = cursor.offset + cursor.next;
      const chunk = Math.floor(absolute / this.chunkLength);
      if (this.written[chunk] !== 1) return;
      const fileEnd = Math.min(cursor.offset + cursor.length, this.totalLength);
      const fresh = cursor.fresh.get(chunk);
      if (fresh) {
        cursor.fresh.delete(chunk);
        const chunkStart = chunk * this.chunkLength;
        const to = Math.min(fileEnd, chunkStart + this.chunkLength);
        cursor.hash.update(fresh.subarray(absolute - chunkStart, to - chunkStart));
        cursor.next += to - absolute;
        continue;
      }
      // Read back the run of written chunks from here (up to READ_BACK_BYTES), stopping before a fresh one.
      let to = Math.min(fileEnd, (chunk + 1) * this.chunkLength, absolute + READ_BACK_BYTES);
      for (let next = chunk + 1; to < fileEnd && to - absolute < READ_BACK_BYTES && this.written[next] === 1 && !cursor.fresh.has(next); next++) {
        to = Math.min(fileEnd, (next + 1) * this.chunkLength, absolute + READ_BACK_BYTES);
      }
      cursor.readBuffer ??= Buffer.allocUnsafe(Math.min(READ_BACK_BYTES, Math.max(this.chunkLength, cursor.length)));
      const bytes = cursor.readBuffer.subarray(0, to - absolute);
      await this.io.read(cursor.index, cursor.next, bytes);
      cursor.hash.update(bytes);
      cursor.next += to - absolute;
    }
  }
}
