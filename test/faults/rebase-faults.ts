/**
 * Rebase faults: a RebaseVirtualMachines (recompose) of ten clones on two hosts, from version 1 of a fresh image
 * onto version 2, with a fault in the middle: the agent of one host SIGKILLed and started again, or the cloning
 * service SIGKILLed and started again, right after the canary moved. Invariants, until they hold or the bound
 * passes:
 *
 * 1. the rebase operation terminates and (these faults are absorbed) succeeds, every clone's result OK;
 * 2. every clone stands on exactly one version, and consistently: the inventory's lineage.image_version, the
 *    clone's system-disk overlay's backing file (qemu-img info) and the replica directory of that version agree;
 *    after success every clone is on version 2, its UUID unchanged;
 * 3. `clone.rebased` is in the event stream exactly once per clone (a retried move publishes no second one);
 * 4. no base changed: both versions' replica disks hash as before the row.
 *
 * The JSON line has the same keys as the other rows.
 */
import { CLONE_REBASED } from '../../services/common/domain/event-types.js';
import { unpack } from '../../services/common/domain/operations.js';
import { EVERY_HOST, HOST_NAME, imageKey, imageVersionName, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';
import { EVENT_STREAM } from '../../services/common/platform/events.js';
import { readAllPages } from '../../services/common/platform/list-pages.js';
import {
  CloneResult_State,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
  RebaseVirtualMachinesMetadata,
  RebaseVirtualMachinesResponse,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import type { VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { ORIGIN, type FaultFleet } from './fleet.js';
import { backingFile, describeStatus, RECOVERY_BOUND_SECONDS, Rpc, sha256, sleep, waitDone, type RowResult, type SuiteState } from './row.js';

/** The second host of the rebase rows' clones. */
const OTHER = 'recv1';
const CLONES = 10;
const DOWN_MS = 3_000;

/** A fault that hits a rebase. */
export interface RebaseFaultRow {
  readonly fault: string;
  /** Runs once the canary moved; resolves with the time (ms) the fault ended. */
  readonly inject: (fleet: FaultFleet, note: (text: string) => void) => Promise<number>;
}

export const REBASE_FAULTS: readonly RebaseFaultRow[] = [
  {
    fault: 'agent-kill-during-rebase',
    inject: async (fleet, note) => {
      const agent = fleet.agents.get(OTHER)!;
      note(`SIGKILL agent ${OTHER} (pid ${agent.daemon?.pid})`);
      await agent.kill();
      await sleep(DOWN_MS);
      await agent.start();
      note(`agent ${OTHER} started again`);
      return Date.now();
    },
  },
  {
    fault: 'cloning-kill-during-rebase',
    inject: async (fleet, note) => {
      note(`SIGKILL cloning (pid ${fleet.cloning.process?.daemon.pid})`);
      await fleet.cloning.kill();
      await sleep(DOWN_MS);
      await fleet.cloning.start();
      note('cloning started again');
      return Date.now();
    },
  },
];

/** Runs one rebase row; throws only for the suite's own failures (the work could not even be set up). */
export async function runRebaseRow(fleet: FaultFleet, state: SuiteState, row: RebaseFaultRow): Promise<RowResult> {
  const index = ++state.rowIndex;
  const rpc = new Rpc();
  const note = (text: string): void => fleet.say(`${row.fault}: ${text}`);
  const { clients } = fleet;
  const image = `${fleet.runId}-rb${index}`;
  const prefix = `${fleet.runId}-rb${index}-`;
  const v1 = imageVersionName(image, 1);
  const v2 = imageVersionName(image, 2);

  // Set-up, without a fault: version 1, ten clones on two hosts, version 2.
  const publish = async (): Promise<void> => {
    const operation = await rpc.call<Operation>('PublishImage', (cb) =>
      clients.distribution.publishImage(
        { imageId: image, sourceVirtualMachine: fleet.masterVm, description: `fault suite: ${row.fault}`, labels: {}, requestId: '' },
        cb,
      ),
    );
    const done = await waitDone(rpc, fleet, operation.name, 'distribution', Date.now() + 120_000);
    if (done?.result?.$case !== 'response') throw new Error(`${row.fault}: publishing ${image} failed: ${JSON.stringify(done?.result ?? 'no answer')}`);
  };
  await publish();
  const clone = await rpc.call<Operation>('CloneVirtualMachines', (cb) =>
    clients.cloning.cloneVirtualMachines(
      {
        dataDiskBytes: String(4 * 1024 * 1024),
        guestConfiguration: undefined,
        source: { $case: 'image', value: v1 },
        placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [ORIGIN, OTHER].map((host) => HOST_NAME.format({ host })), maxClonesPerHost: 0 },
        delivery: 0,
        diskBackend: 0,
        count: CLONES,
        nameTemplate: `${prefix}{index}`,
        start: false,
        requestId: '',
      },
      cb,
    ),
  );
  const cloned = await waitDone(rpc, fleet, clone.name, 'cloning', Date.now() + 240_000);
  const cloneResults = cloned?.result?.$case === 'response' ? unpack(CloneVirtualMachinesResponse, cloned.result.value).clones : [];
  if (cloneResults.length !== CLONES || cloneResults.some((result) => result.state !== CloneResult_State.STATE_DONE))
    throw new Error(`${row.fault}: the clones of version 1 were not all made: ${JSON.stringify(cloned?.result ?? 'no answer')}`);
  await publish();
  const before = new Map((await cloneVms(rpc, fleet, prefix)).map((vm) => [vm.name, vm] as const));
  const bases = new Map<string, string>();
  for (const vm of before.values()) {
    const base = await systemBase(vm);
    if (base && !bases.has(base)) bases.set(base, await sha256(base));
  }
  const firstSequence = (await fleet.reader.manager.streams.info(EVENT_STREAM)).state.last_seq + 1;

  // The work: the rebase, and the fault once the canary moved.
  const rebase = await rpc.call<Operation>('RebaseVirtualMachines', (cb) =>
    clients.cloning.rebaseVirtualMachines(
      {
        parent: EVERY_HOST,
        filter: `source_image = "${IMAGE_NAME.format({ image })}"`,
        targetImageVersion: v2,
        canaryCount: 1,
        maxPerHost: 2,
        restart: false,
        newInstanceId: false,
        shutdownTimeout: undefined,
        requestId: '',
      },
      cb,
    ),
  );
  const workStart = Date.now();
  for (;;) {
    const current = await rpc.call<Operation>('GetOperation', (cb) => clients.cloningOperations.getOperation({ name: rebase.name }, cb)).catch(() => undefined);
    const metadata = current?.metadata ? unpack(RebaseVirtualMachinesMetadata, current.metadata) : undefined;
    if (current?.done || (metadata?.doneCount ?? 0) >= 1 || Date.now() - workStart > 120_000) break;
    await sleep(100);
  }
  let faultEnd: number;
  try {
    faultEnd = await row.inject(fleet, note);
  } catch (error) {
    note(`the fault could not be injected: ${(error as Error).message}`);
    faultEnd = Date.now();
  }
  const deadline = faultEnd + RECOVERY_BOUND_SECONDS * 1000;

  // The invariants.
  let problems: string[] = [];
  let recoveredAt: number | undefined;
  let eventsSeen = 0;
  let duplicates = 0;
  let terminated = 0;
  for (;;) {
    problems = [];
    const operation = await rpc
      .call<Operation>('GetOperation', (cb) => clients.cloningOperations.getOperation({ name: rebase.name }, cb))
      .catch(() => undefined);
    terminated = operation?.done ? 1 : 0;
    if (!operation?.done) problems.push(`the rebase operation ${rebase.name} has not ended`);
    else if (operation.result?.$case === 'error') problems.push(`the rebase operation failed: ${describeStatus(operation.result.value)}`);
    else if (operation.result?.$case === 'response') {
      for (const result of unpack(RebaseVirtualMachinesResponse, operation.result.value).results)
        if ((result.status?.code ?? 0) !== 0) problems.push(`${result.virtualMachine} did not move: ${describeStatus(result.status!)}`);
    }
    const vms = await cloneVms(rpc, fleet, prefix).catch(() => [] as VirtualMachine[]);
    if (vms.length !== CLONES) problems.push(`${vms.length} of ${CLONES} clones in the inventory`);
    for (const vm of vms) {
      const version = vm.lineage?.imageVersion ?? '';
      if (version !== v1 && version !== v2) problems.push(`${vm.name} reports version ${JSON.stringify(version)}`);
      const base = await systemBase(vm);
      const key = version === v2 ? imageKey(image, 2) : imageKey(image, 1);
      if (!base?.includes(`/images/${key}/`)) problems.push(`${vm.name} reports ${version} but its system disk stands on ${base ?? 'nothing'}`);
      if (operation?.done && version !== v2) problems.push(`${vm.name} is still on ${version} after the rebase ended`);
      const earlier = before.get(vm.name);
      if (earlier && earlier.uuid !== vm.uuid) problems.push(`${vm.name} changed its UUID`);
    }
    const tally = await rebasedEvents(fleet, firstSequence, prefix);
    eventsSeen = [...tally.values()].reduce((sum, count) => sum + count, 0);
    duplicates = [...tally.values()].reduce((sum, count) => sum + Math.max(0, count - 1), 0);
    if (operation?.done && tally.size !== CLONES) problems.push(`clone.rebased for ${tally.size} of ${CLONES} clones`);
    if (duplicates > 0) problems.push(`${duplicates} duplicate clone.rebased`);
    if (problems.length === 0) {
      recoveredAt = Date.now();
      break;
    }
    if (Date.now() > deadline) break;
    await sleep(1_000);
  }
  let changed = 0;
  for (const [base, sha] of bases) {
    const now = await sha256(base).catch(() => 'missing');
    if (now !== sha) {
      changed++;
      problems.push(`base ${base} changed during the rebase`);
    }
  }
  if (rpc.overruns > 0) problems.push(...rpc.overrunNotes);
  for (const problem of problems) note(`NOT SURVIVED: ${problem}`);
  return {
    fault: row.fault,
    work: `RebaseVirtualMachines of ${CLONES} clones on ${ORIGIN}, ${OTHER} from ${v1} to ${v2} (canary 1, 2 per host)`,
    survived: problems.length === 0,
    operations_terminated: terminated,
    operations_total: 1,
    events_expected: CLONES,
    events_seen: eventsSeen,
    duplicates,
    bases_changed: changed,
    seconds_to_recover: recoveredAt === undefined ? null : Math.round((recoveredAt - faultEnd) / 100) / 10,
  };
}

/** The row's clones as the inventory has them. */
async function cloneVms(rpc: Rpc, fleet: FaultFleet, prefix: string): Promise<VirtualMachine[]> {
  const all = await readAllPages(async (pageToken) => {
    const page = await rpc.call<{ virtualMachines: VirtualMachine[]; nextPageToken: string }>('ListVirtualMachines', (cb) =>
      fleet.clients.inventory.listVirtualMachines({ parent: EVERY_HOST, pageSize: 500, pageToken, filter: '' }, cb),
    );
    return { items: page.virtualMachines, nextPageToken: page.nextPageToken };
  });
  return all.filter((vm) => VIRTUAL_MACHINE_NAME.parse(vm.name)?.virtualMachine.startsWith(prefix) === true);
}

/** The backing file of a clone's system disk (its first non-persistent disk with a backing chain). */
async function systemBase(vm: VirtualMachine): Promise<string | undefined> {
  const disk = vm.disks.find((candidate) => !candidate.persistent && candidate.backingChain.length > 0) ?? vm.disks[0];
  return disk ? backingFile(disk.path) : undefined;
}

/** clone.rebased of the row's clones since `firstSequence`: clone name -> how many times. */
async function rebasedEvents(fleet: FaultFleet, firstSequence: number, prefix: string): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  let last: number;
  try {
    last = (await fleet.reader.manager.streams.info(EVENT_STREAM)).state.last_seq;
  } catch {
    return counts;
  }
  for (let sequence = firstSequence; sequence <= last; sequence++) {
    const message = await fleet.reader.manager.streams.getMessage(EVENT_STREAM, { seq: sequence }).catch(() => undefined);
    if (!message) continue;
    const kind = message.subject.split('.').slice(2, -1).join('.');
    if (kind !== CLONE_REBASED.kind) continue;
    const event = CLONE_REBASED.decode(message.data);
    const name = VIRTUAL_MACHINE_NAME.parse(event.virtualMachine)?.virtualMachine ?? '';
    if (name.startsWith(prefix)) counts.set(name, (counts.get(name) ?? 0) + 1);
  }
  return counts;
}
