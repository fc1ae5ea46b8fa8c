/**
 * One row of the fault suite: real work on the fleet (a fresh image published from the master VM, a
 * DistributeImage to three or more receivers slowed by their transfer limits, and a CloneVirtualMachines batch
 * of 20 across two or more hosts, one of which gets the image by that same distribution, so the batch runs
 * across the fault), a fault injected while it runs, then the invariants checked until they hold or the bound
 * passes:
 *
 * 1. every operation of the row terminates: done, SUCCEEDED or FAILED with a reason (an error message), within
 *    {@link RECOVERY_BOUND_SECONDS} of the fault's end;
 * 2. every clone the batch reports DONE exists exactly once in libvirt, in inventory and on disk (its overlays),
 *    and no other domain of the batch exists anywhere (a FAILED clone leaves nothing behind);
 * 3. each logical `clone.done` (host and domain), `image.available` (image and host) and `image.published` of the row is in the
 *    COWHERD_EVENTS stream exactly once (read by sequence from the row's first one);
 * 4. no file that a VM uses as a base changed (SHA-256) or vanished, and every clone of the row sits on a base
 *    whose SHA-256 is the image record's (no clone on a damaged copy);
 * 5. no RPC of the suite waited past its deadline (grpc-js enforces deadlines on the client, so an overrun
 *    means a retry loop or a stream that never ended).
 *
 * The row's JSON line is printed by the runner; the details behind a failed row go to stderr.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { basename } from 'node:path';
import type { ServiceError } from '@grpc/grpc-js';
import { call as plainCall } from '../../services/common/platform/client.js';
import { EVENT_STREAM } from '../../services/common/platform/events.js';
import { CLONE_DONE, IMAGE_AVAILABLE, IMAGE_PUBLISHED } from '../../services/common/domain/event-types.js';
import { unpack } from '../../services/common/domain/operations.js';
import { runCommand } from '../../services/common/platform/child-process.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest_Delivery,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
  type CloneResult,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributeImageMetadata, DistributeImageResponse } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Image, ImageReplica_State, type ImageReplica, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { ErrorInfo } from '../../services/gen/google/rpc/error_details.js';
import type { Status } from '../../services/gen/google/rpc/status.js';
import { RPC_DEADLINE_MS, type FaultFleet } from './fleet.js';
import { EVERY_HOST, HOST_IMAGE_NAME, HOST_NAME, hostOf, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';
import { readAllPages } from '../../services/common/platform/list-pages.js';
import { parseStreamBackingUri } from '../../services/agent/image-directory/index.js';

/** How long after a fault ends the fleet has to satisfy every invariant. */
export const RECOVERY_BOUND_SECONDS = 150;
/** Slack on top of an RPC's deadline before the suite calls it an overrun. */
const DEADLINE_SLACK_MS = 2_000;
export const CLONES_PER_BATCH = 20;

/** The JSON line of a row, exactly these keys in this order. */
export interface RowResult {
  fault: string;
  work: string;
  survived: boolean;
  operations_terminated: number;
  operations_total: number;
  events_expected: number;
  events_seen: number;
  duplicates: number;
  bases_changed: number;
  seconds_to_recover: number | null;
}

/** What rows share across the run. */
export interface SuiteState {
  /** Every file some clone uses as its base, with its SHA-256 as last checked (or as a fault left it on purpose). */
  readonly bases: Map<string, string>;
  /** The newest image that origin and every receiver hold, with clones on origin and recv1 (for the damage rows). */
  lastImage: string | undefined;
  rowIndex: number;
}

/** What a fault module sees while its fault runs. */
export interface RowContext {
  readonly fleet: FaultFleet;
  readonly state: SuiteState;
  /** The row's image. */
  readonly image: string;
  /** The domain names of the row's clones start with this. */
  readonly prefix: string;
  /** Resolves when a receiver holds part of the image (some bytes, not all): the transfer is under way. */
  midTransfer(receivers?: readonly string[]): Promise<void>;
  /** Notes for stderr. */
  note(text: string): void;
  /** Records a broken promise that only the fault itself can observe (e.g. a host that never showed UNREACHABLE). */
  fail(text: string): void;
  /** The row's operations so far (publish, DistributeImage, CloneVirtualMachines), with the service that runs each. */
  readonly operations: ReadonlyArray<{ name: string; on: 'distribution' | 'cloning' }>;
  /** GetOperation through the suite's bookkeeping (undefined when the service does not answer). */
  getOperation(name: string, on: 'distribution' | 'cloning'): Promise<Operation | undefined>;
}

/** A fault and the work it hits. */
export interface FaultRow {
  readonly fault: string;
  /** Receivers of the row's DistributeImage. */
  readonly distributeTo: readonly string[];
  /** Placement hosts of the clone batch (round robin). */
  readonly cloneHosts: readonly string[];
  /** How the batch's hosts without the image get it: 'stream' = DELIVERY_STREAM (streaming clones); default DISTRIBUTE. */
  readonly delivery?: 'stream';
  /**
   * The fault is one the fleet must absorb (nothing in it stops the work from finishing: NATS keeps a quorum or
   * comes back, a killed process is started again, the cut is shorter than every progress deadline): every
   * operation must SUCCEED and every clone be DONE, not merely end.
   */
  readonly mustSucceed: boolean;
  /** A negative control: the suite itself breaks an invariant, and the row must NOT survive (controls.ts). */
  readonly control?: boolean;
  /** Seconds after the fault's end within which every invariant must hold; default {@link RECOVERY_BOUND_SECONDS}. */
  readonly boundSeconds?: number;
  /** Use this earlier image instead of publishing a fresh one (damage rows). */
  readonly reuseImage?: (state: SuiteState) => string | undefined;
  /** Runs before the work starts (damage rows damage here); returns nothing. */
  readonly before?: (context: RowContext) => Promise<void>;
  /** Injects the fault while the work runs; resolves with the time (ms) at which the fault ended. */
  readonly inject: (context: RowContext) => Promise<number>;
  /** Runs after the invariants were checked (undoes a fault that lasts through the check, e.g. a full disk). */
  readonly after?: (context: RowContext) => Promise<void>;
  /**
   * How many image.available of the row's image each host should have published during the row. Default: one
   * for every receiver whose replica became AVAILABLE during the row. (The origin's copy is announced by the one
   * image.published of a row that publishes.)
   */
  readonly expectedAvailable?: (final: ReadonlyMap<string, ImageReplica>) => Map<string, number>;
}

/** Calls with the suite's bookkeeping of deadlines. */
export class Rpc {
  overruns = 0;
  readonly overrunNotes: string[] = [];
  async call<Res>(what: string, invoke: (callback: (error: ServiceError | null, response: Res) => void) => void, deadlineMs = RPC_DEADLINE_MS): Promise<Res> {
    const started = Date.now();
    try {
      return await plainCall(invoke);
    } finally {
      const elapsed = Date.now() - started;
      if (elapsed > deadlineMs + DEADLINE_SLACK_MS) {
        this.overruns++;
        this.overrunNotes.push(`${what} took ${elapsed} ms (deadline ${deadlineMs} ms)`);
      }
    }
  }
}

/** Runs one row; never throws for a fault's effects (they make the row fail), only for the suite's own bugs. */
export async function runRow(fleet: FaultFleet, state: SuiteState, row: FaultRow): Promise<RowResult> {
  const index = ++state.rowIndex;
  const rpc = new Rpc();
  const notes: string[] = [];
  const note = (text: string): void => {
    notes.push(text);
    fleet.say(`${row.fault}: ${text}`);
  };
  const { clients } = fleet;
  const prefix = `${fleet.runId}-r${index}-`;
  const firstSequence = (await fleet.reader.manager.streams.info(EVENT_STREAM)).state.last_seq + 1;

  const reused = row.reuseImage?.(state);
  const image = reused ?? `${fleet.runId}-i${index}`;
  const operations: Array<{ name: string; on: 'distribution' | 'cloning' }> = [];
  const observed: string[] = [];
  const context: RowContext = {
    fleet,
    state,
    image,
    prefix,
    note,
    fail: (text) => {
      observed.push(text);
      note(text);
    },
    operations,
    getOperation: (name, on) => getOperation(rpc, fleet, name, on),
    midTransfer: async (receivers = row.distributeTo) => {
      const deadline = Date.now() + 60_000;
      while (Date.now() < deadline) {
        for (const host of receivers) {
          const replica = await rpc
            .call<ImageReplica>('GetImageReplica', (cb) => clients.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image }) }, cb))
            .catch(() => undefined);
          const done = Number(replica?.progress?.bytesDone ?? 0);
          const total = Number(replica?.progress?.bytesTotal ?? 0);
          if (replica?.state === ImageReplica_State.STATE_TRANSFERRING && done > 0 && done < total) {
            note(`mid-transfer: ${host} holds ${done} of ${total} bytes`);
            return;
          }
        }
        await sleep(250);
      }
      note('no receiver was seen mid-transfer within 60 s; injecting anyway');
    },
  };

  // The work.
  if (!reused) {
    const publish = await rpc.call<Operation>('PublishImage', (cb) =>
      clients.distribution.publishImage(
        { imageId: image, sourceVirtualMachine: fleet.masterVm, description: `fault suite: ${row.fault}`, labels: {}, requestId: '' },
        cb,
      ),
    );
    operations.push({ name: publish.name, on: 'distribution' });
    const published = await waitDone(rpc, fleet, publish.name, 'distribution', Date.now() + 120_000);
    if (published?.result?.$case !== 'response')
      throw new Error(`${row.fault}: publishing ${image} failed before the fault: ${JSON.stringify(published?.result ?? 'no answer')}`);
  }
  const before = new Map<string, ImageReplica>();
  for (const host of [...row.distributeTo, ...row.cloneHosts]) {
    const replica = await rpc
      .call<ImageReplica>('GetImageReplica', (cb) => clients.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image }) }, cb))
      .catch(() => undefined);
    if (replica) before.set(host, replica);
  }
  await row.before?.(context);
  const faultStart = Date.now();
  const distribute = await rpc.call<Operation>('DistributeImage', (cb) =>
    clients.distribution.distributeImage(
      { image: IMAGE_NAME.format({ image }), hosts: row.distributeTo.map((host) => HOST_NAME.format({ host })), requestId: '' },
      cb,
    ),
  );
  operations.push({ name: distribute.name, on: 'distribution' });
  const clone = await rpc.call<Operation>('CloneVirtualMachines', (cb) =>
    clients.cloning.cloneVirtualMachines(
      {
        dataDiskBytes: '0',
        guestConfiguration: undefined,
        source: { $case: 'image', value: IMAGE_NAME.format({ image }) },
        placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: row.cloneHosts.map((host) => HOST_NAME.format({ host })), maxClonesPerHost: 0 },
        delivery: row.delivery === 'stream' ? CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM : CloneVirtualMachinesRequest_Delivery.DELIVERY_DISTRIBUTE,
        diskBackend: 0,
        count: CLONES_PER_BATCH,
        nameTemplate: `${prefix}{index}`,
        start: false,
        requestId: '',
      },
      cb,
    ),
  );
  operations.push({ name: clone.name, on: 'cloning' });

  // The fault.
  let faultEnd: number;
  try {
    faultEnd = await row.inject(context);
  } catch (error) {
    note(`the fault could not be injected: ${(error as Error).message}`);
    faultEnd = Date.now();
  }
  const deadline = faultEnd + (row.boundSeconds ?? RECOVERY_BOUND_SECONDS) * 1000;

  // The invariants, until they hold or the bound passes.
  const events = new EventTally(fleet, firstSequence, prefix, image);
  let recoveredAt: number | undefined;
  let last: Evaluation | undefined;
  for (;;) {
    last = await evaluate(fleet, rpc, row, operations, events, image, prefix, !reused, before);
    if (last.problems.length === 0) {
      recoveredAt = Date.now();
      break;
    }
    if (Date.now() > deadline) break;
    await sleep(1_000);
  }

  await row.after?.(context).catch((error: unknown) => note(`undoing the fault failed: ${(error as Error).message}`));

  // Bases: every base known before the row and every base of this row's clones, hashed once at the end.
  const bases = await checkBases(fleet, state, last.doneClones, image, rpc);
  const problems = [...observed, ...last.problems, ...bases.problems];
  if (rpc.overruns > 0) problems.push(...rpc.overrunNotes);
  const survived = problems.length === 0;
  if (!survived) {
    for (const problem of problems) note(`NOT SURVIVED: ${problem}`);
    note(
      `events of the row in the stream: ${
        [...events.counts]
          .filter(([key]) => !key.startsWith('clone.done'))
          .map(([key, count]) => `${key} x${count}`)
          .join(', ') || 'none'
      } and ${[...events.counts].filter(([key]) => key.startsWith('clone.done')).length} clone.done`,
    );
  }
  if (survived && row.distributeTo.length >= 3 && last.allReceiversAvailable) state.lastImage = image;
  note(`operations: ${last.outcomes.join('; ')}; fault ${((faultEnd - faultStart) / 1000).toFixed(1)} s after the work started`);
  return {
    fault: row.fault,
    work: `${reused ? `image ${image} (already on every host)` : `fresh ${image}`}: DistributeImage to ${row.distributeTo.length} receivers (${row.distributeTo.join(', ')}) + ${CLONES_PER_BATCH} clones on ${row.cloneHosts.join(', ')}`,
    survived,
    operations_terminated: last.terminated,
    operations_total: operations.length + last.extraOperations,
    events_expected: last.eventsExpected,
    events_seen: last.eventsSeen,
    duplicates: last.duplicates,
    bases_changed: bases.changed,
    seconds_to_recover: recoveredAt === undefined ? null : Math.round((recoveredAt - faultEnd) / 100) / 10,
  };
}

interface Evaluation {
  problems: string[];
  terminated: number;
  extraOperations: number;
  outcomes: string[];
  doneClones: CloneResult[];
  eventsExpected: number;
  eventsSeen: number;
  duplicates: number;
  allReceiversAvailable: boolean;
}

async function evaluate(
  fleet: FaultFleet,
  rpc: Rpc,
  row: FaultRow,
  operations: ReadonlyArray<{ name: string; on: 'distribution' | 'cloning' }>,
  events: EventTally,
  image: string,
  prefix: string,
  published: boolean,
  before: ReadonlyMap<string, ImageReplica>,
): Promise<Evaluation> {
  const problems: string[] = [];
  const outcomes: string[] = [];
  let terminated = 0;
  let clones: CloneResult[] = [];
  let cloneResponseKnown = false;
  // The clone batch's own DistributeImage operations count too.
  const all = [...operations];
  for (const operation of [...all]) {
    const answer = await getOperation(rpc, fleet, operation.name, operation.on);
    if (!answer) {
      problems.push(`${operation.name} on ${operation.on}: no answer`);
      outcomes.push(`${operation.name}: no answer`);
      continue;
    }
    if (operation.on === 'cloning' && answer.metadata) {
      try {
        const metadata = unpack(CloneVirtualMachinesMetadata, answer.metadata);
        for (const sub of metadata.distributeOperations) if (!all.some((known) => known.name === sub)) all.push({ name: sub, on: 'distribution' });
        clones = metadata.clones;
      } catch {
        // Not the metadata type: the response below tells.
      }
    }
  }
  for (const operation of all) {
    const answer = await getOperation(rpc, fleet, operation.name, operation.on);
    if (!answer) continue;
    if (!answer.done) {
      problems.push(`${operation.name} (${operation.on}) still running: ${describeRunning(answer, operation.on)}`);
      outcomes.push(`${operation.name}: RUNNING`);
      continue;
    }
    if (answer.result?.$case === 'error') {
      const reason = reasonOf(answer.result.value);
      if (reason === undefined) problems.push(`${operation.name} FAILED without a reason (no ErrorInfo): ${describeStatus(answer.result.value)}`);
      else terminated++;
      if (row.mustSucceed) problems.push(`${operation.name} FAILED (${describeStatus(answer.result.value)}), though the fleet must absorb this fault`);
      outcomes.push(`${operation.name}: FAILED (${describeStatus(answer.result.value)})`);
    } else if (answer.result?.$case === 'response') {
      terminated++;
      // A DistributeImage succeeds with the hosts it could not serve listed as failures: each needs its reason too.
      let failures: string[] = [];
      if (operation.on === 'distribution' && answer.result.value.typeUrl.endsWith('/cowherd.distribution.v1.DistributeImageResponse')) {
        const response = unpack(DistributeImageResponse, answer.result.value);
        failures = response.failures.map((failure) => `${failure.host} ${failure.status ? describeStatus(failure.status) : 'no status'}`);
        for (const failure of response.failures) {
          if (!failure.status || reasonOf(failure.status) === undefined)
            problems.push(
              `${operation.name}: ${failure.host} failed without a reason (no ErrorInfo): ${failure.status ? describeStatus(failure.status) : 'no status'}`,
            );
        }
        if (row.mustSucceed && failures.length > 0)
          problems.push(`${operation.name} SUCCEEDED with failed hosts (${failures.join('; ')}), though the fleet must absorb this fault`);
      }
      outcomes.push(`${operation.name}: SUCCEEDED${failures.length > 0 ? ` with failed hosts (${failures.join('; ')})` : ''}`);
      if (operation.on === 'cloning') {
        clones = unpack(CloneVirtualMachinesResponse, answer.result.value).clones;
        cloneResponseKnown = true;
      }
    } else {
      problems.push(`${operation.name} done with neither response nor error`);
    }
  }
  const extraOperations = all.length - operations.length;
  const cloneOperationDone =
    cloneResponseKnown || outcomes.some((outcome) => outcome.includes('FAILED') && operations.some((op) => op.on === 'cloning' && outcome.startsWith(op.name)));
  const doneClones = clones.filter((clone) => clone.state === CloneResult_State.STATE_DONE);
  for (const clone of clones) {
    if (!cloneOperationDone || clone.state !== CloneResult_State.STATE_FAILED) continue;
    if (!clone.error || reasonOf(clone.error) === undefined)
      problems.push(`clone ${clone.domainName} FAILED without a reason (no ErrorInfo): ${clone.error ? describeStatus(clone.error) : 'no status'}`);
  }
  if (row.mustSucceed && cloneOperationDone) {
    const notDone = clones.filter((clone) => clone.state !== CloneResult_State.STATE_DONE);
    if (notDone.length > 0)
      problems.push(
        `${notDone.length} of ${clones.length} clones not DONE (first: ${notDone[0]!.domainName} ${CloneResult_State[notDone[0]!.state]} ${notDone[0]!.error ? describeStatus(notDone[0]!.error) : ''}), though the fleet must absorb this fault`,
      );
  }
  // A streaming row must have streamed: the clones of the host without the image carry their base's progress.
  const streamed = clones.filter((clone) => clone.baseProgress !== undefined).length;
  if (row.delivery === 'stream' && cloneOperationDone && streamed === 0) problems.push('delivery STREAM: no clone streamed (none carries base_progress)');
  if (row.delivery === 'stream') outcomes.push(`${streamed} clone(s) streamed`);
  const failedClones = clones.filter((clone) => clone.state === CloneResult_State.STATE_FAILED).length;
  const cloneErrors = [...new Set(clones.filter((clone) => clone.error).map((clone) => `${clone.host}: ${describeStatus(clone.error!)}`))];
  outcomes.push(`clones ${doneClones.length} DONE, ${failedClones} FAILED of ${clones.length}${cloneErrors.length > 0 ? ` (${cloneErrors.join('; ')})` : ''}`);

  // Exactly once in libvirt, in inventory, on disk (only once the batch is over: before that a clone may be half made).
  if (cloneOperationDone) {
    const domains = (await fleet.virsh('list', '--all', '--name'))
      .split('\n')
      .map((name) => name.trim())
      .filter((name) => name.startsWith(prefix));
    const vms = await listVms(rpc, fleet, prefix);
    for (const clone of doneClones) {
      const inLibvirt = domains.filter((name) => name === clone.domainName).length;
      if (inLibvirt !== 1) problems.push(`clone ${clone.domainName}: ${inLibvirt} domains in libvirt`);
      const inInventory = vms.filter((vm) => VIRTUAL_MACHINE_NAME.parse(vm.name)?.virtualMachine === clone.domainName).length;
      if (inInventory !== 1) problems.push(`clone ${clone.domainName}: ${inInventory} records in inventory`);
      if (clone.overlays.length === 0) problems.push(`clone ${clone.domainName}: no overlays reported`);
      for (const overlay of clone.overlays) if (!(await exists(overlay))) problems.push(`clone ${clone.domainName}: overlay ${overlay} missing`);
    }
    const expectedNames = new Set(doneClones.map((clone) => clone.domainName));
    for (const name of new Set(domains)) if (!expectedNames.has(name)) problems.push(`domain ${name} exists in libvirt but the batch does not report it DONE`);
    for (const vm of vms)
      if (!expectedNames.has(VIRTUAL_MACHINE_NAME.parse(vm.name)?.virtualMachine ?? ''))
        problems.push(`${vm.name} is in inventory but the batch does not report it DONE`);
  }

  // Events: each logical occurrence exactly once.
  await events.advance();
  const final = new Map<string, ImageReplica>();
  for (const host of new Set([...row.distributeTo, ...row.cloneHosts])) {
    const replica = await rpc
      .call<ImageReplica>('GetImageReplica', (cb) => fleet.clients.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image }) }, cb))
      .catch(() => undefined);
    if (replica) final.set(host, replica);
  }
  const expectedAvailable = row.expectedAvailable?.(final) ?? defaultExpectedAvailable(final, before);
  const expected = new Map<string, number>();
  for (const clone of doneClones) expected.set(`clone.done ${hostOf(clone.host)}/${clone.domainName}`, 1);
  for (const [host, count] of expectedAvailable) if (count > 0) expected.set(`image.available ${image}@${host}`, count);
  // The origin's copy is announced by image.published (distribution), not image.available.
  if (published) expected.set(`image.published ${image}`, 1);
  let eventsExpected = 0;
  let eventsSeen = 0;
  let duplicates = 0;
  for (const [key, count] of expected) {
    eventsExpected += count;
    const seen = events.counts.get(key) ?? 0;
    eventsSeen += Math.min(seen, count);
    if (seen < count) problems.push(`event ${key}: ${seen} in the stream, ${count} expected`);
  }
  for (const [key, seen] of events.counts) {
    const wanted = expected.get(key) ?? 0;
    if (seen > wanted) {
      // Extra copies of an expected occurrence are duplicates; an occurrence nobody expected is reported too.
      if (wanted > 0) duplicates += seen - wanted;
      else if (cloneOperationDone) problems.push(`event ${key} in the stream, none expected`);
      if (wanted > 0) problems.push(`event ${key}: ${seen} in the stream, ${wanted} expected`);
      eventsSeen += wanted > 0 ? 0 : seen;
    }
  }
  const allReceiversAvailable = row.distributeTo.every((host) => final.get(host)?.state === ImageReplica_State.STATE_AVAILABLE);
  return { problems, terminated, extraOperations, outcomes, doneClones, eventsExpected, eventsSeen, duplicates, allReceiversAvailable };
}

/** One image.available for every replica that became AVAILABLE in the row (the origin's is image.published). */
function defaultExpectedAvailable(final: ReadonlyMap<string, ImageReplica>, before: ReadonlyMap<string, ImageReplica>): Map<string, number> {
  const expected = new Map<string, number>();
  for (const [host, replica] of final) {
    if (replica.origin) continue;
    const wasAvailable = before.get(host)?.state === ImageReplica_State.STATE_AVAILABLE;
    if (replica.state === ImageReplica_State.STATE_AVAILABLE && !wasAvailable) expected.set(host, 1);
  }
  return expected;
}

/** Counts this row's clone.done and image.available in the stream, by logical occurrence, reading by sequence. */
class EventTally {
  readonly counts = new Map<string, number>();
  private next: number;
  constructor(
    private readonly fleet: FaultFleet,
    firstSequence: number,
    private readonly prefix: string,
    private readonly image: string,
  ) {
    this.next = firstSequence;
  }

  async advance(): Promise<void> {
    let last: number;
    try {
      last = (await this.fleet.reader.manager.streams.info(EVENT_STREAM)).state.last_seq;
    } catch {
      return; // NATS not answering yet: the next pass reads on.
    }
    while (this.next <= last) {
      let message;
      try {
        message = await this.fleet.reader.manager.streams.getMessage(EVENT_STREAM, { seq: this.next });
      } catch (error) {
        if (/no message found/i.test(String((error as Error).message))) {
          this.next++;
          continue;
        }
        return;
      }
      this.next++;
      if (!message) continue;
      const tokens = message.subject.split('.');
      const host = tokens[tokens.length - 1]!;
      const kind = tokens.slice(2, -1).join('.');
      if (kind === CLONE_DONE.kind) {
        const event = CLONE_DONE.decode(message.data);
        if (event.domainName.startsWith(this.prefix)) this.bump(`clone.done ${host}/${event.domainName}`);
      } else if (kind === IMAGE_AVAILABLE.kind) {
        const event = IMAGE_AVAILABLE.decode(message.data);
        if (event.image === IMAGE_NAME.format({ image: this.image })) this.bump(`image.available ${this.image}@${host}`);
      } else if (kind === IMAGE_PUBLISHED.kind) {
        const event = IMAGE_PUBLISHED.decode(message.data);
        if (event.image === IMAGE_NAME.format({ image: this.image })) this.bump(`image.published ${this.image}`);
      }
    }
  }

  private bump(key: string): void {
    this.counts.set(key, (this.counts.get(key) ?? 0) + 1);
  }
}

/** Hashes every known base and every base of the row's clones; the changed or vanished ones are counted. */
async function checkBases(
  fleet: FaultFleet,
  state: SuiteState,
  doneClones: readonly CloneResult[],
  image: string,
  rpc: Rpc,
): Promise<{ changed: number; problems: string[] }> {
  const problems: string[] = [];
  let changed = 0;
  for (const [path, sha] of state.bases) {
    const now = await sha256(path).catch(() => undefined);
    if (now === undefined) {
      changed++;
      problems.push(`base ${path} vanished`);
      state.bases.delete(path);
    } else if (now !== sha) {
      changed++;
      problems.push(`base ${path} changed (SHA-256 ${sha.slice(0, 12)} -> ${now.slice(0, 12)})`);
      state.bases.set(path, now);
    }
  }
  // This row's clones: each must sit on a base whose content is the image's.
  const record = await rpc
    .call<Image>('GetImage', (cb) => fleet.clients.inventory.getImage({ name: IMAGE_NAME.format({ image }), view: 0 }, cb))
    .catch(() => undefined);
  const wanted = new Map((record?.files ?? []).map((file) => [file.path, file.sha256]));
  const seen = new Set<string>();
  for (const clone of doneClones) {
    for (const overlay of clone.overlays) {
      const backing = await backingFile(overlay);
      if (!backing) {
        problems.push(`clone ${clone.domainName}: ${overlay} has no readable backing file`);
        continue;
      }
      if (seen.has(backing)) continue;
      seen.add(backing);
      const sha = await sha256(backing).catch(() => undefined);
      if (sha === undefined) {
        problems.push(`clone ${clone.domainName}: base ${backing} missing`);
        continue;
      }
      const expected = wanted.get(basename(backing));
      if (expected !== undefined && expected !== sha)
        problems.push(`clone ${clone.domainName} sits on ${backing}, whose SHA-256 is not the image's (a damaged copy)`);
      if (!state.bases.has(backing)) state.bases.set(backing, sha);
    }
  }
  return { changed, problems };
}

/**
 * The ErrorInfo reason of a failure, undefined when it has none: an operation that ends FAILED must say why in
 * the API's terms (an ErrorReason), not only as a message. ERROR_REASON_INTERNAL ("internal error") is none.
 */
function reasonOf(status: Status): string | undefined {
  for (const detail of status.details ?? []) {
    if (!detail.typeUrl.endsWith('/google.rpc.ErrorInfo')) continue;
    try {
      const reason = ErrorInfo.decode(detail.value).reason;
      // INTERNAL says only that something unexpected broke: no reason an operator can act on.
      if (reason && !/_(INTERNAL|UNSPECIFIED)$/.test(reason)) return reason;
    } catch {
      // Not decodable: no reason.
    }
  }
  return undefined;
}

export function describeStatus(status: Status): string {
  return `code ${status.code}, ${reasonOf(status) ?? 'no reason'}: ${status.message}`;
}

export async function backingFile(overlay: string): Promise<string | undefined> {
  try {
    const info = JSON.parse(await runCommand('qemu-img', ['info', '-U', '--output=json', overlay])) as {
      'full-backing-filename'?: string;
      'backing-filename'?: string;
    };
    const backing = info['full-backing-filename'] ?? info['backing-filename'];
    // A streaming clone not settled yet (its replica just became AVAILABLE) reads its replica's file over NBD: that
    // file is its base (the agent points the overlay at it within seconds).
    return (backing === undefined ? undefined : parseStreamBackingUri(backing)?.replicaPath) ?? backing;
  } catch {
    return undefined;
  }
}

export function sha256(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path)
      .on('data', (chunk) => hash.update(chunk))
      .on('end', () => resolve(hash.digest('hex')))
      .on('error', reject);
  });
}

async function listVms(rpc: Rpc, fleet: FaultFleet, prefix: string): Promise<VirtualMachine[]> {
  const all = await readAllPages(async (pageToken) => {
    const page = await rpc.call<{ virtualMachines: VirtualMachine[]; nextPageToken: string }>('ListVirtualMachines', (cb) =>
      fleet.clients.inventory.listVirtualMachines({ parent: EVERY_HOST, pageSize: 500, pageToken, filter: '' }, cb),
    );
    return { items: page.virtualMachines, nextPageToken: page.nextPageToken };
  });
  return all.filter((vm) => VIRTUAL_MACHINE_NAME.parse(vm.name)?.virtualMachine.startsWith(prefix) === true);
}

export async function getOperation(rpc: Rpc, fleet: FaultFleet, name: string, on: 'distribution' | 'cloning'): Promise<Operation | undefined> {
  const client = on === 'distribution' ? fleet.clients.distributionOperations : fleet.clients.cloningOperations;
  return rpc.call<Operation>('GetOperation', (cb) => client.getOperation({ name }, cb)).catch(() => undefined);
}

export async function waitDone(rpc: Rpc, fleet: FaultFleet, name: string, on: 'distribution' | 'cloning', until: number): Promise<Operation | undefined> {
  for (;;) {
    const answer = await getOperation(rpc, fleet, name, on);
    if (answer?.done || Date.now() > until) return answer;
    await sleep(500);
  }
}

function describeRunning(operation: Operation, on: 'distribution' | 'cloning'): string {
  try {
    if (on === 'distribution') {
      const metadata = unpack(DistributeImageMetadata, operation.metadata);
      return metadata.transfers
        .map((transfer) => `${transfer.host} ${ImageReplica_State[transfer.state]} ${transfer.progress?.bytesDone ?? 0}/${transfer.progress?.bytesTotal ?? 0}`)
        .join(', ');
    }
    const metadata = unpack(CloneVirtualMachinesMetadata, operation.metadata);
    return `${metadata.doneCount} done, ${metadata.failedCount} failed of ${metadata.totalCount}; transfers ${metadata.imageTransfers.map((transfer) => `${transfer.host} ${ImageReplica_State[transfer.state]}`).join(', ')}`;
  } catch {
    return 'metadata unreadable';
  }
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
