/**
 * Disk backends: how a clone's disks are made on a base, one backend per kind of copy-on-write child. The clone
 * engine and the rebase call only this interface; which backend a host uses follows from its hypervisor
 * (`diskBackendFor`), or from a request's choice where the host can honour it. Lineage, dependents, the
 * protection of bases (0444, never opened for writing) and the clone.done contract are the callers' and the same
 * for every backend.
 *
 * - `qcow2-overlay` (KVM): a qcow2 overlay made by qemu-img on a qcow2 or raw base. Overlays of one base with
 *   the same options are byte-identical (a qcow2 header holds no per-file identity), so a batch makes one with
 *   qemu-img (~6 ms) and copies it per clone (~0.2 ms).
 * - `vhd-differencing` (Xen): a VHD differencing disk written by cowherd (vhd.ts) on a VHD base. Every child has
 *   its own unique id in its footer, so each is made on its own. Untested on a Xen host here (none in the fleet);
 *   test/integration/agent-xen-path.test.ts runs everything up to the hypervisor.
 * - `reflink-copy` (KVM, btrfs or xfs with reflink=1): the child is a reflink copy (FICLONE) of the base in the
 *   base's own format (qcow2 or raw), with no backing chain: the guest's I/O is that of a plain file, and the copy
 *   depends on its base for nothing, so the base can be deleted under it. A copy of a 64 MiB base on disk takes
 *   0.5-1.6 ms on a loop-mounted xfs or btrfs here (it grows with the base's extent count, not its bytes; a base
 *   with dirty pages is written back first), and only the blocks a guest rewrites take new space. Where the
 *   filesystem cannot reflink it refuses: never a silent full copy.
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { chmod, copyFile, rm, stat, statfs, writeFile } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { DiskBackend as DiskBackendValue } from '../../gen/cowherd/common/v1/types.js';
import { CowherdError } from '../../common/platform/errors.js';
import { backingChain } from './dependents.js';
import type { DiskBackendName } from './domain-xml/clone-metadata.js';
import type { DiskFormatName } from './domain-xml/safety.js';
import { createEmptyDisk, createQcow2Overlay } from './overlays.js';
import { createDifferencingVhd, readVhdInfo, resolveVhdParentPath } from './vhd.js';

/** A base disk as a backend sees it: its libvirt target, file and format. */
export interface BaseDisk {
  readonly target: string;
  readonly base: string;
  readonly format: DiskFormatName;
}

export type { DiskBackendName };

/** libvirt `<driver name type>` of a disk. */
export interface DiskDriver {
  readonly name: string;
  readonly type: string;
}

/** The file name extension and libvirt driver of one child. */
export interface ChildDiskFormat {
  readonly extension: 'qcow2' | 'vhd' | 'raw';
  readonly driver: DiskDriver;
}

/** What makes, describes and removes a clone's disks. */
export interface DiskBackend {
  readonly name: DiskBackendName;
  /**
   * File extension of the empty disks it makes (`data.qcow2`, `data.vhd`), and of its children unless
   * {@link childFormat} says otherwise (`vda.qcow2`).
   */
  readonly extension: 'qcow2' | 'vhd';
  /** libvirt `<driver>` of its empty disks, and of its children unless {@link childFormat} says otherwise. */
  readonly driver: DiskDriver;
  /**
   * Extension and driver of the child of a base in `format`, for backends whose children follow their base's
   * format (`reflink-copy`: a copy of a raw base is raw). Optional so that backends whose children always have
   * one format need nothing; callers go through {@link childDiskFormat}, which falls back to
   * {@link extension} and {@link driver}.
   */
  childFormat?(format: DiskFormatName): ChildDiskFormat;
  /** Whether this backend can make children of a base disk in `format`. */
  accepts(format: DiskFormatName): boolean;
  /** FAILED_PRECONDITION (HYPERVISOR_MISMATCH) unless this backend {@link accepts} the disk's format. */
  checkBase(disk: Pick<BaseDisk, 'target' | 'format'>): void;
  /**
   * Whether one child made per batch may be copied byte for byte for each clone of that batch (and one empty
   * disk likewise); false when every child must carry its own identity.
   */
  readonly copiesChildren: boolean;
  /**
   * Makes the child of `disk` at `path`, or copies `prototype` (a child of the same base made by this backend)
   * there; never overwrites. RESOURCE_EXHAUSTED (INSUFFICIENT_SPACE) when the disk is full.
   */
  createChild(disk: BaseDisk, path: string, prototype?: string): Promise<void>;
  /** An empty disk of `bytes` at `path` (a persistent data disk), or `prototype` copied; never overwrites. */
  createEmptyDisk(path: string, bytes: number, prototype?: string): Promise<void>;
  /** The files under a child (absolute, nearest first); undefined when the file cannot be read. */
  chain(path: string): Promise<string[] | undefined>;
  /** Removes a child or empty disk it made (nothing when it is gone already). */
  remove(path: string): Promise<void>;
}

function mismatch(disk: Pick<BaseDisk, 'target' | 'format'>, needed: string): CowherdError {
  return CowherdError.failedPrecondition(
    disk.format === 'vpc' ? `disk ${disk.target} is a VHD; ${needed}` : `disk ${disk.target} is ${disk.format}; ${needed}`,
    ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
  );
}

/** A full disk becomes RESOURCE_EXHAUSTED naming the file; anything else is rethrown as it is. */
async function spaceChecked(path: string, make: Promise<unknown>): Promise<void> {
  await make.catch((error: unknown) => {
    throw /No space left|ENOSPC/i.test(String((error as Error).message))
      ? new CowherdError(GrpcStatus.RESOURCE_EXHAUSTED, `no space left for ${path}`, { reason: ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE, cause: error })
      : error;
  });
}

const remove = (path: string): Promise<void> => rm(path, { force: true });

/** KVM: qcow2 overlays by qemu-img (see the module comment). */
export const QCOW2_OVERLAY_BACKEND: DiskBackend = {
  name: 'qcow2-overlay',
  extension: 'qcow2',
  driver: { name: 'qemu', type: 'qcow2' },
  childFormat: () => ({ extension: 'qcow2', driver: { name: 'qemu', type: 'qcow2' } }),
  copiesChildren: true,
  accepts: (format) => format !== 'vpc',
  checkBase(disk) {
    if (!this.accepts(disk.format)) throw mismatch(disk, 'KVM clones need qcow2 or raw bases');
  },
  async createChild(disk, path, prototype) {
    this.checkBase(disk);
    const format = disk.format as 'qcow2' | 'raw';
    await spaceChecked(path, prototype === undefined ? createQcow2Overlay(disk.base, format, path) : copyFile(prototype, path, fsConstants.COPYFILE_EXCL));
  },
  async createEmptyDisk(path, bytes, prototype) {
    await spaceChecked(path, prototype === undefined ? createEmptyDisk(path, bytes, 'qcow2') : copyFile(prototype, path, fsConstants.COPYFILE_EXCL));
  },
  chain: backingChain,
  remove,
};

/**
 * Xen: VHD differencing disks (see the module comment). The driver is blktap's: libxl maps `name='tap'
 * type='vhd'` to its TAP backend, whose tapdisk follows the VHD parent locators. qemu's VHD ("vpc") driver,
 * which `name='qemu'` would select (libxl's qdisk backend), ignores a differencing disk's parent and shows
 * garbage; and libxl does not accept the format name "vpc" at all.
 */
export const VHD_DIFFERENCING_BACKEND: DiskBackend = {
  name: 'vhd-differencing',
  extension: 'vhd',
  driver: { name: 'tap', type: 'vhd' },
  childFormat: () => ({ extension: 'vhd', driver: { name: 'tap', type: 'vhd' } }),
  copiesChildren: false,
  accepts: (format) => format === 'vpc',
  checkBase(disk) {
    if (!this.accepts(disk.format)) throw mismatch(disk, 'Xen clones need VHD bases');
  },
  async createChild(disk, path) {
    this.checkBase(disk);
    await spaceChecked(path, createDifferencingVhd({ parentPath: disk.base, childPath: path }));
  },
  async createEmptyDisk(path, bytes) {
    // A dynamic VHD's footer carries a unique id: never copied.
    await spaceChecked(path, createEmptyDisk(path, bytes, 'vhd'));
  },
  async chain(path) {
    const chain: string[] = [];
    let current = path;
    for (let depth = 0; depth < 16; depth += 1) {
      const info = await readVhdInfo(current).catch(() => undefined);
      if (info === undefined) return depth === 0 ? undefined : chain;
      if (info.parent === undefined) return chain;
      const parent = await resolveVhdParentPath(info).catch(() => undefined);
      if (parent === undefined) return chain;
      chain.push(parent);
      current = parent;
    }
    return chain;
  },
  remove,
};

/** The extension and driver of `backend`'s child of a base in `format` (its `childFormat`, else its defaults). */
export function childDiskFormat(backend: DiskBackend, format: DiskFormatName): ChildDiskFormat {
  return backend.childFormat?.(format) ?? { extension: backend.extension, driver: backend.driver };
}

/** errno codes with which FICLONE says "not on this filesystem" (any other error is not an answer). */
const NO_REFLINK_CODES = new Set(['ENOTSUP', 'EOPNOTSUPP', 'EXDEV', 'EINVAL', 'ENOTTY', 'ENOSYS']);
const REFLINK_COPY = fsConstants.COPYFILE_FICLONE_FORCE | fsConstants.COPYFILE_EXCL;

/** Answers per filesystem (st_dev and statfs type): every clone directory of an image directory shares one. */
const reflinkAnswers = new Map<string, Promise<boolean>>();

/**
 * Whether files in `directory` can be reflink copies of each other: a FICLONE of a 4 KiB temporary file in
 * that directory (two dot files, removed again). The answer is cached per filesystem, so the clone directories
 * of one image directory are probed once. Rejects (and caches nothing) when the probe cannot run at all (the
 * directory is missing or not writable, the disk is full): that is not an answer.
 */
export async function reflinkSupported(directory: string): Promise<boolean> {
  const [info, fileSystem] = await Promise.all([stat(directory), statfs(directory)]);
  const key = `${info.dev}:${fileSystem.type}`;
  let answer = reflinkAnswers.get(key);
  if (answer === undefined) {
    answer = probeReflink(directory);
    reflinkAnswers.set(key, answer);
    answer.catch(() => reflinkAnswers.delete(key));
  }
  return answer;
}

async function probeReflink(directory: string): Promise<boolean> {
  const source = join(directory, `.cowherd-reflink-probe-${randomBytes(6).toString('hex')}`);
  const copy = `${source}.copy`;
  try {
    await writeFile(source, Buffer.alloc(4096, 0x5a), { flag: 'wx', mode: 0o600 });
    await copyFile(source, copy, REFLINK_COPY);
    return true;
  } catch (error) {
    if (NO_REFLINK_CODES.has((error as NodeJS.ErrnoException).code ?? '')) return false;
    throw error;
  } finally {
    await rm(copy, { force: true });
    await rm(source, { force: true });
  }
}

function noReflinks(message: string, metadata: Record<string, string>, cause?: unknown): CowherdError {
  // No reason fits exactly (a dedicated one would need a proto change): HYPERVISOR_MISMATCH is what every
  // backend answers when this host cannot make the child a request needs.
  return new CowherdError(GrpcStatus.FAILED_PRECONDITION, message, {
    reason: ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
    metadata: { disk_backend: 'reflink-copy', ...metadata },
    ...(cause === undefined ? {} : { cause }),
  });
}

/**
 * A reflink copy of `source` at `path` (never a byte copy, never over an existing file), writable by its owner
 * (the copy inherits the base's 0444). FAILED_PRECONDITION when the filesystem cannot reflink, or the two are on
 * different filesystems.
 */
async function reflinkCopy(source: string, path: string): Promise<void> {
  await copyFile(source, path, REFLINK_COPY).catch((error: unknown) => {
    const code = (error as NodeJS.ErrnoException).code ?? '';
    if (code === 'EXDEV') {
      throw noReflinks(`${path} cannot be a reflink copy of ${source}: they are on different filesystems`, { directory: dirname(path) }, error);
    }
    if (NO_REFLINK_CODES.has(code)) throw noReflinks(`the filesystem of ${dirname(path)} cannot make reflink copies`, { directory: dirname(path) }, error);
    throw error;
  });
  try {
    await chmod(path, 0o644);
  } catch (error) {
    await rm(path, { force: true });
    throw error;
  }
}

/**
 * KVM on btrfs or xfs (reflink=1): a reflink copy of the base (see the module comment). A copy is as cheap as a
 * prototype would be, and a byte copy of a prototype would be a full copy: `copiesChildren` is false.
 */
export const REFLINK_COPY_BACKEND: DiskBackend = {
  name: 'reflink-copy',
  extension: 'qcow2',
  driver: { name: 'qemu', type: 'qcow2' },
  childFormat(format) {
    if (!this.accepts(format)) {
      throw CowherdError.failedPrecondition(
        `reflink copies need qcow2 or raw bases, not ${format === 'vpc' ? 'VHD' : format}`,
        ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
      );
    }
    return { extension: format as 'qcow2' | 'raw', driver: { name: 'qemu', type: format } };
  },
  copiesChildren: false,
  accepts: (format) => format === 'qcow2' || format === 'raw',
  checkBase(disk) {
    if (!this.accepts(disk.format)) throw mismatch(disk, 'reflink copies need qcow2 or raw bases');
  },
  async createChild(disk, path, prototype) {
    this.checkBase(disk);
    // A streaming clone's base is an NBD URI until its replica is complete: there is no file to share blocks with.
    if (!isAbsolute(disk.base)) {
      throw noReflinks(`disk ${disk.target}: a reflink copy needs the base as a local file, not ${disk.base}`, { disk: disk.target });
    }
    const directory = dirname(resolve(path));
    if (!(await reflinkSupported(directory))) {
      throw noReflinks(`the filesystem of ${directory} cannot make reflink copies (btrfs, or xfs made with reflink=1, can)`, { directory });
    }
    await spaceChecked(path, reflinkCopy(prototype ?? disk.base, path));
  },
  async createEmptyDisk(path, bytes, prototype) {
    await spaceChecked(path, prototype === undefined ? createEmptyDisk(path, bytes, 'qcow2') : copyFile(prototype, path, fsConstants.COPYFILE_EXCL));
  },
  // [] for a copy of a standalone base. A copy of a qcow2 that has a backing file of its own (a VM's disk
  // that is itself an overlay) keeps that backing file, and the chain says so, so that dependents count it.
  chain: backingChain,
  remove,
};

/** Every backend's name and the `cowherd.common.v1.DiskBackend` value that names it in requests and lineage. */
const BACKEND_VALUES: ReadonlyArray<readonly [DiskBackendName, DiskBackendValue]> = [
  ['qcow2-overlay', DiskBackendValue.DISK_BACKEND_QCOW2_OVERLAY],
  ['vhd-differencing', DiskBackendValue.DISK_BACKEND_VHD_DIFFERENCING],
  ['reflink-copy', DiskBackendValue.DISK_BACKEND_REFLINK_COPY],
];

/**
 * The backend a request's `disk_backend` names; undefined for DISK_BACKEND_UNSPECIFIED (the host's standard).
 * INVALID_ARGUMENT naming `field` for a number that is no DiskBackend (a newer client's value, or garbage).
 */
export function diskBackendChoice(value: DiskBackendValue | number, field = 'disk_backend'): DiskBackendName | undefined {
  if (value === DiskBackendValue.DISK_BACKEND_UNSPECIFIED) return undefined;
  const found = BACKEND_VALUES.find(([, known]) => known === value);
  if (!found) throw CowherdError.invalidArgument(field, `is not a known disk backend (${String(value)}): QCOW2_OVERLAY, VHD_DIFFERENCING or REFLINK_COPY`);
  return found[0];
}

/** The `cowherd.common.v1.DiskBackend` value of a backend (UNSPECIFIED for none: a clone recorded before backends were). */
export function diskBackendValue(name: DiskBackendName | undefined): DiskBackendValue {
  return BACKEND_VALUES.find(([known]) => known === name)?.[1] ?? DiskBackendValue.DISK_BACKEND_UNSPECIFIED;
}

/**
 * The backend of a host's clones: qcow2 overlays on KVM, VHD differencing disks on Xen, unless `choice` names
 * another one the host's hypervisor runs (`reflink-copy` on KVM; whether the filesystem can reflink is checked
 * when a child is made). FAILED_PRECONDITION (HYPERVISOR_MISMATCH) for a choice the hypervisor cannot run.
 */
export function diskBackendFor(hypervisor: 'kvm' | 'xen', choice?: DiskBackendName): DiskBackend {
  const standard = hypervisor === 'xen' ? VHD_DIFFERENCING_BACKEND : QCOW2_OVERLAY_BACKEND;
  if (choice === undefined || choice === standard.name) return standard;
  if (choice === 'reflink-copy' && hypervisor === 'kvm') return REFLINK_COPY_BACKEND;
  throw CowherdError.failedPrecondition(
    `disk backend ${choice} does not run on ${hypervisor === 'xen' ? 'Xen' : 'KVM'} hosts`,
    ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
    {
      disk_backend: choice,
      host_hypervisor: hypervisor,
    },
  );
}
