/**
 * Copy-on-write children of base disks. KVM: a qcow2 overlay made by `qemu-img create -b BASE -F FMT`
 * with extended L2 entries and 64 KiB clusters: a guest's first small write to a shared base copies a
 * 2 KiB subcluster instead of a 64 KiB cluster (less write amplification for many clones booting at once),
 * while the overlay stays at the default size (196 KiB, ~5 ms to create; 128 KiB clusters would double it
 * for no creation-time gain, measured on this machine). Bases are made read-only on disk and are never
 * opened for writing by cowherd.
 */
import { chmod, open, stat } from 'node:fs/promises';
import { runCommand } from '../../common/platform/child-process.js';

/** Overlay options, chosen and measured as the module comment explains. */
export const QCOW2_OVERLAY_OPTIONS = 'extended_l2=on,cluster_size=64k';

/** Makes `base` read-only for everyone (0444): a base that any clone depends on is never written. */
export async function protectBase(base: string): Promise<void> {
  const mode = (await stat(base)).mode & 0o777;
  if ((mode & 0o222) !== 0) await chmod(base, mode & ~0o222);
}

/** Creates a qcow2 overlay of `base` (format `baseFormat`: qcow2 or raw) at `child`; refuses to overwrite. */
export async function createQcow2Overlay(base: string, baseFormat: 'qcow2' | 'raw', child: string, options: { timeoutMs?: number } = {}): Promise<void> {
  await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', QCOW2_OVERLAY_OPTIONS, '-b', base, '-F', baseFormat, child], {
    timeoutMs: options.timeoutMs ?? 30_000,
  });
}

/**
 * Creates an empty disk of `bytes` at `path` (refuses to overwrite): qcow2 on KVM; on Xen a dynamic VHD
 * (`vpc`, `force_size` so the size is exact), which blktap opens as the children are. A clone's persistent
 * data disk; the Xen path is untested here (no Xen host in the test fleet).
 */
export async function createEmptyDisk(path: string, bytes: number, kind: 'qcow2' | 'vhd', options: { timeoutMs?: number } = {}): Promise<void> {
  const format = kind === 'qcow2' ? ['-f', 'qcow2', '-o', QCOW2_OVERLAY_OPTIONS] : ['-f', 'vpc', '-o', 'subformat=dynamic,force_size=on'];
  // qemu-img create truncates an existing file: claim the name first so that nothing is overwritten.
  await (await open(path, 'wx', 0o644)).close();
  await runCommand('qemu-img', ['create', '-q', ...format, path, String(bytes)], { timeoutMs: options.timeoutMs ?? 30_000 });
}

/** What a disk file's first bytes say it is: qcow2 (with its backing file name as written, if any), VHD, or raw. */
export type DiskHeader = { readonly format: 'qcow2'; readonly backing: string | undefined } | { readonly format: 'vpc' } | { readonly format: 'raw' };

const QCOW2_MAGIC = 0x514649fb;

/**
 * Reads `path`'s header: a qcow2 magic (then the backing file name from its header fields), a VHD's footer copy at
 * offset 0 (`conectix`), or neither (raw). Rejects when the file cannot be opened.
 */
export async function readDiskHeader(path: string): Promise<DiskHeader> {
  const handle = await open(path, 'r');
  try {
    const header = Buffer.alloc(20);
    const { bytesRead } = await handle.read(header, 0, 20, 0);
    if (bytesRead < 20 || header.readUInt32BE(0) !== QCOW2_MAGIC)
      return bytesRead >= 8 && header.toString('latin1', 0, 8) === 'conectix' ? { format: 'vpc' } : { format: 'raw' };
    const offset = Number(header.readBigUInt64BE(8));
    const size = header.readUInt32BE(16);
    if (offset === 0 || size === 0 || size > 4096) return { format: 'qcow2', backing: undefined };
    const name = Buffer.alloc(size);
    await handle.read(name, 0, size, offset);
    return { format: 'qcow2', backing: name.toString('utf8') };
  } finally {
    await handle.close();
  }
}

/** The backing file name in a qcow2 overlay's header, as written; undefined for none, or a file that is not qcow2. */
export async function readBackingFileName(path: string): Promise<string | undefined> {
  const header = await readDiskHeader(path);
  return header.format === 'qcow2' ? header.backing : undefined;
}

/**
 * Points an overlay at another backing file that holds the same bytes (`qemu-img rebase -u`: only the header
 * changes, no data is read or copied). qemu-img takes the overlay's write lock, so this fails, changing nothing,
 * while a VM runs on it.
 */
export async function repointOverlay(overlay: string, backing: string, backingFormat: 'qcow2' | 'raw', options: { timeoutMs?: number } = {}): Promise<void> {
  await runCommand('qemu-img', ['rebase', '-q', '-u', '-f', 'qcow2', '-b', backing, '-F', backingFormat, overlay], { timeoutMs: options.timeoutMs ?? 30_000 });
}
