/**
 * Unit tests of the event outbox's relay (services/common/platform/event-outbox.ts) with a fake store and a fake
 * JetStream: records go out in record order, an outage is waited out with a growing, jittered delay and
 * never given up, a record that fails on its own does not hold the others back, and the directory store
 * keeps records across a "restart" in order. The clone engine fails a batch whose clone.done it could
 * not record (it used to log "clone.done not published" and drop it), and the retry records it.
 */
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CloneEngine } from '../../services/agent/clone-engine.js';
import { readCloneMetadata } from '../../services/agent/hypervisor/index.js';
import type { DomainInfo, Libvirt } from '../../services/agent/hypervisor/libvirt.js';
import { backoffDelay } from '../../services/common/platform/concurrency.js';
import {
  DirectoryOutboxStore,
  OutboxEventPublisher,
  OutboxRelay,
  type OutboxRecord,
  type OutboxStore,
  type StoredRecord,
} from '../../services/common/platform/event-outbox.js';
import { CLONE_DONE } from '../../services/common/domain/event-types.js';
import type { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { metricsRegistry } from '../../services/common/platform/metrics.js';
import type { CloneDone } from '../../services/gen/cowherd/events/v1/events.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { CreateClonesRequest } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { writeTinyReplica } from '../harness/index.js';
import { VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** An in-memory store (what an earlier process left: `left`). */
class FakeStore implements OutboxStore {
  readonly records = new Map<string, StoredRecord>();
  private order = 0;
  constructor(private readonly left: StoredRecord[] = []) {
    for (const record of left) this.records.set(record.key, record);
    this.order = Math.max(0, ...left.map((record) => record.order));
  }
  async add(record: OutboxRecord): Promise<StoredRecord> {
    const order = ++this.order;
    const stored = { ...record, key: `r${order}`, order };
    this.records.set(stored.key, stored);
    return stored;
  }
  async leftovers(): Promise<StoredRecord[]> {
    return this.left.splice(0);
  }
  async remove(record: StoredRecord): Promise<void> {
    this.records.delete(record.key);
  }
}

function record(id: string, order: number): StoredRecord {
  return {
    subject: 'cowherd.events.clone.done.kvm-01',
    kind: 'clone.done',
    typeName: CLONE_DONE.typeName,
    id,
    data: new Uint8Array([1]),
    recordedAt: 0,
    key: `left-${order}`,
    order,
  };
}

const cloneDone = (name: string): CloneDone => ({
  imageVersion: '',
  virtualMachine: VIRTUAL_MACHINE_NAME.format({ host: 'kvm-01', virtualMachine: name }),
  host: 'hosts/kvm-01',
  domainName: name,
  uuid: '',
  image: '',
  sourceVirtualMachine: '',
  overlays: [],
  started: false,
  operation: '',
  occurTime: undefined,
  diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
});

/** Polls `condition` (the relay runs on real timers with tiny delays). */
async function until(condition: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

async function gaugeValue(): Promise<number> {
  const { values } = await metricsRegistry.getSingleMetric('cowherd_event_outbox_pending')!.get();
  return values[0]?.value ?? 0;
}

describe('event outbox relay', () => {
  it('publishes what an earlier process left first, then new records, in record order, and removes each', async () => {
    const store = new FakeStore([record('old-2', 2), record('old-1', 1)].sort((a, b) => a.order - b.order));
    const sent: string[] = [];
    const relay = new OutboxRelay(store, async (event) => void sent.push(event.id), log, { baseDelayMs: 1, maxDelayMs: 5 });
    await relay.start();
    const publisher = new OutboxEventPublisher(store, relay);
    for (const name of ['a', 'b', 'c']) await publisher.publish(CLONE_DONE, cloneDone(name), { host: 'kvm-01', id: `clone.done/${name}` });
    await until(() => sent.length === 5 && relay.pending === 0, 'five sends');
    assert.deepEqual(sent, ['old-1', 'old-2', 'clone.done/a', 'clone.done/b', 'clone.done/c']);
    assert.equal(store.records.size, 0, 'every acknowledged record removed');
    await relay.stop();
  });

  it('waits out an outage with growing jittered delays, never gives up, and resumes from the oldest record', async () => {
    const store = new FakeStore();
    let down = true;
    const attempts: string[] = [];
    const sent: string[] = [];
    const delays: number[] = [];
    const relay = new OutboxRelay(
      store,
      async (event) => {
        attempts.push(event.id);
        if (down) throw new Error('TIMEOUT');
        sent.push(event.id);
      },
      log,
      {
        window: 2,
        baseDelayMs: 10,
        maxDelayMs: 80,
        random: () => 1,
        // Records every wait of the relay; outage waits are short enough to run for real.
        sleep: (ms, signal) => {
          delays.push(ms);
          return new Promise((resolve) => {
            const timer = setTimeout(resolve, Math.min(ms, 20));
            signal.addEventListener('abort', () => (clearTimeout(timer), resolve()), { once: true });
          });
        },
      },
    );
    await relay.start();
    const publisher = new OutboxEventPublisher(store, relay);
    for (const name of ['a', 'b', 'c', 'd', 'e']) await publisher.publish(CLONE_DONE, cloneDone(name), { host: 'kvm-01', id: name });
    // Many failed windows: far more than any give-up limit a relay might have.
    await until(() => attempts.length >= 40, 'forty failed attempts');
    assert.equal(sent.length, 0);
    assert.equal(relay.pending, 5, 'nothing dropped while JetStream is unreachable');
    assert.ok(
      attempts.slice(0, 40).every((id) => id === 'a' || id === 'b'),
      'during the outage only the oldest window is tried',
    );
    const outageDelays = delays.filter((ms) => ms < 1e9);
    assert.deepEqual(outageDelays.slice(0, 5), [10, 20, 40, 80, 80], 'the delay doubles up to maxDelayMs');
    down = false;
    await until(() => sent.length === 5, 'all five after the outage');
    assert.deepEqual(sent, ['a', 'b', 'c', 'd', 'e'], 'record order survives the outage');
    assert.equal(store.records.size, 0);
    await relay.stop();
  });

  it('a record JetStream refuses on its own waits its own backoff while later records go out', async () => {
    const store = new FakeStore();
    const sent: string[] = [];
    let refusals = 0;
    const relay = new OutboxRelay(
      store,
      async (event) => {
        if (event.id === 'forbidden') {
          refusals++;
          throw new Error('Permissions Violation');
        }
        sent.push(event.id);
      },
      log,
      { baseDelayMs: 1, maxDelayMs: 5, maxParkedDelayMs: 20 },
    );
    await relay.start();
    const publisher = new OutboxEventPublisher(store, relay);
    await publisher.publish(CLONE_DONE, cloneDone('x'), { host: 'kvm-02', id: 'forbidden' });
    await publisher.publish(CLONE_DONE, cloneDone('y'), { host: 'kvm-01', id: 'fine-1' });
    await until(() => sent.includes('fine-1'), 'the record after a refused one');
    await publisher.publish(CLONE_DONE, cloneDone('z'), { host: 'kvm-01', id: 'fine-2' });
    await until(() => sent.includes('fine-2') && refusals >= 3, 'later records and repeated tries of the refused one');
    assert.equal(relay.pending, 1, 'the refused record is kept, not dropped');
    assert.ok([...store.records.values()].some((stored) => stored.id === 'forbidden'));
    await relay.stop();
  });

  it('counts pending records in cowherd_event_outbox_pending', async () => {
    const store = new FakeStore();
    let release: () => void = () => undefined;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const relay = new OutboxRelay(store, () => gate, log, { baseDelayMs: 1 });
    await relay.start();
    const before = await gaugeValue();
    const publisher = new OutboxEventPublisher(store, relay);
    await publisher.publish(CLONE_DONE, cloneDone('a'), { host: 'kvm-01', id: 'g-a' });
    await publisher.publish(CLONE_DONE, cloneDone('b'), { host: 'kvm-01', id: 'g-b' });
    assert.equal(await gaugeValue(), before + 2);
    release();
    await until(() => relay.pending === 0, 'drained');
    assert.equal(await gaugeValue(), before);
    await relay.stop();
  });

  it('refuses an event without an id or with a host that is no host id, recording nothing', async () => {
    const store = new FakeStore();
    const relay = new OutboxRelay(store, async () => undefined, log);
    const publisher = new OutboxEventPublisher(store, relay);
    await assert.rejects(publisher.publish(CLONE_DONE, cloneDone('a'), { host: 'kvm-01', id: '' }), /without an id/);
    await assert.rejects(publisher.publish(CLONE_DONE, cloneDone('a'), { host: 'Not.A.Host', id: 'x' }), /not a host id/);
    assert.equal(store.records.size, 0);
  });

  it('backoff: equal jitter between half and all of the doubling delay, capped', () => {
    assert.equal(
      backoffDelay(1, 100, 5_000, () => 0),
      50,
    );
    assert.equal(
      backoffDelay(1, 100, 5_000, () => 1),
      100,
    );
    assert.equal(
      backoffDelay(4, 100, 5_000, () => 1),
      800,
    );
    assert.equal(
      backoffDelay(50, 100, 5_000, () => 0.5),
      3_750,
    );
  });
});

describe('directory outbox store', () => {
  it('keeps records as files across a restart, in order, and sets aside what it cannot read', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-outbox-'));
    try {
      const first = await DirectoryOutboxStore.open(join(directory, 'images-root', 'outbox'), log);
      assert.equal((await stat(join(directory, 'images-root'))).mode & 0o777, 0o755, 'a parent it makes (the image directory) stays traversable');
      assert.equal((await stat(join(directory, 'images-root', 'outbox'))).mode & 0o777, 0o700);
      const envelope = (id: string): OutboxRecord => ({
        subject: 'cowherd.events.clone.done.kvm-01',
        kind: 'clone.done',
        typeName: CLONE_DONE.typeName,
        id,
        data: new Uint8Array([1, 2, 3]),
        recordedAt: 1,
      });
      const stored = await Promise.all(['a', 'b', 'c'].map((id) => first.add(envelope(id))));
      await first.remove(stored[1]!);
      // A write that died before its rename, and a damaged record.
      await writeFile(join(directory, 'images-root', 'outbox', '.0000000000000009.event.abcd.tmp'), '{');
      await writeFile(join(directory, 'images-root', 'outbox', '0000000000000010.event'), 'not json');

      const second = await DirectoryOutboxStore.open(join(directory, 'images-root', 'outbox'), log);
      const left = await second.leftovers();
      assert.deepEqual(
        left.map((item) => item.id),
        ['a', 'c'],
      );
      assert.deepEqual([...left[0]!.data], [1, 2, 3]);
      assert.deepEqual(await second.leftovers(), [], 'handed out once');
      const next = await second.add(envelope('d'));
      assert.ok(next.order > 10, 'new records sort after everything found');
      const names = await readdir(join(directory, 'images-root', 'outbox'));
      assert.ok(!names.some((name) => name.endsWith('.tmp')), 'temporary files cleared');
      assert.ok(names.includes('0000000000000010.event.bad'), 'unreadable record set aside');
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });
});

describe('clone engine and the outbox', () => {
  it('a batch whose clone.done cannot be recorded fails instead of dropping it, and its retry records it under the same id', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-outbox-engine-'));
    try {
      await writeTinyReplica(directory);
      const defined: DomainInfo[] = [];
      const define = async (xml: string): Promise<void> => {
        const clone = readCloneMetadata(xml);
        defined.push({
          name: /<name>([^<]+)<\/name>/.exec(xml)![1]!,
          uuid: /<uuid>([^<]+)<\/uuid>/.exec(xml)![1]!,
          state: 'shut off',
          domainType: 'qemu',
          vcpus: 1,
          memoryBytes: 64 * 1024 * 1024,
          disks: [],
          ...(clone ? { clone } : {}),
        } as DomainInfo);
      };
      const libvirt = { uri: 'test:///default', listDomains: async () => [...defined], define } as unknown as Libvirt;
      // The outbox's disk refuses the first batch's records (full), then takes them.
      let diskFull = true;
      const recorded: string[] = [];
      const publish = async (_type: unknown, _payload: unknown, options: { id: string }): Promise<void> => {
        if (diskFull) throw new Error('ENOSPC: no space left on device');
        recorded.push(options.id);
      };
      const engine = new CloneEngine({ host: 'kvm-01', imageDirectory: directory, hypervisor: 'kvm', libvirt, events: { publish }, log });
      const names = ['a', 'b', 'c'];
      const operation = 'operations/00000000-0000-4000-8000-00000000000a';
      const request = CreateClonesRequest.fromPartial({
        source: { $case: 'image', value: 'images/tiny' },
        clones: names.map((domainName) => ({ domainName, start: false })),
        operation,
        requestId: `${operation}/hosts/kvm-01`,
      });

      await assert.rejects(
        engine.createClones(request),
        (error: CowherdError) =>
          error.code === GrpcStatus.RESOURCE_EXHAUSTED && /ENOSPC/.test(error.message) && /retry with the same request_id/.test(error.message),
        'the call fails, saying that a retry records the events',
      );
      assert.equal(defined.length, 3, 'the clones were made');
      diskFull = false;
      const retried = await engine.createClones(request);
      assert.deepEqual(
        retried.map((result) => result.status?.code ?? 0),
        [0, 0, 0],
      );
      assert.deepEqual(
        recorded.sort(),
        names.map((name) => `clone.done/${operation}/kvm-01/${name}`).sort(),
        'the retry records the clone.done each clone owed',
      );
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });
});
