/**
 * What a bench:distribution method gets and returns, and the helpers every method uses to measure the same way.
 *
 * A method runs on a fresh {@link TestBed} state (host directories empty, no process of an earlier method left)
 * with the hosts below: it starts its servers, calls `start()` on a {@link Stopwatch} once everything is ready
 * to send, makes every receiver fetch the image into its own directory, records each receiver's completion,
 * and stops all of its processes before it returns. The runner turns the result into the JSON line.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import type { Daemon } from '../services/common/platform/child-process.js';
import type { TestBed } from './testbed.js';

/** The host that holds the image at the start. */
export const ORIGIN = 'origin';
/** A host for coordination (tracker, control plane): its traffic is not counted. */
export const CONTROL = 'control';
/** Receiver host names are r1, r2, ... */
export function receiverHosts(bed: TestBed): string[] {
  return bed.hosts.filter((host) => /^r\d+$/.test(host));
}

/** The image to distribute: random data, on the shared file system (readable from every namespace). */
export interface BenchImage {
  /** The origin's copy, inside `bed.directory(ORIGIN)`. */
  readonly path: string;
  readonly bytes: number;
  /** Hex SHA-256 of the content. */
  readonly sha256: string;
}

/** What a method measured. */
export interface MethodResult {
  /** T: seconds from `Stopwatch.start()` until the last receiver held a complete copy. */
  readonly seconds: number;
  /** Bytes the origin's eth0 transmitted in that time. */
  readonly originTxBytes: number;
  /** Every receiver's copy has the image's SHA-256. */
  readonly allVerified: boolean;
  /** S when the method moved other bytes than the raw image (cowherd: the qcow2 disk and the template). */
  readonly bytes?: number;
  /**
   * CPU-seconds all receivers' processes used in T (the test bed's per-host cgroups: user and system time,
   * processes that exited included); undefined when the machine has no CPU accounting.
   */
  readonly receiversCpuSeconds: number | undefined;
  /** Per receiver: seconds until it held its copy, and bytes its eth0 sent in T (what it shared). */
  readonly perReceiver: ReadonlyArray<{ readonly host: string; readonly seconds: number; readonly txBytes: number }>;
}

/** A method of distributing the image from ORIGIN to every receiver host. */
export type DistributionMethod = (bed: TestBed, image: BenchImage) => Promise<MethodResult>;

/** Times one distribution and counts the origin's transmitted bytes and the receivers' CPU over the same interval. */
export class Stopwatch {
  private startedAt = 0;
  private txAtStart = new Map<string, number>();
  private cpuAtStart: number | undefined;
  private readonly finishedAt = new Map<string, number>();

  constructor(private readonly bed: TestBed) {}

  /** Call when everything is ready and the first receiver is about to be told to fetch. */
  async start(): Promise<void> {
    this.txAtStart = await this.txBytes();
    this.cpuAtStart = this.receiversCpuSeconds();
    this.startedAt = performance.now();
  }

  /** Records that a receiver holds a complete copy now (the first call per receiver counts). */
  finished(receiver: string): void {
    if (!this.finishedAt.has(receiver)) this.finishedAt.set(receiver, performance.now());
  }

  /** Once every receiver finished: T, and the origin's bytes read now (call it right after the last finish). */
  async result(receivers: readonly string[], copies: readonly string[], image: BenchImage): Promise<MethodResult> {
    const tx = await this.txBytes();
    const cpu = this.receiversCpuSeconds();
    const sent = (host: string): number => (tx.get(host) ?? 0) - (this.txAtStart.get(host) ?? 0);
    const missing = receivers.filter((receiver) => !this.finishedAt.has(receiver));
    if (missing.length > 0) throw new Error(`receivers never finished: ${missing.join(', ')}`);
    const last = Math.max(...receivers.map((receiver) => this.finishedAt.get(receiver)!));
    return {
      seconds: (last - this.startedAt) / 1000,
      originTxBytes: sent(ORIGIN),
      receiversCpuSeconds: cpu === undefined || this.cpuAtStart === undefined ? undefined : cpu - this.cpuAtStart,
      allVerified: await verifyCopies(copies, image),
      perReceiver: receivers.map((host) => ({ host, seconds: (this.finishedAt.get(host)! - this.startedAt) / 1000, txBytes: sent(host) })),
    };
  }

  /** Sum of every receiver's CPU-seconds so far, or undefined without CPU accounting. */
  private receiversCpuSeconds(): number | undefined {
    let total = 0;
    for (const host of receiverHosts(this.bed)) {
      const seconds = this.bed.cpuSeconds(host);
      if (seconds === undefined) return undefined;
      total += seconds;
    }
    return total;
  }

  /** The origin's counter first: it is the one that must be read right at the start and the end. */
  private async txBytes(): Promise<Map<string, number>> {
    const counts = new Map<string, number>();
    counts.set(ORIGIN, await this.bed.txBytes(ORIGIN));
    await Promise.all(receiverHosts(this.bed).map(async (host) => counts.set(host, await this.bed.txBytes(host))));
    return counts;
  }
}

/** Hex SHA-256 of a file (node:crypto: SHA-NI, ~0.35 s per 256 MiB). */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** True when every file has the image's size and SHA-256. */
export async function verifyCopies(paths: readonly string[], image: BenchImage): Promise<boolean> {
  for (const path of paths) {
    const size = await stat(path).then(
      (stats) => stats.size,
      () => -1,
    );
    if (size !== image.bytes || (await sha256File(path)) !== image.sha256) {
      process.stderr.write(`distribution: ${path} is not a verified copy\n`);
      return false;
    }
  }
  return paths.length > 0;
}

/** Resolves once `condition()` is true, checking every `intervalMs`; rejects after `timeoutMs`. */
export async function waitUntil(what: string, condition: () => boolean | Promise<boolean>, timeoutMs: number, intervalMs = 100): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** Generous: the slowest method (HTTP fan-out) needs about receivers x S/B. */
export function transferTimeoutMs(bed: TestBed, image: BenchImage): number {
  return Math.round(((receiverHosts(bed).length + 4) * image.bytes * 1000) / bed.rateBytesPerSecond) + 120_000;
}

/** Stops processes in parallel, ignoring the ones already gone. */
export async function stopAll(daemons: Iterable<Daemon>): Promise<void> {
  await Promise.all([...daemons].map((daemon) => daemon.stop(3_000)));
}

/**
 * Polls every 50 ms until each receiver's completion signal (a file) exists, recording each on the stopwatch;
 * fails early when one of the method's processes died.
 */
export async function waitForCopies(
  bed: TestBed,
  image: BenchImage,
  receivers: readonly string[],
  copies: readonly string[],
  stopwatch: Stopwatch,
  daemons: readonly Daemon[],
  signal: (copy: string) => string = (copy) => copy,
): Promise<void> {
  let died: Daemon | undefined;
  for (const daemon of daemons) void daemon.exited.then(() => (died ??= daemon));
  const pending = new Set(receivers.keys());
  await waitUntil(
    'every receiver to complete',
    async () => {
      for (const index of [...pending]) {
        if (
          await access(signal(copies[index]!)).then(
            () => true,
            () => false,
          )
        ) {
          stopwatch.finished(receivers[index]!);
          pending.delete(index);
        }
      }
      // After the check: a sender that exits once every receiver is done (uftp) has not failed.
      if (pending.size > 0 && died !== undefined) throw new Error(`a process of the method exited early: ${died.output().slice(-2000)}`);
      return pending.size === 0;
    },
    transferTimeoutMs(bed, image),
    50,
  );
}
