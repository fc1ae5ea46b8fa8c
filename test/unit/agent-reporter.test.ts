// The agent's reporter against a fake inventory and a fake libvirt: registration with retries, heartbeats at
// the server's interval, re-registration on NOT_FOUND, partial reports on events within the debounce window,
// full snapshots that remove vanished domains.
//
//   node --import tsx --test test/unit/agent-reporter.test.ts
import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { createLogger } from '../../services/common/platform/logger.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import type {
  HeartbeatRequest,
  HeartbeatResponse,
  RegisterHostRequest,
  ReportVirtualMachinesRequest,
  ReportVirtualMachinesResponse,
} from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { DiskFormat } from '../../services/gen/cowherd/common/v1/types.js';
import { Host, VirtualMachine_State, type Disk, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { DiskInspector } from '../../services/agent/hypervisor/disks.js';
import type { Capacity, HostFactsSource, HostRegistrationFacts } from '../../services/agent/host/host-facts.js';
import {
  LibvirtError,
  type DomainInfo,
  type EventWatch,
  type HypervisorFacts,
  type Libvirt,
  type LibvirtEvent,
} from '../../services/agent/hypervisor/libvirt.js';
import { createReporter, toVirtualMachine, type InventoryPort, type Reporter, type ReporterOptions } from '../../services/agent/host/reporter.js';
import { virtualMachineState } from '../../services/agent/hypervisor/domain-state.js';

const HOST = 'kvm-01';
const log = createLogger({ service: 'agent-test', level: 'silent' });

function grpcError(code: GrpcStatus, message: string): Error {
  return Object.assign(new Error(`${GrpcStatus[code]}: ${message}`), { code, details: message });
}

/** Inventory as the server keeps it: registration, heartbeats, reports applied to a map. */
class FakeInventory implements InventoryPort {
  readonly registrations: Array<{ at: number; host: Host }> = [];
  readonly heartbeats: Array<{ at: number; request: HeartbeatRequest }> = [];
  readonly reports: Array<{ at: number; request: ReportVirtualMachinesRequest }> = [];
  readonly machines = new Map<string, VirtualMachine>();
  registered = false;
  /** Registrations to refuse with UNAVAILABLE before accepting. */
  failRegistrations = 0;
  heartbeatIntervalMs = 10_000;

  async registerHost(request: RegisterHostRequest): Promise<Host> {
    if (this.failRegistrations > 0) {
      this.failRegistrations -= 1;
      throw grpcError(GrpcStatus.UNAVAILABLE, 'inventory restarting');
    }
    this.registrations.push({ at: performance.now(), host: request.host! });
    this.registered = true;
    return Host.fromPartial({ ...request.host, transferLimits: { uploadBytesPerSecond: '100', downloadBytesPerSecond: '0' } });
  }

  async heartbeat(request: HeartbeatRequest): Promise<HeartbeatResponse> {
    this.heartbeats.push({ at: performance.now(), request });
    if (!this.registered) throw grpcError(GrpcStatus.NOT_FOUND, `hosts/${HOST} not found`);
    return {
      heartbeatInterval: { seconds: String(Math.floor(this.heartbeatIntervalMs / 1000)), nanos: (this.heartbeatIntervalMs % 1000) * 1e6 },
      transferLimits: undefined,
    };
  }

  async reportVirtualMachines(request: ReportVirtualMachinesRequest): Promise<ReportVirtualMachinesResponse> {
    if (!this.registered) throw grpcError(GrpcStatus.NOT_FOUND, `hosts/${HOST} not found`);
    this.reports.push({ at: performance.now(), request });
    if (request.fullSnapshot) this.machines.clear();
    for (const name of request.removedVirtualMachines) this.machines.delete(name);
    for (const machine of request.virtualMachines) this.machines.set(machine.name, machine);
    return { changedCount: request.virtualMachines.length, removedCount: request.removedVirtualMachines.length, revision: '1' };
  }

  /** The inventory forgot the host (deleted, or its KV was reset). */
  forget(): void {
    this.registered = false;
    this.machines.clear();
  }
}

/** Domains in a map; events are emitted by the test. */
class FakeLibvirt implements Libvirt {
  readonly uri = 'test:///fake';
  readonly domains = new Map<string, DomainInfo>();
  reachable = true;
  domainReads = 0;
  private listener: ((event: LibvirtEvent) => void) | undefined;

  add(name: string, state: DomainInfo['state'] = 'shut off', uuid = crypto.randomUUID()): DomainInfo {
    const domain: DomainInfo = {
      name,
      uuid,
      state,
      domainType: 'qemu',
      vcpus: 1,
      memoryBytes: 64 * 1024 * 1024,
      disks: [{ target: 'vda', device: 'disk', type: 'file', sourcePath: `/images/${name}.qcow2`, format: 'qcow2' }],
    };
    this.domains.set(name, domain);
    return domain;
  }

  emit(domain: string, event = 'lifecycle', detail = 'Defined Added'): void {
    this.listener?.({ kind: 'domain', domain, event, detail });
  }

  reconnect(): void {
    this.listener?.({ kind: 'reconnected' });
  }

  private check(): void {
    if (!this.reachable) throw new LibvirtError('connection-failed', 'error: failed to connect to the hypervisor');
  }

  async listDomains(): Promise<DomainInfo[]> {
    this.check();
    return [...this.domains.values()];
  }

  async domain(nameOrUuid: string): Promise<DomainInfo> {
    this.check();
    this.domainReads += 1;
    const found = this.domains.get(nameOrUuid) ?? [...this.domains.values()].find((domain) => domain.uuid === nameOrUuid);
    if (!found) throw new LibvirtError('domain-not-found', `error: failed to get domain '${nameOrUuid}'`);
    return found;
  }

  async domainXml(): Promise<string> {
    throw new Error('not used');
  }

  async hypervisorFacts(): Promise<HypervisorFacts> {
    this.check();
    return {
      uri: this.uri,
      driver: 'QEMU',
      libraryVersion: '9.0.0',
      daemonVersion: '9.0.0',
      hypervisorName: 'QEMU',
      hypervisorVersion: '7.2.0',
      domainTypes: ['qemu'],
      osTypes: ['hvm'],
    };
  }

  async watchEvents(onEvent: (event: LibvirtEvent) => void): Promise<EventWatch> {
    this.check();
    this.listener = onEvent;
    return { stop: async () => void (this.listener = undefined) };
  }

  async define(): Promise<void> {}
  async start(): Promise<void> {}
  async destroy(): Promise<void> {}
  async undefine(): Promise<void> {}
}

const fakeDisks: DiskInspector = {
  inspect: async (disk) =>
    disk.type === 'file' && disk.sourcePath
      ? {
          target: disk.target,
          path: disk.sourcePath,
          persistent: false,
          format: DiskFormat.DISK_FORMAT_QCOW2,
          virtualSizeBytes: '1048576',
          allocatedBytes: '4096',
          backingChain: [{ path: '/images/base.raw', format: DiskFormat.DISK_FORMAT_RAW }],
        }
      : undefined,
};

function fakeFacts(libvirt: FakeLibvirt): HostFactsSource {
  const capacity = async (): Promise<Capacity> => ({ memoryFreeBytes: 1000, imageDirectoryFreeBytes: 2000, imageDirectoryTotalBytes: 3000 });
  return {
    capacity,
    registration: async (): Promise<HostRegistrationFacts> => {
      const reachable = await libvirt.hypervisorFacts().then(
        () => true,
        () => false,
      );
      return {
        libvirtReachable: reachable,
        hostname: `${HOST}.example.org`,
        hypervisor: reachable ? Hypervisor.HYPERVISOR_KVM : Hypervisor.HYPERVISOR_UNSPECIFIED,
        hypervisorDetail: reachable ? 'qemu 7.2.0 via libvirt 9.0.0, TCG' : 'libvirt unreachable',
        libvirtUri: libvirt.uri,
        agentEndpoint: `${HOST}:7445`,
        cpuCount: 2,
        memoryBytes: 4096,
        imageDirectory: '/images',
        agentVersion: '0.1.0',
        ...(await capacity()),
      };
    },
  };
}

async function waitFor(what: string, predicate: () => boolean, timeoutMs = 3_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!predicate()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

const reporters: Reporter[] = [];
afterEach(async () => {
  for (const reporter of reporters.splice(0)) await reporter.stop();
});

function setup(overrides: Partial<ReporterOptions> = {}): { inventory: FakeInventory; libvirt: FakeLibvirt; reporter: Reporter } {
  const inventory = new FakeInventory();
  const libvirt = new FakeLibvirt();
  const reporter = createReporter({
    host: HOST,
    inventory,
    libvirt,
    disks: fakeDisks,
    facts: fakeFacts(libvirt),
    log,
    initialRetryMs: 10,
    maxRetryMs: 40,
    debounceMs: 50,
    ...overrides,
  });
  reporters.push(reporter);
  return { inventory, libvirt, reporter };
}

test('registers with retries and backoff, then sends a full snapshot with every domain', async () => {
  const { inventory, libvirt, reporter } = setup();
  libvirt.add('web-1', 'running');
  libvirt.add('db-1', 'shut off');
  inventory.failRegistrations = 3;
  await reporter.start();
  await waitFor('a full snapshot', () => inventory.reports.length > 0);
  assert.equal(inventory.registrations.length, 1, 'one accepted registration after three refused ones');
  const registered = inventory.registrations[0]!.host;
  assert.equal(registered.name, `hosts/${HOST}`);
  assert.equal(registered.hypervisor, Hypervisor.HYPERVISOR_KVM);
  assert.equal(registered.agentEndpoint, `${HOST}:7445`);
  assert.equal(registered.memoryBytes, '4096');
  assert.equal(registered.imageDirectoryFreeBytes, '2000');
  const [snapshot] = inventory.reports;
  assert.equal(snapshot!.request.fullSnapshot, true);
  assert.equal(snapshot!.request.parent, `hosts/${HOST}`);
  assert.deepEqual(snapshot!.request.virtualMachines.map((machine) => machine.name).sort(), [
    `hosts/${HOST}/virtualMachines/db-1`,
    `hosts/${HOST}/virtualMachines/web-1`,
  ]);
  const web = snapshot!.request.virtualMachines.find((machine) => machine.domainName === 'web-1')!;
  assert.equal(web.state, VirtualMachine_State.STATE_RUNNING);
  assert.equal(web.memoryBytes, String(64 * 1024 * 1024));
  assert.equal(web.disks[0]!.backingChain.length, 1);
  assert.equal(web.managed, false);
  assert.equal(web.sourceImage, '');
});

test('heartbeats at the interval the server returns', async () => {
  const { inventory, reporter } = setup();
  inventory.heartbeatIntervalMs = 40;
  await reporter.start();
  await waitFor('the first heartbeat', () => inventory.heartbeats.length > 0);
  await sleep(400);
  const count = inventory.heartbeats.length;
  // 1 at once + about 10 in 400 ms; a default 10 s interval would give 1.
  assert.ok(count >= 4 && count <= 13, `expected ~11 heartbeats in 400 ms at 40 ms, got ${count}`);
  const gaps = inventory.heartbeats.slice(1).map((beat, index) => beat.at - inventory.heartbeats[index]!.at);
  assert.ok(Math.min(...gaps) >= 35, `heartbeats must keep the interval, gaps ${gaps.map((gap) => gap.toFixed(0)).join(',')}`);
  assert.equal(inventory.heartbeats[0]!.request.host, `hosts/${HOST}`);
  assert.equal(inventory.heartbeats[0]!.request.imageDirectoryTotalBytes, '3000');

  inventory.heartbeatIntervalMs = 200;
  await sleep(100);
  const before = inventory.heartbeats.length;
  await sleep(450);
  const slower = inventory.heartbeats.length - before;
  assert.ok(slower >= 1 && slower <= 3, `expected ~2 heartbeats in 450 ms at 200 ms, got ${slower}`);
});

test('re-registers and sends a new full snapshot when a heartbeat answers NOT_FOUND', async () => {
  const { inventory, libvirt, reporter } = setup();
  inventory.heartbeatIntervalMs = 30;
  libvirt.add('web-1');
  await reporter.start();
  await waitFor('the first snapshot', () => inventory.reports.length === 1);
  inventory.forget();
  await waitFor('a second registration', () => inventory.registrations.length === 2);
  await waitFor('a second full snapshot', () => inventory.reports.filter((report) => report.request.fullSnapshot).length === 2);
  assert.ok(inventory.machines.has(`hosts/${HOST}/virtualMachines/web-1`), 'the inventory knows the domain again');
  assert.ok(reporter.status().registered);
});

test('a libvirt event becomes one partial report within the debounce window; undefine reports a removal', async () => {
  const { inventory, libvirt, reporter } = setup({ debounceMs: 50 });
  libvirt.add('web-1');
  await reporter.start();
  await waitFor('the first snapshot', () => inventory.reports.length === 1);

  const begin = performance.now();
  libvirt.add('web-2', 'running');
  libvirt.emit('web-2', 'lifecycle', 'Defined Added');
  libvirt.emit('web-2', 'lifecycle', 'Resumed Unpaused');
  libvirt.emit('web-2', 'lifecycle', 'Started Booted');
  libvirt.emit('web-1', 'lifecycle', 'Started Booted');
  await waitFor('a partial report', () => inventory.reports.length === 2);
  const latency = performance.now() - begin;
  await sleep(100);
  assert.equal(inventory.reports.length, 2, 'four events coalesce into one report');
  const partial = inventory.reports[1]!.request;
  assert.equal(partial.fullSnapshot, false);
  assert.deepEqual(partial.virtualMachines.map((machine) => machine.domainName).sort(), ['web-1', 'web-2']);
  assert.deepEqual(partial.removedVirtualMachines, []);
  assert.ok(latency >= 45 && latency < 500, `report ${latency.toFixed(0)} ms after the first event (debounce 50 ms)`);

  libvirt.domains.delete('web-2');
  libvirt.emit('web-2', 'lifecycle', 'Undefined Removed');
  await waitFor('a removal', () => inventory.reports.length === 3);
  assert.deepEqual(inventory.reports[2]!.request.removedVirtualMachines, [`hosts/${HOST}/virtualMachines/web-2`]);
  assert.deepEqual(inventory.reports[2]!.request.virtualMachines, []);
  assert.ok(!inventory.machines.has(`hosts/${HOST}/virtualMachines/web-2`));

  // A domain that came and went before it was ever reported is nobody's business.
  libvirt.emit('flash', 'lifecycle', 'Undefined Removed');
  await sleep(120);
  assert.equal(inventory.reports.length, 3);
});

test('the periodic full snapshot removes domains that vanished without an event', async () => {
  const { inventory, libvirt, reporter } = setup({ fullSnapshotIntervalMs: 100 });
  libvirt.add('web-1');
  libvirt.add('web-2');
  await reporter.start();
  await waitFor('the first snapshot', () => inventory.machines.size === 2);
  libvirt.domains.delete('web-2');
  await waitFor('the next full snapshot', () => inventory.reports.filter((report) => report.request.fullSnapshot).length >= 2);
  assert.deepEqual([...inventory.machines.keys()], [`hosts/${HOST}/virtualMachines/web-1`]);
  assert.deepEqual([...reporter.status().reported.keys()], ['web-1']);
});

test('a reconnected event watch triggers a full snapshot', async () => {
  const { inventory, libvirt, reporter } = setup();
  await reporter.start();
  await waitFor('the first snapshot', () => inventory.reports.length === 1);
  libvirt.add('missed-while-disconnected');
  libvirt.reconnect();
  await waitFor('a second snapshot', () => inventory.reports.length === 2);
  assert.equal(inventory.reports[1]!.request.fullSnapshot, true);
  assert.ok(inventory.machines.has(`hosts/${HOST}/virtualMachines/missed-while-disconnected`));
});

test('registers without libvirt, never sends an empty snapshot, and registers again once libvirt answers', async () => {
  const { inventory, libvirt, reporter } = setup();
  libvirt.add('web-1');
  libvirt.reachable = false;
  await reporter.start();
  await waitFor('a registration', () => inventory.registrations.length === 1);
  assert.equal(inventory.registrations[0]!.host.hypervisor, Hypervisor.HYPERVISOR_UNSPECIFIED);
  await sleep(100);
  assert.equal(inventory.reports.length, 0, 'no snapshot while libvirt is down');
  libvirt.reachable = true;
  await waitFor('a second registration', () => inventory.registrations.length === 2);
  assert.equal(inventory.registrations[1]!.host.hypervisor, Hypervisor.HYPERVISOR_KVM);
  await waitFor('a snapshot', () => inventory.machines.size === 1);
});

test('a partial report that fails is retried with the same domains', async () => {
  const { inventory, libvirt, reporter } = setup();
  await reporter.start();
  await waitFor('the first snapshot', () => inventory.reports.length === 1);
  const original = inventory.reportVirtualMachines.bind(inventory);
  let failures = 2;
  inventory.reportVirtualMachines = async (request) => {
    if (failures-- > 0) throw grpcError(GrpcStatus.DEADLINE_EXCEEDED, 'slow');
    return original(request);
  };
  libvirt.add('web-3', 'paused');
  libvirt.emit('web-3', 'lifecycle', 'Suspended Paused');
  await waitFor('the retried report', () => inventory.machines.has(`hosts/${HOST}/virtualMachines/web-3`));
  assert.equal(inventory.machines.get(`hosts/${HOST}/virtualMachines/web-3`)!.state, VirtualMachine_State.STATE_PAUSED);
});

test('domain names that are not safe ids are reported under their UUID; states map to the API', () => {
  const uuid = '6695EB01-F6A4-8304-79AA-97F2502E193F';
  const disks: Disk[] = [];
  const machine = toVirtualMachine(HOST, { name: "it's a vm", uuid, state: 'pmsuspended', domainType: 'qemu', vcpus: 2, memoryBytes: 1024, disks: [] }, disks);
  assert.equal(machine.name, `hosts/${HOST}/virtualMachines/${uuid.toLowerCase()}`);
  assert.equal(machine.domainName, "it's a vm");
  assert.equal(machine.uuid, uuid.toLowerCase());
  assert.equal(machine.state, VirtualMachine_State.STATE_SUSPENDED);
  assert.equal(machine.vcpuCount, 2);
  assert.equal(
    toVirtualMachine(HOST, { name: 'web-1.example', uuid, state: 'running', domainType: 'qemu', vcpus: 1, memoryBytes: 1, disks: [] }, disks).name,
    `hosts/${HOST}/virtualMachines/web-1.example`,
  );
  assert.equal(virtualMachineState('shut off'), VirtualMachine_State.STATE_SHUT_OFF);
  assert.equal(virtualMachineState('crashed'), VirtualMachine_State.STATE_CRASHED);
  assert.equal(virtualMachineState('in shutdown'), VirtualMachine_State.STATE_OTHER);
  assert.equal(virtualMachineState('idle'), VirtualMachine_State.STATE_OTHER);
});
