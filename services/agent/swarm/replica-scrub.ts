/**
 * Noticing damage to a verified replica while the agent runs (job 2; issue 12 "Damage is noticed while the
 * agent runs"): the fingerprint of each file at verification, and the piece-by-piece scan that the background
 * scrub and every re-verification run.
 *
 * Decisions:
 * - Fingerprint = size, mtime and ctime (ns) and inode, taken when a replica is verified and kept in its state
 *   file. Any write through the file system moves mtime or ctime (ctime cannot be set back from user space),
 *   a replaced file has another inode: comparing costs one stat per file, so it runs before every seed, every
 *   clone from the replica and every FetchImage that finds it AVAILABLE, and on every inotify event in the
 *   replica's directory. A change is not damage by itself (a chmod or chown moves ctime too): it triggers a
 *   re-verification (the scan below), and only a failing scan is damage.
 * - Bit rot and writes below the file system (a block device written directly) move no timestamp: the scrub
 *   re-reads every AVAILABLE replica at a bounded rate (`COWHERD_SCRUB_MIB_PER_SECOND`, default 32 MiB/s:
 *   ~5 % of one core for SHA-256 + SHA-1 on this machine's SHA-NI, and a small share of a disk's bandwidth),
 *   one pass after another with `COWHERD_SCRUB_INTERVAL_SECONDS` between them.
 * - The scan reads the files once, in torrent order, and checks both hashes the image carries: each piece's
 *   SHA-1 (from the torrent; the count of bad pieces is what a repair will fetch) and each file's whole-file
 *   SHA-256 and size (the image record; what a replica is verified against).
 */
import { createHash, type Hash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open, stat, type FileHandle } from 'node:fs/promises';
import { counter } from '../../common/platform/metrics.js';
import type { ExpectedImageFile } from './swarm.js';
import type { ImageTorrent } from './torrent.js';
import { replicaFile } from '../image-directory/index.js';

/** A file as it was when it was verified. Big integers as decimal strings (JSON state file). */
export interface FileFingerprint {
  readonly path: string;
  readonly sizeBytes: string;
  readonly mtimeNs: string;
  readonly ctimeNs: string;
  readonly inode: string;
}

/** The fingerprints of `files` in `directory`; a missing file gets inode "0" (never equal to a real one). */
export async function fingerprintFiles(directory: string, files: ReadonlyArray<{ readonly path: string }>): Promise<FileFingerprint[]> {
  return Promise.all(
    files.map(async (file) => {
      const info = await stat(replicaFile(directory, file.path), { bigint: true }).catch(() => undefined);
      return info
        ? { path: file.path, sizeBytes: String(info.size), mtimeNs: String(info.mtimeNs), ctimeNs: String(info.ctimeNs), inode: String(info.ino) }
        : { path: file.path, sizeBytes: '-1', mtimeNs: '0', ctimeNs: '0', inode: '0' };
    }),
  );
}

/** The paths whose fingerprint differs (or that one side lacks). */
export function changedFiles(recorded: readonly FileFingerprint[], current: readonly FileFingerprint[]): string[] {
  const now = new Map(current.map((file) => [file.path, file]));
  const changed = recorded
    .filter((file) => {
      const other = now.get(file.path);
      return !other || other.sizeBytes !== file.sizeBytes || other.mtimeNs !== file.mtimeNs || other.ctimeNs !== file.ctimeNs || other.inode !== file.inode;
    })
    .map((file) => file.path);
  for (const file of current) if (!recorded.some((known) => known.path === file.path)) changed.push(file.path);
  return changed;
}

/** What a scan found. */
export interface ScanResult {
  /** Files that are missing, of the wrong size, or whose SHA-256 differs from the image record. */
  readonly badFiles: string[];
  /** Pieces whose SHA-1 differs from the torrent's (a missing or short file makes its pieces bad). */
  readonly badPieces: number;
  /** Bytes read. */
  readonly bytesRead: number;
}

/** Options of {@link scanReplica}. */
export interface ScanOptions {
  /** Reads at most this many bytes per second; 0 or absent = as fast as the disk goes. */
  readonly bytesPerSecond?: number;
  /** Stops the scan (it rejects with the signal's reason). */
  readonly signal?: AbortSignal;
  /** Called with the bytes read so far. */
  readonly onBytes?: (bytesRead: number) => void;
}

const READ_CHUNK = 1024 * 1024;

/** Reads the replica's files once and checks every piece's SHA-1 and every file's size and SHA-256. */
export async function scanReplica(
  directory: string,
  torrent: Pick<ImageTorrent, 'files' | 'pieceLengthBytes' | 'pieceCount' | 'pieceHashes'>,
  files: readonly ExpectedImageFile[],
  options: ScanOptions = {},
): Promise<ScanResult> {
  const handles: Array<FileHandle | undefined> = [];
  const badFiles = new Set<string>();
  try {
    for (const file of files) {
      const handle = await open(replicaFile(directory, file.path), fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW).catch(() => undefined);
      const info = await handle?.stat();
      if (!handle || !info?.isFile() || info.size !== file.sizeBytes) badFiles.add(file.path);
      handles.push(handle);
    }
    const fileHashes: Hash[] = files.map(() => createHash('sha256'));
    const started = performance.now();
    const buffer = Buffer.allocUnsafe(READ_CHUNK);
    let bytesRead = 0;
    let badPieces = 0;
    // Pieces span files: walk the concatenation of the files, piece by piece, in chunks of at most 1 MiB.
    let fileIndex = 0;
    let filePosition = 0;
    for (let piece = 0; piece < torrent.pieceCount; piece += 1) {
      const pieceHash = createHash('sha1');
      let pieceBad = false;
      let left = Math.min(torrent.pieceLengthBytes, totalOf(torrent.files) - piece * torrent.pieceLengthBytes);
      while (left > 0) {
        options.signal?.throwIfAborted();
        while (fileIndex < files.length && filePosition >= files[fileIndex]!.sizeBytes) {
          fileIndex += 1;
          filePosition = 0;
        }
        const file = files[fileIndex]!;
        const length = Math.min(left, READ_CHUNK, file.sizeBytes - filePosition);
        const handle = handles[fileIndex];
        if (!handle || badFiles.has(file.path)) {
          // Missing, or another size than the record (every later offset disagrees): each piece touching it is bad.
          pieceBad = true;
        } else {
          const { bytesRead: got } = await handle.read(buffer, 0, length, filePosition);
          if (got !== length) {
            pieceBad = true;
            badFiles.add(file.path);
          } else {
            const chunk = buffer.subarray(0, length);
            pieceHash.update(chunk);
            fileHashes[fileIndex]!.update(chunk);
          }
          bytesRead += got;
          options.onBytes?.(bytesRead);
          await pace(bytesRead, started, options.bytesPerSecond ?? 0, options.signal);
        }
        filePosition += length;
        left -= length;
      }
      if (pieceBad || !pieceHash.digest().equals(torrent.pieceHashes.subarray(piece * 20, piece * 20 + 20))) badPieces += 1;
    }
    for (const [index, file] of files.entries()) {
      if (!badFiles.has(file.path) && fileHashes[index]!.digest('hex') !== file.sha256.toLowerCase()) badFiles.add(file.path);
    }
    return { badFiles: files.map((file) => file.path).filter((path) => badFiles.has(path)), badPieces, bytesRead };
  } finally {
    await Promise.allSettled(handles.map((handle) => handle?.close()));
  }
}

function totalOf(files: ReadonlyArray<{ readonly length: number }>): number {
  return files.reduce((sum, file) => sum + file.length, 0);
}

/** Sleeps until `bytes` read since `started` fit `bytesPerSecond`. */
async function pace(bytes: number, started: number, bytesPerSecond: number, signal: AbortSignal | undefined): Promise<void> {
  if (bytesPerSecond <= 0) return;
  const due = (bytes / bytesPerSecond) * 1000 - (performance.now() - started);
  if (due < 5) return;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, due);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal!.reason as Error);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Bytes the scrub read, and replicas it (or a check before use) found damaged. */
export const scrubMetrics = {
  bytes: counter({
    name: 'cowherd_replica_scrub_bytes_total',
    help: 'Bytes of verified replicas this agent re-read to check them (background scrub and re-verifications)',
  }),
  damaged: counter({
    name: 'cowherd_replica_damaged_total',
    help: 'Replicas this agent found damaged after they were verified (scrub, or the check before a seed, serve or clone)',
    labelNames: ['found_by'] as const,
  }),
};
