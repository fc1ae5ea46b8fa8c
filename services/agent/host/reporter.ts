/**
 * Keeps inventory's view of this host current: RegisterHost at start (retried with backoff until it
 * works), Heartbeat at the interval the server asks for, RegisterHost again when a heartbeat or report
 * answers NOT_FOUND, a full snapshot of the libvirt domains after every registration and every 5 minutes,
 * and partial reports within a fraction of a second of libvirt events (coalesced over a short window).
 *
 * Every write to inventory (registration, snapshots, partial reports) runs in one sequential loop, so a
 * report read from libvirt earlier never overtakes one read later. Heartbeats run beside it on their own
 * timer, so that a slow snapshot never makes the host look unreachable.
 */
import { Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import type { Logger } from '../../common/platform/logger.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, imageNameOfKey, imageVersionNameOfKey, VIRTUAL_MACHINE_NAME } from '../../common/domain/resource-names.js';
import { Hypervisor } from '../../gen/cowherd/common/v1/types.js';
import type {
  HeartbeatRequest,
  HeartbeatResponse,
  InventoryServiceClient,
  RegisterHostRequest,
  ReportVirtualMachinesRequest,
  ReportVirtualMachinesResponse,
} from '../../gen/cowherd/inventory/v1/inventory_service.js';
import { Host, VirtualMachine, type Disk, type TransferLimits } from '../../gen/cowherd/inventory/v1/resources.js';
import {
  diskBackendValue,
  imageKeyOfBackingFile,
  inspectAll,
  LibvirtError,
  virtualMachineId,
  virtualMachineState,
  type DiskInspector,
  type DomainInfo,
  type EventWatch,
  type Libvirt,
  type LibvirtEvent,
} from '../hypervisor/index.js';
import type { HostFactsSource, HostRegistrationFacts } from './host-facts.js';

/** The three inventory calls the reporter makes (a fake in unit tests, gRPC in the agent). */
export interface InventoryPort {
  registerHost(request: RegisterHostRequest): Promise<Host>;
  heartbeat(request: HeartbeatRequest): Promise<HeartbeatResponse>;
  reportVirtualMachines(request: ReportVirtualMachinesRequest): Promise<ReportVirtualMachinesResponse>;
}

/** An InventoryPort over the generated gRPC client; every call gets `deadlineMs` (the client retries UNAVAILABLE within it). */
export function inventoryPort(client: InventoryServiceClient, deadlineMs = 15_000): InventoryPort {
  const options = (): { deadline: number } => ({ deadline: Date.now() + deadlineMs });
  const settle =
    <T>(resolve: (value: T) => void, reject: (error: unknown) => void) =>
    (error: ServiceError | null, response: T): void =>
      error ? reject(error) : resolve(response);
  return {
    registerHost: (request) => new Promise((resolve, reject) => client.registerHost(request, new Metadata(), options(), settle(resolve, reject))),
    heartbeat: (request) => new Promise((resolve, reject) => client.heartbeat(request, new Metadata(), options(), settle(resolve, reject))),
    reportVirtualMachines: (request) =>
      new Promise((resolve, reject) => client.reportVirtualMachines(request, new Metadata(), options(), settle(resolve, reject))),
  };
}

/**
 * The storage key of the version a clone of an image stands on: its metadata's imageVersion; for a clone made
 * before versions existed, the replica directory its system disk's backing file lies in (the first disk with
 * one), else the image its metadata names (then always version 1). Undefined when it names no valid image.
 */
function versionKeyOf(clone: NonNullable<DomainInfo['clone']>, disks: readonly Disk[]): string | undefined {
  if (!('image' in clone.source)) return undefined;
  if (clone.imageVersion) return IMAGE_NAME.parse(clone.imageVersion)?.image;
  for (const disk of disks) {
    const base = disk.backingChain.at(-1)?.path;
    const key = base === undefined ? undefined : imageKeyOfBackingFile(base);
    if (key !== undefined) return key;
  }
  return IMAGE_NAME.parse(clone.source.image)?.image;
}

/** The inventory record of a domain; clones cowherd made carry their lineage from their metadata. */
export function toVirtualMachine(host: string, domain: DomainInfo, disks: readonly Disk[]): VirtualMachine {
  const clone = domain.clone;
  const key = clone ? versionKeyOf(clone, disks) : undefined;
  const image = key !== undefined ? imageNameOfKey(key) : clone && 'image' in clone.source ? clone.source.image : '';
  const imageVersion = key === undefined ? '' : imageVersionNameOfKey(key);
  const persistent = new Set(clone?.persistentDisks ?? []);
  const lineage = clone
    ? {
        lineage: {
          image,
          imageVersion,
          previousImageVersion: clone.previousImageVersion ?? '',
          replica: key === undefined ? '' : HOST_IMAGE_NAME.format({ host, image: key }),
          sourceVirtualMachine: 'virtualMachine' in clone.source ? clone.source.virtualMachine : '',
          overlays: disks.map((disk) => disk.path),
          diskBackend: diskBackendValue(clone.diskBackend),
        },
        managed: true,
        sourceImage: image,
        sourceImageVersion: imageVersion,
        ...(clone.guestConfigurationDigest === undefined ? {} : { guestConfigurationDigest: clone.guestConfigurationDigest }),
      }
    : {};
  return VirtualMachine.fromPartial({
    ...lineage,
    name: VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: virtualMachineId(domain) }),
    host: HOST_NAME.format({ host }),
    domainName: domain.name,
    uuid: domain.uuid.toLowerCase(),
    state: virtualMachineState(domain.state),
    vcpuCount: domain.vcpus,
    memoryBytes: String(domain.memoryBytes),
    disks: disks.map((disk) => (persistent.has(disk.target) ? { ...disk, persistent: true } : disk)),
  });
}

/** Options of {@link createReporter}. */
export interface ReporterOptions {
  /** This host's id, `{host}` of `hosts/{host}`. */
  readonly host: string;
  readonly inventory: InventoryPort;
  readonly libvirt: Libvirt;
  readonly disks: DiskInspector;
  readonly facts: HostFactsSource;
  readonly log: Logger;
  /** Events are collected this long before one partial report. Default 200 ms. */
  readonly debounceMs?: number;
  /** Full snapshot period. Default 5 minutes. */
  readonly fullSnapshotIntervalMs?: number;
  /** Heartbeat period until the server names one. Default 10 s. */
  readonly defaultHeartbeatIntervalMs?: number;
  /** First retry delay after a failed registration or report; doubles (with jitter) up to maxRetryMs. Default 500 ms. */
  readonly initialRetryMs?: number;
  /** Default 30 s. */
  readonly maxRetryMs?: number;
  /** qemu-img processes at once. Default 4. */
  readonly diskConcurrency?: number;
  /** Virtual machines per ReportVirtualMachines call (the API allows at most 1000). */
  readonly maxPerReport?: number;
  /** Called with the transfer limits from every RegisterHost and Heartbeat response. */
  readonly onTransferLimits?: (limits: TransferLimits | undefined) => void;
}

/** Lifecycle of a reporter. */
export type ReporterState = 'INITIALIZED' | 'RUNNING' | 'STOPPING' | 'STOPPED';

/** What a reporter has done, for tests and logs. */
export interface ReporterStatus {
  readonly state: ReporterState;
  readonly registered: boolean;
  readonly registrations: number;
  readonly fullSnapshots: number;
  readonly partialReports: number;
  /** Domain name to resource name, as last reported. */
  readonly reported: ReadonlyMap<string, string>;
}

/** A running reporter. */
export interface Reporter {
  /** Starts watching libvirt and reporting; returns at once (registration retries in the background). */
  start(): Promise<void>;
  /** Stops timers and the event watch and waits for the report in flight. */
  stop(): Promise<void>;
  status(): ReporterStatus;
}

const NOT_FOUND = GrpcStatus.NOT_FOUND;

function isNotFound(error: unknown): boolean {
  return (error as { code?: unknown } | null)?.code === NOT_FOUND;
}

function durationMs(duration: { seconds: string; nanos: number } | undefined): number | undefined {
  if (!duration) return undefined;
  const ms = Number(duration.seconds) * 1000 + duration.nanos / 1e6;
  return Number.isFinite(ms) && ms > 0 ? ms : undefined;
}

/** Makes a reporter; call start(). */
export function createReporter(options: ReporterOptions): Reporter {
  const log = options.log.child({ component: 'reporter' });
  const parent = HOST_NAME.format({ host: options.host });
  const debounceMs = options.debounceMs ?? 200;
  const fullSnapshotIntervalMs = options.fullSnapshotIntervalMs ?? 300_000;
  const initialRetryMs = options.initialRetryMs ?? 500;
  const maxRetryMs = options.maxRetryMs ?? 30_000;
  const maxPerReport = Math.min(1000, options.maxPerReport ?? 1000);
  const diskConcurrency = options.diskConcurrency ?? 4;

  let state: ReporterState = 'INITIALIZED';
  let registered = false;
  /** The last registration was made without libvirt's facts: register again once libvirt answers. */
  let registeredWithoutLibvirt = false;
  let needFullSnapshot = true;
  const pending = new Set<string>();
  const reported = new Map<string, string>();
  let counts = { registrations: 0, fullSnapshots: 0, partialReports: 0 };
  let heartbeatIntervalMs = options.defaultHeartbeatIntervalMs ?? 10_000;
  let retryDelayMs = initialRetryMs;
  let watch: EventWatch | undefined;
  let watchRetryMs = initialRetryMs;

  let debounceTimer: NodeJS.Timeout | undefined;
  let retryTimer: NodeJS.Timeout | undefined;
  let heartbeatTimer: NodeJS.Timeout | undefined;
  let snapshotTimer: NodeJS.Timeout | undefined;
  let watchTimer: NodeJS.Timeout | undefined;
  let running: Promise<void> | undefined;
  let again = false;
  let heartbeatSession = 0;

  const nextRetryDelay = (): number => {
    const delay = retryDelayMs / 2 + Math.random() * (retryDelayMs / 2);
    retryDelayMs = Math.min(maxRetryMs, retryDelayMs * 2);
    return delay;
  };

  /** Runs the write loop, or asks the running one to go round again. */
  const kick = (): void => {
    if (state !== 'RUNNING') return;
    if (running) {
      again = true;
      return;
    }
    running = loop()
      .catch((error: unknown) => log.error({ err: error }, 'reporter loop failed'))
      .finally(() => {
        running = undefined;
        if (again) {
          again = false;
          kick();
        }
      });
  };

  const retryLater = (what: string, error: unknown): void => {
    if (state !== 'RUNNING') return;
    const delay = nextRetryDelay();
    log.warn({ err: error, retryInMs: Math.round(delay) }, `${what} failed; retrying`);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(() => {
      retryTimer = undefined;
      kick();
    }, delay);
  };

  const lostRegistration = (why: string): void => {
    if (!registered) return;
    log.warn({ host: parent }, `${why} answered NOT_FOUND: registering again`);
    registered = false;
    heartbeatSession += 1;
    clearTimeout(heartbeatTimer);
  };

  async function loop(): Promise<void> {
    while (state === 'RUNNING' && retryTimer === undefined) {
      again = false;
      if (!registered) {
        if (!(await register())) return;
        continue;
      }
      if (needFullSnapshot) {
        if (!(await fullSnapshot())) return;
        continue;
      }
      if (pending.size > 0 && debounceTimer === undefined) {
        if (!(await partialReport())) return;
        continue;
      }
      return;
    }
  }

  async function register(): Promise<boolean> {
    let facts: HostRegistrationFacts;
    try {
      facts = await options.facts.registration();
      registeredWithoutLibvirt = !facts.libvirtReachable;
      const host = await options.inventory.registerHost({
        host: Host.fromPartial({
          name: parent,
          hostname: facts.hostname,
          hypervisor: facts.hypervisor,
          hypervisorDetail: facts.hypervisorDetail,
          libvirtUri: facts.libvirtUri,
          agentEndpoint: facts.agentEndpoint,
          cpuCount: facts.cpuCount,
          memoryBytes: String(facts.memoryBytes),
          memoryFreeBytes: String(facts.memoryFreeBytes),
          imageDirectory: facts.imageDirectory,
          imageDirectoryFreeBytes: String(facts.imageDirectoryFreeBytes),
          imageDirectoryTotalBytes: String(facts.imageDirectoryTotalBytes),
          imageDirectoryReflinks: facts.imageDirectoryReflinks ?? false,
          agentVersion: facts.agentVersion,
        }),
      });
      registered = true;
      retryDelayMs = initialRetryMs;
      counts = { ...counts, registrations: counts.registrations + 1 };
      needFullSnapshot = true;
      log.info(
        { host: parent, hypervisor: Hypervisor[facts.hypervisor], hypervisorDetail: facts.hypervisorDetail, state: host.state },
        'registered with inventory',
      );
      options.onTransferLimits?.(host.transferLimits);
      // One heartbeat at once, to learn the server's interval.
      heartbeatSession += 1;
      scheduleHeartbeat(0);
      return true;
    } catch (error) {
      retryLater('RegisterHost', error);
      return false;
    }
  }

  async function readVirtualMachines(domains: readonly DomainInfo[]): Promise<VirtualMachine[]> {
    const disks = domains.flatMap((domain) => domain.disks.map((disk) => ({ domain, disk })));
    const inspected = await inspectAll(disks, diskConcurrency, ({ disk }) => options.disks.inspect(disk));
    const byDomain = new Map<DomainInfo, Disk[]>(domains.map((domain) => [domain, []]));
    inspected.forEach((record, index) => {
      if (record) byDomain.get(disks[index]!.domain)!.push(record);
    });
    return domains.map((domain) => toVirtualMachine(options.host, domain, byDomain.get(domain)!));
  }

  async function send(request: Omit<ReportVirtualMachinesRequest, 'parent'>): Promise<void> {
    await options.inventory.reportVirtualMachines({ parent, ...request });
  }

  async function fullSnapshot(): Promise<boolean> {
    // Events up to now are covered by the snapshot.
    pending.clear();
    try {
      const domains = await options.libvirt.listDomains();
      if (registeredWithoutLibvirt) {
        // libvirt answers again: the registration lacks the hypervisor; register anew (a snapshot follows).
        registered = false;
        return true;
      }
      const machines = await readVirtualMachines(domains);
      const chunks: VirtualMachine[][] = [];
      for (let start = 0; start < machines.length; start += maxPerReport) chunks.push(machines.slice(start, start + maxPerReport));
      if (chunks.length === 0) chunks.push([]);
      for (const [index, chunk] of chunks.entries()) await send({ virtualMachines: chunk, fullSnapshot: index === 0, removedVirtualMachines: [] });
      reported.clear();
      for (const machine of machines) reported.set(machine.domainName, machine.name);
      needFullSnapshot = false;
      retryDelayMs = initialRetryMs;
      counts = { ...counts, fullSnapshots: counts.fullSnapshots + 1 };
      log.debug({ virtualMachines: machines.length }, 'full snapshot reported');
      clearTimeout(snapshotTimer);
      if (state === 'RUNNING') {
        snapshotTimer = setTimeout(() => {
          needFullSnapshot = true;
          kick();
        }, fullSnapshotIntervalMs);
      }
      return true;
    } catch (error) {
      if (isNotFound(error)) {
        lostRegistration('ReportVirtualMachines');
        return true;
      }
      retryLater('full snapshot', error);
      return false;
    }
  }

  async function partialReport(): Promise<boolean> {
    const names = [...pending];
    pending.clear();
    try {
      const found: DomainInfo[] = [];
      const removed: string[] = [];
      const gone: string[] = [];
      for (const name of names) {
        try {
          const domain = await options.libvirt.domain(name);
          // virsh looks a name up as an id or UUID first: a domain named "3" may resolve to another one.
          if (domain.name !== name) {
            needFullSnapshot = true;
            continue;
          }
          const previous = reported.get(name);
          if (previous !== undefined && previous !== VIRTUAL_MACHINE_NAME.format({ host: options.host, virtualMachine: virtualMachineId(domain) }))
            removed.push(previous);
          found.push(domain);
        } catch (error) {
          if (!(error instanceof LibvirtError && error.kind === 'domain-not-found')) throw error;
          const previous = reported.get(name);
          if (previous !== undefined) {
            removed.push(previous);
            gone.push(name);
          }
        }
      }
      if (needFullSnapshot) return true;
      const machines = await readVirtualMachines(found);
      if (machines.length === 0 && removed.length === 0) return true;
      for (let start = 0; start < Math.max(machines.length, 1); start += maxPerReport) {
        await send({ virtualMachines: machines.slice(start, start + maxPerReport), fullSnapshot: false, removedVirtualMachines: start === 0 ? removed : [] });
      }
      for (const name of gone) reported.delete(name);
      for (const machine of machines) reported.set(machine.domainName, machine.name);
      retryDelayMs = initialRetryMs;
      counts = { ...counts, partialReports: counts.partialReports + 1 };
      log.debug({ changed: machines.map((machine) => machine.name), removed }, 'partial report');
      return true;
    } catch (error) {
      for (const name of names) pending.add(name);
      if (isNotFound(error)) {
        lostRegistration('ReportVirtualMachines');
        return true;
      }
      retryLater('partial report', error);
      return false;
    }
  }

  function scheduleHeartbeat(delayMs: number): void {
    clearTimeout(heartbeatTimer);
    const session = heartbeatSession;
    heartbeatTimer = setTimeout(() => void heartbeat(session), delayMs);
  }

  async function heartbeat(session: number): Promise<void> {
    if (state !== 'RUNNING' || !registered || session !== heartbeatSession) return;
    try {
      const capacity = await options.facts.capacity();
      const response = await options.inventory.heartbeat({
        host: parent,
        memoryFreeBytes: String(capacity.memoryFreeBytes),
        imageDirectoryFreeBytes: String(capacity.imageDirectoryFreeBytes),
        imageDirectoryTotalBytes: String(capacity.imageDirectoryTotalBytes),
      });
      heartbeatIntervalMs = durationMs(response.heartbeatInterval) ?? heartbeatIntervalMs;
      options.onTransferLimits?.(response.transferLimits);
    } catch (error) {
      if (isNotFound(error) && session === heartbeatSession) {
        lostRegistration('Heartbeat');
        kick();
        return;
      }
      log.warn({ err: error }, 'heartbeat failed');
    }
    if (state === 'RUNNING' && session === heartbeatSession) scheduleHeartbeat(heartbeatIntervalMs);
  }

  function onEvent(event: LibvirtEvent): void {
    if (event.kind === 'reconnected') {
      log.info('libvirt event watch reconnected: full snapshot');
      needFullSnapshot = true;
      kick();
      return;
    }
    pending.add(event.domain);
    // A fixed window from the first event, not a sliding one: a busy host still reports every debounceMs.
    if (debounceTimer === undefined) {
      debounceTimer = setTimeout(() => {
        debounceTimer = undefined;
        kick();
      }, debounceMs);
    }
  }

  async function startWatch(): Promise<void> {
    watchTimer = undefined;
    if (state !== 'RUNNING') return;
    try {
      const started = await options.libvirt.watchEvents(onEvent);
      if (state !== 'RUNNING') {
        await started.stop();
        return;
      }
      watch = started;
      // Anything that happened while there was no watch.
      if (counts.fullSnapshots > 0) {
        needFullSnapshot = true;
        kick();
      }
    } catch (error) {
      const delay = watchRetryMs;
      watchRetryMs = Math.min(maxRetryMs, watchRetryMs * 2);
      log.warn({ err: error, retryInMs: delay }, 'cannot watch libvirt events; retrying');
      watchTimer = setTimeout(() => void startWatch(), delay);
    }
  }

  return {
    async start() {
      if (state !== 'INITIALIZED') throw new Error(`reporter is ${state}`);
      state = 'RUNNING';
      // Watch first, so that nothing between the snapshot and the watch is missed.
      await startWatch();
      kick();
    },
    async stop() {
      if (state === 'STOPPED' || state === 'STOPPING') return;
      state = 'STOPPING';
      for (const timer of [debounceTimer, retryTimer, heartbeatTimer, snapshotTimer, watchTimer]) clearTimeout(timer);
      await watch?.stop().catch((error: unknown) => log.warn({ err: error }, 'stopping the event watch failed'));
      await running;
      for (const timer of [debounceTimer, retryTimer, heartbeatTimer, snapshotTimer, watchTimer]) clearTimeout(timer);
      state = 'STOPPED';
    },
    status: () => ({ state, registered, ...counts, reported: new Map(reported) }),
  };
}
