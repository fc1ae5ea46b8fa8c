/**
 * A domain's file-backed disks as inventory records them: sizes and backing chains from
 * `qemu-img info --backing-chain -U --output=json` (-U: a running VM holds a lock on its image). A missing
 * file or a broken chain is reported as far as it can be read, with a warning, never as a failure.
 */
import { CommandError, runCommand } from '../../common/platform/child-process.js';
import type { Logger } from '../../common/platform/logger.js';
import { DiskFormat } from '../../gen/cowherd/common/v1/types.js';
import type { BackingFile, Disk } from '../../gen/cowherd/inventory/v1/resources.js';
import type { DomainDisk } from './libvirt.js';

/** Reads disk files. */
export interface DiskInspector {
  /** The inventory record of one disk; undefined for disks that are not file-backed (block, network, empty CD-ROM). */
  inspect(disk: DomainDisk): Promise<Disk | undefined>;
}

/** qemu-img's format name as a DiskFormat (qemu calls VHD "vpc"). */
export function diskFormatOf(name: string | undefined): DiskFormat {
  switch (name) {
    case 'qcow2':
      return DiskFormat.DISK_FORMAT_QCOW2;
    case 'raw':
      return DiskFormat.DISK_FORMAT_RAW;
    case 'vpc':
      return DiskFormat.DISK_FORMAT_VHD;
    default:
      return DiskFormat.DISK_FORMAT_UNSPECIFIED;
  }
}

/** One image of `qemu-img info --output=json` (the fields cowherd reads). */
interface ImageInfo {
  readonly filename?: string;
  readonly format?: string;
  readonly 'virtual-size'?: number;
  readonly 'actual-size'?: number;
  readonly 'full-backing-filename'?: string;
  readonly 'backing-filename'?: string;
  readonly 'backing-filename-format'?: string;
}

/** What qemu-img says about a disk file. */
export interface DiskImage {
  readonly format: string | undefined;
  readonly virtualSizeBytes: number;
  readonly allocatedBytes: number;
  /** Nearest first. */
  readonly backingChain: readonly { readonly path: string; readonly format: string | undefined }[];
}

/**
 * Parses `qemu-img info --backing-chain --output=json` (an array, the disk first) or plain `info` (one
 * object; its chain is then only the declared backing file).
 */
export function parseQemuImgInfo(json: string): DiskImage {
  const parsed = JSON.parse(json) as ImageInfo | ImageInfo[];
  const images = Array.isArray(parsed) ? parsed : [parsed];
  const top = images[0];
  if (!top) throw new Error('qemu-img printed an empty chain');
  const backingChain: Array<{ path: string; format: string | undefined }> = [];
  images.forEach((image, index) => {
    if (index === 0) return;
    // The parent's resolved name is the absolute path; `filename` may be relative for the first entry only.
    const parent = images[index - 1]!;
    backingChain.push({ path: parent['full-backing-filename'] ?? image.filename ?? '', format: image.format ?? parent['backing-filename-format'] });
  });
  if (images.length === 1) {
    const declared = top['full-backing-filename'] ?? top['backing-filename'];
    if (declared) backingChain.push({ path: declared, format: top['backing-filename-format'] });
  }
  return { format: top.format, virtualSizeBytes: top['virtual-size'] ?? 0, allocatedBytes: top['actual-size'] ?? 0, backingChain };
}

/** Options of {@link createQemuImgDiskInspector}. */
export interface QemuImgDiskInspectorOptions {
  readonly log: Logger;
  /** Per qemu-img call. Default 15 s. */
  readonly timeoutMs?: number;
  /** The qemu-img binary. Default "qemu-img". */
  readonly qemuImg?: string;
}

/** Formats qemu-img may be told to open a disk as; anything else is left to probing. */
const KNOWN_FORMATS = new Set(['qcow2', 'raw', 'vpc', 'vhdx', 'vmdk', 'qed', 'vdi']);

/** A DiskInspector that runs qemu-img. */
export function createQemuImgDiskInspector(options: QemuImgDiskInspectorOptions): DiskInspector {
  const qemuImg = options.qemuImg ?? 'qemu-img';
  const timeoutMs = options.timeoutMs ?? 15_000;
  const info = async (path: string, format: string | undefined, chain: boolean): Promise<DiskImage> => {
    // Open the disk with libvirt's declared format: probing a raw disk would trust a header the guest may
    // have written (a fake qcow2 header naming any host file as "backing file").
    const args = [
      'info',
      '-U',
      '--output=json',
      ...(chain ? ['--backing-chain'] : []),
      ...(format && KNOWN_FORMATS.has(format) ? ['-f', format] : []),
      '--',
      path,
    ];
    return parseQemuImgInfo(await runCommand(qemuImg, args, { timeoutMs, env: { LC_ALL: 'C' } }));
  };
  return {
    async inspect(disk) {
      if (disk.type !== 'file' || !disk.sourcePath) return undefined;
      const path = disk.sourcePath;
      const record = (image: DiskImage | undefined): Disk => ({
        persistent: false,
        target: disk.target,
        path,
        format: diskFormatOf(image?.format ?? disk.format),
        virtualSizeBytes: String(image?.virtualSizeBytes ?? 0),
        allocatedBytes: String(image?.allocatedBytes ?? 0),
        backingChain: (image?.backingChain ?? []).map((entry): BackingFile => ({ path: entry.path, format: diskFormatOf(entry.format) })),
      });
      try {
        return record(await info(path, disk.format, true));
      } catch (error) {
        if (!(error instanceof CommandError) && !(error instanceof SyntaxError)) throw error;
        // A backing file is missing or unreadable: the disk itself may still be readable.
        try {
          const image = await info(path, disk.format, false);
          options.log.warn({ path, target: disk.target, err: describe(error) }, 'backing chain of a disk is broken; reporting it as far as it can be read');
          return record(image);
        } catch (inner) {
          if (!(inner instanceof CommandError) && !(inner instanceof SyntaxError)) throw inner;
          options.log.warn({ path, target: disk.target, err: describe(inner) }, 'cannot read a disk file; reporting it without sizes or backing chain');
          return record(undefined);
        }
      }
    },
  };
}

function describe(error: unknown): string {
  return error instanceof CommandError ? (error.stderr.trim().split('\n').slice(-1)[0] ?? error.message) : (error as Error).message;
}

/** Runs `inspect` over every disk with at most `concurrency` qemu-img processes at once, keeping order. */
export async function inspectAll<T, R>(items: readonly T[], concurrency: number, inspect: (item: T) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const index = next++;
      results[index] = await inspect(items[index]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
  return results;
}
