/**
 * The inventory's domain logic: hosts register, heartbeat and report their VMs; the inventory marks
 * silent hosts UNREACHABLE and answers reads from in-memory indexes of the KV buckets `hosts`, `vms`,
 * `images`, `image-heads` (read only: the distribution service writes it) and `replicas`. Writes are
 * compare-and-set, so any number of replicas may run side by side.
 */
import type { JetStreamClient } from '@nats-io/jetstream';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { Host, Host_State, Image, ImageHead, ImageReplica, VirtualMachine, VirtualMachineChange_Type } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import { HOST_DELETED, HOST_READY, HOST_UNREACHABLE, VIRTUAL_MACHINE_CHANGED } from '../common/domain/event-types.js';
import type { EventPublisher } from '../common/platform/events.js';
import { KvStore, protoCodec } from '../common/platform/kv.js';
import type { Logger } from '../common/platform/logger.js';
import { IMAGE_HEADS_BUCKET } from '../common/domain/image-versions.js';
import { HOST_NAME, IMAGE_NAME, parseImageKey, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';
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

/**
 * The resource name a VM key stands for. The VM index is ordered by these names, not by its keys: '='
 * sorts after digits and '.' before them, so `vm-00.web` (key `vm-00=web`) comes before `vm-000` by name
 * and after it by key, and lists are ordered by resource name.
 */
export function vmNameOfKey(key: string): string {
  const dot = key.indexOf('.');
  return VIRTUAL_MACHINE_NAME.format({ host: key.slice(0, dot), virtualMachine: key.slice(dot + 1).replace(/=/g, '.') });
}

/** The prefix of the names of one host's VMs in the VM index (every host's: '' ). */
export function vmNamePrefix(host: string | undefined): string {
  return host === undefined ? '' : `${HOST_NAME.format({ host })}/virtualMachines/`;
}

/** Parses `hosts/{host}/virtualMachines/{vm}`; undefined when malformed. */
export function parseVmName(name: string): { host: string; vm: string } | undefined {
  const parsed = VIRTUAL_MACHINE_NAME.parse(name);
  return parsed && { host: parsed.host, vm: parsed.virtualMachine };
}

/** The `{host}` of `hosts/{host}`, or INVALID_ARGUMENT naming `field`. */
export function hostIdOf(name: string, field: string): string {
  const parsed = HOST_NAME.parse(name);
  if (!parsed) throw CowherdError.invalidArgument(field, 'must be hosts/{host} with {host} an RFC 1123 label');
  return parsed.host;
}

/** The inventory. */
export class Inventory {
  private monitor: NodeJS.Timeout | undefined;

  private constructor(
    readonly hosts: ResourceIndex<Host>,
    readonly vms: ResourceIndex<VirtualMachine>,
    readonly images: ResourceIndex<Image>,
    readonly imageHeads: ResourceIndex<ImageHead>,
    readonly replicas: ResourceIndex<ImageReplica>,
    private readonly events: EventPublisher,
    private readonly log: Logger,
    readonly heartbeat: HeartbeatPolicy,
  ) {}

  /** Opens the buckets and loads the indexes. */
  static async open(js: JetStreamClient, events: EventPublisher, log: Logger, heartbeat: HeartbeatPolicy): Promise<Inventory> {
    const indexLog = log.child({ component: 'resource-index' });
    const [hosts, vms, images, imageHeads, replicas] = await Promise.all([
      KvStore.open(js, 'hosts', protoCodec(Host)).then((store) => ResourceIndex.open(store, { log: indexLog })),
      KvStore.open(js, 'vms', protoCodec(VirtualMachine)).then((store) => ResourceIndex.open(store, { orderOf: vmNameOfKey, log: indexLog })),
      KvStore.open(js, 'images', protoCodec(Image)).then((store) => ResourceIndex.open(store, { log: indexLog })),
      KvStore.open(js, IMAGE_HEADS_BUCKET, protoCodec(ImageHead)).then((store) => ResourceIndex.open(store, { log: indexLog })),
      KvStore.open(js, 'replicas', protoCodec(ImageReplica)).then((store) => ResourceIndex.open(store, { log: indexLog })),
    ]);
    return new Inventory(hosts, vms, images, imageHeads, replicas, events, log, heartbeat);
  }

  /**
   * The catalog records of every version of image `id` (keys `id` and `id_v<n>`), named by their storage keys
   * (IMAGE_NAME), from memory. Empty when the image does not exist.
   */
  imageRecords(id: string): Image[] {
    const records: Image[] = [];
    const first = this.images.get(id);
    if (first) records.push(recordNamed(id, first.value));
    for (const { key, value } of this.images.valuesWithPrefix(`${id}_v`)) if (parseImageKey(key)?.id === id) records.push(recordNamed(key, value));
    return records;
  }

  /** Every image id's records (see {@link imageRecords}), by image id. */
  imageRecordsById(): Map<string, Image[]> {
    const byId = new Map<string, Image[]>();
    for (const { key, value } of this.images.valuesWithPrefix('')) {
      const parsed = parseImageKey(key);
      if (!parsed) continue;
      const records = byId.get(parsed.id) ?? [];
      records.push(recordNamed(key, value));
      byId.set(parsed.id, records);
    }
    return byId;
  }

  /** The ImageHead of image `id`; undefined when it has none (then its single version is 1). */
  imageHead(id: string): ImageHead | undefined {
    return this.imageHeads.get(id)?.value;
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
        name: HOST_NAME.format({ host }),
        state: draining ? Host_State.STATE_DRAINING : Host_State.STATE_READY,
        labels: current?.labels ?? {},
        transferLimits: current?.transferLimits,
        imageDirectoryHighWatermarkPercent: current?.imageDirectoryHighWatermarkPercent ?? 0,
        draining,
        enrollTime: current?.enrollTime ?? now,
        lastHeartbeatTime: now,
        updateTime: now,
      });
    });
    if (previousState !== Host_State.STATE_READY && stored!.state === Host_State.STATE_READY) {
      await this.events.publish(
        HOST_READY,
        { host: HOST_NAME.format({ host }), hypervisor: stored!.hypervisor, agentVersion: stored!.agentVersion, previousState, occurTime: now },
        { host, id: `host.ready/${host}/${now.getTime()}` },
      );
    }
    this.log.info({ host, previousState: Host_State[previousState] }, 'host registered');
    return stored!;
  }

  /** Records a heartbeat; NOT_FOUND when the host is not registered (the agent then registers). */
  async recordHeartbeat(host: string, capacity: { memoryFreeBytes: string; imageDirectoryFreeBytes: string; imageDirectoryTotalBytes: string }): Promise<Host> {
    const now = new Date();
    let previousState = Host_State.STATE_UNSPECIFIED as Host_State;
    const stored = await this.hosts.write(host, (current) => {
      if (!current) throw CowherdError.notFound(HOST_NAME.format({ host }));
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
      await this.events.publish(
        HOST_READY,
        { host: HOST_NAME.format({ host }), hypervisor: stored!.hypervisor, agentVersion: stored!.agentVersion, previousState, occurTime: now },
        { host, id: `host.ready/${host}/${now.getTime()}` },
      );
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
          await this.events.publish(
            HOST_UNREACHABLE,
            { host: HOST_NAME.format({ host: key }), lastHeartbeatTime: host.lastHeartbeatTime, occurTime: new Date() },
            { host: key, id: `host.unreachable/${key}/${host.lastHeartbeatTime?.getTime() ?? 0}` },
          );
        }
      }
      await this.collectOrphans();
    };
    const loop = (): void => {
      this.monitor = setTimeout(
        () =>
          void check()
            .catch((error: unknown) => this.log.warn({ err: error }, 'heartbeat check failed'))
            .finally(loop),
        Math.max(200, (this.heartbeat.intervalSeconds * 1000) / 2),
      );
    };
    loop();
  }

  /**
   * Applies an agent's report: a full snapshot replaces the host's set, otherwise upserts and removals.
   * Unchanged VMs are not rewritten. Every change is published as vm.changed.
   *
   * Safe against other replicas: the report is decided on an index that holds every write accepted before
   * it (the host's previous report may have gone to another replica), each write is a compare-and-set that
   * decides again on a newer value, and after writing, the host is looked up in KV once more. If it was
   * deleted meanwhile (DeleteHost on another replica), this report takes back what it wrote and answers
   * NOT_FOUND; DeleteHost removes everything written before it, so no VM outlives its host.
   */
  async reportVirtualMachines(
    host: string,
    reported: readonly VirtualMachine[],
    fullSnapshot: boolean,
    removed: readonly string[],
  ): Promise<{ changed: number; removed: number }> {
    // Everything is checked before anything is written: a refused report changes nothing.
    const incoming = new Map<string, VirtualMachine>();
    reported.forEach((vm, index) => {
      const parsed = parseVmName(vm.name);
      if (!parsed)
        throw CowherdError.invalidArgument(
          `virtual_machines[${index}].name`,
          'must be hosts/{host}/virtualMachines/{vm} with a domain name of [A-Za-z0-9._-] or a UUID',
        );
      if (parsed.host !== host)
        throw CowherdError.permissionDenied(
          `virtual_machines[${index}] belongs to ${HOST_NAME.format({ host: parsed.host })}, not to the caller's host`,
          ErrorReason.ERROR_REASON_HOST_MISMATCH,
        );
      incoming.set(vmKey(host, parsed.vm), vm);
    });
    const toRemove = new Set<string>();
    removed.forEach((name, index) => {
      const parsed = parseVmName(name);
      if (!parsed)
        throw CowherdError.invalidArgument(
          `removed_virtual_machines[${index}]`,
          'must be hosts/{host}/virtualMachines/{vm} with a domain name of [A-Za-z0-9._-] or a UUID',
        );
      if (parsed.host !== host)
        throw CowherdError.permissionDenied(
          `removed_virtual_machines[${index}] belongs to ${HOST_NAME.format({ host: parsed.host })}, not to the caller's host`,
          ErrorReason.ERROR_REASON_HOST_MISMATCH,
        );
      toRemove.add(vmKey(host, parsed.vm));
    });
    await this.requireHost(host);
    await this.vms.sync();
    if (fullSnapshot) for (const { key } of this.vms.valuesWithPrefix(vmNamePrefix(host))) if (!incoming.has(key)) toRemove.add(key);

    const now = new Date();
    const published: Array<Promise<unknown>> = [];
    const written: Array<{ key: string; revision: number; value: VirtualMachine }> = [];
    const writes: Array<() => Promise<void>> = [];
    for (const [key, vm] of incoming) {
      writes.push(async () => {
        const result = await this.vms.replace(key, (current) => {
          const next = VirtualMachine.fromPartial({
            ...vm,
            host: HOST_NAME.format({ host }),
            // Fields the agent does not own survive its reports.
            sourceImage: vm.sourceImage || current?.sourceImage || '',
            sourceImageVersion: vm.sourceImageVersion || vm.lineage?.imageVersion || current?.sourceImageVersion || '',
            lineage: vm.lineage ?? current?.lineage,
            managed: vm.managed || (current?.managed ?? false),
            dependentVirtualMachines: current?.dependentVirtualMachines ?? [],
            createTime: current?.createTime ?? now,
            updateTime: now,
          });
          return current && sameReportedState(current, next) ? undefined : next;
        });
        if (!result.written) return;
        written.push({ key, revision: result.revision, value: result.value! });
        published.push(
          this.publishChange(
            host,
            result.previous ? VirtualMachineChange_Type.TYPE_MODIFIED : VirtualMachineChange_Type.TYPE_ADDED,
            result.value!,
            key,
            result.revision,
          ),
        );
      });
    }
    await runLimited(writes, 32);
    let removedCount = 0;
    for (const key of toRemove) {
      let gone: VirtualMachine | undefined;
      // The agent's word on existence is final: whatever the record became meanwhile, it goes.
      const removedNow = await this.vms.removeWhile(key, (current) => {
        gone = current;
        return true;
      });
      if (!removedNow || !gone) continue;
      removedCount++;
      published.push(this.publishChange(host, VirtualMachineChange_Type.TYPE_REMOVED, gone, key, this.vms.get(key)?.revision ?? 0));
    }

    if (!(await this.hosts.store.get(host))) {
      // Deleted while this report was being written: take back exactly what this report wrote (a newer
      // write of the same key is its writer's to take back), and tell the agent.
      await Promise.all(
        written.map(async ({ key, revision, value }) => {
          if (await this.vms.remove(key, revision)) published.push(this.publishChange(host, VirtualMachineChange_Type.TYPE_REMOVED, value, key, revision + 1));
        }),
      );
      this.log.warn({ host, virtualMachines: written.length }, 'host deleted during a report; its writes were taken back');
      await Promise.all(published);
      throw CowherdError.notFound(HOST_NAME.format({ host }));
    }
    await Promise.all(published);
    return { changed: written.length, removed: removedCount };
  }

  /**
   * Deletes a host and its records; refused while managed VMs exist unless forced. The host record goes
   * first (compare-and-set), then every VM and replica record written before that: a report racing the
   * deletion on another replica finds the host gone after its writes and takes them back itself.
   */
  async deleteHost(host: string, force: boolean): Promise<void> {
    await this.vms.sync();
    for (let attempt = 0; ; attempt++) {
      const current = await this.hosts.store.get(host);
      if (!current) throw CowherdError.notFound(HOST_NAME.format({ host }));
      const managed = this.vms
        .valuesWithPrefix(vmNamePrefix(host))
        .filter((entry) => entry.value.managed)
        .map((entry) => entry.value.name);
      if (managed.length > 0 && !force) {
        throw CowherdError.failedPrecondition(
          `${HOST_NAME.format({ host })} still has ${managed.length} cowherd-managed virtual machines; delete them or use force`,
          ErrorReason.ERROR_REASON_HOST_NOT_EMPTY,
          { dependents: managed.slice(0, 20).join(',') },
        );
      }
      // A heartbeat or registration in between changes the revision: decide again on the newer record.
      if (await this.hosts.remove(host, current.revision)) break;
      if (attempt >= 20) throw new Error(`${HOST_NAME.format({ host })} kept changing while being deleted`);
    }
    const removed = await this.removeRecordsOf(host);
    await this.events.publish(
      HOST_DELETED,
      { host: HOST_NAME.format({ host }), forced: force, occurTime: new Date() },
      { host, id: `host.deleted/${host}/${Date.now()}` },
    );
    this.log.warn({ host, force, virtualMachines: removed }, 'host deleted');
  }

  /** Removes the VM and replica records of a host that no longer exists; returns how many VMs. */
  private async removeRecordsOf(host: string): Promise<number> {
    // Everything written before this point is in the index; a write after it comes from a report that
    // checks the host after writing, so that report takes it back.
    await Promise.all([this.vms.sync(), this.replicas.sync()]);
    let removed = 0;
    const tasks = this.vms.valuesWithPrefix(vmNamePrefix(host)).map(({ key, value }) => async () => {
      if (!(await this.vms.remove(key))) return;
      removed++;
      await this.publishChange(host, VirtualMachineChange_Type.TYPE_REMOVED, value, key, this.vms.get(key)?.revision ?? 0);
    });
    await runLimited(tasks, 16);
    // Replica records are written by distribution, which does not look for the host afterwards: they go
    // whatever they became meanwhile.
    await runLimited(
      this.replicas.valuesWithPrefix(`${host}.`).map(
        ({ key }) =>
          async () =>
            void (await this.replicas.removeWhile(key, () => true)),
      ),
      16,
    );
    return removed;
  }

  /**
   * Removes VM records whose host record is gone and that nobody wrote for `minimumAgeMs`: what a
   * DeleteHost left behind when its replica died between deleting the host and its records. A host record
   * exists before its first VM record (reports need it), so such a VM is an orphan. (Fresh ones are left to
   * the report and the DeleteHost that race: they clean up after themselves.)
   */
  async collectOrphans(minimumAgeMs = 60_000): Promise<number> {
    const cutoff = Date.now() - minimumAgeMs;
    const hosts = new Set<string>();
    for (const key of this.vms.keys()) {
      const host = key.slice(0, key.indexOf('.'));
      if (!this.hosts.get(host) && (this.vms.get(key)?.value.updateTime?.getTime() ?? 0) < cutoff) hosts.add(host);
    }
    let removed = 0;
    for (const host of hosts) {
      await this.hosts.sync();
      if (this.hosts.get(host) || (await this.hosts.store.get(host))) continue;
      const count = await this.removeRecordsOf(host);
      removed += count;
      this.log.warn({ host, virtualMachines: count }, 'removed the records a deletion of the host left behind');
    }
    return removed;
  }

  /** NOT_FOUND unless the host is registered (looked up in KV too when this replica has not seen it yet). */
  async requireHost(host: string): Promise<void> {
    if (this.hosts.get(host)) return;
    await this.hosts.sync();
    if (!this.hosts.get(host)) throw CowherdError.notFound(HOST_NAME.format({ host }));
  }

  stop(): void {
    clearTimeout(this.monitor);
    for (const index of [this.hosts, this.vms, this.images, this.imageHeads, this.replicas]) index.stop();
  }

  private publishChange(host: string, type: VirtualMachineChange_Type, vm: VirtualMachine, key: string, revision: number): Promise<unknown> {
    return this.events
      .publish(
        VIRTUAL_MACHINE_CHANGED,
        { type, virtualMachine: vm, revision: String(revision), occurTime: new Date() },
        { host, id: `vm.changed/${key}/${type}/${revision}/${Date.now()}` },
      )
      .catch((error: unknown) => this.log.warn({ err: error, vm: vm.name }, 'vm.changed not published'));
  }
}

/** A catalog record named by its storage key, whatever name it was stored with (the key is its identity). */
function recordNamed(key: string, record: Image): Image {
  const name = IMAGE_NAME.format({ image: key });
  return record.name === name ? record : { ...record, name };
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
