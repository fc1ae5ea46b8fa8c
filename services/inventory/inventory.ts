/**
 * The inventory's domain logic: hosts register, heartbeat and report their VMs; the inventory marks
 * silent hosts UNREACHABLE and answers reads from in-memory indexes of the KV buckets `hosts`, `vms`,
 * `images` and `replicas`. Writes are compare-and-set, so any number of replicas may run side by side.
 */
import type { JetStreamClient } from '@nats-io/jetstream';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { Host, Host_State, Image, ImageReplica, VirtualMachine, VirtualMachineChange_Type } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/errors.js';
import { HOST_DELETED, HOST_READY, HOST_UNREACHABLE, VIRTUAL_MACHINE_CHANGED } from '../common/event-types.js';
import type { EventPublisher } from '../common/events.js';
import { KvStore, protoCodec } from '../common/kv.js';
import type { Logger } from '../common/logger.js';
import { HOST_ID, VIRTUAL_MACHINE_ID } from '../common/resource-names.js';
import { ResourceIndex } from './resource-index.js';

/** Timing of heartbeats. */
export interface HeartbeatPolicy {
  /** What agents are told to use. Default 10 s. */
  readonly intervalSeconds: number;
  /** Missed intervals before a host is UNREACHABLE. Default 3. */
  readonly missedIntervals: number;
}

/** KV key of a VM: `<host>.<vm id with dots as '='>` ('=' never occurs in an id; dots would split the key). */
export function vmKey(host: string, vmId: string): string {
  return `${host}.${vmId.replace(/\./g, '=')}`;
}

/** Parses `hosts/{host}/virtualMachines/{vm}`; undefined when malformed. */
export function parseVmName(name: string): { host: string; vm: string } | undefined {
  const match = /^hosts\/([^/]+)\/virtualMachines\/([^/]+)$/.exec(name);
  if (!match || !HOST_ID.test(match[1]!) || !VIRTUAL_MACHINE_ID.test(match[2]!)) return undefined;
  return { host: match[1]!, vm: match[2]! };
}

/** The `{host}` of `hosts/{host}`, or INVALID_ARGUMENT naming `field`. */
export function hostIdOf(name: string, field: string): string {
  const match = /^hosts\/([^/]+)$/.exec(name);
  if (!match || !HOST_ID.test(match[1]!)) throw CowherdError.invalidArgument(field, 'must be hosts/{host} with {host} an RFC 1123 label');
  return match[1]!;
}

/** The inventory. */
export class Inventory {
  private monitor: NodeJS.Timeout | undefined;

  private constructor(
    readonly hosts: ResourceIndex<Host>,
    readonly vms: ResourceIndex<VirtualMachine>,
    readonly images: ResourceIndex<Image>,
    readonly replicas: ResourceIndex<ImageReplica>,
    private readonly events: EventPublisher,
    private readonly log: Logger,
    readonly heartbeat: HeartbeatPolicy,
  ) {}

  /** Opens the buckets and loads the indexes. */
  static async open(js: JetStreamClient, events: EventPublisher, log: Logger, heartbeat: HeartbeatPolicy): Promise<Inventory> {
    const [hosts, vms, images, replicas] = await Promise.all([
      KvStore.open(js, 'hosts', protoCodec(Host)).then((store) => ResourceIndex.open(store)),
      KvStore.open(js, 'vms', protoCodec(VirtualMachine)).then((store) => ResourceIndex.open(store)),
      KvStore.open(js, 'images', protoCodec(Image)).then((store) => ResourceIndex.open(store)),
      KvStore.open(js, 'replicas', protoCodec(ImageReplica)).then((store) => ResourceIndex.open(store)),
    ]);
    return new Inventory(hosts, vms, images, replicas, events, log, heartbeat);
  }

  /** Creates or refreshes the caller's host record from its agent's facts; keeps admin-owned fields. */
  async registerHost(reported: Host): Promise<Host> {
    const host = hostIdOf(reported.name, 'host.name');
    const now = new Date();
    let previousState = Host_State.STATE_UNSPECIFIED as Host_State;
    const stored = await this.hosts.write(host, (current) => {
      previousState = current?.state ?? Host_State.STATE_UNSPECIFIED;
      const draining = current?.draining ?? false;
      return Host.fromPartial({
        ...reported,
        name: `hosts/${host}`,
        state: draining ? Host_State.STATE_DRAINING : Host_State.STATE_READY,
        labels: current?.labels ?? {},
        transferLimits: current?.transferLimits,
        draining,
        enrollTime: current?.enrollTime ?? now,
        lastHeartbeatTime: now,
        updateTime: now,
      });
    });
    if (previousState !== Host_State.STATE_READY && stored!.state === Host_State.STATE_READY) {
      await this.events.publish(HOST_READY, { host: `hosts/${host}`, hypervisor: stored!.hypervisor, agentVersion: stored!.agentVersion, previousState, occurTime: now }, { host, id: `host.ready/${host}/${now.getTime()}` });
    }
    this.log.info({ host, previousState: Host_State[previousState] }, 'host registered');
    return stored!;
  }

  /** Records a heartbeat; NOT_FOUND when the host is not registered (the agent then registers). */
  async recordHeartbeat(host: string, capacity: { memoryFreeBytes: string; imageDirectoryFreeBytes: string; imageDirectoryTotalBytes: string }): Promise<Host> {
    const now = new Date();
    let previousState = Host_State.STATE_UNSPECIFIED as Host_State;
    const stored = await this.hosts.write(host, (current) => {
      if (!current) throw CowherdError.notFound(`hosts/${host}`);
      previousState = current.state;
      return {
        ...current,
        ...capacity,
        state: current.draining ? Host_State.STATE_DRAINING : Host_State.STATE_READY,
        lastHeartbeatTime: now,
      };
    });
    if (previousState === Host_State.STATE_UNREACHABLE && stored!.state === Host_State.STATE_READY) {
      this.log.info({ host }, 'host is back');
      await this.events.publish(HOST_READY, { host: `hosts/${host}`, hypervisor: stored!.hypervisor, agentVersion: stored!.agentVersion, previousState, occurTime: now }, { host, id: `host.ready/${host}/${now.getTime()}` });
    }
    return stored!;
  }

  /** Starts marking hosts UNREACHABLE after the missed intervals (every replica checks; CAS makes it once). */
  startMonitor(): void {
    const check = async (): Promise<void> => {
      const deadline = Date.now() - this.heartbeat.intervalSeconds * this.heartbeat.missedIntervals * 1000;
      for (const key of this.hosts.keys()) {
        const host = this.hosts.get(key)?.value;
        if (!host || host.state === Host_State.STATE_UNREACHABLE || (host.lastHeartbeatTime?.getTime() ?? 0) > deadline) continue;
        let marked = false;
        await this.hosts.write(key, (current) => {
          if (!current || current.state === Host_State.STATE_UNREACHABLE || (current.lastHeartbeatTime?.getTime() ?? 0) > deadline) return undefined;
          marked = true;
          return { ...current, state: Host_State.STATE_UNREACHABLE, updateTime: new Date() };
        });
        if (marked) {
          this.log.warn({ host: key, lastHeartbeatTime: host.lastHeartbeatTime }, 'host unreachable: heartbeats stopped');
          await this.events.publish(HOST_UNREACHABLE, { host: `hosts/${key}`, lastHeartbeatTime: host.lastHeartbeatTime, occurTime: new Date() }, { host: key, id: `host.unreachable/${key}/${host.lastHeartbeatTime?.getTime() ?? 0}` });
        }
      }
    };
    const loop = (): void => {
      this.monitor = setTimeout(() => void check().catch((error: unknown) => this.log.warn({ err: error }, 'heartbeat check failed')).finally(loop), Math.max(200, (this.heartbeat.intervalSeconds * 1000) / 2));
    };
    loop();
  }

  /**
   * Applies an agent's report: a full snapshot replaces the host's set, otherwise upserts and removals.
   * Unchanged VMs are not rewritten. Every change is published as vm.changed.
   */
  async reportVirtualMachines(host: string, reported: readonly VirtualMachine[], fullSnapshot: boolean, removed: readonly string[]): Promise<{ changed: number; removed: number }> {
    if (!this.hosts.get(host)) throw CowherdError.notFound(`hosts/${host}`);
    const incoming = new Map<string, VirtualMachine>();
    reported.forEach((vm, index) => {
      const parsed = parseVmName(vm.name);
      if (!parsed) throw CowherdError.invalidArgument(`virtual_machines[${index}].name`, 'must be hosts/{host}/virtualMachines/{vm} with a domain name of [A-Za-z0-9._-] or a UUID');
      if (parsed.host !== host) throw CowherdError.permissionDenied(`virtual_machines[${index}] belongs to hosts/${parsed.host}, not to the caller's host`, ErrorReason.ERROR_REASON_HOST_MISMATCH);
      incoming.set(vmKey(host, parsed.vm), vm);
    });
    const toRemove = new Set<string>();
    removed.forEach((name, index) => {
      const parsed = parseVmName(name);
      if (!parsed) throw CowherdError.invalidArgument(`removed_virtual_machines[${index}]`, 'must be hosts/{host}/virtualMachines/{vm}');
      if (parsed.host !== host) throw CowherdError.permissionDenied(`removed_virtual_machines[${index}] belongs to another host`, ErrorReason.ERROR_REASON_HOST_MISMATCH);
      toRemove.add(vmKey(host, parsed.vm));
    });
    if (fullSnapshot) for (const { key } of this.vms.valuesWithPrefix(`${host}.`)) if (!incoming.has(key)) toRemove.add(key);

    const now = new Date();
    const published: Array<Promise<unknown>> = [];
    let changed = 0;
    const writes: Array<() => Promise<void>> = [];
    for (const [key, vm] of incoming) {
      const current = this.vms.get(key)?.value;
      const next = VirtualMachine.fromPartial({
        ...vm,
        host: `hosts/${host}`,
        // Fields the agent does not own survive its reports.
        sourceImage: vm.sourceImage || current?.sourceImage || '',
        lineage: vm.lineage ?? current?.lineage,
        managed: vm.managed || (current?.managed ?? false),
        dependentVirtualMachines: current?.dependentVirtualMachines ?? [],
        createTime: current?.createTime ?? now,
        updateTime: now,
      });
      if (current && sameReportedState(current, next)) continue;
      changed++;
      writes.push(async () => {
        const written = await this.vms.replace(key, next);
        published.push(this.publishChange(host, current ? VirtualMachineChange_Type.TYPE_MODIFIED : VirtualMachineChange_Type.TYPE_ADDED, written, key));
      });
    }
    await runLimited(writes, 32);
    let removedCount = 0;
    for (const key of toRemove) {
      const current = this.vms.get(key)?.value;
      if (!current) continue;
      await this.vms.remove(key);
      removedCount++;
      published.push(this.publishChange(host, VirtualMachineChange_Type.TYPE_REMOVED, current, key));
    }
    await Promise.all(published);
    return { changed, removed: removedCount };
  }

  /** Deletes a host and its records; refused while managed VMs exist unless forced. */
  async deleteHost(host: string, force: boolean): Promise<void> {
    if (!this.hosts.get(host)) throw CowherdError.notFound(`hosts/${host}`);
    const vms = this.vms.valuesWithPrefix(`${host}.`);
    const managed = vms.filter((entry) => entry.value.managed).map((entry) => entry.value.name);
    if (managed.length > 0 && !force) {
      throw CowherdError.failedPrecondition(`hosts/${host} still has ${managed.length} cowherd-managed virtual machines; delete them or use force`, ErrorReason.ERROR_REASON_HOST_NOT_EMPTY, { dependents: managed.slice(0, 20).join(',') });
    }
    for (const { key } of vms) await this.vms.remove(key);
    for (const { key } of this.replicas.valuesWithPrefix(`${host}.`)) await this.replicas.remove(key);
    await this.hosts.remove(host);
    await this.events.publish(HOST_DELETED, { host: `hosts/${host}`, forced: force, occurTime: new Date() }, { host, id: `host.deleted/${host}/${Date.now()}` });
    this.log.warn({ host, force, virtualMachines: vms.length }, 'host deleted');
  }

  stop(): void {
    clearTimeout(this.monitor);
    for (const index of [this.hosts, this.vms, this.images, this.replicas]) index.stop();
  }

  private publishChange(host: string, type: VirtualMachineChange_Type, vm: VirtualMachine, key: string): Promise<unknown> {
    const revision = this.vms.get(key)?.revision ?? 0;
    return this.events
      .publish(VIRTUAL_MACHINE_CHANGED, { type, virtualMachine: vm, revision: String(revision), occurTime: new Date() }, { host, id: `vm.changed/${key}/${type}/${revision}/${Date.now()}` })
      .catch((error: unknown) => this.log.warn({ err: error, vm: vm.name }, 'vm.changed not published'));
  }
}

/** True when nothing the agent reports differs (timestamps aside). */
function sameReportedState(a: VirtualMachine, b: VirtualMachine): boolean {
  const strip = (vm: VirtualMachine): Uint8Array => VirtualMachine.encode({ ...vm, createTime: undefined, updateTime: undefined }).finish();
  return Buffer.from(strip(a)).equals(Buffer.from(strip(b)));
}

/** Runs the tasks with at most `limit` at a time; rejects with the first failure after all settle. */
async function runLimited(tasks: ReadonlyArray<() => Promise<void>>, limit: number): Promise<void> {
  let next = 0;
  const errors: unknown[] = [];
  const worker = async (): Promise<void> => {
    while (next < tasks.length) {
      const task = tasks[next++]!;
      await task().catch((error: unknown) => void errors.push(error));
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
  if (errors.length > 0) throw errors[0];
}
