/**
 * The private BitTorrent v1 torrent of an image (job 2): created on the origin from the replica's files, and
 * read back (checked) by every agent that joins the swarm.
 *
 * Decisions:
 * - Always a multi-file torrent named after the image id, files in Image.files order, so that the torrent's
 *   file paths are `<image id>/<file name>` and the BEP 19 web seed URL is the web seed server's root
 *   (web-seed.ts serves `/<image id>/<file name>`). create-torrent would make a one-file image a single-file
 *   torrent (a different web seed URL scheme), stamps a creation date, filters "junk" names and always adds
 *   public trackers unless told otherwise, so the metainfo is written here: pieces hashed with node:crypto
 *   while the files are streamed from their paths (never buffered whole), bencoded by hand. The info-hash
 *   equals create-torrent's for the same files and options (checked by the unit test).
 * - `info.private = 1`; the announce list is exactly the cowherd tracker (BEP 12 `announce-list` with one
 *   tier); no creation date, no "created by", no url-list (web seeds are given per fetch), so the same files
 *   always give byte-identical metainfo.
 * - Piece length by image size ({@link pieceLengthFor}): 512 KiB up to 8 GiB, then doubling to keep at most
 *   16384 pieces, at most 16 MiB (16 MiB pieces push seeder memory up, webtorrent caches 20 pieces; small pieces
 *   multiply per-piece CPU in webtorrent's request scanning; few pieces starve super-seeding). A piece is also
 *   the unit a streaming clone's read waits for (nothing unverified reaches a guest), so it must not grow with
 *   the image over the sizes VM images have.
 * - TorrentInfo.metainfo is documented as the bencoded info dictionary while the agent brief asks for a
 *   .torrent: {@link parseImageTorrent} accepts either, and {@link torrentFile} rebuilds a .torrent with the
 *   tracker a fetch names, so the agent can store either form.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { IMAGE_KEY } from '../../common/domain/resource-names.js';
import { replicaFile } from '../image-directory/index.js';

/** The smallest piece length cowherd chooses: 512 KiB. */
export const MIN_PIECE_LENGTH_BYTES = 512 * 1024;
/** The largest: 16 MiB (bigger pieces push a seeder's memory up: webtorrent caches 20 pieces). */
export const MAX_PIECE_LENGTH_BYTES = 16 * 1024 * 1024;
/** Pieces an image is cut into, at most, while the piece length is below the maximum (320 KiB of SHA-1s). */
export const TARGET_PIECES = 16384;

/**
 * The piece length for an image of `totalBytes`: the smallest power of two from 512 KiB that keeps the image
 * at or below 16384 pieces, at most 16 MiB. So every image up to 8 GiB -> 512 KiB, 16 GiB -> 1 MiB, 256 GiB and
 * more -> 16 MiB.
 * - 512 KiB: measured on the 7-host test bed (bench:distribution, 256 MiB to 6 receivers at 100 Mbit/s): 4 MiB
 *   pieces 3.2x S/B (64 pieces: the origin's super-seeding runs out of fresh pieces at once and the last pieces
 *   spread from one holder); 256 KiB 1.87x (per-piece CPU in webtorrent); 512 KiB beat 1 MiB: 1.18-1.20x in five
 *   runs against 1.21-1.31x in four, interleaved on the same machine. A piece reaches a receiver only once
 *   another holds all of it, so smaller pieces shorten the start of the swarm and its tail.
 * - Up to 16384 pieces (not 1024, the rule until streaming clones): a streaming clone's read waits for whole
 *   verified pieces, so with the piece growing with the image the same guest reads pulled four times the bytes
 *   from a 4 GiB image as from a 1 GiB one (bench:boot: 282.7 s against 87.6 s to the last marker, 8 MiB against
 *   2 MiB pieces). 16384 SHA-1s are 320 KiB of metainfo, well inside a NATS message and a gRPC call.
 */
export function pieceLengthFor(totalBytes: number): number {
  let length = MIN_PIECE_LENGTH_BYTES;
  while (length < MAX_PIECE_LENGTH_BYTES && totalBytes > length * TARGET_PIECES) length *= 2;
  return length;
}

/** A file name inside an image directory: one path segment of `[A-Za-z0-9._-]`, not "." or "..". */
export const IMAGE_FILE_NAME = /^(?!\.\.?$)[A-Za-z0-9._-]{1,255}$/;

/** Options of {@link createImageTorrent}. */
export interface CreateImageTorrentOptions {
  /** The directory that holds the files (the replica directory `<image dir>/images/<id>`). */
  readonly directory: string;
  /** File names inside `directory`, in Image.files order. */
  readonly files: readonly string[];
  /** The cowherd tracker's announce URL; the only tracker the torrent names. */
  readonly announce: string;
  /** The torrent name: the image id. */
  readonly name: string;
  /** A power of two of at least 16 KiB. Default 4 MiB. */
  readonly pieceLengthBytes?: number;
  /** Bytes hashed so far, after each read chunk. */
  readonly onProgress?: (bytesDone: number, bytesTotal: number) => void;
  readonly signal?: AbortSignal;
}

/** A created or parsed image torrent. */
export interface ImageTorrent {
  /** SHA-1 of the bencoded info dictionary, 40 lowercase hex characters. */
  readonly infoHash: string;
  /**
   * The bencoded .torrent: `announce`, `announce-list` and `info` (from {@link parseImageTorrent}: the bytes
   * it was given, which may be a bare info dictionary).
   */
  readonly metainfo: Buffer;
  /** The bencoded info dictionary alone (what TorrentInfo.metainfo documents). */
  readonly infoDictionary: Buffer;
  readonly name: string;
  readonly pieceLengthBytes: number;
  readonly pieceCount: number;
  readonly totalBytes: number;
  /** The files in torrent order, with their sizes. */
  readonly files: ReadonlyArray<{ readonly path: string; readonly length: number }>;
  /** The pieces' SHA-1 hashes, 20 bytes each, in order (info.pieces): a scrub counts bad pieces with them. */
  readonly pieceHashes: Buffer;
}

/** Hashes the files (streamed from their paths) and returns the private torrent. */
export async function createImageTorrent(options: CreateImageTorrentOptions): Promise<ImageTorrent> {
  if (
    options.pieceLengthBytes !== undefined &&
    (!Number.isInteger(options.pieceLengthBytes) || options.pieceLengthBytes < 16 * 1024 || (options.pieceLengthBytes & (options.pieceLengthBytes - 1)) !== 0)
  ) {
    throw new Error(`piece length ${options.pieceLengthBytes} is not a power of two of at least 16 KiB`);
  }
  if (options.files.length === 0) throw new Error('an image torrent needs at least one file');
  if (!IMAGE_KEY.test(options.name)) throw new Error(`torrent name ${JSON.stringify(options.name)} is not an image id (storage key)`);
  const seen = new Set<string>();
  for (const file of options.files) {
    if (!IMAGE_FILE_NAME.test(file)) throw new Error(`file name ${JSON.stringify(file)} is not a single path segment of [A-Za-z0-9._-]`);
    if (seen.has(file)) throw new Error(`file ${file} is listed twice`);
    seen.add(file);
  }
  checkAnnounceUrl(options.announce);

  const handles = await Promise.all(options.files.map((file) => open(replicaFile(options.directory, file), 'r')));
  try {
    const lengths: number[] = [];
    for (const [index, handle] of handles.entries()) {
      const info = await handle.stat();
      if (!info.isFile()) throw new Error(`${options.files[index]} is not a regular file`);
      lengths.push(info.size);
    }
    const totalBytes = lengths.reduce((sum, length) => sum + length, 0);
    if (totalBytes === 0) throw new Error('the image files are all empty');
    const pieceLength = options.pieceLengthBytes ?? pieceLengthFor(totalBytes);

    const pieceHashes: Buffer[] = [];
    const piece = Buffer.allocUnsafe(pieceLength);
    let filled = 0;
    let done = 0;
    for (const [index, handle] of handles.entries()) {
      let position = 0;
      while (position < lengths[index]!) {
        if (options.signal?.aborted) throw options.signal.reason ?? new Error('aborted');
        const want = Math.min(pieceLength - filled, lengths[index]! - position);
        const { bytesRead } = await handle.read(piece, filled, want, position);
        if (bytesRead === 0) throw new Error(`${options.files[index]} shrank while it was hashed`);
        filled += bytesRead;
        position += bytesRead;
        done += bytesRead;
        if (filled === pieceLength) {
          pieceHashes.push(createHash('sha1').update(piece).digest());
          filled = 0;
        }
        options.onProgress?.(done, totalBytes);
      }
    }
    if (filled > 0) pieceHashes.push(createHash('sha1').update(piece.subarray(0, filled)).digest());

    const pieces = Buffer.concat(pieceHashes);
    const infoDictionary = bencode({
      files: options.files.map((path, index) => ({ length: lengths[index]!, path: [path] })),
      name: options.name,
      'piece length': pieceLength,
      pieces,
      private: 1,
    });
    return {
      infoHash: createHash('sha1').update(infoDictionary).digest('hex'),
      metainfo: torrentFile(infoDictionary, options.announce),
      infoDictionary,
      name: options.name,
      pieceLengthBytes: pieceLength,
      pieceCount: pieceHashes.length,
      totalBytes,
      files: options.files.map((path, index) => ({ path, length: lengths[index]! })),
      pieceHashes: pieces,
    };
  } finally {
    await Promise.all(handles.map((handle) => handle.close()));
  }
}

/**
 * A .torrent around a bencoded info dictionary (kept byte for byte, so the info-hash cannot change) that
 * names exactly one tracker.
 */
export function torrentFile(infoDictionary: Buffer, announce: string): Buffer {
  checkAnnounceUrl(announce);
  // Keys in bencode order: announce < announce-list < info.
  return Buffer.concat([
    Buffer.from('d'),
    bencode('announce'),
    bencode(announce),
    bencode('announce-list'),
    bencode([[announce]]),
    bencode('info'),
    infoDictionary,
    Buffer.from('e'),
  ]);
}

/**
 * Reads a .torrent or a bare info dictionary and checks that it is an image torrent cowherd can use: private,
 * multi-file, every path one safe segment, a power-of-two piece length, the right number of piece hashes.
 * With `expectedInfoHash`, the info dictionary must hash to it.
 */
export function parseImageTorrent(metainfo: Uint8Array, expectedInfoHash?: string): ImageTorrent {
  const buffer = Buffer.from(metainfo.buffer, metainfo.byteOffset, metainfo.byteLength);
  const top = decodeDictionary(buffer);
  const infoSpan = top.spans.get('info');
  const infoDictionary = infoSpan ? buffer.subarray(infoSpan[0], infoSpan[1]) : buffer;
  const info = infoSpan ? decodeDictionary(infoDictionary).value : top.value;
  const infoHash = createHash('sha1').update(infoDictionary).digest('hex');
  if (expectedInfoHash !== undefined && infoHash !== expectedInfoHash.toLowerCase()) {
    throw new Error(`the metainfo's info-hash is ${infoHash}, not ${expectedInfoHash}`);
  }
  const name = text(info['name'], 'info.name');
  const pieceLength = info['piece length'];
  if (typeof pieceLength !== 'number' || pieceLength < 16 * 1024 || (pieceLength & (pieceLength - 1)) !== 0)
    throw new Error('info["piece length"] is not a power of two of at least 16 KiB');
  if (info['private'] !== 1) throw new Error('the torrent is not private');
  const pieces = info['pieces'];
  if (!Buffer.isBuffer(pieces) || pieces.length % 20 !== 0) throw new Error('info.pieces is not a list of SHA-1 hashes');
  if (!Array.isArray(info['files'])) throw new Error('not a multi-file torrent');
  const files = (info['files'] as unknown[]).map((entry, index) => {
    const file = entry as Record<string, unknown>;
    const path = file['path'];
    if (!Array.isArray(path) || path.length !== 1) throw new Error(`info.files[${index}].path is not a single segment`);
    const segment = text(path[0], `info.files[${index}].path`);
    if (!IMAGE_FILE_NAME.test(segment)) throw new Error(`info.files[${index}].path ${JSON.stringify(segment)} is not a safe file name`);
    const length = file['length'];
    if (typeof length !== 'number' || length < 0) throw new Error(`info.files[${index}].length is invalid`);
    return { path: segment, length };
  });
  if (new Set(files.map((file) => file.path)).size !== files.length) throw new Error('a file is listed twice');
  const totalBytes = files.reduce((sum, file) => sum + file.length, 0);
  const pieceCount = Math.ceil(totalBytes / pieceLength);
  if (pieces.length / 20 !== pieceCount) throw new Error(`${pieces.length / 20} piece hashes for ${pieceCount} pieces`);
  return {
    infoHash,
    metainfo: buffer,
    infoDictionary,
    name,
    pieceLengthBytes: pieceLength,
    pieceCount,
    totalBytes,
    files,
    pieceHashes: pieces,
  };
}

function checkAnnounceUrl(announce: string): void {
  const url = new URL(announce);
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`announce URL ${announce} is not http(s)`);
}

function text(value: unknown, what: string): string {
  if (!Buffer.isBuffer(value)) throw new Error(`${what} is not a string`);
  return value.toString('utf8');
}

// ---------------------------------------------------------------------------------------------------------
// Bencode (only what torrents use: integers, byte strings, lists, dictionaries with sorted keys)

type Bencodable = number | string | Buffer | readonly Bencodable[] | { readonly [key: string]: Bencodable };

function bencode(value: Bencodable): Buffer {
  const parts: Buffer[] = [];
  const write = (item: Bencodable): void => {
    if (typeof item === 'number') {
      if (!Number.isSafeInteger(item)) throw new Error(`cannot bencode ${item}`);
      parts.push(Buffer.from(`i${item}e`));
    } else if (typeof item === 'string' || Buffer.isBuffer(item)) {
      const bytes = typeof item === 'string' ? Buffer.from(item, 'utf8') : item;
      parts.push(Buffer.from(`${bytes.length}:`), bytes);
    } else if (Array.isArray(item)) {
      parts.push(Buffer.from('l'));
      for (const element of item as readonly Bencodable[]) write(element);
      parts.push(Buffer.from('e'));
    } else {
      const dictionary = item as { readonly [key: string]: Bencodable };
      parts.push(Buffer.from('d'));
      // Keys sorted as raw bytes.
      for (const key of Object.keys(dictionary).sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)))) {
        write(key);
        write(dictionary[key]!);
      }
      parts.push(Buffer.from('e'));
    }
  };
  write(value);
  return Buffer.concat(parts);
}

type Decoded = number | Buffer | Decoded[] | { [key: string]: Decoded };

/** Decodes a top-level dictionary, also returning each top-level value's byte span. */
function decodeDictionary(buffer: Buffer): { value: Record<string, Decoded>; spans: Map<string, [number, number]> } {
  const spans = new Map<string, [number, number]>();
  let position = 0;
  const fail = (problem: string): never => {
    throw new Error(`invalid bencoding at byte ${position}: ${problem}`);
  };
  const readValue = (depth: number): Decoded => {
    if (depth > 16) fail('nested too deeply');
    const byte = buffer[position];
    if (byte === undefined) return fail('truncated');
    if (byte === 0x69 /* i */) {
      const end = buffer.indexOf(0x65, position);
      if (end < 0) fail('unterminated integer');
      const digits = buffer.toString('ascii', position + 1, end);
      if (!/^(0|-?[1-9][0-9]*)$/.test(digits)) fail('bad integer');
      position = end + 1;
      const number = Number(digits);
      if (!Number.isSafeInteger(number)) fail('integer too large');
      return number;
    }
    if (byte >= 0x30 && byte <= 0x39) {
      const colon = buffer.indexOf(0x3a, position);
      if (colon < 0) fail('unterminated string length');
      const digits = buffer.toString('ascii', position, colon);
      if (!/^(0|[1-9][0-9]*)$/.test(digits)) fail('bad string length');
      const length = Number(digits);
      if (colon + 1 + length > buffer.length) fail('truncated string');
      position = colon + 1 + length;
      return buffer.subarray(colon + 1, colon + 1 + length);
    }
    if (byte === 0x6c /* l */) {
      position += 1;
      const list: Decoded[] = [];
      while (buffer[position] !== 0x65) list.push(readValue(depth + 1));
      position += 1;
      return list;
    }
    if (byte === 0x64 /* d */) return readDictionary(depth, false);
    return fail('unknown type');
  };
  const readDictionary = (depth: number, top: boolean): Record<string, Decoded> => {
    position += 1;
    const dictionary: Record<string, Decoded> = Object.create(null) as Record<string, Decoded>;
    while (buffer[position] !== 0x65) {
      if (buffer[position] === undefined) fail('truncated dictionary');
      const key = readValue(depth + 1);
      if (!Buffer.isBuffer(key)) return fail('dictionary key is not a string');
      const start = position;
      dictionary[key.toString('utf8')] = readValue(depth + 1);
      if (top) spans.set(key.toString('utf8'), [start, position]);
    }
    position += 1;
    return dictionary;
  };
  if (buffer[0] !== 0x64) fail('not a dictionary');
  const value = readDictionary(0, true);
  if (position !== buffer.length) fail('trailing bytes');
  return { value, spans };
}
