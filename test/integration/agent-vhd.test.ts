// Differencing VHDs written by services/agent/hypervisor/vhd.ts, checked against the outside world: parents made by
// qemu-img (dynamic and fixed, filled from random bytes), children inspected with vhdiinfo and read WHOLE
// through libvhdi (python3-libvhdi, test/python/vhd_read.py) and, as root with /dev/fuse, through vhdimount.
// qemu-img cannot be the reference: it ignores a differencing VHD's parent.
//
//   node --import tsx --test test/integration/agent-vhd.test.ts
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { runCommand } from '../../services/common/platform/child-process.js';
import { createDifferencingVhd, readVhdInfo, readVhdSectors, resolveVhdParentPath, writeVhdSectors } from '../../services/agent/hypervisor/vhd.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const readerScript = path.join(repoRoot, 'test', 'python', 'vhd_read.py');
const MiB = 1024 * 1024;
const RAW_SIZE = 8 * MiB;
const canFuse = process.getuid?.() === 0 && existsSync('/dev/fuse') && existsSync('/usr/bin/vhdimount');

let directory: string;
let raw: Buffer;
before(async () => {
  directory = await mkdtemp(path.join(tmpdir(), 'cowherd-vhd-'));
  raw = randomBytes(RAW_SIZE);
  await writeFile(path.join(directory, 'random.raw'), raw);
});
after(async () => {
  await rm(directory, { recursive: true, force: true });
});

const sha256 = async (file: string): Promise<string> =>
  createHash('sha256')
    .update(await readFile(file))
    .digest('hex');

/** `vhdiinfo` output as key/value pairs. */
async function vhdiinfo(file: string): Promise<Record<string, string>> {
  const output = await runCommand('vhdiinfo', [file], { timeoutMs: 15_000, env: { LC_ALL: 'C' } });
  const fields: Record<string, string> = {};
  for (const line of output.split('\n')) {
    const match = /^\t([^:\t]+?)\t*:\s*(.*)$/.exec(line);
    if (match) fields[match[1]!.trim()] = match[2]!.trim();
  }
  return fields;
}

interface LibvhdiChainEntry {
  readonly path: string;
  readonly disk_type: string;
  readonly identifier: string;
  readonly parent_identifier: string | null;
  readonly parent_filename: string | null;
  readonly media_size: number;
}

/** The whole virtual disk of `image` read through libvhdi, and the chain libvhdi saw. */
async function readThroughLibvhdi(image: string, parents: readonly string[]): Promise<{ data: Buffer; chain: LibvhdiChainEntry[] }> {
  const out = path.join(directory, `libvhdi-${randomBytes(4).toString('hex')}.raw`);
  try {
    const printed = await runCommand('/usr/bin/python3', [readerScript, '--out', out, image, ...parents], { timeoutMs: 60_000 });
    return { data: await readFile(out), chain: (JSON.parse(printed) as { chain: LibvhdiChainEntry[] }).chain };
  } finally {
    await rm(out, { force: true });
  }
}

/** The whole virtual disk of `image` as vhdimount (FUSE) shows it; the parent is found by name next to the child. */
async function readThroughVhdimount(image: string): Promise<Buffer> {
  const mountPoint = await mkdtemp(path.join(directory, 'mnt-'));
  await runCommand('vhdimount', [image, mountPoint], { timeoutMs: 15_000 });
  try {
    // One file per layer, vhdi1 the base: the child is the last.
    const layers = (await readdir(mountPoint)).sort((a, b) => Number(a.slice(4)) - Number(b.slice(4)));
    return await readFile(path.join(mountPoint, layers.at(-1)!));
  } finally {
    await runCommand('umount', [mountPoint], { timeoutMs: 15_000 });
    await rm(mountPoint, { recursive: true, force: true });
  }
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

for (const subformat of ['dynamic', 'fixed'] as const) {
  describe(`a child of a qemu-img ${subformat} VHD`, () => {
    let parentPath: string;
    let parentHash: string;
    let virtualSize: number;

    before(async () => {
      parentPath = path.join(directory, `parent-${subformat}.vhd`);
      await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', `subformat=${subformat}`, path.join(directory, 'random.raw'), parentPath], {
        timeoutMs: 60_000,
      });
      parentHash = await sha256(parentPath);
      virtualSize = (await readVhdInfo(parentPath)).currentSizeBytes;
    });

    test('libvhdi reads the parent as the random bytes (qemu-img rounds the size up to its CHS geometry)', async () => {
      const info = await readVhdInfo(parentPath);
      assert.equal(info.diskType, subformat);
      assert.ok(virtualSize >= RAW_SIZE && virtualSize < RAW_SIZE + 64 * 1024, `virtual size ${virtualSize}`);
      const { data, chain } = await readThroughLibvhdi(parentPath, []);
      assert.equal(chain[0]!.identifier, info.uniqueId);
      assert.equal(data.length, virtualSize);
      assert.ok(data.subarray(0, RAW_SIZE).equals(raw));
      assert.ok(data.subarray(RAW_SIZE).every((byte) => byte === 0));
    });

    test('create, vhdiinfo, write at several offsets, read the whole disk through libvhdi', async (t: TestContext) => {
      const childPath = path.join(directory, `child-of-${subformat}.vhd`);
      const started = performance.now();
      const created = await createDifferencingVhd({ parentPath, childPath });
      const elapsedMs = performance.now() - started;
      const childSize = (await stat(childPath)).size;
      t.diagnostic(`createDifferencingVhd (${subformat} parent, ${virtualSize} bytes virtual): ${elapsedMs.toFixed(2)} ms, child ${childSize} bytes`);
      assert.equal(childSize, created.fileSizeBytes);
      assert.ok(childSize <= 8192, `child of ${childSize} bytes`);

      const parentInfo = await readVhdInfo(parentPath);
      const fields = await vhdiinfo(childPath);
      assert.equal(fields['Disk type'], 'Differential');
      assert.equal(fields['Identifier'], created.uniqueId);
      assert.equal(fields['Parent identifier'], parentInfo.uniqueId);
      assert.equal(fields['Parent filename'], path.basename(parentPath));
      assert.match(fields['Media size'] ?? '', new RegExp(`\\(${virtualSize} bytes\\)`));
      assert.equal((await vhdiinfo(parentPath))['Identifier'], parentInfo.uniqueId, 'vhdiinfo and readVhdInfo print ids alike');

      // Before any write the child reads exactly as the parent.
      const expected = Buffer.alloc(virtualSize);
      raw.copy(expected);
      assert.ok((await readThroughLibvhdi(childPath, [parentPath])).data.equals(expected));

      const blockSize = created.blockSizeBytes;
      const writes: Array<[string, number, Buffer]> = [
        ['first sector', 0, randomBytes(512)],
        ['within one block, not 4 KiB aligned', 5 * 512, randomBytes(3 * 512)],
        ['within one block, 64 KiB', blockSize + 256 * 1024, randomBytes(64 * 1024)],
        ['spanning two blocks', 2 * blockSize - 1536, randomBytes(4096)],
        ['the last sector', virtualSize - 512, randomBytes(512)],
        ['over an earlier write', 6 * 512, randomBytes(512)],
      ];
      for (const [, offset, data] of writes) {
        await writeVhdSectors(childPath, offset, data);
        data.copy(expected, offset);
      }

      const { data, chain } = await readThroughLibvhdi(childPath, [parentPath]);
      assert.deepEqual(
        chain.map((entry) => [entry.disk_type, entry.identifier, entry.parent_identifier]),
        [
          ['differencing', created.uniqueId, parentInfo.uniqueId],
          [subformat, parentInfo.uniqueId, null],
        ],
      );
      assert.equal(data.length, virtualSize);
      for (const [label, offset, written] of writes) {
        assert.ok(data.subarray(offset, offset + written.length).equals(expected.subarray(offset, offset + written.length)), `${label} reads back`);
      }
      assert.ok(data.equals(expected), 'the whole disk through libvhdi = parent bytes overlaid with the writes');
      // Found by name next to the child, as vhdimount does, instead of given.
      assert.ok((await readThroughLibvhdi(childPath, [])).data.equals(expected));
      assert.ok((await readVhdSectors(childPath, 0, virtualSize)).equals(expected), "cowherd's own reader agrees");
      if (canFuse) assert.ok((await readThroughVhdimount(childPath)).equals(expected), 'vhdimount agrees');
      else t.diagnostic('vhdimount skipped: needs root and /dev/fuse');

      assert.equal(await sha256(parentPath), parentHash, 'parent unchanged');
      const info = await readVhdInfo(childPath);
      t.diagnostic(
        `after ${writes.length} writes: ${info.allocatedBlocks} of ${info.blockCount} blocks allocated, file ${info.fileSizeBytes} bytes (${(await stat(childPath)).blocks * 512} on disk)`,
      );
    });
  });
}

test('a child in another directory: libvhdi reads it with the parent given, cowherd finds the parent by locator', async () => {
  const parentPath = path.join(directory, 'images', 'base.vhd');
  await mkdir(path.dirname(parentPath), { recursive: true });
  await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic', path.join(directory, 'random.raw'), parentPath], {
    timeoutMs: 60_000,
  });
  const childPath = path.join(directory, 'clones', 'vm-1', 'disk.vhd');
  await mkdir(path.dirname(childPath), { recursive: true });
  await createDifferencingVhd({ parentPath, childPath });
  const chunk = randomBytes(8192);
  await writeVhdSectors(childPath, 3 * MiB, chunk);
  const info = await readVhdInfo(childPath);
  assert.equal(await resolveVhdParentPath(info), parentPath);
  const expected = Buffer.alloc(info.currentSizeBytes);
  raw.copy(expected);
  chunk.copy(expected, 3 * MiB);
  assert.ok((await readThroughLibvhdi(childPath, [parentPath])).data.equals(expected));
  // By name only (vhdimount's rule) the parent is not next to the child.
  await assert.rejects(readThroughLibvhdi(childPath, []));
});

test('grandchild: a differencing child of a differencing child', async () => {
  const base = path.join(directory, 'chain-base.vhd');
  await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic', path.join(directory, 'random.raw'), base], {
    timeoutMs: 60_000,
  });
  const middle = path.join(directory, 'chain-middle.vhd');
  const top = path.join(directory, 'chain-top.vhd');
  await createDifferencingVhd({ parentPath: base, childPath: middle });
  const first = randomBytes(MiB);
  await writeVhdSectors(middle, MiB, first);
  await createDifferencingVhd({ parentPath: middle, childPath: top });
  const second = randomBytes(1024);
  await writeVhdSectors(top, MiB + 512, second);
  const expected = Buffer.alloc((await readVhdInfo(base)).currentSizeBytes);
  raw.copy(expected);
  first.copy(expected, MiB);
  second.copy(expected, MiB + 512);
  const { data, chain } = await readThroughLibvhdi(top, [middle, base]);
  assert.deepEqual(
    chain.map((entry) => entry.disk_type),
    ['differencing', 'differencing', 'dynamic'],
  );
  assert.ok(data.equals(expected));
});

test('createDifferencingVhd timings and sizes, up to a 100 GiB parent', async (t: TestContext) => {
  const big = path.join(directory, 'big.vhd');
  await runCommand('qemu-img', ['create', '-f', 'vpc', '-o', 'subformat=dynamic', big, '100G'], { timeoutMs: 60_000 });
  const small = path.join(directory, 'parent-dynamic.vhd');
  for (const [label, parentPath] of [
    ['8 MiB dynamic', small],
    ['100 GiB dynamic', big],
  ] as const) {
    for (const durable of [true, false]) {
      const times: number[] = [];
      let size = 0;
      for (let run = 0; run < 20; run++) {
        const childPath = path.join(directory, 'timing', `${label.replaceAll(' ', '-')}-${durable}-${run}.vhd`);
        await mkdir(path.dirname(childPath), { recursive: true });
        const started = performance.now();
        const created = await createDifferencingVhd({ parentPath, childPath, durable });
        times.push(performance.now() - started);
        size = created.fileSizeBytes;
      }
      t.diagnostic(`${label} parent, durable=${durable}: median ${median(times).toFixed(2)} ms, max ${Math.max(...times).toFixed(2)} ms, child ${size} bytes`);
      assert.ok(median(times) < 200, `median ${median(times)} ms`);
    }
  }
  const bigChild = await readVhdInfo(path.join(directory, 'timing', '100-GiB-dynamic-true-0.vhd'));
  assert.equal(bigChild.blockCount, Math.ceil(bigChild.currentSizeBytes / (2 * MiB)));
  assert.equal((await vhdiinfo(bigChild.path))['Disk type'], 'Differential');
});
