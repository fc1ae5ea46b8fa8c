/**
 * bench:io — the 2011 thesis' I/O comparison (IOzone and Bonnie++ inside guests, copy-on-write formats against a
 * raw partition), for the disks cowherd's backends make, through qemu's block layer as a guest would see it.
 *
 * Each disk is opened by qemu-storage-daemon (cache.direct=on, aio=native: no page cache in the way, as a guest
 * with cache='none' io='native') and exported over NBD on a unix socket; fio's nbd engine (libnbd) drives it:
 * sequential 1 MiB reads (two passes) and writes (one pass) over the whole disk (queue depth 4), random 4 KiB reads and writes (queue
 * depth 16, every block at most once) over BENCH_IO_RANDOM_MIB. A fresh disk is made for every run where the first
 * write is what is measured; each test runs BENCH_IO_REPEAT times, the rows taking turns, and the median counts.
 *
 * Rows, in this order (bench/README.md says what each measures and why):
 *   raw                    the floor: a fully written raw file on BENCH_IO_DIR's filesystem
 *   qcow2-overlay          cowherd's overlay (overlays.ts options) on a qcow2 base as images are published:
 *                          reads fall through to the base, writes are the first ones (a fresh overlay per run)
 *   qcow2-overlay-written  the same overlay after every block was written once
 *   vhd-differencing       cowherd's VHD child with every block written by cowherd's writer, through qemu's vpc
 *                          driver (which ignores a differencing disk's parent: only a fully written child reads right)
 *   raw-xfs                the floor of the reflink rows: a raw file on a loop-mounted xfs (reflink=1, loop device
 *                          with direct I/O) made by the bench (root)
 *   reflink-copy           a reflink copy of a raw base on that xfs (a fresh copy per run: writes pay the unsharing)
 *   reflink-copy-written   the same copy after every block was written once
 *   streaming              the streaming backend once its replica is complete: a fresh overlay per run (as
 *                          qcow2-overlay) whose base is the qcow2 base served read-only over NBD by the agent's
 *                          streaming server (its own Node process), which SHA-1-checks each piece on its first read
 *
 * stdout: one JSON line per row, {"backend", "seq_read_mib_s", "seq_write_mib_s", "rand_read_4k_iops",
 * "rand_write_4k_iops", "ratio_to_raw": {...}} (the reflink rows against raw-xfs). stderr: the setup and, per row,
 * every run's value, so noise shows.
 *
 *   npm run bench:io                                       # root; 1 GiB disks, 3 runs per test, ~5 minutes
 *   BENCH_IO_MIB=256 BENCH_IO_REPEAT=1 npm run bench:io    # a quick run
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, open, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { runCommand, startDaemon, type Daemon } from '../services/common/platform/child-process.js';
import { QCOW2_OVERLAY_OPTIONS, createQcow2Overlay } from '../services/agent/hypervisor/overlays.js';
import { REFLINK_COPY_BACKEND, VHD_DIFFERENCING_BACKEND } from '../services/agent/hypervisor/disk-backends.js';
import { readVhdInfo, writeVhdSectors } from '../services/agent/hypervisor/vhd.js';
import { StreamServerClient, streamServerPaths } from '../services/agent/streaming/index.js';
import { pieceLengthFor } from '../services/agent/swarm/torrent.js';

const MiB = 1024 * 1024;
const env = process.env;
const DISK_BYTES = Number(env['BENCH_IO_MIB'] ?? 1024) * MiB;
const RANDOM_BYTES = Math.min(DISK_BYTES, Number(env['BENCH_IO_RANDOM_MIB'] ?? 256) * MiB);
const REPEAT = Math.max(1, Number(env['BENCH_IO_REPEAT'] ?? 3));
const WORK_ROOT = env['BENCH_IO_DIR'] ?? tmpdir();
const ONLY = env['BENCH_IO_BACKENDS']?.split(',').map((name) => name.trim());

type TestKey = 'seq_read' | 'seq_write' | 'rand_read' | 'rand_write';
interface IoTest {
  readonly key: TestKey;
  readonly rw: 'read' | 'write' | 'randread' | 'randwrite';
  readonly blockSize: string;
  readonly depth: number;
  readonly bytes: number;
}
const TESTS: readonly IoTest[] = [
  // Reads change nothing: two passes, so that a read test lasts about as long as a write test.
  { key: 'seq_read', rw: 'read', blockSize: '1M', depth: 4, bytes: 2 * DISK_BYTES },
  { key: 'seq_write', rw: 'write', blockSize: '1M', depth: 4, bytes: DISK_BYTES },
  { key: 'rand_read', rw: 'randread', blockSize: '4k', depth: 16, bytes: RANDOM_BYTES },
  { key: 'rand_write', rw: 'randwrite', blockSize: '4k', depth: 16, bytes: RANDOM_BYTES },
];

/** A disk under test as qemu-storage-daemon opens it: `--blockdev` values, the exported node named `disk`. */
interface OpenedDisk {
  readonly blockdevs: readonly string[];
  /** Removes what this run made (a fresh overlay or copy); nothing for a disk that is measured as it is. */
  dispose(): Promise<void>;
}

interface Row {
  readonly backend: string;
  /** The backend whose medians the ratios divide by (itself for a floor). */
  readonly floor: string;
  /** Once, before the row's runs (untimed). */
  prepare(): Promise<void>;
  /** Per run. */
  open(): Promise<OpenedDisk>;
  /** What the row measures, for stderr. */
  readonly note: string;
}

/** SIGINT or SIGTERM: the running fio is stopped and the bench unwinds, unmounting and removing what it made. */
const interrupted = new AbortController();
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  // `on`, not `once`: execa's exit hook (signal-exit) re-raises a signal that no other listener handles, which
  // would end the process before the clean-up. A second signal ends it at once.
  process.on(signal, () => {
    if (interrupted.signal.aborted) process.exit(130);
    process.stderr.write(`bench:io: ${signal}, cleaning up\n`);
    process.exitCode = 130;
    interrupted.abort(new Error(`interrupted by ${signal}`));
  });
}

const log = (record: Record<string, unknown>): void => {
  process.stderr.write(`${JSON.stringify(record)}\n`);
};

/** `--blockdev` for a file, without the page cache (as a guest disk with cache='none' io='native'). */
const fileNode = (name: string, filename: string, readOnly = false): string =>
  `driver=file,node-name=${name},filename=${filename},cache.direct=on,aio=native${readOnly ? ',read-only=on' : ''}`;

/**
 * l2-cache-size covering the whole disk: qemu's default is 1 MiB (8 GiB of 64 KiB clusters with 8-byte L2
 * entries, 4 GiB with extended L2's 16-byte entries); a cache smaller than the disk's L2 tables turns random reads
 * into metadata reads. At least two clusters (qemu's minimum).
 */
function l2CacheBytes(extendedL2: boolean): number {
  return Math.max(2 * 65536, (DISK_BYTES / 65536) * (extendedL2 ? 16 : 8));
}

/** `--blockdev` for a qcow2 node; `backing` names the node under it (bases have none). */
const qcow2Node = (name: string, file: string, backing: string | undefined, extendedL2: boolean): string =>
  `driver=qcow2,node-name=${name},file=${file}${backing === undefined ? '' : `,backing=${backing}`},l2-cache-size=${l2CacheBytes(extendedL2)}`;

async function waitForSocket(path: string, daemon: Daemon): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (!existsSync(path)) {
    if (Date.now() > deadline) throw new Error(`qemu-storage-daemon made no socket in 20 s: ${daemon.output()}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** One run's result: MiB/s for sequential tests, IOPS for random ones, and what the daemon spent on it. */
interface Measurement {
  readonly value: number;
  /** qemu-storage-daemon's user + system CPU time over the run (start-up included, a few ms). */
  readonly daemonCpuSeconds: number;
}

/** User + system CPU seconds of a live process, from /proc (clock ticks of 1/100 s on Linux). */
async function cpuSeconds(pid: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).replace(/^.*\) /s, '').split(' ');
  // After "pid (comm) ", utime and stime are the 12th and 13th fields.
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** One fio run against `disk`. */
async function runFio(work: string, disk: OpenedDisk, test: IoTest): Promise<Measurement> {
  const socket = join(work, `nbd-${randomBytes(4).toString('hex')}.sock`);
  const daemon = await startDaemon(
    'qemu-storage-daemon',
    [
      ...disk.blockdevs.flatMap((value) => ['--blockdev', value]),
      '--nbd-server',
      `addr.type=unix,addr.path=${socket}`,
      '--export',
      'type=nbd,id=export,node-name=disk,name=disk,writable=on',
    ],
    { dieWithParent: true },
  );
  try {
    await waitForSocket(socket, daemon);
    const output = join(work, 'fio.json');
    // fio's nbd engine prints "connected" on stdout: the JSON goes to a file.
    await runCommand(
      'fio',
      [
        `--name=${test.key}`,
        '--ioengine=nbd',
        `--uri=nbd+unix:///disk?socket=${socket}`,
        `--rw=${test.rw}`,
        `--bs=${test.blockSize}`,
        `--iodepth=${test.depth}`,
        `--size=${DISK_BYTES}`,
        `--io_size=${test.bytes}`,
        '--output-format=json',
        `--output=${output}`,
      ],
      { timeoutMs: 600_000, signal: interrupted.signal },
    );
    const daemonCpuSeconds = await cpuSeconds(daemon.pid);
    const job = (JSON.parse(await readFile(output, 'utf8')) as { jobs: Array<Record<'read' | 'write', { bw_bytes: number; iops: number }>> }).jobs[0]!;
    const side = test.rw.endsWith('read') ? job.read : job.write;
    return { value: test.key.startsWith('seq') ? side.bw_bytes / MiB : side.iops, daemonCpuSeconds };
  } finally {
    await daemon.stop(10_000);
    await rm(socket, { force: true });
  }
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** Writes `bytes` of random data to a new file in 16 MiB chunks (one random chunk, varied per chunk). */
async function writeRandomFile(path: string, bytes: number): Promise<void> {
  const chunk = randomBytes(16 * MiB);
  const handle = await open(path, 'wx');
  try {
    for (let offset = 0; offset < bytes; offset += chunk.length) {
      randomBytes(64).copy(chunk, 0);
      await handle.write(chunk, 0, Math.min(chunk.length, bytes - offset), offset);
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Writes every block of a disk once, sequentially, through qemu (the "after its blocks were written" state). */
async function fillThroughQemu(work: string, disk: OpenedDisk): Promise<void> {
  await runFio(work, disk, { key: 'seq_write', rw: 'write', blockSize: '1M', depth: 4, bytes: DISK_BYTES });
}

/** The agent's streaming server serving a replica file, for the `streaming` row. */
interface StreamingExport {
  /** The server's NBD socket. */
  readonly socket: string;
  readonly exportName: string;
  /** Ends the server's process (SIGTERM, as serve-main handles it) and waits until it has exited and its sockets are gone. */
  stop(): Promise<void>;
}

/**
 * `replicaFile` (complete) served read-only over NBD by the agent's streaming server, started as the agent starts
 * it: StreamServerClient, which runs serve-main.ts in a detached Node process of its own (directory `.streaming`
 * beside the file, its log `server.log` there), then exports the file as the agent exports a replica's disk: a
 * one-file torrent cut into pieceLengthFor's pieces, whose SHA-1 hashes are computed here from the file, so that
 * the server checks each piece the first time a read needs it. The server's stall limit is 30 s rather than 15
 * minutes: a piece that does not verify fails the row's read (EIO) instead of holding the bench.
 */
async function streamingReplicaExport(replicaFile: string): Promise<StreamingExport> {
  const size = (await stat(replicaFile)).size;
  const pieceLength = pieceLengthFor(size);
  const started = performance.now();
  const hashes: Buffer[] = [];
  const handle = await open(replicaFile, 'r');
  try {
    const piece = Buffer.alloc(pieceLength);
    for (let offset = 0; offset < size; offset += pieceLength) {
      const length = Math.min(pieceLength, size - offset);
      let filled = 0;
      while (filled < length) {
        const { bytesRead } = await handle.read(piece, filled, length - filled, offset + filled);
        if (bytesRead === 0) throw new Error(`${replicaFile} ended at ${offset + filled} of ${size} bytes`);
        filled += bytesRead;
      }
      hashes.push(createHash('sha1').update(piece.subarray(0, length)).digest());
    }
  } finally {
    await handle.close();
  }
  const hashSeconds = (performance.now() - started) / 1000;
  const directory = join(dirname(replicaFile), '.streaming');
  const paths = streamServerPaths(directory);
  const exportName = `bench.${basename(replicaFile)}`;
  const wants: Array<{ offset: number; length: number }> = [];
  const client = new StreamServerClient({
    directory,
    // A complete replica whose hashes come from its own bytes has nothing to wait for: a want is a failed check.
    onWant: (_name, offset, length) => {
      if (wants.push({ offset, length }) <= 10) log({ streaming_want: { offset, length }, why: 'a piece did not verify' });
    },
    serverEnvironment: { COWHERD_STREAM_MAX_STALL_MS: '30000' },
  });
  await client.export({
    name: exportName,
    directories: [dirname(replicaFile)],
    files: [{ path: basename(replicaFile), length: size }],
    file: basename(replicaFile),
    pieceLength,
    pieceHashes: Buffer.concat(hashes).toString('base64'),
  });
  const pid = (await client.status())?.pid;
  if (pid === undefined) throw new Error(`the streaming server stopped answering right after it started (see ${paths.logFile})`);
  log({
    setup: 'streaming',
    server: 'serve-main.ts via StreamServerClient (a detached Node process)',
    pid,
    export: exportName,
    replica_bytes: size,
    piece_length: pieceLength,
    pieces: hashes.length,
    hash_s: Number(hashSeconds.toFixed(2)),
  });
  const alive = async (): Promise<boolean> => {
    // A zombie (exited, not reaped yet) counts as gone.
    const state = await readFile(`/proc/${pid}/stat`, 'utf8').then(
      (text) => text.replace(/^.*\) /s, '')[0],
      () => undefined,
    );
    return state !== undefined && state !== 'Z' && state !== 'X';
  };
  return {
    socket: paths.nbdSocket,
    exportName,
    stop: async () => {
      const status = await client.status().catch(() => undefined);
      const serverCpuSeconds = await cpuSeconds(pid).catch(() => undefined);
      client.close();
      if (await alive()) process.kill(pid, 'SIGTERM');
      const deadline = Date.now() + 10_000;
      while (await alive()) {
        if (Date.now() > deadline) {
          process.kill(pid, 'SIGKILL');
          throw new Error(`the streaming server (pid ${pid}) did not exit within 10 s of SIGTERM: killed (see ${paths.logFile})`);
        }
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const socketsLeft = [paths.nbdSocket, paths.controlSocket].filter((path) => existsSync(path));
      await Promise.all(socketsLeft.map((path) => rm(path, { force: true })));
      const gib = (status?.statistics.bytesRead ?? 0) / 1024 / MiB;
      log({
        stopped: 'streaming server',
        pid,
        exited: true,
        sockets_left: socketsLeft,
        statistics: status?.statistics,
        complete: status?.exports.find((entry) => entry.name === exportName)?.complete,
        wants: wants.length,
        // Its whole life: the first round's piece checks (SHA-1 of every piece) and every read served.
        server_cpu_s: serverCpuSeconds,
        server_cpu_s_per_gib_served: serverCpuSeconds === undefined || gib === 0 ? undefined : Number((serverCpuSeconds / gib).toFixed(3)),
      });
    },
  };
}

async function main(): Promise<void> {
  await mkdir(WORK_ROOT, { recursive: true });
  const work = await mkdtemp(join(WORK_ROOT, 'cowherd-bench-io-'));
  const cleanups: Array<() => Promise<unknown>> = [() => rm(work, { recursive: true, force: true })];
  const wanted = (backend: string): boolean => ONLY === undefined || ONLY.includes(backend);
  try {
    log({
      setup: 'bench:io',
      disk_mib: DISK_BYTES / MiB,
      random_mib: RANDOM_BYTES / MiB,
      repeat: REPEAT,
      directory: WORK_ROOT,
      filesystem: (await runCommand('stat', ['-f', '-c', '%T', WORK_ROOT])).trim(),
      fio: 'nbd engine -> qemu-storage-daemon NBD export (unix socket), cache.direct=on aio=native',
      overlay_options: QCOW2_OVERLAY_OPTIONS,
      l2_cache_bytes: { overlay: l2CacheBytes(true), base: l2CacheBytes(false) },
      loadavg_1m: loadavg()[0],
    });
    const rows: Row[] = [];

    // The floor and the base's bytes: random data, fully allocated.
    const raw = join(work, 'raw.img');
    const baseQcow2 = join(work, 'base.qcow2');
    const baseVhd = join(work, 'base.vhd');
    await writeRandomFile(raw, DISK_BYTES);
    // As image export publishes a KVM image: qemu-img convert -O qcow2 (64 KiB clusters, no extended L2).
    await runCommand('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, baseQcow2], { timeoutMs: 600_000 });
    await chmod(baseQcow2, 0o444);
    const baseNodes = [fileNode('base-file', baseQcow2, true), `${qcow2Node('base', 'base-file', undefined, false)},read-only=on`];

    rows.push({
      backend: 'raw',
      floor: 'raw',
      note: 'a fully written raw file, overwritten in place',
      prepare: async () => {},
      open: async () => ({ blockdevs: [fileNode('file', raw), 'driver=raw,node-name=disk,file=file'], dispose: async () => {} }),
    });

    let overlayRun = 0;
    rows.push({
      backend: 'qcow2-overlay',
      floor: 'raw',
      note: `a fresh cowherd overlay (${QCOW2_OVERLAY_OPTIONS}) per run on a qcow2 base: reads fall through to the base, writes allocate`,
      prepare: async () => {},
      open: async () => {
        const overlay = join(work, `overlay-${overlayRun++}.qcow2`);
        await createQcow2Overlay(baseQcow2, 'qcow2', overlay);
        return {
          blockdevs: [...baseNodes, fileNode('file', overlay), qcow2Node('disk', 'file', 'base', true)],
          dispose: () => rm(overlay, { force: true }),
        };
      },
    });

    const writtenOverlay = join(work, 'overlay-written.qcow2');
    const writtenOverlayDisk: OpenedDisk = {
      blockdevs: [...baseNodes, fileNode('file', writtenOverlay), qcow2Node('disk', 'file', 'base', true)],
      dispose: async () => {},
    };
    rows.push({
      backend: 'qcow2-overlay-written',
      floor: 'raw',
      note: 'the same overlay after one sequential pass wrote every block (nothing falls through any more)',
      prepare: async () => {
        await createQcow2Overlay(baseQcow2, 'qcow2', writtenOverlay);
        await fillThroughQemu(work, writtenOverlayDisk);
      },
      open: async () => writtenOverlayDisk,
    });

    const vhdChild = join(work, 'child.vhd');
    rows.push({
      backend: 'vhd-differencing',
      floor: 'raw',
      note:
        "cowherd's differencing child of a dynamic VHD base, every block written by cowherd's VHD writer, read and written through qemu's vpc driver. " +
        'qemu ignores the parent of a differencing VHD, so only a child that holds every block reads right through it: reads falling through to ' +
        "the parent, and first writes into a fresh child, are not measurable through qemu (tapdisk would be the reader, and there is no Xen host). qemu's vpc " +
        'serializes requests (one lock) and rewrites a block bitmap synchronously whenever a write moves to another block',
      prepare: async () => {
        await runCommand('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, baseVhd], {
          timeoutMs: 600_000,
        });
        await chmod(baseVhd, 0o444);
        await VHD_DIFFERENCING_BACKEND.createChild({ target: 'xvda', base: baseVhd, format: 'vpc' }, vhdChild);
        const info = await readVhdInfo(vhdChild);
        const block = randomBytes(info.blockSizeBytes!);
        const started = performance.now();
        for (let offset = 0; offset < info.currentSizeBytes; offset += block.length) {
          randomBytes(64).copy(block, 0);
          await writeVhdSectors(vhdChild, offset, block.subarray(0, Math.min(block.length, info.currentSizeBytes - offset)), { parents: [baseVhd] });
        }
        log({ setup: 'vhd-differencing', filled_blocks: info.blockCount, fill_s: Number(((performance.now() - started) / 1000).toFixed(1)) });
      },
      open: async () => ({
        blockdevs: [fileNode('file', vhdChild), 'driver=vpc,node-name=disk,file=file'],
        dispose: async () => {},
      }),
    });

    // Reflink rows: on a loop-mounted xfs (reflink=1) that the bench makes, with its own raw floor.
    const canMount = process.getuid?.() === 0 && existsSync('/usr/sbin/mkfs.xfs');
    if (!canMount) log({ skipped: ['raw-xfs', 'reflink-copy', 'reflink-copy-written'], why: 'needs root and mkfs.xfs (xfsprogs) for a loop-mounted xfs' });
    else if (['raw-xfs', 'reflink-copy', 'reflink-copy-written'].some(wanted)) {
      const image = join(work, 'xfs.img');
      const mountPoint = join(work, 'xfs');
      await mkdir(mountPoint);
      await writeFile(image, '');
      await truncate(image, 4 * DISK_BYTES + 512 * MiB);
      // A loop device with direct I/O: without it the loop device's reads and writes go through the page cache
      // of the file underneath, and O_DIRECT inside the xfs would measure memory.
      const device = (await runCommand('losetup', ['--find', '--show', '--direct-io=on', image])).trim();
      cleanups.push(() => runCommand('losetup', ['-d', device]));
      await runCommand('mkfs.xfs', ['-q', '-m', 'reflink=1', device], { timeoutMs: 120_000 });
      await runCommand('mount', [device, mountPoint]);
      cleanups.push(() => runCommand('umount', [mountPoint]).catch(() => runCommand('umount', ['-l', mountPoint])));
      log({
        setup: 'xfs',
        device,
        direct_io: (await readFile(`/sys/block/${device.replace('/dev/', '')}/loop/dio`, 'utf8').catch(() => '?')).trim() === '1',
      });
      const rawXfs = join(mountPoint, 'raw.img');
      const reflinkBase = join(mountPoint, 'base.raw');
      await writeRandomFile(rawXfs, DISK_BYTES);
      await writeRandomFile(reflinkBase, DISK_BYTES);
      await chmod(reflinkBase, 0o444);
      rows.push({
        backend: 'raw-xfs',
        floor: 'raw-xfs',
        note: 'the reflink rows’ floor: a fully written raw file on the loop-mounted xfs',
        prepare: async () => {},
        open: async () => ({ blockdevs: [fileNode('file', rawXfs), 'driver=raw,node-name=disk,file=file'], dispose: async () => {} }),
      });
      let copyRun = 0;
      rows.push({
        backend: 'reflink-copy',
        floor: 'raw-xfs',
        note: 'a fresh reflink copy (REFLINK_COPY_BACKEND) of a raw base per run: reads share the base’s blocks, writes unshare them (xfs copy-on-write)',
        prepare: async () => {},
        open: async () => {
          const copy = join(mountPoint, `copy-${copyRun++}.raw`);
          await REFLINK_COPY_BACKEND.createChild({ target: 'vda', base: reflinkBase, format: 'raw' }, copy);
          return {
            blockdevs: [fileNode('file', copy), 'driver=raw,node-name=disk,file=file'],
            // xfs frees a removed file's extents in the background (inode inactivation): with thousands of them
            // after a random-write run, that work would land on the next row's run. syncfs waits for it.
            dispose: async () => {
              await rm(copy, { force: true });
              await runCommand('sync', ['-f', mountPoint], { timeoutMs: 600_000 });
            },
          };
        },
      });
      const writtenCopy = join(mountPoint, 'copy-written.raw');
      const writtenCopyDisk: OpenedDisk = { blockdevs: [fileNode('file', writtenCopy), 'driver=raw,node-name=disk,file=file'], dispose: async () => {} };
      rows.push({
        backend: 'reflink-copy-written',
        floor: 'raw-xfs',
        note: 'the same copy after one sequential pass rewrote every block (nothing shared any more)',
        prepare: async () => {
          await REFLINK_COPY_BACKEND.createChild({ target: 'vda', base: reflinkBase, format: 'raw' }, writtenCopy);
          await fillThroughQemu(work, writtenCopyDisk);
        },
        open: async () => writtenCopyDisk,
      });
    }

    // Only when asked for: it starts a server process.
    if (wanted('streaming')) {
      const streaming = await streamingReplicaExport(baseQcow2);
      cleanups.push(() => streaming.stop());
      let streamedRun = 0;
      rows.push({
        backend: 'streaming',
        floor: 'raw',
        note:
          'a fresh cowherd overlay per run whose base is the complete replica (the qcow2 base) served read-only over NBD by the streaming server ' +
          '(serve-main, a Node process of its own): reads fall through qemu’s NBD client to the server, which checks each piece’s SHA-1 on its first ' +
          'read (in the first round) and reads the file through the page cache; writes are first writes, as in qcow2-overlay',
        prepare: async () => {},
        open: async () => {
          const overlay = join(work, `streamed-${streamedRun++}.qcow2`);
          await createQcow2Overlay(baseQcow2, 'qcow2', overlay);
          return {
            blockdevs: [
              `driver=nbd,node-name=base-nbd,server.type=unix,server.path=${streaming.socket},export=${streaming.exportName},read-only=on`,
              `${qcow2Node('base', 'base-nbd', undefined, false)},read-only=on`,
              fileNode('file', overlay),
              qcow2Node('disk', 'file', 'base', true),
            ],
            dispose: () => rm(overlay, { force: true }),
          };
        },
      });
    }

    // Rows take turns run by run and test by test, so that whatever else the machine does at a moment weighs on
    // every row alike rather than on the rows measured at that moment.
    const active = rows.filter((candidate) => wanted(candidate.backend) || rows.some((other) => wanted(other.backend) && other.floor === candidate.backend));
    const runs = new Map<string, Record<TestKey, Measurement[]>>();
    for (const row of active) {
      const started = performance.now();
      await row.prepare();
      interrupted.signal.throwIfAborted();
      runs.set(row.backend, { seq_read: [], seq_write: [], rand_read: [], rand_write: [] });
      log({ prepared: row.backend, seconds: Number(((performance.now() - started) / 1000).toFixed(1)) });
    }
    // qemu-img convert leaves its output in the page cache, dirty: the first O_DIRECT read of a base would wait for
    // its write-back (measured: the first fall-through read of a fresh base ran at 60% of the later ones).
    await runCommand('sync', [], { timeoutMs: 600_000 });
    const started = performance.now();
    for (let run = 0; run < REPEAT; run++) {
      for (const test of TESTS) {
        for (const row of active) {
          interrupted.signal.throwIfAborted();
          const disk = await row.open();
          try {
            runs.get(row.backend)![test.key].push(await runFio(work, disk, test));
          } finally {
            await disk.dispose();
          }
        }
      }
      log({ round: run + 1, of: REPEAT, seconds: Number(((performance.now() - started) / 1000).toFixed(1)), loadavg_1m: loadavg()[0] });
    }

    const medians = new Map<string, Record<TestKey, number>>();
    for (const row of active) {
      const measured = runs.get(row.backend)!;
      const result = Object.fromEntries(TESTS.map((test) => [test.key, median(measured[test.key].map((entry) => entry.value))])) as Record<TestKey, number>;
      medians.set(row.backend, result);
      log({
        backend: row.backend,
        measured: row.note,
        runs: Object.fromEntries(TESTS.map((test) => [test.key, measured[test.key].map((entry) => Math.round(entry.value))])),
        // qemu-storage-daemon's CPU time per GiB moved (median): what the format costs the host, whatever the noise.
        daemon_cpu_s_per_gib: Object.fromEntries(
          TESTS.map((test) => [test.key, Number(median(measured[test.key].map((entry) => entry.daemonCpuSeconds / (test.bytes / 1024 / MiB))).toFixed(3))]),
        ),
      });
      if (!wanted(row.backend)) continue;
      const floor = medians.get(row.floor)!;
      const ratio = (key: TestKey): number => Number((result[key] / floor[key]).toFixed(3));
      process.stdout.write(
        `${JSON.stringify({
          backend: row.backend,
          seq_read_mib_s: Number(result.seq_read.toFixed(1)),
          seq_write_mib_s: Number(result.seq_write.toFixed(1)),
          rand_read_4k_iops: Math.round(result.rand_read),
          rand_write_4k_iops: Math.round(result.rand_write),
          ratio_to_raw: { seq_read: ratio('seq_read'), seq_write: ratio('seq_write'), rand_read: ratio('rand_read'), rand_write: ratio('rand_write') },
        })}\n`,
      );
    }
    const sizes: Record<string, number> = {};
    for (const [name, file] of [
      ['qcow2-overlay-written', writtenOverlay],
      ['vhd-differencing', vhdChild],
    ] as const) {
      if (existsSync(file)) sizes[name] = Math.round((await stat(file)).size / MiB);
    }
    log({ done: true, file_mib: sizes, loadavg_1m: loadavg()[0] });
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup().catch((error: unknown) => log({ cleanup_failed: String(error) }));
  }
}

main().catch((error: unknown) => {
  if (interrupted.signal.aborted) return;
  process.stderr.write(`bench:io failed: ${(error as Error).stack ?? String(error)}\n`);
  process.exitCode = 1;
});
