/**
 * bench:distribution — one image from one origin to N receivers on a network-namespace test bed, several ways,
 * in the same run on the same test bed:
 * - cowherd: cowherd's own distribution through the real services and agents (distribution-cowherd.ts);
 * - http: HTTP fan-out from the origin (one curl per receiver, all at once);
 * - deluge: the 2011 tool's stack, mktorrent + deluged (libtorrent);
 * - aria2: aria2c with the same kind of torrent.
 * Prints one JSON line per method:
 *   {"method","receivers","bytes","ratio_time","ratio_origin","all_verified","seconds","rate_mbit"}
 * where ratio_time = T / (S/B) (T: until the last receiver holds a complete copy, S: image bytes, B: shaped rate
 * in bytes/s; 1.0 is one copy's time at full rate) and ratio_origin = bytes the origin's eth0 sent in T / S.
 *
 * Root. Environment: COWHERD_BENCH_IMAGE_MIB (256), COWHERD_BENCH_RATE_MBIT (100), COWHERD_BENCH_RECEIVERS (6),
 * COWHERD_BENCH_METHODS (all, comma-separated, e.g. http,aria2), COWHERD_BENCH_QUEUE_KIB (the shaper's queue per
 * direction, default 100 ms at the rate), COWHERD_BENCH_DIR (the system temp directory).
 */
import { createHash, randomFillSync } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { aria2, deluge, httpFanOut } from './distribution-baselines.js';
import { cowherdMethod } from './distribution-cowherd.js';
import { CONTROL, ORIGIN, receiverHosts, type BenchImage, type DistributionMethod } from './distribution-method.js';
import { TestBed } from './testbed.js';

const IMAGE_MIB = positive('COWHERD_BENCH_IMAGE_MIB', 256);
const RATE_MBIT = positive('COWHERD_BENCH_RATE_MBIT', 100);
const RECEIVERS = positive('COWHERD_BENCH_RECEIVERS', 6);
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
};

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

async function main(): Promise<void> {
  const names = selectedMethods();
  const receivers = Array.from({ length: RECEIVERS }, (_, index) => `r${index + 1}`);
  const bed = await TestBed.create({
    hosts: [ORIGIN, CONTROL, ...receivers],
    rateMbit: RATE_MBIT,
    ...(QUEUE_KIB === undefined ? {} : { queueBytes: QUEUE_KIB * 1024 }),
    ...(process.env['COWHERD_BENCH_DIR'] ? { directory: process.env['COWHERD_BENCH_DIR'] } : {}),
  });
  let failed = false;
  try {
    const imagePath = join(bed.directory(ORIGIN), 'image.raw');
    for (const name of names) {
      await bed.clearDirectories();
      // A fresh image per method: no method finds another's copies (or their torrent) anywhere.
      const image = await writeRandomImage(imagePath, IMAGE_MIB);
      try {
        const result = await methods[name]!(bed, image);
        const bytes = result.bytes ?? image.bytes;
        const seconds = bytes / bed.rateBytesPerSecond;
        const line = {
          method: name,
          receivers: receiverHosts(bed).length,
          bytes,
          ratio_time: round(result.seconds / seconds),
          ratio_origin: round(result.originTxBytes / bytes),
          all_verified: result.allVerified,
          seconds: round(result.seconds),
          rate_mbit: RATE_MBIT,
        };
        process.stdout.write(`${JSON.stringify(line)}\n`);
        const receiverSummary = result.perReceiver
          .map((receiver) => `${receiver.host} ${round(receiver.seconds)} s, sent ${round(receiver.txBytes / image.bytes)} S`)
          .join('; ');
        process.stderr.write(`distribution: ${name}: ${receiverSummary}\n`);
        if (!result.allVerified) failed = true;
      } catch (error) {
        if (error instanceof NotWiredError) {
          process.stderr.write(`distribution: skipping ${name}: ${error.message}\n`);
          continue;
        }
        failed = true;
        process.stderr.write(`distribution: ${name} failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      }
    }
  } finally {
    await bed.destroy();
  }
  if (failed) process.exitCode = 1;
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}

await main();
