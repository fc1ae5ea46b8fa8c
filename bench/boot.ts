/**
 * bench:boot — how long until clones on hosts that lack their image have booted (issue 16, streaming clones), on
 * the network-namespace test bed of bench:distribution with a whole cowherd fleet (cowherd-fleet.ts): one image
 * of COWHERD_BENCH_IMAGE_MIB MiB (1024) of random data on the origin, with a direct-kernel-boot template whose
 * guest (scripts/guest-kernel.sh) reads a fixed scattered set of blocks (`cowherd.reads=`, 64 MiB by default)
 * before it writes its marker and powers off; COWHERD_BENCH_HOSTS hosts (6) at COWHERD_BENCH_RATE_MBIT (100)
 * that lack the image; at t = 0 one CloneVirtualMachines call (cloning service) asks for one started clone on
 * each. Methods, in this order, each from the same state (only the origin holds the image, no clone exists):
 * - local: the image is distributed to every host first (not timed), then the clones are made and started:
 *   the floor. Before it, one clone boots alone (one_guest_seconds: the TCG boot without contention);
 * - distribute-then-clone: today's path, delivery DISTRIBUTE (clones are made once the host's replica is AVAILABLE);
 * - stream: delivery STREAM (clones are made and started while the replica arrives);
 * - stream-profiled: delivery STREAM again, after an earlier streamed boot of the same image version (the stream
 *   row, or an unprinted warm-up stream round when stream is not selected) in which the agents could record a
 *   read profile. See README (bench:boot) for what the bench assumes and how it tells.
 * Prints one JSON line per method:
 *   {"method","hosts","image_bytes","seconds_to_last_marker","ratio_to_local","origin_bytes_ratio",
 *    "all_replicas_verified","seconds_to_all_available","guest_reads_seconds_max","longest_read_ms", ...}
 * A method that fails prints its line with "error" and the run goes on; the exit code is then 1.
 *
 * Root. Environment: COWHERD_BENCH_IMAGE_MIB (1024), COWHERD_BENCH_HOSTS (6), COWHERD_BENCH_RATE_MBIT (100),
 * COWHERD_BENCH_METHODS (all, comma-separated), COWHERD_BENCH_READS (`64x1024`: 64 blocks of 1024 KiB over the
 * whole disk; `<count>x<KiB>@<span MiB>` for another span), COWHERD_BENCH_DIR (the system temp directory), and
 * the fleet's (COWHERD_BENCH_LOG_DIR, ...; cowherd-fleet.ts).
 */
import { randomUUID } from 'node:crypto';
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status as Status, type ServiceError } from '@grpc/grpc-js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest_Delivery,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
} from '../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributeImageResponse } from '../services/gen/cowherd/distribution/v1/distribution_service.js';
import { ImageReplica_State, ImageView, type Image, type ImageReplica } from '../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../services/gen/google/longrunning/operations.js';
import { unpack } from '../services/common/domain/operations.js';
import { readServiceError } from '../services/common/platform/errors.js';
import { Resources } from '../test/harness/index.js';
import { call } from '../test/harness/grpc.js';
import { guestKit, guestReadsLine, parseGuestReads, type GuestReads, type GuestReadsLine } from '../test/harness/guest.js';
import { bootPieces, publishBootImage, type BootImage } from './boot-image.js';
import { processCpuSeconds, startBenchFleet, waitOperation, type BenchFleet } from './cowherd-fleet.js';
import { ORIGIN, sha256File } from './distribution-method.js';
import { TestBed } from './testbed.js';

const run = promisify(execFile);
const METHODS = ['local', 'distribute-then-clone', 'stream', 'stream-profiled'] as const;
type Method = (typeof METHODS)[number];
const IMAGE_MIB = positive('COWHERD_BENCH_IMAGE_MIB', 1024);
const HOSTS = positive('COWHERD_BENCH_HOSTS', 6);
const RATE_MBIT = positive('COWHERD_BENCH_RATE_MBIT', 100);
/** What a boot reads before its marker: 64 MiB in 1 MiB blocks, spread over the whole disk. */
const DEFAULT_READS = '64x1024';
/** The line a guest prints once its marker is on disk (scripts/guest-kernel.sh). */
const MARKER_LINE = 'cowherd-guest: marker written';
/** Lines of a guest that ended without its marker (or the kernel's last word on power-off). */
const NO_MARKER = /^cowherd-guest: (no marker|writing the marker failed|no \/dev\/vda|reads failed)|reboot: Power down/m;
const metadataType = CloneVirtualMachinesMetadata;
const responseType = CloneVirtualMachinesResponse;
const distributeResponseType = DistributeImageResponse;

const say = (text: string): void => void process.stderr.write(`boot: ${text}\n`);
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const round = (value: number): number => Math.round(value * 100) / 100;

function positive(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    process.stderr.write(`boot: ${name} must be a positive integer, got ${JSON.stringify(raw)}\n`);
    process.exit(2);
  }
  return value;
}

function selectedMethods(): Method[] {
  const raw = process.env['COWHERD_BENCH_METHODS'];
  if (raw === undefined || raw.trim() === '') return [...METHODS];
  const wanted = raw
    .split(',')
    .map((name) => name.trim())
    .filter(Boolean);
  const unknown = wanted.filter((name) => !(METHODS as readonly string[]).includes(name));
  if (unknown.length > 0) {
    process.stderr.write(`boot: unknown method(s) ${unknown.join(', ')}; known: ${METHODS.join(', ')}\n`);
    process.exit(2);
  }
  return METHODS.filter((name) => wanted.includes(name));
}

/** COWHERD_BENCH_READS: `<count>x<KiB>` (over the whole disk) or `<count>x<KiB>@<span MiB>`. */
function selectedReads(): GuestReads {
  const raw = (process.env['COWHERD_BENCH_READS'] ?? '').trim() || DEFAULT_READS;
  try {
    return parseGuestReads(raw.includes('@') ? raw : `${raw}@${IMAGE_MIB}`);
  } catch (error) {
    process.stderr.write(`boot: COWHERD_BENCH_READS: ${(error as Error).message}\n`);
    process.exit(2);
  }
}

/** A gRPC error as one line, `NOT_FOUND: message (REASON)`; any other error's message. */
function describeError(error: unknown): string {
  if (typeof (error as Partial<ServiceError>).code !== 'number') return error instanceof Error ? error.message : String(error);
  const received = readServiceError(error as Partial<ServiceError>);
  return `${Status[received.code]}: ${received.message}${received.reason ? ` (${received.reason})` : ''}`;
}

/** One CloneVirtualMachines call: one started clone on each host. */
interface Round {
  /** Part of every clone's name: `boot-<tag>-<host>-<index>`. */
  readonly tag: string;
  readonly hosts: readonly string[];
  readonly delivery: CloneVirtualMachinesRequest_Delivery;
  /** Every host holds an AVAILABLE replica at t = 0. */
  readonly imagePresent: boolean;
}

/** One clone of a round. */
interface CloneOutcome {
  readonly host: string;
  readonly domain: string;
  /** Seconds from t = 0 until its serial console log appeared (qemu creates it when the domain starts). */
  consoleSeconds?: number;
  /** Seconds from t = 0 until its console showed the marker line. */
  markerSeconds?: number;
  /** What the guest printed of its reads. */
  reads?: GuestReadsLine;
  /** Seconds from t = 0 until its host's replica was AVAILABLE (image.available). */
  availableSeconds?: number;
  /** The operation showed it STREAMING, or its result carries base_progress. */
  streamed: boolean;
}

interface RoundResult {
  readonly clones: readonly CloneOutcome[];
  readonly secondsToLastMarker: number | undefined;
  readonly secondsToAllAvailable: number | undefined;
  /** Bytes the origin's eth0 sent from t = 0 until every replica was AVAILABLE (or the round ended, when not). */
  readonly originBytes: number;
  /** Every host's replica AVAILABLE, and every file's SHA-256 (read by the bench) the record's. */
  readonly allVerified: boolean;
  readonly streamedClones: number;
  readonly agentsCpuSeconds: number;
  readonly error: string | undefined;
}

/** The bench's state over one run: the test bed, the fleet, the image. */
class BootBench {
  /** image.available for the round that runs (each host's first event counts). */
  private onAvailable: (host: string) => void = () => undefined;
  private readonly rateBytesPerSecond: number;

  private constructor(
    private readonly bed: TestBed,
    private readonly fleet: BenchFleet,
    private readonly image: BootImage,
    readonly receivers: readonly string[],
  ) {
    this.rateBytesPerSecond = bed.rateBytesPerSecond;
  }

  static async start(bed: TestBed, resources: Resources, receivers: readonly string[], reads: GuestReads, runTag: string): Promise<BootBench> {
    const fleet = await startBenchFleet(bed, resources, {
      hosts: [ORIGIN, ...receivers],
      cloning: true,
    });
    say(`control plane, cloning and ${receivers.length + 1} agents up`);
    const kit = await guestKit();
    const started = performance.now();
    const image = await publishBootImage(bed, fleet, kit, { host: ORIGIN, imageId: `boot-${runTag}`, mib: IMAGE_MIB, reads });
    say(
      `published images/${image.imageId} in ${round((performance.now() - started) / 1000)} s: ${image.record.files.map((file) => `${file.path} ${file.sizeBytes}`).join(', ')} bytes; kernel command line: ${image.commandLine}`,
    );
    const bench = new BootBench(bed, fleet, image, receivers);
    await fleet.watchImageAvailable(image.imageId, (host) => bench.onAvailable(host));
    await fleet.waitForPeerInTracker(image.record.torrent!.infoHash, ORIGIN);
    const pieces = await bootPieces(image, join(bed.directory(ORIGIN), 'images-root', 'images', image.imageId, image.disk.path));
    const mib = (count: number): number => round((count * pieces.pieceBytes) / 2 ** 20);
    say(
      `a boot needs ${pieces.totalPieces} of ${pieces.pieceCount} pieces of ${mib(1)} MiB (${mib(pieces.totalPieces)} MiB, ${round((100 * pieces.totalPieces) / pieces.pieceCount)}% of the image): ${pieces.readPieces} hold the guest's ${reads.count} blocks of ${reads.blockKib} KiB, ${pieces.bootFilePieces} the boot files and template`,
    );
    return bench;
  }

  get imageBytes(): number {
    return this.image.bytes;
  }

  /** Time a round may take: every host's copy from the origin alone, with room for boots and verification. */
  private get budgetMs(): number {
    return Math.round(((this.receivers.length + 4) * this.image.bytes * 1000) / this.rateBytesPerSecond) + 600_000;
  }

  /** DistributeImage to `hosts` (not timed); throws unless every host ends with an AVAILABLE replica. */
  async distribute(hosts: readonly string[]): Promise<void> {
    const started = performance.now();
    const operation = await call<Operation>((cb) =>
      this.fleet.distribution.distributeImage(
        { image: `images/${this.image.imageId}`, hosts: hosts.map((host) => `hosts/${host}`), requestId: randomUUID() },
        cb,
      ),
    );
    const done = await waitOperation(this.fleet.distributionOperations, operation.name, this.budgetMs);
    if (done.result?.$case !== 'response') throw new Error(`DistributeImage failed: ${JSON.stringify(done.result)}`);
    const response = unpack(distributeResponseType, done.result.value);
    if (response.failures.length > 0) throw new Error(`DistributeImage: hosts failed: ${JSON.stringify(response.failures)}`);
    say(`distributed to ${hosts.length} hosts (not timed) in ${round((performance.now() - started) / 1000)} s`);
  }

  /** Runs one round from t = 0 until every marker and every replica, then checks the replicas. */
  async runRound(spec: Round): Promise<{ result: RoundResult; operation: Operation | undefined }> {
    const clones: CloneOutcome[] = spec.hosts.map((host, index) => ({ host, domain: `boot-${spec.tag}-${host}-${index + 1}`, streamed: false }));
    const cpuOf = (): number => [...this.fleet.agentPids.values()].reduce((sum, pid) => sum + processCpuSeconds(pid), 0);
    const txStart = await this.bed.txBytes(ORIGIN);
    const cpuStart = cpuOf();
    const t0 = performance.now();
    const elapsed = (): number => (performance.now() - t0) / 1000;
    const deadline = t0 + this.budgetMs;
    let allAvailable: { seconds: number; originTx: Promise<number> } | undefined;
    const noteAvailable = (host: string): void => {
      const clone = clones.find((candidate) => candidate.host === host);
      if (clone === undefined || clone.availableSeconds !== undefined) return;
      clone.availableSeconds = elapsed();
      if (clones.every((candidate) => candidate.availableSeconds !== undefined)) allAvailable = { seconds: elapsed(), originTx: this.bed.txBytes(ORIGIN) };
    };
    if (spec.imagePresent) {
      for (const clone of clones) clone.availableSeconds = 0;
      allAvailable = { seconds: 0, originTx: Promise.resolve(txStart) };
    }
    this.onAvailable = noteAvailable;
    const finish = async (error: string | undefined, operation: Operation | undefined): Promise<{ result: RoundResult; operation: Operation | undefined }> => {
      this.onAvailable = () => undefined;
      const originTx = allAvailable ? await allAvailable.originTx : await this.bed.txBytes(ORIGIN);
      const markers = clones.map((clone) => clone.markerSeconds);
      const allVerified = allAvailable !== undefined && error === undefined ? await this.verifyReplicas(spec.hosts) : false;
      return {
        operation,
        result: {
          clones,
          secondsToLastMarker: markers.every((seconds) => seconds !== undefined) ? Math.max(...(markers as number[])) : undefined,
          secondsToAllAvailable: allAvailable?.seconds,
          originBytes: originTx - txStart,
          allVerified,
          streamedClones: clones.filter((clone) => clone.streamed).length,
          agentsCpuSeconds: cpuOf() - cpuStart,
          error,
        },
      };
    };

    let operation: Operation;
    try {
      operation = await call<Operation>((cb) =>
        this.fleet.cloning!.cloneVirtualMachines(
          {
            source: { $case: 'image', value: `images/${this.image.imageId}` },
            placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: spec.hosts.map((host) => `hosts/${host}`), maxClonesPerHost: 1 },
            count: spec.hosts.length,
            nameTemplate: `boot-${spec.tag}-{host}-{index}`,
            start: true,
            requestId: randomUUID(),
            guestConfiguration: undefined,
            dataDiskBytes: '0',
            delivery: spec.delivery,
            diskBackend: 0,
          },
          cb,
        ),
      );
    } catch (error) {
      return finish(`CloneVirtualMachines: ${describeError(error)}`, undefined);
    }

    // What the operation says: clones that stream, clones that failed, the operation's end.
    let latest = operation;
    const track = (current: Operation): string | undefined => {
      latest = current;
      const states = current.metadata ? unpack(metadataType, current.metadata).clones : [];
      const results = current.result?.$case === 'response' ? unpack(responseType, current.result.value).clones : [];
      for (const result of [...states, ...results]) {
        const clone = clones.find((candidate) => candidate.domain === result.domainName);
        if (clone && (result.state === CloneResult_State.STATE_STREAMING || result.baseProgress !== undefined)) clone.streamed = true;
      }
      if (current.result?.$case === 'error') return `the clone operation failed: ${Status[current.result.value.code]}: ${current.result.value.message}`;
      const failed = results.filter((result) => result.state === CloneResult_State.STATE_FAILED);
      if (failed.length > 0) return `clones failed: ${failed.map((result) => `${result.domainName}: ${result.error?.message ?? 'no error'}`).join('; ')}`;
      return undefined;
    };
    let polledAt = 0;
    const poll = async (): Promise<string | undefined> => {
      if (latest.done || performance.now() - polledAt < 1_000) return undefined;
      polledAt = performance.now();
      const current = await call<Operation>((cb) => this.fleet.cloningOperations!.getOperation({ name: operation.name }, cb)).catch(() => undefined);
      return current === undefined ? undefined : track(current);
    };

    // Every clone's marker, from its serial console log.
    while (clones.some((clone) => clone.markerSeconds === undefined)) {
      if (performance.now() > deadline) return finish(`timed out after ${this.budgetMs / 1000} s waiting for the markers`, latest);
      for (const clone of clones.filter((candidate) => candidate.markerSeconds === undefined)) {
        const console = await this.consoleOf(clone);
        if (console === undefined) continue;
        clone.consoleSeconds ??= elapsed();
        if (console.includes(MARKER_LINE)) {
          clone.markerSeconds = elapsed();
          const reads = guestReadsLine(console);
          if (reads !== undefined) clone.reads = reads;
        } else if (NO_MARKER.test(console)) {
          return finish(`${clone.host}: the guest ended without its marker: ${console.slice(-1500)}`, latest);
        }
      }
      const problem = await poll();
      if (problem !== undefined) return finish(problem, latest);
      await sleep(100);
    }
    const secondsToLastMarker = elapsed();
    // Then every replica, and the operation's end.
    while (allAvailable === undefined || !latest.done) {
      if (performance.now() > deadline)
        return finish(
          allAvailable === undefined
            ? `timed out after ${this.budgetMs / 1000} s waiting for every replica to be AVAILABLE`
            : 'the clone operation was not done when the time was up',
          latest,
        );
      const problem = await poll();
      if (problem !== undefined) return finish(problem, latest);
      await sleep(200);
    }
    say(`${spec.tag}: last marker after ${round(secondsToLastMarker)} s, every replica AVAILABLE after ${round(allAvailable.seconds)} s`);
    return finish(undefined, latest);
  }

  /**
   * The clone's serial console log (the agent names it `serial-<n>.<ext>` in the clone's directory); undefined
   * until there is one.
   */
  private async consoleOf(clone: CloneOutcome): Promise<string | undefined> {
    const directory = join(this.bed.directory(clone.host), 'images-root', 'clones', clone.domain);
    const names = (await readdir(directory).catch(() => [] as string[])).filter((name) => name.startsWith('serial-'));
    if (names.length === 0) return undefined;
    const logs = await Promise.all(names.map((name) => readFile(join(directory, name), 'utf8').catch(() => '')));
    return logs.join('\n');
  }

  /**
   * The image version's read profile (Image.read_profile: what the first streamed boot read, kept by distribution),
   * waited for up to `timeoutMs` (an agent publishes it once its boot's recording window is over, 60 s + 3 s).
   */
  async readProfile(timeoutMs: number): Promise<{ pieces: number; bytes: number } | undefined> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const image = await call<Image>((cb) =>
        this.fleet.inventory.getImage({ name: `images/${this.image.imageId}`, view: ImageView.IMAGE_VIEW_FULL }, cb),
      ).catch(() => undefined);
      const profile = image?.readProfile;
      if (profile && profile.pieces.length > 0) return { pieces: profile.pieces.length, bytes: Number(profile.bytesRead) };
      if (performance.now() > deadline) return undefined;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  /** Every host's replica AVAILABLE in inventory, and every file's SHA-256 (read here) the record's. */
  private async verifyReplicas(hosts: readonly string[]): Promise<boolean> {
    let verified = true;
    for (const host of hosts) {
      const replica = await call<ImageReplica>((cb) => this.fleet.inventory.getImageReplica({ name: `hosts/${host}/images/${this.image.imageId}` }, cb)).catch(
        () => undefined,
      );
      if (replica?.state !== ImageReplica_State.STATE_AVAILABLE) {
        say(`${host}: the replica is ${replica ? ImageReplica_State[replica.state] : 'missing'}`);
        verified = false;
        continue;
      }
      const directory = replica.path || join(this.bed.directory(host), 'images-root', 'images', this.image.imageId);
      for (const file of this.image.record.files) {
        if ((await sha256File(join(directory, file.path)).catch(() => '')) !== file.sha256) {
          say(`${host}: ${file.path} does not have the SHA-256 of the image's record`);
          verified = false;
        }
      }
    }
    return verified;
  }

  /**
   * After a round: cancels its operation (and the DistributeImage operations it started) if still running,
   * deletes its clones and, with `deleteReplicas`, the hosts' replicas (waiting until inventory has none).
   */
  async clean(spec: Round, operation: Operation | undefined, options: { deleteReplicas: boolean }): Promise<void> {
    if (operation !== undefined) {
      const current = await call<Operation>((cb) => this.fleet.cloningOperations!.getOperation({ name: operation.name }, cb)).catch(() => operation);
      if (!current.done) {
        await call((cb) => this.fleet.cloningOperations!.cancelOperation({ name: operation.name }, cb)).catch(() => undefined);
        const distributing = current.metadata ? unpack(metadataType, current.metadata).distributeOperations : [];
        for (const name of distributing) await call((cb) => this.fleet.distributionOperations.cancelOperation({ name }, cb)).catch(() => undefined);
      }
    }
    const retry = async (what: string, attempt: () => Promise<unknown>): Promise<void> => {
      for (let tries = 1; ; tries++) {
        try {
          await attempt();
          return;
        } catch (error) {
          if (readServiceError(error as Partial<ServiceError>).code === Status.NOT_FOUND) return;
          if (tries >= 30) throw new Error(`${what}: ${describeError(error)}`);
          await sleep(2_000);
        }
      }
    };
    for (const [index, host] of spec.hosts.entries()) {
      const name = `hosts/${host}/virtualMachines/boot-${spec.tag}-${host}-${index + 1}`;
      await retry(`deleting ${name}`, () => call((cb) => this.fleet.cloning!.deleteVirtualMachine({ name, force: true }, cb)));
    }
    if (!options.deleteReplicas) return;
    for (const host of spec.hosts) {
      const name = `hosts/${host}/images/${this.image.imageId}`;
      await retry(`deleting ${name}`, () => call((cb) => this.fleet.distribution.deleteImageReplica({ name }, cb)));
    }
    for (const host of spec.hosts) {
      const name = `hosts/${host}/images/${this.image.imageId}`;
      for (let tries = 0; ; tries++) {
        const gone = await call((cb) => this.fleet.inventory.getImageReplica({ name }, cb)).then(
          () => false,
          (error: unknown) => readServiceError(error as Partial<ServiceError>).code === Status.NOT_FOUND,
        );
        if (gone) break;
        if (tries >= 300) throw new Error(`${name} is still in inventory 60 s after it was deleted`);
        await sleep(200);
      }
    }
  }

  /** The round's per-clone story, on stderr. */
  describe(method: string, result: RoundResult): void {
    const seconds = (value: number | undefined): string => (value === undefined ? '-' : `${round(value)} s`);
    for (const clone of result.clones) {
      const reads = clone.reads
        ? `, reads ${clone.reads.count} blocks in ${round(clone.reads.milliseconds / 1000)} s (slowest ${clone.reads.slowestMilliseconds ?? '?'} ms)`
        : '';
      say(
        `${method}: ${clone.host} console from ${seconds(clone.consoleSeconds)}, marker ${seconds(clone.markerSeconds)}${reads}, replica AVAILABLE ${seconds(clone.availableSeconds)}${clone.streamed ? ', streamed' : ''}`,
      );
    }
    say(`${method}: the agents used ${round(result.agentsCpuSeconds)} CPU-s during the round`);
  }
}

/** The JSON line of one method. */
function line(
  method: Method,
  bench: BootBench,
  result: RoundResult,
  localSeconds: number | undefined,
  extra: Record<string, unknown>,
): Record<string, unknown> {
  const reads = result.clones.map((clone) => clone.reads).filter((reads): reads is GuestReadsLine => reads !== undefined);
  return {
    method,
    hosts: bench.receivers.length,
    image_bytes: bench.imageBytes,
    seconds_to_last_marker: result.secondsToLastMarker === undefined ? null : round(result.secondsToLastMarker),
    ratio_to_local: result.secondsToLastMarker === undefined || localSeconds === undefined ? null : round(result.secondsToLastMarker / localSeconds),
    origin_bytes_ratio: round(result.originBytes / bench.imageBytes),
    all_replicas_verified: result.allVerified,
    seconds_to_all_available: result.secondsToAllAvailable === undefined ? null : round(result.secondsToAllAvailable),
    guest_reads_seconds_max: reads.length === 0 ? null : round(Math.max(...reads.map((read) => read.milliseconds)) / 1000),
    longest_read_ms: reads.length === 0 ? null : Math.max(...reads.map((read) => read.slowestMilliseconds ?? 0)),
    ...extra,
    ...(result.error === undefined ? {} : { error: result.error }),
  };
}

async function main(): Promise<void> {
  const methods = selectedMethods();
  const reads = selectedReads();
  const receivers = Array.from({ length: HOSTS }, (_, index) => `r${index + 1}`);
  const runTag = Math.random().toString(36).slice(2, 6);
  await guestKit();
  const bed = await TestBed.create({
    hosts: [ORIGIN, ...receivers],
    rateMbit: RATE_MBIT,
    ...(process.env['COWHERD_BENCH_DIR'] ? { directory: process.env['COWHERD_BENCH_DIR'] } : {}),
  });
  const resources = new Resources();
  let failed = false;
  try {
    const bench = await BootBench.start(bed, resources, receivers, reads, runTag);
    // Whatever a failed clean-up leaves: the bench's domains, destroyed and undefined before the fleet stops.
    resources.defer(async () => {
      const { stdout } = await run('virsh', ['-c', 'qemu:///system', 'list', '--all', '--name']).catch(() => ({ stdout: '' }));
      for (const domain of stdout.split('\n').filter((name) => name.startsWith(`boot-${runTag}-`))) {
        await run('virsh', ['-c', 'qemu:///system', 'destroy', domain]).catch(() => undefined);
        await run('virsh', ['-c', 'qemu:///system', 'undefine', domain]).catch(() => undefined);
      }
    });
    const streamDelivery = CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM;
    const distributeDelivery = CloneVirtualMachinesRequest_Delivery.DELIVERY_DISTRIBUTE;
    let localSeconds: number | undefined;
    /** The last stream round's outcome: whether a streamed boot of this image happened before stream-profiled. */
    let earlierStream: RoundResult | undefined;
    const print = (entry: Record<string, unknown>): void => {
      process.stdout.write(`${JSON.stringify(entry)}\n`);
      if (entry['error'] !== undefined || entry['all_replicas_verified'] !== true) failed = true;
    };
    const measure = async (spec: Round, deleteReplicas: boolean): Promise<RoundResult> => {
      const { result, operation } = await bench.runRound(spec);
      await bench.clean(spec, operation, { deleteReplicas });
      return result;
    };
    const streamError = (result: RoundResult): string | undefined =>
      result.error ??
      (result.streamedClones < result.clones.length
        ? `delivery STREAM was not honoured: ${result.streamedClones} of ${result.clones.length} clones streamed`
        : undefined);

    for (const method of methods) {
      const started = performance.now();
      try {
        if (method === 'local') {
          await bench.distribute(receivers);
          const one = await measure({ tag: `${runTag}-one`, hosts: receivers.slice(0, 1), delivery: distributeDelivery, imagePresent: true }, false);
          bench.describe('local, one guest alone', one);
          const result = await measure({ tag: `${runTag}-local`, hosts: receivers, delivery: distributeDelivery, imagePresent: true }, true);
          bench.describe(method, result);
          localSeconds = result.secondsToLastMarker;
          print(
            line(method, bench, result, localSeconds, { one_guest_seconds: one.secondsToLastMarker === undefined ? null : round(one.secondsToLastMarker) }),
          );
        } else if (method === 'distribute-then-clone') {
          const result = await measure({ tag: `${runTag}-dtc`, hosts: receivers, delivery: distributeDelivery, imagePresent: false }, true);
          bench.describe(method, result);
          print(line(method, bench, result, localSeconds, {}));
        } else {
          if (method === 'stream-profiled' && earlierStream === undefined) {
            say('stream-profiled: a warm-up stream round first (not printed), so that a streamed boot of this image version came before');
            earlierStream = await measure({ tag: `${runTag}-warm`, hosts: receivers, delivery: streamDelivery, imagePresent: false }, true);
            bench.describe('warm-up stream', earlierStream);
          }
          // The profile reaches the image record a minute after the boot that recorded it: the profiled round waits for it.
          const profile = method === 'stream-profiled' ? await bench.readProfile(120_000) : undefined;
          if (method === 'stream-profiled') say(`read profile: ${profile ? `${profile.pieces} pieces (${profile.bytes} bytes read)` : 'none recorded'}`);
          const tag = method === 'stream' ? `${runTag}-stream` : `${runTag}-prof`;
          const result = await measure({ tag, hosts: receivers, delivery: streamDelivery, imagePresent: false }, true);
          bench.describe(method, result);
          const error = streamError(result);
          const extra: Record<string, unknown> = { streamed_clones: result.streamedClones };
          if (method === 'stream-profiled') {
            extra['profile'] = profile ? 'recorded' : 'not recorded';
            extra['profile_pieces'] = profile?.pieces ?? 0;
          }
          print(line(method, bench, { ...result, error }, localSeconds, extra));
          if (method === 'stream') earlierStream = result;
        }
      } catch (error) {
        // A failed set-up or clean-up: the line says so, the next method still runs (on whatever state is left).
        print({ method, hosts: receivers.length, image_bytes: bench.imageBytes, error: error instanceof Error ? error.message : String(error) });
        say(`${method} failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
      }
      say(`${method} took ${round((performance.now() - started) / 1000)} s with its set-up and clean-up`);
    }
  } finally {
    await resources.release().catch((error: unknown) => say(`clean-up: ${String(error)}`));
    await bed.destroy();
  }
  if (failed) process.exitCode = 1;
}

await main();
