/**
 * bench:distribution — one image from one origin to N receivers on a network-namespace test bed, several ways,
 * in the same run on the same test bed:
 * - cowherd: cowherd's own distribution through the real services and agents (distribution-cowherd.ts);
 * - http: HTTP fan-out from the origin (one curl per receiver, all at once);
 * - deluge: the 2011 tool's stack, mktorrent + deluged (libtorrent);
 * - aria2: aria2c with the same kind of torrent;
 * - multicast: reliable multicast with uftp/uftpd (distribution-multicast.ts);
 * - nfs: a user-space NFS server (nfs-ganesha) on the origin, nfs-cp on every receiver (distribution-nfs.ts).
 * Prints one JSON line per method:
 *   {"method","receivers","bytes","ratio_time","ratio_origin","cpu_s_per_gib","all_verified","seconds","rate_mbit"}
 * where ratio_time = T / (S/B) (T: until the last receiver holds a complete copy, S: image bytes, B: shaped rate
 * in bytes/s; 1.0 is one copy's time at full rate), ratio_origin = bytes the origin's eth0 sent in T / S, and
 * cpu_s_per_gib = the receivers' CPU-seconds in T / the GiB they received (receivers x S / 2^30), null without
 * CPU accounting.
 *
 * One cell (rate, receivers, image size) by default; COWHERD_BENCH_MATRIX=1 runs the cells of MATRIX one after
 * the other, each on its own test bed with every method, and adds "cell" to every line.
 *
 * Root. Environment: COWHERD_BENCH_IMAGE_MIB (256; in the matrix: overrides every cell's size),
 * COWHERD_BENCH_RATE_MBIT (100), COWHERD_BENCH_RECEIVERS (6), COWHERD_BENCH_METHODS (all, comma-separated, e.g.
 * http,aria2), COWHERD_BENCH_MATRIX (unset), COWHERD_BENCH_CELLS (every cell of the matrix, comma-separated),
 * COWHERD_BENCH_QUEUE_KIB (the shaper's queue per direction, default 100 ms at the rate), COWHERD_BENCH_DIR (the
 * system temp directory).
 */
import { createHash, randomFillSync } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { aria2, deluge, httpFanOut } from './distribution-baselines.js';
import { cowherdMethod } from './distribution-cowherd.js';
import { multicast } from './distribution-multicast.js';
import { nfs } from './distribution-nfs.js';
import { CONTROL, ORIGIN, receiverHosts, type BenchImage, type DistributionMethod } from './distribution-method.js';
import { TestBed } from './testbed.js';

const IMAGE_MIB = positive('COWHERD_BENCH_IMAGE_MIB', 256);
/** Set only when COWHERD_BENCH_IMAGE_MIB is: then it replaces every matrix cell's size (quick trials). */
const IMAGE_MIB_OVERRIDE = process.env['COWHERD_BENCH_IMAGE_MIB'] ? IMAGE_MIB : undefined;
const RATE_MBIT = positive('COWHERD_BENCH_RATE_MBIT', 100);
const RECEIVERS = positive('COWHERD_BENCH_RECEIVERS', 6);
const MATRIX = process.env['COWHERD_BENCH_MATRIX'] === '1';
/** The shaper's queue per direction; default (unset) is the test bed's: 100 ms at the rate. */
const QUEUE_KIB = process.env['COWHERD_BENCH_QUEUE_KIB'] ? positive('COWHERD_BENCH_QUEUE_KIB', 0) : undefined;

/** Thrown by a method that cannot run yet: the runner skips it with a message on stderr. */
class NotWiredError extends Error {
  override readonly name = 'NotWiredError';
}

const methods: Record<string, DistributionMethod> = {
  cowherd: cowherdMethod,
  http: httpFanOut,
  deluge,
  aria2,
  multicast,
  nfs,
};

/** One configuration of the test bed, run with every (selected) method. */
interface Cell {
  /** The matrix's name for it; '' for the one cell of a run without the matrix (its lines carry no "cell"). */
  readonly name: string;
  readonly rateMbit: number;
  readonly receivers: number;
  readonly imageMib: number;
  /** Methods this cell leaves out (with the reason on stderr). */
  readonly skip?: Readonly<Record<string, string>>;
}

/**
 * The highest rate this machine's test bed shapes: one curl of 1 GiB between two hosts (2 cores, shared) got
 * 0.93 of the set rate at 1 Gbit/s, 0.90 at 2, 0.88 at 3, 0.82-0.83 at 4 and 5, and 0.62 at 10 Gbit/s (6.2 Gbit/s
 * delivered; 8.1 Gbit/s with the shaper at 100 Gbit/s, i.e. unshaped). 5 Gbit/s is the highest rate at which htb
 * still delivers the share it delivers at 4; above it the share falls fast.
 */
const MAX_RATE_MBIT = 5000;
/** The fan-out's ratio_time is receivers x 1.05 by construction; it would add ~8 min to the series' ~16. */
const SCALING_SKIP = { http: 'one copy per receiver from the origin by construction; left out of the scaling series for time' };

/**
 * COWHERD_BENCH_MATRIX=1: sizes chosen so that the whole matrix, every method, takes about 35 minutes on the
 * 2-core machine (README: bench:distribution, the matrix).
 */
const CELLS: readonly Cell[] = [
  { name: '100mbit-6', rateMbit: 100, receivers: 6, imageMib: 256 },
  { name: '1gbit-2', rateMbit: 1000, receivers: 2, imageMib: 512 },
  { name: '1gbit-6', rateMbit: 1000, receivers: 6, imageMib: 512 },
  { name: 'max-2', rateMbit: MAX_RATE_MBIT, receivers: 2, imageMib: 512 },
  { name: '25mbit-6', rateMbit: 25, receivers: 6, imageMib: 32, skip: SCALING_SKIP },
  { name: '25mbit-12', rateMbit: 25, receivers: 12, imageMib: 32, skip: SCALING_SKIP },
  { name: '25mbit-24', rateMbit: 25, receivers: 24, imageMib: 32, skip: SCALING_SKIP },
];

function positive(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    process.stderr.write(`distribution: ${name} must be a positive integer, got ${JSON.stringify(raw)}\n`);
    process.exit(2);
  }
  return value;
}

function selectedCells(): Cell[] {
  if (!MATRIX) return [{ name: '', rateMbit: RATE_MBIT, receivers: RECEIVERS, imageMib: IMAGE_MIB }];
  const raw = process.env['COWHERD_BENCH_CELLS'];
  const cells = CELLS.map((cell) => (IMAGE_MIB_OVERRIDE === undefined ? cell : { ...cell, imageMib: IMAGE_MIB_OVERRIDE }));
  if (raw === undefined || raw.trim() === '') return cells;
  const wanted = raw
    .split(',')
    .map((name) => name.trim())
    .filter(Boolean);
  const unknown = wanted.filter((name) => !cells.some((cell) => cell.name === name));
  if (unknown.length > 0) {
    process.stderr.write(`distribution: unknown cell(s) ${unknown.join(', ')}; known: ${cells.map((cell) => cell.name).join(', ')}\n`);
    process.exit(2);
  }
  return cells.filter((cell) => wanted.includes(cell.name));
}

function selectedMethods(): string[] {
  const raw = process.env['COWHERD_BENCH_METHODS'];
  if (raw === undefined || raw.trim() === '') return Object.keys(methods);
  const wanted = raw
    .split(',')
    .map((name) => name.trim())
    .filter(Boolean);
  const unknown = wanted.filter((name) => !(name in methods));
  if (unknown.length > 0) {
    process.stderr.write(`distribution: unknown method(s) ${unknown.join(', ')}; known: ${Object.keys(methods).join(', ')}\n`);
    process.exit(2);
  }
  return Object.keys(methods).filter((name) => wanted.includes(name));
}

/** Writes `mib` MiB of random data and returns its SHA-256 (random: nothing compresses or deduplicates it). */
async function writeRandomImage(path: string, mib: number): Promise<BenchImage> {
  const hash = createHash('sha256');
  const chunk = Buffer.alloc(16 * 1024 * 1024);
  const file = await open(path, 'w');
  try {
    for (let left = mib * 1024 * 1024; left > 0; left -= chunk.length) {
      const part = chunk.subarray(0, Math.min(chunk.length, left));
      randomFillSync(part);
      hash.update(part);
      await file.write(part);
    }
    await file.sync();
  } finally {
    await file.close();
  }
  return { path, bytes: mib * 1024 * 1024, sha256: hash.digest('hex') };
}

/** Runs every method on one test bed built for the cell; prints their lines; returns false when one failed. */
async function runCell(cell: Cell, names: readonly string[]): Promise<boolean> {
  const receivers = Array.from({ length: cell.receivers }, (_, index) => `r${index + 1}`);
  const bed = await TestBed.create({
    hosts: [ORIGIN, CONTROL, ...receivers],
    rateMbit: cell.rateMbit,
    ...(QUEUE_KIB === undefined ? {} : { queueBytes: QUEUE_KIB * 1024 }),
    ...(process.env['COWHERD_BENCH_DIR'] ? { directory: process.env['COWHERD_BENCH_DIR'] } : {}),
  });
  const label = cell.name === '' ? '' : `${cell.name}: `;
  let failed = false;
  try {
    const imagePath = join(bed.directory(ORIGIN), 'image.raw');
    for (const name of names) {
      const skip = cell.skip?.[name];
      if (skip !== undefined) {
        process.stderr.write(`distribution: ${label}skipping ${name}: ${skip}\n`);
        continue;
      }
      await bed.clearDirectories();
      // A fresh image per method: no method finds another's copies (or their torrent) anywhere.
      const image = await writeRandomImage(imagePath, cell.imageMib);
      try {
        const result = await methods[name]!(bed, image);
        const bytes = result.bytes ?? image.bytes;
        const seconds = bytes / bed.rateBytesPerSecond;
        const receivedGib = (receiverHosts(bed).length * bytes) / 2 ** 30;
        const line = {
          ...(cell.name === '' ? {} : { cell: cell.name }),
          method: name,
          receivers: receiverHosts(bed).length,
          bytes,
          ratio_time: round(result.seconds / seconds),
          ratio_origin: round(result.originTxBytes / bytes),
          cpu_s_per_gib: result.receiversCpuSeconds === undefined ? null : round(result.receiversCpuSeconds / receivedGib),
          all_verified: result.allVerified,
          seconds: round(result.seconds),
          rate_mbit: cell.rateMbit,
        };
        process.stdout.write(`${JSON.stringify(line)}\n`);
        const receiverSummary = result.perReceiver
          .map((receiver) => `${receiver.host} ${round(receiver.seconds)} s, sent ${round(receiver.txBytes / image.bytes)} S`)
          .join('; ');
        process.stderr.write(`distribution: ${label}${name}: ${receiverSummary}\n`);
        if (!result.allVerified) failed = true;
      } catch (error) {
        if (error instanceof NotWiredError) {
          process.stderr.write(`distribution: ${label}skipping ${name}: ${error.message}\n`);
          continue;
        }
        failed = true;
        process.stderr.write(`distribution: ${label}${name} failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      }
    }
  } finally {
    await bed.destroy();
  }
  return !failed;
}

async function main(): Promise<void> {
  const names = selectedMethods();
  let failed = false;
  for (const cell of selectedCells()) {
    const started = performance.now();
    if (!(await runCell(cell, names))) failed = true;
    if (cell.name !== '') process.stderr.write(`distribution: cell ${cell.name} took ${round((performance.now() - started) / 1000)} s\n`);
  }
  if (failed) process.exitCode = 1;
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}

await main();
