/**
 * VHD (Microsoft "Virtual Hard Disk Image Format Specification", the format Xen's blktap uses) read and
 * written by cowherd itself: qemu-img refuses VHD backing files and silently ignores the parent of a
 * differencing VHD, and vhd-util is not packaged. This module parses footers and dynamic headers, creates
 * differencing children of fixed, dynamic or differencing parents, and has a minimal sector writer and reader.
 *
 * Layout of a child written here (all integers big-endian):
 *
 *   0        footer copy (512)
 *   512      dynamic disk header (1024): parent UUID and timestamp, parent name, 8 parent locator entries
 *   1536     BAT: one u32 sector offset per block, 0xFFFFFFFF = not allocated, padded to 512
 *   ...      parent locator data (W2ru, W2ku, MacX), each padded to 512
 *   ...      blocks appended by writeVhdSectors: sector bitmap (padded to 512) + block data, data 4 KiB aligned
 *   end-512  footer
 *
 * vhdiinfo / python3-libvhdi (libvhdi) are the reference readers in tests.
 */
import { randomBytes } from 'node:crypto';
import { link, lstat, open, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';

/** What a VHD failure is about. */
export type VhdErrorKind =
  /** The file does not exist. */
  | 'not-found'
  /** No "conectix" footer at the end: not a VHD (or truncated). */
  | 'not-a-vhd'
  /** A footer or dynamic header checksum does not match its bytes. */
  | 'bad-checksum'
  /** A field is out of range or contradicts another (offsets outside the file, block size not a power of two...). */
  | 'malformed'
  /** A valid VHD this module does not handle (unknown disk type or format version). */
  | 'unsupported'
  /** The child path is already taken. */
  | 'already-exists'
  /** A write is not a whole number of 512-byte sectors. */
  | 'unaligned'
  /** A read or write reaches past the virtual disk. */
  | 'out-of-range'
  /** No parent locator (nor the parent name next to the child) leads to a readable file. */
  | 'parent-not-found'
  /** A file was found where the parent should be, but its unique id is not the one the child records. */
  | 'parent-mismatch'
  /** Invalid arguments (a parent name too long for the header...). */
  | 'invalid-argument';

/** Thrown when a VHD cannot be read, created or written; `kind` says why, `path` names the file. */
export class VhdError extends Error {
  override readonly name = 'VhdError';
  constructor(
    readonly kind: VhdErrorKind,
    readonly path: string,
    message: string,
    cause?: unknown,
  ) {
    super(`${path}: ${message}`, cause === undefined ? undefined : { cause });
  }
}

/** The footer's disk type (2, 3, 4). */
export type VhdDiskType = 'fixed' | 'dynamic' | 'differencing';

/** Cylinders, heads, sectors per track, as the footer stores them. */
export interface VhdGeometry {
  readonly cylinders: number;
  readonly heads: number;
  readonly sectorsPerTrack: number;
}

/** One used entry of a differencing disk's parent locator table. */
export interface VhdParentLocator {
  /** Platform code as 4 ASCII characters: 'W2ru', 'W2ku', 'MacX' ('Wi2r', 'Wi2k', 'Mac ' are deprecated). */
  readonly platformCode: string;
  /** The entry's "platform data space" as stored: bytes in files from Windows and Xen, sectors per the spec. */
  readonly dataSpace: number;
  readonly dataLengthBytes: number;
  readonly dataOffset: number;
  /** The decoded locator: UTF-16LE for W2ru/W2ku, UTF-8 for MacX; undefined for other codes. */
  readonly value: string | undefined;
}

/** What a differencing disk says about its parent. */
export interface VhdParentInfo {
  /** The parent footer's unique id, as libvhdi prints it (bytes in file order, 8-4-4-4-12 hex). */
  readonly uniqueId: string;
  /** Seconds since 2000-01-01 00:00:00 UTC. */
  readonly timestamp: number;
  /** The header's parent name (UTF-16BE). */
  readonly unicodeName: string;
  readonly locators: readonly VhdParentLocator[];
}

/** A VHD's footer and, for dynamic and differencing disks, its dynamic header. */
export interface VhdInfo {
  readonly path: string;
  readonly fileSizeBytes: number;
  readonly diskType: VhdDiskType;
  /** The virtual disk size guests see. */
  readonly currentSizeBytes: number;
  readonly originalSizeBytes: number;
  readonly geometry: VhdGeometry;
  /** As libvhdi prints it (bytes in file order, 8-4-4-4-12 hex). */
  readonly uniqueId: string;
  /** Creation time, seconds since 2000-01-01 00:00:00 UTC (what a child records as its parent timestamp). */
  readonly timestamp: number;
  readonly creatorApplication: string;
  readonly creatorVersion: number;
  readonly creatorHostOs: string;
  readonly features: number;
  readonly savedState: boolean;
  /** Dynamic and differencing disks only. */
  readonly blockSizeBytes: number | undefined;
  /** Dynamic and differencing disks only: BAT entries (virtual size / block size, rounded up). */
  readonly blockCount: number | undefined;
  /** Dynamic and differencing disks only: blocks present in the file. */
  readonly allocatedBlocks: number | undefined;
  /** Differencing disks only. */
  readonly parent: VhdParentInfo | undefined;
}

/** Options of {@link createDifferencingVhd}. */
export interface CreateDifferencingVhdOptions {
  /** The parent VHD (fixed, dynamic or differencing), opened read-only. */
  readonly parentPath: string;
  /** Where the child goes; must not exist. */
  readonly childPath: string;
  /**
   * The parent's path as the hypervisor will open it, when that differs from `parentPath` (the parent read
   * through another mount, or the pair moved later). Default `parentPath`. The relative locator is computed
   * from the child's directory to this path.
   */
  readonly parentLocatorPath?: string;
  /** Block size of the child. Default: the parent's when it has blocks, else 2 MiB. A power of two >= 4 KiB. */
  readonly blockSizeBytes?: number;
  /** Flush file and directory before returning. Default true. */
  readonly durable?: boolean;
  /** The clock, for tests. Default Date.now. */
  readonly now?: () => number;
}

/** What {@link createDifferencingVhd} wrote. */
export interface CreatedDifferencingVhd {
  readonly childPath: string;
  readonly fileSizeBytes: number;
  readonly uniqueId: string;
  readonly blockSizeBytes: number;
  readonly parent: VhdInfo;
  /** The locators written, in table order. */
  readonly locators: readonly { readonly platformCode: string; readonly value: string }[];
}

const SECTOR_SIZE = 512;
const FOOTER_SIZE = 512;
const DYNAMIC_HEADER_SIZE = 1024;
const FOOTER_COOKIE = 'conectix';
const DYNAMIC_COOKIE = 'cxsparse';
const FORMAT_VERSION = 0x0001_0000;
/** Bit 1 of "features" is reserved and must be set. */
const FEATURES_RESERVED = 0x0000_0002;
const NO_OFFSET = 0xffff_ffff_ffff_ffffn;
const UNALLOCATED = 0xffff_ffff;
const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;
/** Block data starts on a page boundary, as blktap allocates it, so O_DIRECT readers on 4K disks stay aligned. */
const DATA_ALIGNMENT = 4096;
const VHD_EPOCH_SECONDS = Date.UTC(2000, 0, 1) / 1000;
const PARENT_NAME_BYTES = 512;
const LOCATOR_ENTRIES = 8;
const LOCATOR_TABLE_OFFSET = 576;
const LOCATOR_ENTRY_SIZE = 24;
/** Locator data larger than this is not a path. */
const MAX_LOCATOR_BYTES = 64 * 1024;
/**
 * Not "tap": blktap treats "tap" files of creator version >= 1.2 as having its private batmap. Not "qemu"
 * either: qemu derives the size of "qemu" files from the CHS geometry.
 */
const CREATOR_APPLICATION = 'cowh';
const CREATOR_VERSION = 0x0001_0000;
const CREATOR_HOST_OS = 'Wi2k';

const DISK_TYPES: Readonly<Record<number, VhdDiskType>> = { 2: 'fixed', 3: 'dynamic', 4: 'differencing' };
const DISK_TYPE_CODES: Readonly<Record<VhdDiskType, number>> = { fixed: 2, dynamic: 3, differencing: 4 };

/** A VHD opened for reading (and, for writeVhdSectors, writing): parsed metadata plus its BAT. */
interface OpenedVhd {
  readonly info: VhdInfo;
  readonly footer: Buffer;
  /** Dynamic and differencing only. */
  readonly tableOffset: number;
  readonly bat: Uint32Array;
  readonly bitmapBytes: number;
}

/** Reads and validates a VHD's footer, dynamic header and parent locators. Throws VhdError. */
export async function readVhdInfo(filePath: string): Promise<VhdInfo> {
  const handle = await openFile(filePath, 'r');
  try {
    return (await parseVhd(handle, filePath)).info;
  } finally {
    await handle.close();
  }
}

/**
 * Writes a differencing VHD whose parent is `parentPath`: same virtual size and geometry, an empty BAT, the
 * parent's unique id and timestamp, the parent's file name, and W2ru (relative), W2ku (absolute) and MacX
 * (file URL) locators. Written under a temporary name and linked into place, so no half-written child ever
 * carries the final name; refuses (VhdError 'already-exists') when `childPath` exists. Never opens the parent
 * for writing.
 */
export async function createDifferencingVhd(options: CreateDifferencingVhdOptions): Promise<CreatedDifferencingVhd> {
  const childPath = path.resolve(options.childPath);
  if (await exists(childPath)) throw new VhdError('already-exists', childPath, 'the child path already exists');
  const parent = await readVhdInfo(options.parentPath);
  const blockSize = options.blockSizeBytes ?? parent.blockSizeBytes ?? DEFAULT_BLOCK_SIZE;
  if (!Number.isInteger(blockSize) || blockSize < DATA_ALIGNMENT || blockSize > 0x8000_0000 || (blockSize & (blockSize - 1)) !== 0) {
    throw new VhdError('invalid-argument', childPath, `block size ${blockSize} is not a power of two between 4 KiB and 2 GiB`);
  }
  const blockCount = Math.ceil(parent.currentSizeBytes / blockSize);
  if (blockCount > 0xffff_fffe) throw new VhdError('invalid-argument', childPath, 'the disk has too many blocks for a BAT');

  const locatorTarget = path.resolve(options.parentLocatorPath ?? options.parentPath);
  const childDirectory = path.dirname(childPath);
  const relative = path.relative(childDirectory, locatorTarget);
  const unicodeName = path.basename(locatorTarget);
  const nameBytes = encodeUtf16Be(unicodeName);
  if (nameBytes.length > PARENT_NAME_BYTES)
    throw new VhdError('invalid-argument', childPath, `parent name "${unicodeName}" exceeds ${PARENT_NAME_BYTES / 2} UTF-16 units`);

  // blktap reads locators in table order and takes the first that resolves, so the relative one goes first: it
  // survives moving parent and child together. Windows paths use backslashes; blktap turns them back into
  // slashes, drops a "C:" and resolves relative ones from the child's directory. Its own relative locator
  // starts with ".\". libvhdi reads no locator at all (its caller picks the parent; vhdimount looks for the
  // parent name next to the child).
  const locators = [
    { platformCode: 'W2ru', value: `.\\${relative.split(path.sep).join('\\')}`, encoding: 'utf16le' as const },
    { platformCode: 'W2ku', value: locatorTarget.split(path.sep).join('\\'), encoding: 'utf16le' as const },
    // blktap strips "file://" and does not decode %-escapes, so the path goes in verbatim.
    { platformCode: 'MacX', value: `file://${locatorTarget}`, encoding: 'utf8' as const },
  ];
  const encodedLocators = locators.map((locator) => Buffer.from(locator.value, locator.encoding));

  const tableOffset = FOOTER_SIZE + DYNAMIC_HEADER_SIZE;
  const tableBytes = roundUp(blockCount * 4, SECTOR_SIZE);
  let cursor = tableOffset + tableBytes;
  const locatorOffsets = encodedLocators.map((data) => {
    const offset = cursor;
    cursor += roundUp(Math.max(data.length, 1), SECTOR_SIZE);
    return offset;
  });
  const footerOffset = cursor;
  const fileSize = footerOffset + FOOTER_SIZE;

  const now = options.now ?? Date.now;
  const uniqueId = randomUuidBytes();
  const footer = Buffer.alloc(FOOTER_SIZE);
  footer.write(FOOTER_COOKIE, 0, 'latin1');
  footer.writeUInt32BE(FEATURES_RESERVED, 8);
  footer.writeUInt32BE(FORMAT_VERSION, 12);
  footer.writeBigUInt64BE(BigInt(FOOTER_SIZE), 16);
  footer.writeUInt32BE(vhdTimestamp(now()), 24);
  footer.write(CREATOR_APPLICATION, 28, 'latin1');
  footer.writeUInt32BE(CREATOR_VERSION, 32);
  footer.write(CREATOR_HOST_OS, 36, 'latin1');
  footer.writeBigUInt64BE(BigInt(parent.currentSizeBytes), 40);
  footer.writeBigUInt64BE(BigInt(parent.currentSizeBytes), 48);
  footer.writeUInt16BE(parent.geometry.cylinders, 56);
  footer.writeUInt8(parent.geometry.heads, 58);
  footer.writeUInt8(parent.geometry.sectorsPerTrack, 59);
  footer.writeUInt32BE(DISK_TYPE_CODES.differencing, 60);
  uniqueId.copy(footer, 68);
  footer.writeUInt32BE(checksum(footer, 64), 64);

  const header = Buffer.alloc(DYNAMIC_HEADER_SIZE);
  header.write(DYNAMIC_COOKIE, 0, 'latin1');
  header.writeBigUInt64BE(NO_OFFSET, 8);
  header.writeBigUInt64BE(BigInt(tableOffset), 16);
  header.writeUInt32BE(FORMAT_VERSION, 24);
  header.writeUInt32BE(blockCount, 28);
  header.writeUInt32BE(blockSize, 32);
  uuidToBytes(parent.uniqueId).copy(header, 40);
  // The parent footer's timestamp (blktap records the parent file's mtime instead; neither blktap nor libvhdi
  // compares it, both match the parent by unique id).
  header.writeUInt32BE(parent.timestamp, 56);
  nameBytes.copy(header, 64);
  encodedLocators.forEach((data, index) => {
    const entry = LOCATOR_TABLE_OFFSET + index * LOCATOR_ENTRY_SIZE;
    header.write(locators[index]!.platformCode, entry, 'latin1');
    // Bytes, not sectors: what Windows and blktap write (blktap reads values < 512 as sectors, others as bytes).
    header.writeUInt32BE(roundUp(Math.max(data.length, 1), SECTOR_SIZE), entry + 4);
    header.writeUInt32BE(data.length, entry + 8);
    header.writeBigUInt64BE(BigInt(locatorOffsets[index]!), entry + 16);
  });
  header.writeUInt32BE(checksum(header, 36), 36);

  const image = Buffer.alloc(fileSize);
  footer.copy(image, 0);
  header.copy(image, FOOTER_SIZE);
  image.fill(0xff, tableOffset, tableOffset + blockCount * 4);
  encodedLocators.forEach((data, index) => data.copy(image, locatorOffsets[index]!));
  footer.copy(image, footerOffset);

  const durable = options.durable ?? true;
  const temporary = path.join(childDirectory, `.${path.basename(childPath)}.${randomBytes(6).toString('hex')}.tmp`);
  let handle: FileHandle | undefined;
  try {
    handle = await open(temporary, 'wx', 0o644);
    await writeFully(handle, image, 0);
    if (durable) await handle.sync();
    await handle.close();
    handle = undefined;
    // link() fails with EEXIST where rename() would replace: a child created meanwhile is never overwritten.
    await link(temporary, childPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw new VhdError('already-exists', childPath, 'the child path already exists', error);
    throw error;
  } finally {
    await handle?.close().catch(() => undefined);
    await unlink(temporary).catch(() => undefined);
  }
  if (durable) await syncDirectory(childDirectory);
  return {
    childPath,
    fileSizeBytes: fileSize,
    uniqueId: uuidToString(uniqueId),
    blockSizeBytes: blockSize,
    parent,
    locators: locators.map(({ platformCode, value }) => ({ platformCode, value })),
  };
}

/** Options of {@link writeVhdSectors}. */
export interface WriteVhdSectorsOptions {
  /**
   * Parents of a differencing disk, nearest first, read (never written) to fill the rest of a partly written
   * 4 KiB group. Missing ones are found through the parent locators (see {@link resolveVhdParentPath}).
   */
  readonly parents?: readonly string[];
}

/** Sectors per sector-bitmap byte: the copy-on-write granularity of writeVhdSectors. */
const SECTORS_PER_BITMAP_BYTE = 8;

/**
 * Writes whole sectors into a VHD. Dynamic and differencing disks get blocks appended as needed (sector
 * bitmap + data, BAT entry, footer moved to the new end) and the bitmap bits of the written sectors set; in a
 * differencing disk every other sector keeps reading from the parent. Fixed disks are written in place.
 * `byteOffset` and `data.length` must be multiples of 512 (VhdError 'unaligned').
 *
 * In a differencing disk, sectors are copied up in groups of 8 (one bitmap byte, 4 KiB): the unwritten
 * sectors of a group that still read from the parent are filled with the parent's data, so bitmap bytes are
 * only ever 0x00 or 0xFF. libvhdi (at least 20210425) mis-reads mixed bitmap bytes: it takes every sector
 * after a set bit in the same byte as present in the child.
 */
export async function writeVhdSectors(filePath: string, byteOffset: number, data: Uint8Array, options: WriteVhdSectorsOptions = {}): Promise<void> {
  if (!Number.isSafeInteger(byteOffset) || byteOffset < 0 || byteOffset % SECTOR_SIZE !== 0 || data.length % SECTOR_SIZE !== 0) {
    throw new VhdError('unaligned', filePath, `writes must be whole 512-byte sectors (offset ${byteOffset}, length ${data.length})`);
  }
  if (data.length === 0) return;
  const handle = await openFile(filePath, 'r+');
  try {
    const vhd = await parseVhd(handle, filePath);
    const { info } = vhd;
    if (byteOffset + data.length > info.currentSizeBytes) {
      throw new VhdError('out-of-range', filePath, `write of ${data.length} bytes at ${byteOffset} ends past the disk (${info.currentSizeBytes} bytes)`);
    }
    if (info.diskType === 'fixed') {
      await writeFully(handle, data, byteOffset);
      await handle.sync();
      return;
    }
    const blockSize = info.blockSizeBytes!;
    const sectorsPerBlock = blockSize / SECTOR_SIZE;
    let endOfData = endOfAllocatedData(vhd);
    const footerAt = info.fileSizeBytes - FOOTER_SIZE;
    let done = 0;
    while (done < data.length) {
      const position = byteOffset + done;
      const block = Math.floor(position / blockSize);
      const inBlock = position - block * blockSize;
      const count = Math.min(data.length - done, blockSize - inBlock);
      const chunk = data.subarray(done, done + count);
      const allocated = vhd.bat[block]! !== UNALLOCATED;
      let bitmap = allocated ? await readFully(handle, vhd.bat[block]! * SECTOR_SIZE, vhd.bitmapBytes, filePath) : Buffer.alloc(vhd.bitmapBytes);
      const present = (sector: number): boolean => (bitmap[sector >> 3]! & (0x80 >> (sector & 7))) !== 0;

      // The sectors to write in this block: the chunk, widened to whole bitmap bytes in a differencing disk,
      // with the parent's data where the child has none yet. Sectors already in the child are left alone.
      const firstSector = inBlock / SECTOR_SIZE;
      const endSector = firstSector + count / SECTOR_SIZE;
      const differencing = info.diskType === 'differencing';
      const spanStart = differencing ? Math.floor(firstSector / SECTORS_PER_BITMAP_BYTE) * SECTORS_PER_BITMAP_BYTE : firstSector;
      const spanEnd = differencing ? Math.min(sectorsPerBlock, Math.ceil(endSector / SECTORS_PER_BITMAP_BYTE) * SECTORS_PER_BITMAP_BYTE) : endSector;
      const span = Buffer.alloc((spanEnd - spanStart) * SECTOR_SIZE);
      Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength).copy(span, (firstSector - spanStart) * SECTOR_SIZE);
      const toWrite: boolean[] = [];
      for (let sector = spanStart; sector < spanEnd; sector++) {
        const written = sector >= firstSector && sector < endSector;
        toWrite.push(written || !present(sector));
      }
      for (const [from, to] of runs(toWrite, (value, index) => value && (spanStart + index < firstSector || spanStart + index >= endSector))) {
        // Still the parent's data (bit clear, block not yet changed): read it through the chain, read-only.
        const fillOffset = block * blockSize + (spanStart + from) * SECTOR_SIZE;
        const fillLength = Math.max(0, Math.min((to - from) * SECTOR_SIZE, info.currentSizeBytes - fillOffset));
        if (fillLength > 0) (await readVhdSectors(filePath, fillOffset, fillLength, options)).copy(span, from * SECTOR_SIZE);
      }

      let blockStart: number;
      if (allocated) {
        blockStart = vhd.bat[block]! * SECTOR_SIZE;
      } else {
        // Place the block after everything in use, its data on a page boundary; the old footer is overwritten.
        const dataStart = roundUp(Math.max(endOfData, footerAt) + vhd.bitmapBytes, DATA_ALIGNMENT);
        blockStart = dataStart - vhd.bitmapBytes;
        if (blockStart / SECTOR_SIZE >= UNALLOCATED) throw new VhdError('out-of-range', filePath, 'the file outgrew the 32-bit sector offsets of the BAT');
        endOfData = dataStart + blockSize;
        // The footer first: until the BAT entry points at the block, the file stays a valid VHD without it.
        // Unwritten data is left as a hole (reads as zeros).
        await writeFully(handle, vhd.footer, endOfData);
        bitmap = Buffer.alloc(vhd.bitmapBytes);
      }
      for (const [from, to] of runs(toWrite, (value) => value)) {
        await writeFully(handle, span.subarray(from * SECTOR_SIZE, to * SECTOR_SIZE), blockStart + vhd.bitmapBytes + (spanStart + from) * SECTOR_SIZE);
        for (let sector = spanStart + from; sector < spanStart + to; sector++) bitmap[sector >> 3]! |= 0x80 >> (sector & 7);
      }
      // Data before the bitmap that exposes it, and the bitmap before the BAT entry that exposes the block.
      await handle.sync();
      await writeFully(handle, bitmap, blockStart);
      if (!allocated) {
        await handle.sync();
        const entry = Buffer.alloc(4);
        entry.writeUInt32BE(blockStart / SECTOR_SIZE);
        await writeFully(handle, entry, vhd.tableOffset + block * 4);
        vhd.bat[block] = blockStart / SECTOR_SIZE;
      }
      done += count;
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** [start, end) index ranges of consecutive elements that pass `test`. */
function runs<T>(values: readonly T[], test: (value: T, index: number) => boolean): Array<[number, number]> {
  const result: Array<[number, number]> = [];
  let start = -1;
  values.forEach((value, index) => {
    if (test(value, index)) {
      if (start < 0) start = index;
    } else if (start >= 0) {
      result.push([start, index]);
      start = -1;
    }
  });
  if (start >= 0) result.push([start, values.length]);
  return result;
}

/** Options of {@link readVhdSectors}. */
export interface ReadVhdSectorsOptions {
  /**
   * Parents of a differencing disk, nearest first. Missing ones are found through the parent locators (see
   * {@link resolveVhdParentPath}).
   */
  readonly parents?: readonly string[];
}

/**
 * Reads `length` bytes of the virtual disk at `byteOffset`, following differencing disks to their parents.
 * For tests and checks; libvhdi is the reference reader.
 */
export async function readVhdSectors(filePath: string, byteOffset: number, length: number, options: ReadVhdSectorsOptions = {}): Promise<Buffer> {
  const chain: Array<{ handle: FileHandle; vhd: OpenedVhd; path: string }> = [];
  try {
    let current = filePath;
    for (let depth = 0; ; depth++) {
      if (depth > 64) throw new VhdError('malformed', filePath, 'the parent chain is longer than 64 disks (a loop?)');
      const handle = await openFile(current, 'r');
      const vhd = await parseVhd(handle, current).catch(async (error: unknown) => {
        await handle.close();
        throw error;
      });
      chain.push({ handle, vhd, path: current });
      if (vhd.info.diskType !== 'differencing') break;
      const given = options.parents?.[depth];
      current = given ?? (await resolveVhdParentPath(vhd.info));
      if (given !== undefined) {
        const parentInfo = await readVhdInfo(given);
        if (parentInfo.uniqueId !== vhd.info.parent!.uniqueId) {
          throw new VhdError('parent-mismatch', vhd.info.path, `${given} has unique id ${parentInfo.uniqueId}, the child expects ${vhd.info.parent!.uniqueId}`);
        }
      }
    }
    const top = chain[0]!.vhd.info;
    if (!Number.isSafeInteger(byteOffset) || !Number.isSafeInteger(length) || byteOffset < 0 || length < 0 || byteOffset + length > top.currentSizeBytes) {
      throw new VhdError('out-of-range', filePath, `read of ${length} bytes at ${byteOffset} is outside the disk (${top.currentSizeBytes} bytes)`);
    }
    const out = Buffer.alloc(length);
    const readLevel = async (level: number, offset: number, target: Buffer): Promise<void> => {
      const member = chain[level];
      if (member === undefined) return; // Below the last parent: zeros.
      const { vhd, handle } = member;
      const size = vhd.info.currentSizeBytes;
      // A parent smaller than its child reads as zeros past its end.
      const inside = Math.max(0, Math.min(target.length, size - offset));
      if (vhd.info.diskType === 'fixed') {
        if (inside > 0) (await readFully(handle, offset, inside, member.path)).copy(target, 0);
        return;
      }
      const blockSize = vhd.info.blockSizeBytes!;
      let done = 0;
      while (done < inside) {
        const position = offset + done;
        const block = Math.floor(position / blockSize);
        const inBlock = position - block * blockSize;
        const count = Math.min(inside - done, blockSize - inBlock);
        const entry = vhd.bat[block]!;
        const piece = target.subarray(done, done + count);
        if (entry === UNALLOCATED) {
          if (vhd.info.diskType === 'differencing') await readLevel(level + 1, position, piece);
        } else {
          const blockStart = entry * SECTOR_SIZE;
          const blockData = await readFully(handle, blockStart + vhd.bitmapBytes + inBlock, count, member.path);
          if (vhd.info.diskType === 'dynamic') {
            blockData.copy(piece, 0);
          } else {
            // Runs of sectors present here (bit set) or in the parent (bit clear).
            const bitmap = await readFully(handle, blockStart, vhd.bitmapBytes, member.path);
            const present = (sector: number): boolean => (bitmap[sector >> 3]! & (0x80 >> (sector & 7))) !== 0;
            const firstSector = Math.floor(inBlock / SECTOR_SIZE);
            const sectors = Math.ceil((inBlock + count) / SECTOR_SIZE) - firstSector;
            let runStart = 0;
            while (runStart < sectors) {
              const here = present(firstSector + runStart);
              let runEnd = runStart + 1;
              while (runEnd < sectors && present(firstSector + runEnd) === here) runEnd++;
              const from = Math.max(0, (firstSector + runStart) * SECTOR_SIZE - inBlock);
              const to = Math.min(count, (firstSector + runEnd) * SECTOR_SIZE - inBlock);
              if (here) blockData.copy(piece, from, from, to);
              else await readLevel(level + 1, position + from, piece.subarray(from, to));
              runStart = runEnd;
            }
          }
        }
        done += count;
      }
    };
    await readLevel(0, byteOffset, out);
    return out;
  } finally {
    for (const { handle } of chain) await handle.close().catch(() => undefined);
  }
}

/**
 * Finds a differencing disk's parent as blktap does: each locator in table order (W2ru and relative MacX from
 * the child's directory, W2ku and absolute MacX as they are), then, as vhdimount does, the parent name in
 * the child's directory. The first readable VHD whose unique id matches wins.
 */
export async function resolveVhdParentPath(child: VhdInfo): Promise<string> {
  if (child.parent === undefined) throw new VhdError('invalid-argument', child.path, 'not a differencing disk');
  const directory = path.dirname(path.resolve(child.path));
  const candidates: string[] = [];
  for (const locator of child.parent.locators) {
    if (locator.value === undefined) continue;
    let value = locator.value;
    if (locator.platformCode === 'MacX') {
      if (!value.startsWith('file://')) continue;
      value = value.slice('file://'.length);
    } else {
      value = value.replaceAll('\\', '/').replace(/^[A-Za-z]:/, '');
    }
    if (value === '') continue;
    candidates.push(path.isAbsolute(value) ? value : path.resolve(directory, value));
  }
  const name = child.parent.unicodeName.split('\\').pop();
  if (name) candidates.push(path.join(directory, name));
  let mismatch: string | undefined;
  for (const candidate of candidates) {
    let info: VhdInfo;
    try {
      info = await readVhdInfo(candidate);
    } catch (error) {
      if (error instanceof VhdError) continue;
      throw error;
    }
    if (info.uniqueId === child.parent.uniqueId) return candidate;
    mismatch ??= `${candidate} has unique id ${info.uniqueId}, the child expects ${child.parent.uniqueId}`;
  }
  if (mismatch !== undefined) throw new VhdError('parent-mismatch', child.path, mismatch);
  throw new VhdError('parent-not-found', child.path, `no parent found (tried ${candidates.join(', ') || 'nothing'})`);
}

async function parseVhd(handle: FileHandle, filePath: string): Promise<OpenedVhd> {
  const fileSize = (await handle.stat()).size;
  if (fileSize < FOOTER_SIZE) throw new VhdError('not-a-vhd', filePath, `file of ${fileSize} bytes is too small for a VHD footer`);
  const footer = await readFully(handle, fileSize - FOOTER_SIZE, FOOTER_SIZE, filePath);
  if (footer.toString('latin1', 0, 8) !== FOOTER_COOKIE) throw new VhdError('not-a-vhd', filePath, 'no "conectix" footer at the end of the file');
  const footerChecksum = footer.readUInt32BE(64);
  if (checksum(footer, 64) !== footerChecksum) {
    throw new VhdError('bad-checksum', filePath, `footer checksum 0x${hex32(footerChecksum)} does not match its bytes (0x${hex32(checksum(footer, 64))})`);
  }
  const formatVersion = footer.readUInt32BE(12);
  if (formatVersion >>> 16 !== 1) throw new VhdError('unsupported', filePath, `footer format version 0x${hex32(formatVersion)}`);
  const typeCode = footer.readUInt32BE(60);
  const diskType = DISK_TYPES[typeCode];
  if (diskType === undefined) throw new VhdError('unsupported', filePath, `disk type ${typeCode}`);
  const currentSize = safeNumber(footer.readBigUInt64BE(48), filePath, 'current size');
  const base = {
    path: filePath,
    fileSizeBytes: fileSize,
    diskType,
    currentSizeBytes: currentSize,
    originalSizeBytes: safeNumber(footer.readBigUInt64BE(40), filePath, 'original size'),
    geometry: { cylinders: footer.readUInt16BE(56), heads: footer.readUInt8(58), sectorsPerTrack: footer.readUInt8(59) },
    uniqueId: uuidToString(footer.subarray(68, 84)),
    timestamp: footer.readUInt32BE(24),
    creatorApplication: footer.toString('latin1', 28, 32).replace(/\0+$/, ''),
    creatorVersion: footer.readUInt32BE(32),
    creatorHostOs: footer.toString('latin1', 36, 40).replace(/\0+$/, ''),
    features: footer.readUInt32BE(8),
    savedState: footer.readUInt8(84) !== 0,
  };
  if (currentSize % SECTOR_SIZE !== 0) throw new VhdError('malformed', filePath, `current size ${currentSize} is not a multiple of 512`);
  if (diskType === 'fixed') {
    if (fileSize < currentSize + FOOTER_SIZE) throw new VhdError('malformed', filePath, `fixed disk of ${currentSize} bytes in a file of ${fileSize} bytes`);
    const info: VhdInfo = { ...base, blockSizeBytes: undefined, blockCount: undefined, allocatedBlocks: undefined, parent: undefined };
    return { info, footer, tableOffset: 0, bat: new Uint32Array(0), bitmapBytes: 0 };
  }

  const headerOffset = safeNumber(footer.readBigUInt64BE(16), filePath, 'data offset');
  if (headerOffset + DYNAMIC_HEADER_SIZE > fileSize - FOOTER_SIZE)
    throw new VhdError('malformed', filePath, `dynamic header offset ${headerOffset} outside the file`);
  const header = await readFully(handle, headerOffset, DYNAMIC_HEADER_SIZE, filePath);
  if (header.toString('latin1', 0, 8) !== DYNAMIC_COOKIE) throw new VhdError('malformed', filePath, `no "cxsparse" dynamic header at offset ${headerOffset}`);
  const headerChecksum = header.readUInt32BE(36);
  if (checksum(header, 36) !== headerChecksum) {
    throw new VhdError(
      'bad-checksum',
      filePath,
      `dynamic header checksum 0x${hex32(headerChecksum)} does not match its bytes (0x${hex32(checksum(header, 36))})`,
    );
  }
  const headerVersion = header.readUInt32BE(24);
  if (headerVersion !== FORMAT_VERSION) throw new VhdError('unsupported', filePath, `dynamic header version 0x${hex32(headerVersion)}`);
  const tableOffset = safeNumber(header.readBigUInt64BE(16), filePath, 'table offset');
  const blockCount = header.readUInt32BE(28);
  const blockSize = header.readUInt32BE(32);
  if (blockSize < SECTOR_SIZE || (blockSize & (blockSize - 1)) !== 0)
    throw new VhdError('malformed', filePath, `block size ${blockSize} is not a power of two >= 512`);
  if (blockCount * blockSize < currentSize)
    throw new VhdError('malformed', filePath, `${blockCount} blocks of ${blockSize} bytes do not cover ${currentSize} bytes`);
  if (tableOffset % SECTOR_SIZE !== 0 || tableOffset + blockCount * 4 > fileSize - FOOTER_SIZE)
    throw new VhdError('malformed', filePath, `BAT at ${tableOffset} (${blockCount} entries) outside the file`);
  const batBytes = await readFully(handle, tableOffset, blockCount * 4, filePath);
  const bat = new Uint32Array(blockCount);
  const bitmapBytes = roundUp(Math.ceil(blockSize / SECTOR_SIZE / 8), SECTOR_SIZE);
  let allocated = 0;
  for (let block = 0; block < blockCount; block++) {
    const entry = batBytes.readUInt32BE(block * 4);
    bat[block] = entry;
    if (entry === UNALLOCATED) continue;
    allocated++;
    // The last block may be cut short at the end of the disk, but its bitmap and the used part must be there.
    const usedBytes = Math.min(blockSize, currentSize - block * blockSize);
    if (entry * SECTOR_SIZE + bitmapBytes + usedBytes > fileSize)
      throw new VhdError('malformed', filePath, `block ${block} at sector ${entry} extends past the end of the file`);
  }

  let parent: VhdParentInfo | undefined;
  if (diskType === 'differencing') {
    const locators: VhdParentLocator[] = [];
    for (let index = 0; index < LOCATOR_ENTRIES; index++) {
      const entry = LOCATOR_TABLE_OFFSET + index * LOCATOR_ENTRY_SIZE;
      if (header.readUInt32BE(entry) === 0) continue;
      const platformCode = header.toString('latin1', entry, entry + 4);
      const dataSpace = header.readUInt32BE(entry + 4);
      const dataLength = header.readUInt32BE(entry + 8);
      const dataOffset = safeNumber(header.readBigUInt64BE(entry + 16), filePath, 'locator offset');
      let value: string | undefined;
      const encoding = platformCode === 'W2ru' || platformCode === 'W2ku' ? 'utf16le' : platformCode === 'MacX' ? 'utf8' : undefined;
      if (encoding !== undefined) {
        if (dataLength > MAX_LOCATOR_BYTES || dataOffset + dataLength > fileSize) {
          throw new VhdError('malformed', filePath, `parent locator ${index} (${platformCode}) of ${dataLength} bytes at ${dataOffset} outside the file`);
        }
        value = (await readFully(handle, dataOffset, dataLength, filePath)).toString(encoding).replace(/\0+$/, '');
      }
      locators.push({ platformCode, dataSpace, dataLengthBytes: dataLength, dataOffset, value });
    }
    const nameField = header.subarray(64, 64 + PARENT_NAME_BYTES);
    let nameEnd = 0;
    while (nameEnd < PARENT_NAME_BYTES && (nameField[nameEnd] !== 0 || nameField[nameEnd + 1] !== 0)) nameEnd += 2;
    parent = {
      uniqueId: uuidToString(header.subarray(40, 56)),
      timestamp: header.readUInt32BE(56),
      unicodeName: decodeUtf16Be(nameField.subarray(0, nameEnd)),
      locators,
    };
  }
  const info: VhdInfo = { ...base, blockSizeBytes: blockSize, blockCount, allocatedBlocks: allocated, parent };
  return { info, footer, tableOffset, bat, bitmapBytes };
}

/** The first byte after all metadata, locator data and allocated blocks. */
function endOfAllocatedData(vhd: OpenedVhd): number {
  let end = vhd.tableOffset + roundUp(vhd.bat.length * 4, SECTOR_SIZE);
  end = Math.max(end, FOOTER_SIZE + DYNAMIC_HEADER_SIZE);
  for (const locator of vhd.info.parent?.locators ?? []) {
    // The reserved space, whichever unit it was written in (blktap's rule).
    const space = locator.dataSpace < SECTOR_SIZE ? locator.dataSpace * SECTOR_SIZE : locator.dataSpace;
    end = Math.max(end, locator.dataOffset + Math.max(space, locator.dataLengthBytes));
  }
  const blockSize = vhd.info.blockSizeBytes!;
  for (const entry of vhd.bat) if (entry !== UNALLOCATED) end = Math.max(end, entry * SECTOR_SIZE + vhd.bitmapBytes + blockSize);
  return roundUp(end, SECTOR_SIZE);
}

/** One's complement of the byte sum, the checksum field counted as zero. */
function checksum(bytes: Uint8Array, checksumOffset: number): number {
  let sum = 0;
  for (let index = 0; index < bytes.length; index++) {
    if (index < checksumOffset || index >= checksumOffset + 4) sum += bytes[index]!;
  }
  return ~sum >>> 0;
}

async function openFile(filePath: string, flags: 'r' | 'r+'): Promise<FileHandle> {
  try {
    return await open(filePath, flags);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw new VhdError('not-found', filePath, 'no such file', error);
    throw error;
  }
}

async function readFully(handle: FileHandle, position: number, length: number, filePath: string): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await handle.read(buffer, done, length - done, position + done);
    if (bytesRead === 0) throw new VhdError('malformed', filePath, `file ends before offset ${position + length}`);
    done += bytesRead;
  }
  return buffer;
}

async function writeFully(handle: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await handle.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

async function exists(filePath: string): Promise<boolean> {
  try {
    await lstat(filePath);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw error;
  }
}

async function syncDirectory(directory: string): Promise<void> {
  const handle = await open(directory, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

function vhdTimestamp(epochMs: number): number {
  return Math.max(0, Math.min(0xffff_ffff, Math.floor(epochMs / 1000) - VHD_EPOCH_SECONDS));
}

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}

function safeNumber(value: bigint, filePath: string, field: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new VhdError('malformed', filePath, `${field} 0x${value.toString(16)} is out of range`);
  return Number(value);
}

function hex32(value: number): string {
  return value.toString(16).padStart(8, '0');
}

/** A random (version 4) UUID's 16 bytes. */
function randomUuidBytes(): Buffer {
  const bytes = randomBytes(16);
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  return bytes;
}

function uuidToString(bytes: Uint8Array): string {
  const hex = Buffer.from(bytes).toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function uuidToBytes(text: string): Buffer {
  return Buffer.from(text.replaceAll('-', ''), 'hex');
}

function encodeUtf16Be(text: string): Buffer {
  return Buffer.from(text, 'utf16le').swap16();
}

function decodeUtf16Be(bytes: Uint8Array): string {
  return Buffer.from(bytes).swap16().toString('utf16le');
}
