// The agent's VHD module on hand-built parents (no qemu-img): field layout and checksums of the differencing
// children it creates, refusals, the sector writer and the reference-free reader.
// test/integration/agent-vhd.test.ts checks the same files against qemu-img's VHDs and libvhdi.
//
//   node --import tsx --test test/unit/agent-vhd.test.ts
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import {
  createDifferencingVhd,
  readVhdInfo,
  readVhdSectors,
  resolveVhdParentPath,
  VhdError,
  writeVhdSectors,
  type VhdErrorKind,
} from '../../services/agent/hypervisor/vhd.js';

const MiB = 1024 * 1024;
let directory: string;
before(async () => {
  directory = await mkdtemp(path.join(tmpdir(), 'cowherd-vhd-unit-'));
});
after(async () => {
  await rm(directory, { recursive: true, force: true });
});

// --- An independent encoder for parents, with the spec's offsets written out. ---

/** One's complement of the byte sum, checksum field (4 bytes at `at`) excluded. */
function specChecksum(bytes: Buffer, at: number): number {
  let sum = 0;
  bytes.forEach((byte, index) => {
    if (index < at || index >= at + 4) sum += byte;
  });
  return ~sum >>> 0;
}

const PARENT_ID = Buffer.from('0123456789abcdef0011223344556677', 'hex');
const PARENT_ID_TEXT = '01234567-89ab-cdef-0011-223344556677';
const PARENT_TIMESTAMP = 0x2a2b2c2d;

function specFooter(type: 2 | 3, size: number, dataOffset: bigint): Buffer {
  const footer = Buffer.alloc(512);
  footer.write('conectix', 0, 'latin1');
  footer.writeUInt32BE(2, 8);
  footer.writeUInt32BE(0x00010000, 12);
  footer.writeBigUInt64BE(dataOffset, 16);
  footer.writeUInt32BE(PARENT_TIMESTAMP, 24);
  footer.write('test', 28, 'latin1');
  footer.writeBigUInt64BE(BigInt(size), 40);
  footer.writeBigUInt64BE(BigInt(size), 48);
  footer.writeUInt32BE((1000 << 16) | (16 << 8) | 63, 56); // 1000 cylinders, 16 heads, 63 sectors per track
  footer.writeUInt32BE(type, 60);
  PARENT_ID.copy(footer, 68);
  footer.writeUInt32BE(specChecksum(footer, 64), 64);
  return footer;
}

/** A fixed VHD: the data, then the footer. */
async function makeFixedParent(file: string, content: Buffer): Promise<void> {
  await writeFile(file, Buffer.concat([content, specFooter(2, content.length, 0xffffffffffffffffn)]));
}

/** A dynamic VHD with every block allocated (bitmap all ones) holding `content`. */
async function makeDynamicParent(file: string, content: Buffer, blockSize: number): Promise<void> {
  const blocks = Math.ceil(content.length / blockSize);
  const header = Buffer.alloc(1024);
  header.write('cxsparse', 0, 'latin1');
  header.writeBigUInt64BE(0xffffffffffffffffn, 8);
  header.writeBigUInt64BE(1536n, 16);
  header.writeUInt32BE(0x00010000, 24);
  header.writeUInt32BE(blocks, 28);
  header.writeUInt32BE(blockSize, 32);
  header.writeUInt32BE(specChecksum(header, 36), 36);
  const batBytes = Math.ceil((blocks * 4) / 512) * 512;
  const bat = Buffer.alloc(batBytes, 0xff);
  const bitmapBytes = Math.ceil(blockSize / 512 / 8 / 512) * 512;
  const parts: Buffer[] = [];
  let sector = (1536 + batBytes) / 512;
  for (let block = 0; block < blocks; block++) {
    bat.writeUInt32BE(sector, block * 4);
    const data = Buffer.alloc(blockSize);
    content.copy(data, 0, block * blockSize, Math.min(content.length, (block + 1) * blockSize));
    parts.push(Buffer.alloc(bitmapBytes, 0xff), data);
    sector += (bitmapBytes + blockSize) / 512;
  }
  const footer = specFooter(3, content.length, 512n);
  await writeFile(file, Buffer.concat([footer, header, bat, ...parts, footer]));
}

async function rejectsWith(promise: Promise<unknown>, kind: VhdErrorKind): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof VhdError, `expected VhdError, got ${String(error)}`);
    assert.equal(error.kind, kind, error.message);
    return true;
  });
}

const sha256 = async (file: string): Promise<string> =>
  createHash('sha256')
    .update(await readFile(file))
    .digest('hex');

test('a child of a dynamic parent: field layout, checksums, locators, footer copy', async () => {
  const parentPath = path.join(directory, 'dynamic-parent.vhd');
  const content = randomBytes(3 * MiB);
  await makeDynamicParent(parentPath, content, 512 * 1024);
  const childPath = path.join(directory, 'clones', 'a', 'child.vhd');
  await mkdir(path.dirname(childPath), { recursive: true });
  const parentHash = await sha256(parentPath);

  const created = await createDifferencingVhd({ parentPath, childPath, now: () => Date.UTC(2030, 0, 1) });
  assert.equal(created.blockSizeBytes, 512 * 1024, 'block size copied from the parent');
  const bytes = await readFile(childPath);
  const blocks = 6;
  const expectedSize = 512 + 1024 + 512 /* BAT: 6 entries padded */ + 3 * 512 /* locators */ + 512;
  assert.equal(bytes.length, expectedSize);
  assert.equal(created.fileSizeBytes, expectedSize);

  // Footer, at the end and copied at the start.
  const footer = bytes.subarray(bytes.length - 512);
  assert.deepEqual(bytes.subarray(0, 512), footer);
  assert.equal(footer.toString('latin1', 0, 8), 'conectix');
  assert.equal(footer.readUInt32BE(8), 2, 'features: reserved bit');
  assert.equal(footer.readUInt32BE(12), 0x00010000);
  assert.equal(footer.readBigUInt64BE(16), 512n, 'data offset: the dynamic header');
  assert.equal(footer.readUInt32BE(24), (Date.UTC(2030, 0, 1) - Date.UTC(2000, 0, 1)) / 1000, 'timestamp: seconds since 2000');
  assert.equal(footer.toString('latin1', 28, 32), 'cowh');
  assert.equal(footer.readBigUInt64BE(40), BigInt(content.length));
  assert.equal(footer.readBigUInt64BE(48), BigInt(content.length));
  assert.equal(footer.readUInt32BE(56), (1000 << 16) | (16 << 8) | 63, 'geometry copied from the parent');
  assert.equal(footer.readUInt32BE(60), 4, 'differencing');
  assert.equal(footer.readUInt32BE(64), specChecksum(footer, 64));
  assert.equal(footer[84], 0);
  assert.ok(
    footer.subarray(85).every((byte) => byte === 0),
    'reserved bytes are zero',
  );

  // Dynamic header.
  const header = bytes.subarray(512, 1536);
  assert.equal(header.toString('latin1', 0, 8), 'cxsparse');
  assert.equal(header.readBigUInt64BE(8), 0xffffffffffffffffn);
  assert.equal(header.readBigUInt64BE(16), 1536n);
  assert.equal(header.readUInt32BE(24), 0x00010000);
  assert.equal(header.readUInt32BE(28), blocks);
  assert.equal(header.readUInt32BE(32), 512 * 1024);
  assert.equal(header.readUInt32BE(36), specChecksum(header, 36));
  assert.deepEqual(header.subarray(40, 56), PARENT_ID);
  assert.equal(header.readUInt32BE(56), PARENT_TIMESTAMP, "parent timestamp: the parent footer's");
  assert.equal(
    Buffer.from(header.subarray(64, 64 + 36))
      .swap16()
      .toString('utf16le'),
    'dynamic-parent.vhd',
    'parent name in UTF-16BE',
  );
  assert.ok(header.subarray(768).every((byte) => byte === 0));

  // BAT: every block unallocated.
  assert.ok(bytes.subarray(1536, 1536 + blocks * 4).every((byte) => byte === 0xff));
  assert.ok(bytes.subarray(1536 + blocks * 4, 2048).every((byte) => byte === 0));

  // Locators: W2ru, W2ku (UTF-16LE), MacX (UTF-8), data space in bytes, data sector-aligned.
  const locators = [0, 1, 2].map((index) => {
    const entry = header.subarray(576 + index * 24, 600 + index * 24);
    const offset = Number(entry.readBigUInt64BE(16));
    const length = entry.readUInt32BE(8);
    const code = entry.toString('latin1', 0, 4);
    assert.equal(entry.readUInt32BE(4), 512);
    assert.equal(entry.readUInt32BE(12), 0);
    assert.equal(offset % 512, 0);
    return { code, value: bytes.toString(code === 'MacX' ? 'utf8' : 'utf16le', offset, offset + length) };
  });
  assert.deepEqual(locators, [
    { code: 'W2ru', value: '.\\..\\..\\dynamic-parent.vhd' },
    { code: 'W2ku', value: parentPath.replaceAll('/', '\\') },
    { code: 'MacX', value: `file://${parentPath}` },
  ]);
  assert.ok(
    header.subarray(576 + 3 * 24, 768).every((byte) => byte === 0),
    'other locator entries empty',
  );

  // And readVhdInfo agrees.
  const info = await readVhdInfo(childPath);
  assert.equal(info.diskType, 'differencing');
  assert.equal(info.currentSizeBytes, content.length);
  assert.deepEqual(info.geometry, { cylinders: 1000, heads: 16, sectorsPerTrack: 63 });
  assert.equal(info.uniqueId, created.uniqueId);
  assert.match(info.uniqueId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(info.blockCount, blocks);
  assert.equal(info.allocatedBlocks, 0);
  assert.equal(info.parent?.uniqueId, PARENT_ID_TEXT);
  assert.equal(info.parent?.timestamp, PARENT_TIMESTAMP);
  assert.equal(info.parent?.unicodeName, 'dynamic-parent.vhd');
  assert.deepEqual(
    info.parent?.locators.map((locator) => [locator.platformCode, locator.value]),
    locators.map((locator) => [locator.code, locator.value]),
  );
  assert.equal(await resolveVhdParentPath(info), path.resolve(path.dirname(childPath), '../../dynamic-parent.vhd'));

  // The child reads as the parent; the parent is untouched.
  assert.deepEqual(await readVhdSectors(childPath, 0, content.length), content);
  assert.equal(await sha256(parentPath), parentHash);
  assert.deepEqual(await readdir(path.dirname(childPath)), ['child.vhd'], 'no temporary file left behind');
});

test('a child of a fixed parent gets 2 MiB blocks, the size and geometry of the parent', async () => {
  const parentPath = path.join(directory, 'fixed-parent.vhd');
  const content = randomBytes(5 * MiB + 4096);
  await makeFixedParent(parentPath, content);
  const parentInfo = await readVhdInfo(parentPath);
  assert.equal(parentInfo.diskType, 'fixed');
  assert.equal(parentInfo.blockSizeBytes, undefined);
  const childPath = path.join(directory, 'fixed-child.vhd');
  await createDifferencingVhd({ parentPath, childPath });
  const info = await readVhdInfo(childPath);
  assert.equal(info.blockSizeBytes, 2 * MiB);
  assert.equal(info.blockCount, 3);
  assert.equal(info.currentSizeBytes, content.length);
  assert.deepEqual(info.geometry, parentInfo.geometry);
  assert.equal(info.parent?.uniqueId, parentInfo.uniqueId);
  assert.deepEqual(await readVhdSectors(childPath, 0, content.length), content);
});

test('refuses an existing child path (file or dangling symlink) and leaves it alone', async () => {
  const parentPath = path.join(directory, 'refuse-parent.vhd');
  await makeFixedParent(parentPath, randomBytes(MiB));
  const childPath = path.join(directory, 'refuse-child.vhd');
  await createDifferencingVhd({ parentPath, childPath });
  const before = await readFile(childPath);
  await rejectsWith(createDifferencingVhd({ parentPath, childPath }), 'already-exists');
  assert.deepEqual(await readFile(childPath), before);
  const dangling = path.join(directory, 'dangling.vhd');
  await symlink(path.join(directory, 'nowhere'), dangling);
  await rejectsWith(createDifferencingVhd({ parentPath, childPath: dangling }), 'already-exists');
});

test('refuses a parent that is not a VHD, is missing, or is corrupt; creates nothing', async () => {
  const scratch = await mkdtemp(path.join(directory, 'bad-'));
  const notVhd = path.join(scratch, 'not.vhd');
  await writeFile(notVhd, randomBytes(64 * 1024));
  await rejectsWith(createDifferencingVhd({ parentPath: notVhd, childPath: path.join(scratch, 'c1.vhd') }), 'not-a-vhd');
  const tiny = path.join(scratch, 'tiny.vhd');
  await writeFile(tiny, 'conectix');
  await rejectsWith(readVhdInfo(tiny), 'not-a-vhd');
  await rejectsWith(createDifferencingVhd({ parentPath: path.join(scratch, 'missing.vhd'), childPath: path.join(scratch, 'c2.vhd') }), 'not-found');

  const badFooter = path.join(scratch, 'bad-footer.vhd');
  await makeFixedParent(badFooter, randomBytes(MiB));
  const bytes = await readFile(badFooter);
  bytes[bytes.length - 512 + 48] ^= 1; // current size, checksum not updated
  await writeFile(badFooter, bytes);
  await rejectsWith(createDifferencingVhd({ parentPath: badFooter, childPath: path.join(scratch, 'c3.vhd') }), 'bad-checksum');

  const badHeader = path.join(scratch, 'bad-header.vhd');
  await makeDynamicParent(badHeader, randomBytes(MiB), 512 * 1024);
  const dynamicBytes = await readFile(badHeader);
  dynamicBytes[512 + 40] ^= 1; // parent id in the dynamic header, checksum not updated
  await writeFile(badHeader, dynamicBytes);
  await rejectsWith(readVhdInfo(badHeader), 'bad-checksum');
  assert.deepEqual((await readdir(scratch)).sort(), ['bad-footer.vhd', 'bad-header.vhd', 'not.vhd', 'tiny.vhd']);
});

test('writes allocate blocks, set bitmap bits in whole bytes, keep the rest on the parent', async () => {
  const parentPath = path.join(directory, 'write-parent.vhd');
  const content = randomBytes(4 * MiB + 2048); // a last block of 4 sectors
  await makeDynamicParent(parentPath, content, 2 * MiB);
  const parentHash = await sha256(parentPath);
  const childPath = path.join(directory, 'write-child.vhd');
  await createDifferencingVhd({ parentPath, childPath });

  const expected = Buffer.from(content);
  const write = async (offset: number, data: Buffer): Promise<void> => {
    await writeVhdSectors(childPath, offset, data);
    data.copy(expected, offset);
  };
  await write(512, randomBytes(1024)); // sectors 1-2: one bitmap byte, partly
  await write(2 * MiB - 1024, randomBytes(4096)); // across blocks 0 and 1
  await write(content.length - 512, randomBytes(512)); // the last sector
  await write(512, randomBytes(512)); // again into an allocated block

  assert.deepEqual(await readVhdSectors(childPath, 0, content.length), expected);
  assert.deepEqual(await readVhdSectors(childPath, 1536, 2 * MiB), expected.subarray(1536, 1536 + 2 * MiB));
  assert.equal(await sha256(parentPath), parentHash, 'parent unchanged');

  const info = await readVhdInfo(childPath);
  assert.equal(info.allocatedBlocks, 3);
  const bytes = await readFile(childPath);
  assert.deepEqual(bytes.subarray(bytes.length - 512), bytes.subarray(0, 512), 'footer moved to the end, unchanged');
  const bat = bytes.subarray(1536, 1536 + 12);
  for (let block = 0; block < 3; block++) {
    const start = bat.readUInt32BE(block * 4) * 512;
    assert.equal((start + 512) % 4096, 0, 'block data on a page boundary');
    const bitmap = bytes.subarray(start, start + 512);
    assert.ok(
      bitmap.every((byte) => byte === 0 || byte === 0xff),
      `block ${block} bitmap bytes are 0x00 or 0xff`,
    );
  }
  assert.equal(bytes[bat.readUInt32BE(0) * 512], 0xff, 'block 0: sectors 0-7');
  assert.equal(bytes[bat.readUInt32BE(0) * 512 + 1], 0);
});

test('rejects unaligned and out-of-range writes', async () => {
  const parentPath = path.join(directory, 'range-parent.vhd');
  await makeFixedParent(parentPath, randomBytes(MiB));
  const childPath = path.join(directory, 'range-child.vhd');
  await createDifferencingVhd({ parentPath, childPath });
  await rejectsWith(writeVhdSectors(childPath, 100, Buffer.alloc(512)), 'unaligned');
  await rejectsWith(writeVhdSectors(childPath, 512, Buffer.alloc(100)), 'unaligned');
  await rejectsWith(writeVhdSectors(childPath, MiB, Buffer.alloc(512)), 'out-of-range');
  await rejectsWith(readVhdSectors(childPath, MiB - 512, 1024), 'out-of-range');
  assert.equal((await readVhdInfo(childPath)).allocatedBlocks, 0);
});

test('chains: a child of a differencing disk, parents found by locator or given, a wrong parent refused', async () => {
  const base = path.join(directory, 'chain', 'images', 'base.vhd');
  await mkdir(path.dirname(base), { recursive: true });
  const content = randomBytes(2 * MiB);
  await makeDynamicParent(base, content, 2 * MiB);
  const middle = path.join(directory, 'chain', 'clones', 'middle.vhd');
  await mkdir(path.dirname(middle), { recursive: true });
  await createDifferencingVhd({ parentPath: base, childPath: middle });
  await writeVhdSectors(middle, 0, Buffer.alloc(4096, 1));
  const top = path.join(directory, 'chain', 'clones', 'top.vhd');
  await createDifferencingVhd({ parentPath: middle, childPath: top });
  await writeVhdSectors(top, 8192, Buffer.alloc(512, 2));
  const expected = Buffer.from(content);
  expected.fill(1, 0, 4096);
  expected.fill(2, 8192, 8704);
  assert.deepEqual(await readVhdSectors(top, 0, content.length), expected);
  assert.deepEqual(await readVhdSectors(top, 0, content.length, { parents: [middle, base] }), expected);
  await rejectsWith(readVhdSectors(top, 0, 512, { parents: [base] }), 'parent-mismatch');

  // The relative locator survives moving the tree; an impostor at the parent's place is refused.
  const moved = path.join(directory, 'chain-moved');
  await rm(moved, { recursive: true, force: true });
  await rename(path.join(directory, 'chain'), moved);
  const movedTop = path.join(moved, 'clones', 'top.vhd');
  assert.equal(await resolveVhdParentPath(await readVhdInfo(movedTop)), path.join(moved, 'clones', 'middle.vhd'));
  assert.deepEqual(await readVhdSectors(movedTop, 0, content.length), expected);
  await rm(path.join(moved, 'clones', 'middle.vhd'));
  await makeFixedParent(path.join(moved, 'clones', 'middle.vhd'), randomBytes(2 * MiB)); // a VHD with another unique id
  await rejectsWith(resolveVhdParentPath(await readVhdInfo(movedTop)), 'parent-mismatch');
});

test('parentLocatorPath: the locators name the path the hypervisor will see', async () => {
  const parentPath = path.join(directory, 'seen-here.vhd');
  await makeFixedParent(parentPath, randomBytes(MiB));
  const childPath = path.join(directory, 'locator-child.vhd');
  const created = await createDifferencingVhd({ parentPath, childPath, parentLocatorPath: '/var/lib/cowherd/images/base.vhd' });
  assert.deepEqual(created.locators, [
    { platformCode: 'W2ru', value: `.\\${path.relative(directory, '/var/lib/cowherd/images/base.vhd').replaceAll('/', '\\')}` },
    { platformCode: 'W2ku', value: '\\var\\lib\\cowherd\\images\\base.vhd' },
    { platformCode: 'MacX', value: 'file:///var/lib/cowherd/images/base.vhd' },
  ]);
  assert.equal((await readVhdInfo(childPath)).parent?.unicodeName, 'base.vhd');
});
