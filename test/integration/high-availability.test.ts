/**
 * High availability on one machine (issue 8): two replicas of distribution and two of cloning against one
 * NATS, agents on the private libvirtd. The replica that runs an operation is SIGKILLed in the middle of it
 * (no drain, no lease release: the other replica claims the operation once the 15 s lease ran out):
 * - a DistributeImage to two hosts whose download is capped (the transfer takes ~30 s) is finished by the
 *   other distribution replica; every host ends AVAILABLE with a verified copy, image.available is published
 *   once per host;
 * - a CloneVirtualMachines batch over three hosts, one of which must first receive the image (capped again,
 *   so its clones wait while the others are made), is killed at its first clone.done and finished by the
 *   other cloning replica; every clone exists once in libvirt and on disk with nothing extra left, clone.done
 *   is published once per clone, no clone.failed, and one DistributeImage brought the image to the host;
 * - the replica records stay AVAILABLE once the killed distribution replica's unacknowledged events have
 *   been redelivered (30 s ack wait).
 * Events are counted on durable consumers of the test's own, with a few seconds' grace for duplicates.
 *
 * Trackers: every distribution replica runs its own tracker and hands its own announce URL to the agents of
 * the operations it starts (services/distribution/main.ts). The diagnostics show what that means here: the
 * receivers keep the killed replica's URL (FetchImage is idempotent, so the survivor's URL is not taken),
 * and the origin announces to the tracker of the replica that published.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { createClient } from '../../services/common/platform/client.js';
import { CLONE_DONE, CLONE_FAILED, IMAGE_AVAILABLE } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { jsonCodec, KvStore } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { OPERATIONS_BUCKET, unpack } from '../../services/common/domain/operations.js';
import { FetchImageRequest } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesResponse,
  CloningServiceClient,
  Placement_Strategy,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import {
  DistributeImageMetadata,
  DistributeImageResponse,
  DistributionServiceClient,
} from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import type { CloneDone, CloneFailed, ImageAvailable } from '../../services/gen/cowherd/events/v1/events.js';
import { Image, ImageReplica_State, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { capDownload, startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';
import { call } from '../harness/grpc.js';
import { Resources } from '../harness/index.js';
import type { ServiceProcess } from '../harness/processes.js';
import { HOST_IMAGE_NAME, HOST_NAME, hostOf, IMAGE_NAME, OPERATION_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const MiB = 1024 * 1024;
/** The image's disk: random data, so nothing compresses. */
const IMAGE_MIB = 48;
/** The receivers' download cap: ~32 s for the image, long enough to kill and take over mid-transfer. */
const CAP_BYTES_PER_SECOND = 1.5 * MiB;
/** The cap of the host that receives the image for its clones: ~12 s, well past the kill. */
const DELIVERY_CAP_BYTES_PER_SECOND = 4 * MiB;
/** Clones of the batch, spread round-robin over three hosts. */
const CLONE_COUNT = 21;
/** How long to keep listening for duplicates once every expected event arrived. */
const DUPLICATE_GRACE_MS = 4_000;

/** The fields of an operation record (services/common/domain/operations.ts) the test looks at. */
interface OperationRecordView {
  readonly name: string;
  readonly kind: string;
  readonly owner: string;
  readonly leaseExpiresAt: number;
}

describe('high availability: a replica killed mid-operation', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false, timeout: 300_000 }, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const vm = `ha-src-${suffix}`;
  const imageId = `ha-${suffix}`;
  const origin = `ha-origin-${suffix}`;
  const [hostA, hostB, hostC] = ['a', 'b', 'c'].map((name) => `ha-${name}-${suffix}`) as [string, string, string];
  let stack: CloneStack;
  const agents = new Map<string, StackAgent>();
  let image: Image;
  let operationRecords: KvStore<OperationRecordView>;
  /** The second replicas and clients on them. */
  let distribution2: ServiceProcess;
  let cloning2: ServiceProcess;
  let distribution2Client: DistributionServiceClient;
  let cloning2Client: CloningServiceClient;
  // What the durable consumers saw.
  const available: Array<{ host: string; operation: string; sequence: number }> = [];
  const cloneDone: Array<{ host: string; domainName: string; uuid: string; operation: string; sequence: number }> = [];
  const cloneFailed: Array<{ host: string; domainName: string; operation: string }> = [];
  /** When the distribution replica was killed (its consumer's unacknowledged events come back 30 s later). */
  let distributionKilledAt = 0;

  async function waitFor<T>(what: string, read: () => Promise<T | undefined>, timeoutMs = 60_000, intervalMs = 200): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = await read().catch(() => undefined);
      if (value !== undefined) return value;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((resolve) => setTimeout(resolve, intervalMs));
    }
  }

  const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

  async function operationRecord(name: string): Promise<OperationRecordView> {
    const record = await operationRecords.get(OPERATION_NAME.parse(name)?.operation ?? name);
    assert.ok(record, `${name} has a record in KV ${OPERATIONS_BUCKET}`);
    return record.value;
  }

  function logLine(process: ServiceProcess, message: string, operation: string): Record<string, unknown> | undefined {
    return process.logs.find((line) => line['msg'] === message && line['operation'] === operation);
  }

  async function setDownloadCap(host: string, bytesPerSecond: number): Promise<void> {
    await capDownload(stack, host, bytesPerSecond, agents.get(host)!);
  }

  async function assertVerifiedCopy(host: string): Promise<void> {
    const directory = join(agents.get(host)!.imageDirectory, 'images', imageId);
    for (const file of image.files) {
      const digest = createHash('sha256')
        .update(await readFile(join(directory, file.path)))
        .digest('hex');
      assert.equal(digest, file.sha256, `${host}: ${file.path} verifies`);
    }
  }

  /** The tracker URL an agent was handed for the image (its replica state file keeps the FetchImage request). */
  async function trackerGiven(host: string): Promise<string> {
    const state = JSON.parse(await readFile(join(agents.get(host)!.imageDirectory, 'images', `.${imageId}.replica.json`), 'utf8')) as { request: string };
    return FetchImageRequest.decode(Buffer.from(state.request, 'base64')).trackerAnnounceUrl;
  }

  function trackerOf(process: ServiceProcess): string {
    return String(process.logs.find((line) => line['msg'] === 'agents announce to this tracker URL')?.['trackerAnnounceUrl'] ?? '');
  }

  /** SIGKILL: no drain, no lease release; the lease must run out. */
  async function kill(process: ServiceProcess): Promise<void> {
    globalThis.process.kill(process.daemon.pid, 'SIGKILL');
    await process.daemon.exited;
  }

  before(async () => {
    stack = await startCloneStack(resources, origin);
    agents.set(origin, {
      host: origin,
      imageDirectory: stack.imageDirectory,
      process: stack.agent,
      restart: () => Promise.reject(new Error('not restartable')),
    });
    for (const host of [hostA, hostB, hostC]) agents.set(host, await stack.addAgent(host));
    distribution2 = await stack.startReplica('distribution');
    cloning2 = await stack.startReplica('cloning');
    distribution2Client = createClient(DistributionServiceClient, distribution2.address, stack.adminCredentials, { defaultDeadlineMs: 30_000 });
    cloning2Client = createClient(CloningServiceClient, cloning2.address, stack.adminCredentials, { defaultDeadlineMs: 30_000 });
    resources.defer(() => {
      distribution2Client.close();
      cloning2Client.close();
    });
    operationRecords = await KvStore.open(stack.connection.jetstream, OPERATIONS_BUCKET, jsonCodec<OperationRecordView>());

    // A powered-off domain with a qcow2 disk of random data on the origin.
    await stack.defineSourceVm(vm, IMAGE_MIB);
    await stack.waitHostsReady(agents.keys());

    // The events, on durable consumers of the test's own (redelivered events would show up as duplicates too).
    const silent = createLogger({ service: 'test', level: 'silent' });
    const availableConsumer = await consumeEvents<ImageAvailable>(stack.connection.jetstream, stack.connection.manager, {
      durable: `test-ha-available-${suffix}`,
      types: [IMAGE_AVAILABLE],
      log: silent,
      handle: async (event) => {
        if (event.payload.image === IMAGE_NAME.format({ image: imageId }))
          available.push({ host: event.payload.host, operation: event.payload.operation, sequence: event.sequence });
      },
    });
    resources.defer(() => availableConsumer.stop());
    const cloneConsumer = await consumeEvents<CloneDone | CloneFailed>(stack.connection.jetstream, stack.connection.manager, {
      durable: `test-ha-clones-${suffix}`,
      types: [CLONE_DONE, CLONE_FAILED] as never,
      log: silent,
      handle: async (event) => {
        const payload = event.payload;
        if (!payload.domainName.startsWith(`ha-${suffix}-`)) return;
        if (event.typeName === CLONE_DONE.typeName)
          cloneDone.push({ host: payload.host, domainName: payload.domainName, uuid: payload.uuid, operation: payload.operation, sequence: event.sequence });
        else cloneFailed.push({ host: payload.host, domainName: payload.domainName, operation: payload.operation });
      },
    });
    resources.defer(() => cloneConsumer.stop());

    const published = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        { imageId, sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: origin, virtualMachine: vm }), description: '', labels: {}, requestId: '' },
        cb,
      ),
    );
    const done = await stack.wait(published.name, 120_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    image = unpack(Image, done.result.value);
  });
  after(() => resources.release());

  it('a distribution whose replica is killed mid-transfer is finished by the other replica; image.available once per host', async (t: TestContext) => {
    const receivers = [hostA, hostB];
    for (const host of receivers) await setDownloadCap(host, CAP_BYTES_PER_SECOND);
    const total = Number(image.torrent!.totalBytes);

    // The operation runs where the request lands: on the second replica. (The first one's address is what the
    // cloning replicas were configured with; in Kubernetes a Service would hide the difference.)
    const operation = await call<Operation>((cb) =>
      distribution2Client.distributeImage(
        { image: IMAGE_NAME.format({ image: imageId }), hosts: receivers.map((host) => HOST_NAME.format({ host })), requestId: `ha-distribute-${suffix}` },
        cb,
      ),
    );
    const owner = await operationRecord(operation.name);
    assert.equal(owner.kind, 'distribution.distribute-image');
    assert.ok(logLine(distribution2, 'operation started', operation.name), 'the second replica started the operation');
    assert.equal(logLine(stack.distributionProcess, 'operation started', operation.name), undefined, 'the first replica did not');

    // Kill the owner once a quarter of the image is across, while no receiver is done.
    const readMetadata = async (): Promise<DistributeImageMetadata> =>
      unpack(DistributeImageMetadata, (await call<Operation>((cb) => stack.distributionOperations.getOperation({ name: operation.name }, cb))).metadata!);
    const atKill = await waitFor(
      'a quarter of the image on a receiver',
      async () => {
        const metadata = await readMetadata();
        return metadata.transfers.some((transfer) => Number(transfer.progress?.bytesDone ?? 0) >= total / 4) ? metadata : undefined;
      },
      120_000,
    );
    const leaseAtKill = (await operationRecord(operation.name)).leaseExpiresAt;
    assert.ok(
      atKill.transfers.every((transfer) => transfer.state !== ImageReplica_State.STATE_AVAILABLE && Number(transfer.progress?.bytesDone ?? 0) < total),
      `no receiver was done at the kill: ${JSON.stringify(atKill.transfers.map((transfer) => [transfer.host, transfer.state, transfer.progress?.bytesDone]))}`,
    );
    const trackerAtStart = await Promise.all(receivers.map(trackerGiven));
    const killedAt = Date.now();
    distributionKilledAt = killedAt;
    await kill(distribution2);
    t.diagnostic(
      `killed the owning distribution replica at ${atKill.transfers.map((transfer) => `${transfer.host}=${Math.round(Number(transfer.progress?.bytesDone ?? 0) / MiB)} MiB/${transfer.progress?.peers ?? 0} peers`).join(', ')}; its lease ran ${leaseAtKill - killedAt} ms more`,
    );

    // The other replica claims it once the lease ran out (scan every 5 s) and resumes from the checkpoint.
    const resumed = await waitFor(
      'the first replica to resume the operation',
      async () => logLine(stack.distributionProcess, 'resuming operation', operation.name),
      60_000,
    );
    const resumedAt = Date.now();
    assert.equal(resumed['previousOwner'], owner.owner, 'taken over from the killed replica');
    assert.ok(resumedAt >= leaseAtKill - 1_000, `not resumed before the lease ran out (${resumedAt - leaseAtKill} ms after it)`);
    // Where the transfers stood then, from the replica records (kept by the agents' events, owner or not).
    const atResume = await Promise.all(
      receivers.map((host) => call<ImageReplica>((cb) => stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image: imageId }) }, cb))),
    );
    t.diagnostic(
      `taken over ${resumedAt - killedAt} ms after the kill (${resumedAt - leaseAtKill} ms after the lease ran out); replicas then: ${atResume.map((replica) => `${replica.host}=${ImageReplica_State[replica.state]}/${Math.round(Number(replica.progress?.bytesDone ?? 0) / MiB)} MiB/${replica.progress?.peers ?? 0} peers`).join(', ')}`,
    );

    const done = await stack.wait(operation.name, 150_000, stack.distributionOperations);
    assert.equal(done.done, true, 'the operation finished');
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const response = unpack(DistributeImageResponse, done.result.value);
    assert.deepEqual(response.failures, [], JSON.stringify(response.failures));
    assert.deepEqual(response.replicas.map((replica) => replica.host).sort(), receivers.map((host) => HOST_NAME.format({ host })).sort());
    for (const replica of response.replicas) assert.equal(replica.state, ImageReplica_State.STATE_AVAILABLE);
    assert.ok(logLine(stack.distributionProcess, 'operation done', operation.name), 'the surviving replica finished it');
    assert.equal((await operationRecord(operation.name)).leaseExpiresAt, 0);
    for (const host of receivers) await assertVerifiedCopy(host);
    t.diagnostic(`distribution finished ${Date.now() - killedAt} ms after the kill`);

    // image.available: once per receiver, none from elsewhere, nothing more after a grace period.
    await waitFor(
      'image.available from both receivers',
      async () => (receivers.every((host) => available.some((event) => event.host === HOST_NAME.format({ host }))) ? true : undefined),
      30_000,
    );
    await sleep(DUPLICATE_GRACE_MS);
    assert.deepEqual(
      available.map((event) => event.host).sort(),
      receivers.map((host) => HOST_NAME.format({ host })).sort(),
      `image.available events: ${JSON.stringify(available)}`,
    );
    assert.ok(available.every((event) => event.operation === operation.name));

    // Trackers: the receivers were told the killed replica's tracker, and keep it (FetchImage is idempotent).
    const trackerAfter = await Promise.all(receivers.map(trackerGiven));
    t.diagnostic(
      `trackers: killed replica ${trackerOf(distribution2)}, survivor ${trackerOf(stack.distributionProcess)}; receivers were given ${[...new Set(trackerAtStart)].join(', ')} and still hold ${[...new Set(trackerAfter)].join(', ')}; the origin seeds to the tracker of the replica that published (${trackerOf(stack.distributionProcess)})`,
    );
    assert.deepEqual(
      trackerAtStart,
      receivers.map(() => trackerOf(distribution2)),
    );

    for (const host of receivers) await setDownloadCap(host, 0);
  });

  it('a batch clone whose replica is killed mid-batch is finished by the other replica; every clone once, clone.done once per clone', async (t: TestContext) => {
    // hostC has no replica yet: its clones wait for the image (capped), while hostA's and hostB's are made at once.
    await setDownloadCap(hostC, DELIVERY_CAP_BYTES_PER_SECOND);
    const hosts = [hostA, hostB, hostC];
    const names = Array.from({ length: CLONE_COUNT }, (_, index) => `ha-${suffix}-${index + 1}`);
    const placed = new Map(names.map((name, index) => [name, HOST_NAME.format({ host: hosts[index % hosts.length]! })]));
    stack.track(...names);

    const operation = await call<Operation>((cb) =>
      cloning2Client.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: hosts.map((host) => HOST_NAME.format({ host })), maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: CLONE_COUNT,
          nameTemplate: `ha-${suffix}-{index}`,
          start: false,
          requestId: '',
        },
        cb,
      ),
    );
    const owner = await operationRecord(operation.name);
    assert.equal(owner.kind, 'cloning.clone-virtual-machines');
    assert.ok(logLine(cloning2, 'operation started', operation.name), 'the second cloning replica started the operation');
    const planned = unpack(CloneVirtualMachinesMetadata, operation.metadata!).clones;
    assert.deepEqual(new Map(planned.map((clone) => [clone.domainName, clone.host])), placed, 'the plan is round-robin over the hosts');

    // Kill the owner as soon as the first clone.done of the operation arrives: hostC's clones are still waiting.
    await waitFor('the first clone.done', async () => (cloneDone.some((event) => event.operation === operation.name) ? true : undefined), 60_000, 20);
    const killedAt = Date.now();
    await kill(cloning2);
    const leaseAtKill = (await operationRecord(operation.name)).leaseExpiresAt;
    const atKill = unpack(CloneVirtualMachinesMetadata, (await call<Operation>((cb) => stack.operations.getOperation({ name: operation.name }, cb))).metadata!);
    const countStates = (metadata: CloneVirtualMachinesMetadata): string =>
      Object.entries(
        metadata.clones.reduce<Record<string, number>>(
          (counts, clone) => ({ ...counts, [CloneResult_State[clone.state]]: (counts[CloneResult_State[clone.state]] ?? 0) + 1 }),
          {},
        ),
      )
        .map(([state, count]) => `${state}=${count}`)
        .join(' ');
    const doneAtKill = cloneDone.filter((event) => event.operation === operation.name).length;
    t.diagnostic(
      `killed the owning cloning replica after ${doneAtKill} clone.done events; checkpointed metadata then: ${countStates(atKill)}; its lease ran ${leaseAtKill - killedAt} ms more`,
    );
    assert.ok(
      atKill.clones.filter((clone) => clone.host === HOST_NAME.format({ host: hostC })).every((clone) => clone.state !== CloneResult_State.STATE_DONE),
      `${hostC}'s clones were not done at the kill: ${countStates(atKill)}`,
    );

    // The first cloning replica claims it (a new owner in KV) once the lease ran out.
    const claimed = await waitFor(
      'another replica to claim the operation',
      async () => {
        const record = await operationRecord(operation.name);
        return record.owner !== owner.owner ? record : undefined;
      },
      60_000,
    );
    const resumedAt = Date.now();
    assert.ok(resumedAt >= leaseAtKill - 1_000, `not claimed before the lease ran out (${resumedAt - leaseAtKill} ms after it)`);
    assert.notEqual(claimed.owner, '');
    t.diagnostic(`taken over ${resumedAt - killedAt} ms after the kill (${resumedAt - leaseAtKill} ms after the lease ran out)`);

    const done = await stack.wait(operation.name, 150_000);
    assert.equal(done.done, true, 'the operation finished');
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const clones = unpack(CloneVirtualMachinesResponse, done.result.value).clones;
    assert.equal(clones.length, CLONE_COUNT);
    for (const clone of clones) {
      assert.equal(clone.state, CloneResult_State.STATE_DONE, JSON.stringify(clone));
      assert.equal(clone.host, placed.get(clone.domainName), `${clone.domainName} on the planned host`);
      assert.match(clone.uuid, /^[0-9a-f-]{36}$/);
    }
    assert.deepEqual(new Set(clones.map((clone) => clone.uuid)).size, CLONE_COUNT, 'one UUID per clone');
    t.diagnostic(`clone batch finished ${Date.now() - killedAt} ms after the kill`);

    // libvirt: exactly the planned domains, each with the UUID of the result and its disk in its host's clone directory.
    const listed = (await stack.virsh('list', '--all', '--name')).stdout
      .split('\n')
      .map((line) => line.trim())
      .filter((name) => name.startsWith(`ha-${suffix}-`));
    assert.deepEqual([...listed].sort(), [...names].sort(), 'every clone exists once in libvirt, and nothing else of the batch');
    for (const clone of clones) {
      assert.equal((await stack.virsh('domuuid', clone.domainName)).stdout.trim(), clone.uuid);
      const host = hostOf(clone.host)!;
      const disks = (await stack.virsh('domblklist', clone.domainName)).stdout
        .split('\n')
        .map((line) => line.trim().split(/\s+/))
        .filter((fields) => fields[0] === 'vda');
      assert.deepEqual(
        disks.map((fields) => fields[1]),
        [join(agents.get(host)!.imageDirectory, 'clones', clone.domainName, 'vda.qcow2')],
      );
      assert.deepEqual(clone.overlays, [join(agents.get(host)!.imageDirectory, 'clones', clone.domainName, 'vda.qcow2')]);
    }
    // Disks: each host's clone directory holds exactly its clones, one overlay each, no prototypes or half-made clones.
    for (const host of [origin, ...hosts]) {
      const entries = await readdir(join(agents.get(host)!.imageDirectory, 'clones')).catch(() => [] as string[]);
      const expected = names.filter((name) => placed.get(name) === HOST_NAME.format({ host }));
      assert.deepEqual(entries.sort(), expected.sort(), `${host}'s clone directory`);
      for (const name of expected) {
        const files = (await readdir(join(agents.get(host)!.imageDirectory, 'clones', name))).filter((file) => file.endsWith('.qcow2'));
        assert.deepEqual(files, ['vda.qcow2'], `${name}: one overlay`);
      }
    }

    // clone.done: once per clone, from its host, with its UUID; no clone.failed.
    await waitFor(
      'clone.done for every clone',
      async () =>
        new Set(cloneDone.filter((event) => event.operation === operation.name).map((event) => event.domainName)).size === CLONE_COUNT ? true : undefined,
      30_000,
    );
    await sleep(DUPLICATE_GRACE_MS);
    const events = cloneDone.filter((event) => event.operation === operation.name);
    assert.equal(events.length, CLONE_COUNT, `clone.done events: ${JSON.stringify(events.map((event) => event.domainName).sort())}`);
    assert.equal(new Set(events.map((event) => event.sequence)).size, CLONE_COUNT, 'no event delivered twice');
    const uuids = new Map(clones.map((clone) => [clone.domainName, clone.uuid]));
    for (const event of events) {
      assert.equal(event.host, placed.get(event.domainName), `${event.domainName}'s clone.done names its host`);
      assert.equal(event.uuid, uuids.get(event.domainName), `${event.domainName}'s clone.done names its UUID`);
    }
    assert.deepEqual(cloneFailed, [], 'no clone.failed');
    assert.equal(cloneDone.length, CLONE_COUNT, 'no clone.done of another operation for these names');

    // hostC got the image through one DistributeImage (the resuming replica joined it by request_id), and one image.available.
    await assertVerifiedCopy(hostC);
    assert.deepEqual(
      available.filter((event) => event.host === HOST_NAME.format({ host: hostC })).length,
      1,
      `image.available events: ${JSON.stringify(available)}`,
    );
    const deliveries = (await operationRecords.list('*'))
      .map((entry) => entry.value)
      .filter((record) => record.kind === 'distribution.distribute-image' && record.name !== '');
    const toC: string[] = [];
    for (const record of deliveries) {
      const metadata = unpack(
        DistributeImageMetadata,
        (await call<Operation>((cb) => stack.distributionOperations.getOperation({ name: record.name }, cb))).metadata!,
      );
      if (metadata.transfers.some((transfer) => transfer.host === HOST_NAME.format({ host: hostC }))) toC.push(record.name);
    }
    assert.equal(toC.length, 1, `one DistributeImage brought the image to ${hostC}: ${toC.join(', ')}`);
    await setDownloadCap(hostC, 0);
  });

  it("the replica records stay AVAILABLE after the killed replica's unacknowledged events come back", async () => {
    // The shared durable consumer redelivers what the killed distribution replica had received but not
    // acknowledged once its ack wait (30 s) ran out; an old progress event must not undo an AVAILABLE record.
    const wait = distributionKilledAt + 35_000 - Date.now();
    if (wait > 0) await sleep(wait);
    for (const host of [hostA, hostB, hostC]) {
      const replica = await call<{ state: ImageReplica_State }>((cb) =>
        stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image: imageId }) }, cb),
      );
      assert.equal(ImageReplica_State[replica.state], 'STATE_AVAILABLE', `${host}'s replica record`);
    }
  });
});
