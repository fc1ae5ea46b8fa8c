/**
 * A disk backend (cowherd.common.v1.DiskBackend) as requests and image settings choose it: which values exist and
 * which hypervisor runs which, so that the cloning and distribution services refuse a choice before any agent
 * sees it. The agent checks again (its hypervisor, its file system) before it makes anything.
 */
import { DiskBackend, diskBackendToJSON, Hypervisor, hypervisorToJSON } from '../../gen/cowherd/common/v1/types.js';
import { CowherdError } from '../platform/errors.js';

/** The backends each hypervisor's hosts run; UNSPECIFIED (the host's standard) runs everywhere. */
const BACKENDS_OF: Readonly<Partial<Record<Hypervisor, readonly DiskBackend[]>>> = {
  [Hypervisor.HYPERVISOR_KVM]: [DiskBackend.DISK_BACKEND_QCOW2_OVERLAY, DiskBackend.DISK_BACKEND_REFLINK_COPY],
  [Hypervisor.HYPERVISOR_XEN]: [DiskBackend.DISK_BACKEND_VHD_DIFFERENCING],
};

const KNOWN: readonly DiskBackend[] = [
  DiskBackend.DISK_BACKEND_UNSPECIFIED,
  DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
  DiskBackend.DISK_BACKEND_VHD_DIFFERENCING,
  DiskBackend.DISK_BACKEND_REFLINK_COPY,
];

/** The value's name without its prefix (`REFLINK_COPY`), for messages. */
export function diskBackendLabel(value: DiskBackend): string {
  return diskBackendToJSON(value).replace(/^DISK_BACKEND_/, '');
}

/** INVALID_ARGUMENT naming `field` unless `value` is a DiskBackend (UNSPECIFIED included); the value otherwise. */
export function checkDiskBackend(value: number, field: string): DiskBackend {
  if (!KNOWN.includes(value))
    throw CowherdError.invalidArgument(field, `is not a known disk backend (${value}): QCOW2_OVERLAY, VHD_DIFFERENCING or REFLINK_COPY`);
  return value as DiskBackend;
}

/** Whether hosts of `hypervisor` make clones' disks with `backend`; UNSPECIFIED (their standard) always. */
export function diskBackendRunsOn(backend: DiskBackend, hypervisor: Hypervisor): boolean {
  return backend === DiskBackend.DISK_BACKEND_UNSPECIFIED || (BACKENDS_OF[hypervisor] ?? []).includes(backend);
}

/** INVALID_ARGUMENT naming `field` unless {@link diskBackendRunsOn}; `what` names the source (`images/x`) in the message. */
export function checkDiskBackendFor(backend: DiskBackend, hypervisor: Hypervisor, field: string, what: string): void {
  if (diskBackendRunsOn(backend, hypervisor)) return;
  const runs = (BACKENDS_OF[hypervisor] ?? []).map(diskBackendLabel).join(' or ') || 'none';
  throw CowherdError.invalidArgument(
    field,
    `${diskBackendLabel(backend)} does not run on ${hypervisorToJSON(hypervisor).replace(/^HYPERVISOR_/, '')} hosts, which ${what} is for (they run ${runs})`,
  );
}
