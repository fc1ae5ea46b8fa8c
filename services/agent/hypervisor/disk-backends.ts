/**
 * Disk backends: how a clone's disks are made on a base, one backend per kind of copy-on-write child. The clone
 * engine and the rebase call only this interface; which backend a host uses follows from its hypervisor
 * (`diskBackendFor`). Lineage, dependents, the protection of bases (0444, never opened for writing) and the
 * clone.done contract are the callers' and the same for every backend.
 *
 * - `qcow2-overlay` (KVM): a qcow2 overlay made by qemu-img on a qcow2 or raw base. Overlays of one base with
 *   the same options are byte-identical (a qcow2 header holds no per-file identity), so a batch makes one with
 *   qemu-img (~6 ms) and copies it per clone (~0.2 ms).
 * - `vhd-differencing` (Xen): a VHD differencing disk written by cowherd (vhd.ts) on a VHD base. Every child has
 *   its own unique id in its footer, so each is made on its own. Untested on a Xen host here (none in the fleet).
 */
import { constants as fsConstants } from 'node:fs';
import { copyFile, rm } from 'node:fs/promises';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../../common/platform/errors.js';
import { backingChain } from './dependents.js';
import type { DiskFormatName } from './domain-xml/safety.js';
import { createEmptyDisk, createQcow2Overlay } from './overlays.js';
import { createDifferencingVhd, readVhdInfo, resolveVhdParentPath } from './vhd.js';

/** A base disk as a backend sees it: its libvirt target, file and format. */
export interface BaseDisk {
  readonly target: string;
  readonly base: string;
  readonly format: DiskFormatName;
}

/** What makes, describes and removes a clone's disks. */
export interface DiskBackend {
  readonly name: 'qcow2-overlay' | 'vhd-differencing';
  /** File extension of the children and empty disks it makes (`vda.qcow2`, `data.vhd`). */
  readonly extension: 'qcow2' | 'vhd';
  /** libvirt `<driver>` of its children, for the domain XML. */
  readonly driver: { readonly name: string; readonly type: string };
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

/** The backend of a host's clones: qcow2 overlays on KVM, VHD differencing disks on Xen. */
export function diskBackendFor(hypervisor: 'kvm' | 'xen'): DiskBackend {
  return hypervisor === 'xen' ? VHD_DIFFERENCING_BACKEND : QCOW2_OVERLAY_BACKEND;
}
