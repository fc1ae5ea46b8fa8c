/**
 * What the agent observes about its host, successor of the 2011 tool's whoami.py: the hypervisor (KVM via
 * QEMU, or Xen) and why the agent decided so, the libvirt URI, CPUs, memory, the image directory's space and
 * whether its filesystem makes reflink copies, its own version and the endpoint services reach it at.
 */
import { existsSync, readFileSync } from 'node:fs';
import { readFile, statfs } from 'node:fs/promises';
import { availableParallelism, cpus, freemem, hostname, totalmem } from 'node:os';
import { Hypervisor } from '../../gen/cowherd/common/v1/types.js';
import type { HypervisorFacts, Libvirt } from '../hypervisor/index.js';

/** Facts about the machine itself, outside libvirt (injectable for tests). */
export interface SystemFacts {
  /** /dev/kvm exists on the host. */
  readonly devKvm: boolean;
  /** Content of /sys/hypervisor/type ("xen" in a Xen domain, dom0 included), if any. */
  readonly sysHypervisorType?: string;
  /** /proc/xen exists (xenfs: a Xen domain). */
  readonly procXen: boolean;
}

/** Reads {@link SystemFacts} from this machine. */
export function readSystemFacts(): SystemFacts {
  let sysHypervisorType: string | undefined;
  try {
    sysHypervisorType = readFileSync('/sys/hypervisor/type', 'utf8').trim();
  } catch {
    sysHypervisorType = undefined;
  }
  return { devKvm: existsSync('/dev/kvm'), procXen: existsSync('/proc/xen'), ...(sysHypervisorType ? { sysHypervisorType } : {}) };
}

/** The detected hypervisor and a human-readable account of why. */
export interface HypervisorDetection {
  readonly hypervisor: Hypervisor;
  readonly detail: string;
}

/**
 * Decides the hypervisor from what libvirt's driver says (the "Using API" driver and the domain types its
 * capabilities offer) and from the machine (/dev/kvm, /sys/hypervisor/type, /proc/xen). libvirt's word
 * wins: it is what will run the guests; the machine's facts explain it.
 */
export function detectHypervisor(facts: HypervisorFacts, system: SystemFacts): HypervisorDetection {
  const versions = `libvirt ${facts.daemonVersion ?? facts.libraryVersion}`;
  const driver = facts.driver.toLowerCase();
  const scheme = facts.uri.split(':')[0]?.split('+')[0]?.toLowerCase() ?? '';
  const inXen = system.sysHypervisorType === 'xen' || system.procXen;
  const xenEvidence =
    system.sysHypervisorType === 'xen'
      ? '/sys/hypervisor/type is xen'
      : system.procXen
        ? '/proc/xen exists'
        : 'no /sys/hypervisor/type or /proc/xen on this machine';
  if (driver === 'xen' || driver === 'libxl' || scheme === 'xen' || scheme === 'libxl') {
    return {
      hypervisor: Hypervisor.HYPERVISOR_XEN,
      detail: `Xen ${facts.hypervisorVersion} via ${versions} (${facts.uri}): libvirt's ${facts.driver} driver; ${xenEvidence}; guest types ${facts.osTypes.join(', ') || 'none'}`,
    };
  }
  if (driver === 'qemu' || scheme === 'qemu') {
    const base = `qemu ${facts.hypervisorVersion} via ${versions} (${facts.uri})`;
    const xenNote = inXen ? `; this machine is itself a Xen domain (${xenEvidence})` : '';
    if (facts.domainTypes.includes('kvm')) {
      return {
        hypervisor: Hypervisor.HYPERVISOR_KVM,
        detail: `${base}, KVM acceleration: libvirt offers domain type 'kvm' (/dev/kvm ${system.devKvm ? 'present' : 'not visible to the agent'})${xenNote}`,
      };
    }
    const why = system.devKvm ? '/dev/kvm exists but libvirt does not offer it (masked or unusable)' : '/dev/kvm missing';
    return { hypervisor: Hypervisor.HYPERVISOR_KVM, detail: `${base}, TCG emulation without KVM: libvirt offers only domain type 'qemu' (${why})${xenNote}` };
  }
  return {
    hypervisor: Hypervisor.HYPERVISOR_UNSPECIFIED,
    detail: `libvirt ${facts.driver || 'unknown'} driver ${facts.hypervisorName} ${facts.hypervisorVersion} (${facts.uri}) is neither QEMU/KVM nor Xen`,
  };
}

/** MemAvailable from /proc/meminfo in bytes (what can be given to new guests without swapping); os.freemem() where there is none. */
export async function availableMemoryBytes(): Promise<number> {
  try {
    const match = /^MemAvailable:\s+(\d+) kB$/m.exec(await readFile('/proc/meminfo', 'utf8'));
    if (match) return Number(match[1]) * 1024;
  } catch {
    // not Linux
  }
  return freemem();
}

/** Free and total bytes of the file system holding `directory` (free = available to unprivileged users). */
export async function fileSystemSpace(directory: string): Promise<{ freeBytes: number; totalBytes: number }> {
  const stats = await statfs(directory);
  return { freeBytes: stats.bavail * stats.bsize, totalBytes: stats.blocks * stats.bsize };
}

/** The agent's version: the repository's package.json version. */
export function agentVersion(): string {
  const manifest = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version?: string };
  return manifest.version ?? '0.0.0';
}

/** The facts RegisterHost carries. */
export interface HostRegistrationFacts extends Capacity {
  /** False when libvirt did not answer: hypervisor is then UNSPECIFIED and the detail says why. */
  readonly libvirtReachable: boolean;
  readonly hostname: string;
  readonly hypervisor: Hypervisor;
  readonly hypervisorDetail: string;
  readonly libvirtUri: string;
  readonly agentEndpoint: string;
  readonly cpuCount: number;
  readonly memoryBytes: number;
  readonly imageDirectory: string;
  /**
   * Whether the image directory's filesystem makes reflink copies (btrfs, xfs with reflink=1), which the
   * `reflink-copy` disk backend needs; absent when not probed (no probe given) or the probe could not run.
   * RegisterHost sends it as Host.image_directory_reflinks (absent: false).
   */
  readonly imageDirectoryReflinks?: boolean;
  readonly agentVersion: string;
}

/** The numbers every Heartbeat carries. */
export interface Capacity {
  readonly memoryFreeBytes: number;
  readonly imageDirectoryFreeBytes: number;
  readonly imageDirectoryTotalBytes: number;
}

/** Where the reporter gets host facts from. */
export interface HostFactsSource {
  /** Everything RegisterHost needs (asks libvirt). */
  registration(): Promise<HostRegistrationFacts>;
  /** The live numbers for a heartbeat (cheap: no libvirt call). */
  capacity(): Promise<Capacity>;
}

/** Options of {@link createHostFactsSource}. */
export interface HostFactsOptions {
  readonly libvirt: Libvirt;
  readonly imageDirectory: string;
  /** host:port services dial for AgentService. */
  readonly advertiseAddress: string;
  readonly system?: () => SystemFacts;
  readonly version?: string;
  /**
   * Whether a directory's filesystem makes reflink copies (the hypervisor room's `reflinkSupported`, which
   * probes once per filesystem); without it registration leaves `imageDirectoryReflinks` out.
   */
  readonly reflinkSupported?: (directory: string) => Promise<boolean>;
}

/** Host facts from this machine and libvirt. */
export function createHostFactsSource(options: HostFactsOptions): HostFactsSource {
  const capacity = async (): Promise<Capacity> => {
    const space = await fileSystemSpace(options.imageDirectory);
    return { memoryFreeBytes: await availableMemoryBytes(), imageDirectoryFreeBytes: space.freeBytes, imageDirectoryTotalBytes: space.totalBytes };
  };
  // A probe that cannot run (directory not writable yet) leaves the fact out rather than failing registration.
  const imageDirectoryReflinks = async (): Promise<{ imageDirectoryReflinks?: boolean }> => {
    const supported = await options.reflinkSupported?.(options.imageDirectory).catch(() => undefined);
    return supported === undefined ? {} : { imageDirectoryReflinks: supported };
  };
  return {
    capacity,
    async registration() {
      let detection: HypervisorDetection;
      let libvirtReachable = true;
      try {
        detection = detectHypervisor(await options.libvirt.hypervisorFacts(), (options.system ?? readSystemFacts)());
      } catch (error) {
        // Register anyway, so that the host shows up with the reason; the reporter registers again once libvirt answers.
        libvirtReachable = false;
        detection = { hypervisor: Hypervisor.HYPERVISOR_UNSPECIFIED, detail: `libvirt unreachable at ${options.libvirt.uri}: ${(error as Error).message}` };
      }
      return {
        libvirtReachable,
        hostname: hostname(),
        hypervisor: detection.hypervisor,
        hypervisorDetail: detection.detail,
        libvirtUri: options.libvirt.uri,
        agentEndpoint: options.advertiseAddress,
        cpuCount: cpus().length || availableParallelism(),
        memoryBytes: totalmem(),
        imageDirectory: options.imageDirectory,
        ...(await imageDirectoryReflinks()),
        agentVersion: options.version ?? agentVersion(),
        ...(await capacity()),
      };
    },
  };
}
