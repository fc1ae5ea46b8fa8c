/**
 * The NoCloud seed disk of a clone: a tiny ISO 9660 image with the volume label `cidata` and the files
 * `meta-data`, `user-data` and `network-config`, written here byte by byte instead of by a genisoimage
 * process per clone (a process costs ~5-10 ms; building the ~60 KiB image in memory costs well under 1 ms).
 *
 * Why ISO 9660 with Joliet: cloud-init finds the seed by its label (blkid) and reads the files by their exact
 * names. Plain ISO 9660 level 1 names are 8.3 upper case (`META_DAT.;1`), so the real names need an
 * extension; Joliet (a second directory tree with UCS-2 names, read by Linux's isofs, blkid and Windows) is the
 * simpler of the two to write, and it is what `genisoimage -joliet` gives cloud-init users. FAT would need
 * the guest's vfat and codepage modules; isofs is one module. The primary tree carries the 8.3 names for
 * readers without Joliet.
 *
 * Layout (2048-byte sectors): 0-15 system area (zeros); 16 primary volume descriptor; 17 Joliet
 * supplementary volume descriptor; 18 terminator; 19-22 the L and M path tables of each tree; 23 primary root
 * directory; 24 Joliet root directory; 25... the files, each from a sector boundary.
 */

const SECTOR = 2048;
const FIRST_FILE_SECTOR = 25;
/** The system area at the start of every image: zeros, so writers may leave it as a hole. */
export const SEED_SYSTEM_AREA_BYTES = 16 * SECTOR;
/** The volume label cloud-init's NoCloud looks for. */
export const SEED_VOLUME_LABEL = 'cidata';

/** One file of the seed image: a name of `[a-z0-9-]` (at most 64 characters) and its content. */
export interface SeedFile {
  readonly name: string;
  readonly content: string | Uint8Array;
}

/** Builds the ISO 9660 + Joliet image of `files` (at most 16 files; each at most 16 MiB). */
export function buildSeedImage(files: readonly SeedFile[], options: { readonly label?: string; readonly time?: Date } = {}): Buffer {
  const label = options.label ?? SEED_VOLUME_LABEL;
  const time = options.time ?? new Date();
  if (files.length > 16) throw new Error('a seed image holds at most 16 files');
  const entries = files.map((file) => {
    if (!/^[a-z0-9][a-z0-9-]{0,63}$/.test(file.name)) throw new Error(`seed file name ${JSON.stringify(file.name)} is not [a-z0-9-]`);
    const data = typeof file.content === 'string' ? Buffer.from(file.content, 'utf8') : Buffer.from(file.content);
    if (data.length > 16 * 1024 * 1024) throw new Error(`seed file ${file.name} is larger than 16 MiB`);
    return { name: file.name, data, shortName: shortName(file.name), sector: 0 };
  });
  const shortNames = new Set(entries.map((entry) => entry.shortName));
  if (shortNames.size !== entries.length) throw new Error('seed file names must differ in their first eight characters');
  let sector = FIRST_FILE_SECTOR;
  for (const entry of entries) {
    entry.sector = sector;
    sector += Math.max(1, Math.ceil(entry.data.length / SECTOR));
  }
  const totalSectors = sector;
  const image = Buffer.alloc(totalSectors * SECTOR);

  const recordDate = directoryDate(time);
  const directory = (joliet: boolean, selfSector: number): Buffer => {
    const records = [
      directoryRecord(Buffer.from([0]), selfSector, SECTOR, true, recordDate),
      directoryRecord(Buffer.from([1]), selfSector, SECTOR, true, recordDate),
    ];
    const sorted = [...entries].sort((a, b) => compare(joliet ? a.name : a.shortName, joliet ? b.name : b.shortName));
    for (const entry of sorted) {
      const identifier = joliet ? ucs2(`${entry.name};1`) : Buffer.from(`${entry.shortName};1`, 'ascii');
      records.push(directoryRecord(identifier, entry.sector, entry.data.length, false, recordDate));
    }
    const bytes = Buffer.concat(records);
    if (bytes.length > SECTOR) throw new Error('seed directory does not fit one sector');
    return bytes;
  };
  directory(false, 23).copy(image, 23 * SECTOR);
  directory(true, 24).copy(image, 24 * SECTOR);
  for (const [table, rootSector, bigEndian] of [
    [19, 23, false],
    [20, 23, true],
    [21, 24, false],
    [22, 24, true],
  ] as const) {
    const at = table * SECTOR;
    image[at] = 1; // length of the directory identifier
    image[at + 1] = 0;
    if (bigEndian) image.writeUInt32BE(rootSector, at + 2);
    else image.writeUInt32LE(rootSector, at + 2);
    if (bigEndian) image.writeUInt16BE(1, at + 6);
    else image.writeUInt16LE(1, at + 6);
    image[at + 8] = 0; // the root's identifier
  }
  const volumeDate = descriptorDate(time);
  writeVolumeDescriptor(image, 16, { joliet: false, label, totalSectors, pathTables: [19, 20], rootSector: 23, recordDate, volumeDate });
  writeVolumeDescriptor(image, 17, { joliet: true, label, totalSectors, pathTables: [21, 22], rootSector: 24, recordDate, volumeDate });
  const terminator = 18 * SECTOR;
  image[terminator] = 255;
  image.write('CD001', terminator + 1, 'ascii');
  image[terminator + 6] = 1;
  for (const entry of entries) entry.data.copy(image, entry.sector * SECTOR);
  return image;
}

/** What {@link readSeedImage} finds. */
export interface ReadSeedImage {
  readonly label: string;
  /** The Joliet label, when the image has a Joliet tree. */
  readonly jolietLabel?: string;
  /** Files of the Joliet tree (the primary tree's when there is none), by name without `;1`. */
  readonly files: ReadonlyMap<string, Buffer>;
  /** Names in the primary tree, as stored. */
  readonly primaryNames: readonly string[];
}

/** Reads a seed image back (for tests and for checks): label, names and contents of the root directory. */
export function readSeedImage(image: Buffer): ReadSeedImage {
  let primary: { label: string; root: number; rootLength: number } | undefined;
  let joliet: { label: string; root: number; rootLength: number } | undefined;
  for (let sector = 16; (sector + 1) * SECTOR <= image.length; sector++) {
    const at = sector * SECTOR;
    if (image.toString('ascii', at + 1, at + 6) !== 'CD001') throw new Error(`sector ${sector} is not a volume descriptor`);
    const type = image[at]!;
    if (type === 255) break;
    const root = at + 156;
    const descriptor = { root: image.readUInt32LE(root + 2), rootLength: image.readUInt32LE(root + 10), label: '' };
    if (type === 1) primary = { ...descriptor, label: image.toString('ascii', at + 40, at + 72).trimEnd() };
    if (type === 2 && image[at + 88] === 0x25 && image[at + 89] === 0x2f && [0x40, 0x43, 0x45].includes(image[at + 90]!))
      joliet = { ...descriptor, label: fromUcs2(image.subarray(at + 40, at + 72)).trimEnd() };
  }
  if (!primary) throw new Error('no primary volume descriptor');
  const list = (tree: { root: number; rootLength: number }, decode: (identifier: Buffer) => string): Map<string, Buffer> => {
    const files = new Map<string, Buffer>();
    let offset = tree.root * SECTOR;
    const end = offset + tree.rootLength;
    while (offset < end) {
      const length = image[offset]!;
      if (length === 0) {
        offset = (Math.floor(offset / SECTOR) + 1) * SECTOR;
        continue;
      }
      const identifierLength = image[offset + 32]!;
      const identifier = image.subarray(offset + 33, offset + 33 + identifierLength);
      const isDirectory = (image[offset + 25]! & 2) !== 0;
      if (!isDirectory) {
        const extent = image.readUInt32LE(offset + 2);
        const size = image.readUInt32LE(offset + 10);
        files.set(decode(identifier).replace(/;1$/, ''), image.subarray(extent * SECTOR, extent * SECTOR + size));
      }
      offset += length;
    }
    return files;
  };
  const primaryFiles = list(primary, (identifier) => identifier.toString('ascii'));
  return {
    label: primary.label,
    ...(joliet ? { jolietLabel: joliet.label } : {}),
    files: joliet ? list(joliet, fromUcs2) : primaryFiles,
    primaryNames: [...primaryFiles.keys()],
  };
}

/** The 8.3 level-1 name of a file in the primary tree: `meta-data` -> `META_DAT.`. */
function shortName(name: string): string {
  return `${name.toUpperCase().replaceAll('-', '_').slice(0, 8)}.`;
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function ucs2(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf16le');
  bytes.swap16();
  return bytes;
}

function fromUcs2(bytes: Buffer): string {
  const copy = Buffer.from(bytes.subarray(0, bytes.length - (bytes.length % 2)));
  copy.swap16();
  return copy.toString('utf16le');
}

function bothEndian32(value: number): Buffer {
  const bytes = Buffer.alloc(8);
  bytes.writeUInt32LE(value, 0);
  bytes.writeUInt32BE(value, 4);
  return bytes;
}

/** A directory record (ECMA-119 9.1). */
function directoryRecord(identifier: Buffer, sector: number, size: number, isDirectory: boolean, date: Buffer): Buffer {
  const length = 33 + identifier.length + (identifier.length % 2 === 0 ? 1 : 0);
  const record = Buffer.alloc(length);
  record[0] = length;
  bothEndian32(sector).copy(record, 2);
  bothEndian32(size).copy(record, 10);
  date.copy(record, 18);
  record[25] = isDirectory ? 2 : 0;
  record.writeUInt16LE(1, 28);
  record.writeUInt16BE(1, 30);
  record[32] = identifier.length;
  identifier.copy(record, 33);
  return record;
}

/** The 7-byte recording date of directory records, in UTC. */
function directoryDate(time: Date): Buffer {
  return Buffer.from([
    time.getUTCFullYear() - 1900,
    time.getUTCMonth() + 1,
    time.getUTCDate(),
    time.getUTCHours(),
    time.getUTCMinutes(),
    time.getUTCSeconds(),
    0,
  ]);
}

/** The 17-byte date of volume descriptors ("YYYYMMDDHHMMSScc" and the UTC offset), in UTC. */
function descriptorDate(time: Date): Buffer {
  const text = time
    .toISOString()
    .replace(/[-:T]/g, '')
    .replace(/\.(\d\d)\d*Z$/, '$1');
  return Buffer.concat([Buffer.from(text, 'ascii'), Buffer.from([0])]);
}

function writeVolumeDescriptor(
  image: Buffer,
  sector: number,
  options: {
    joliet: boolean;
    label: string;
    totalSectors: number;
    pathTables: readonly [number, number];
    rootSector: number;
    recordDate: Buffer;
    volumeDate: Buffer;
  },
): void {
  const at = sector * SECTOR;
  image[at] = options.joliet ? 2 : 1;
  image.write('CD001', at + 1, 'ascii');
  image[at + 6] = 1;
  // Text fields: a-characters padded with spaces; in the Joliet descriptor, UCS-2 big endian padded with U+0020.
  const text = (offset: number, length: number, value: string): void => {
    if (options.joliet) {
      const padded = ucs2(value.slice(0, length / 2).padEnd(length / 2, ' '));
      padded.copy(image, at + offset);
    } else image.write(value.slice(0, length).padEnd(length, ' '), at + offset, 'ascii');
  };
  text(8, 32, 'LINUX');
  text(40, 32, options.label);
  bothEndian32(options.totalSectors).copy(image, at + 80);
  if (options.joliet) {
    // UCS-2 level 3.
    image[at + 88] = 0x25;
    image[at + 89] = 0x2f;
    image[at + 90] = 0x45;
  }
  image.writeUInt16LE(1, at + 120);
  image.writeUInt16BE(1, at + 122);
  image.writeUInt16LE(1, at + 124);
  image.writeUInt16BE(1, at + 126);
  image.writeUInt16LE(SECTOR, at + 128);
  image.writeUInt16BE(SECTOR, at + 130);
  bothEndian32(10).copy(image, at + 132);
  image.writeUInt32LE(options.pathTables[0], at + 140);
  image.writeUInt32BE(options.pathTables[1], at + 148);
  directoryRecord(Buffer.from([0]), options.rootSector, SECTOR, true, options.recordDate).copy(image, at + 156);
  text(190, 128, '');
  text(318, 128, '');
  text(446, 128, '');
  text(574, 128, 'COWHERD');
  text(702, 36, '');
  text(739, 36, '');
  text(776, 36, '');
  options.volumeDate.copy(image, at + 813);
  options.volumeDate.copy(image, at + 830);
  Buffer.concat([Buffer.from('0000000000000000', 'ascii'), Buffer.from([0])]).copy(image, at + 847);
  Buffer.concat([Buffer.from('0000000000000000', 'ascii'), Buffer.from([0])]).copy(image, at + 864);
  image[at + 881] = 1;
}

/**
 * The seed image `image` with a new cloud-init instance-id (RebaseClones new_instance_id): `meta-data`'s
 * `instance-id` line replaced (added when missing), every other file and the label kept. A new instance-id
 * makes cloud-init in the guest run its per-instance modules again (new SSH host keys).
 */
export function withNewInstanceId(image: Buffer, instanceId: string): Buffer {
  const read = readSeedImage(image);
  const metaData = read.files.get('meta-data')?.toString('utf8') ?? '';
  const line = `instance-id: ${JSON.stringify(instanceId)}`;
  const replaced = /^instance-id:.*$/m.test(metaData) ? metaData.replace(/^instance-id:.*$/m, line) : `${line}\n${metaData}`;
  const files: SeedFile[] = [...read.files].map(([name, content]) => ({ name, content: name === 'meta-data' ? replaced : content }));
  if (!read.files.has('meta-data')) files.unshift({ name: 'meta-data', content: `${line}\n` });
  return buildSeedImage(files, { label: read.label });
}
