/**
 * ResourceIndex (the inventory's in-memory view of a KV bucket) on a real nats-server, with two indexes
 * as two replicas would hold them. One replica is made to lag for certain by stopping its watch: a
 * write decided on its stale view is decided again on the newer value (no lost update), a delete at a
 * stale revision deletes nothing, and sync refuses to answer from a view that cannot catch up. Also: the
 * VM index's name order, kept by splicing while keys come and go.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { jsonCodec, KvStore } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { vmNameOfKey } from '../../services/inventory/inventory.js';
import { ResourceIndex } from '../../services/inventory/resource-index.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

type Counter = { count: number; by: string };

describe('ResourceIndex across replicas', () => {
  const resources = new Resources();
  const connections: Nats[] = [];
  let open: (bucket: string, options?: Parameters<typeof ResourceIndex.open>[1]) => Promise<ResourceIndex<Counter>>;

  before(async () => {
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    const log = createLogger({ service: 'test', level: 'silent' });
    for (const name of ['replica-a', 'replica-b']) {
      const connection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'inventory', { subdirectory: name }), name, log });
      resources.defer(() => connection.close());
      connections.push(connection);
    }
    let next = 0;
    open = async (bucket, options) => {
      const connection = connections[next++ % connections.length]!;
      const index = await ResourceIndex.open(await KvStore.open(connection.jetstream, bucket, jsonCodec<Counter>()), options);
      resources.defer(() => index.stop());
      return index;
    };
  });
  after(() => resources.release());

  it("sync makes another replica's write visible before deciding", async () => {
    const a = await open('counters-sync');
    const b = await open('counters-sync');
    for (let round = 0; round < 50; round++) {
      await a.replace('k', (current) => ({ count: (current?.count ?? 0) + 1, by: 'a' }));
      await b.sync();
      assert.equal(b.get('k')?.value.count, round * 2 + 1, "b sees a's write after sync");
      await b.replace('k', (current) => ({ count: (current?.count ?? 0) + 1, by: 'b' }));
      await a.sync();
      assert.equal(a.get('k')?.value.count, round * 2 + 2);
    }
  });

  it('decides again on the newer value when its view is stale: no lost update, no stale delete', async () => {
    const a = await open('counters-stale', { syncTimeoutMs: 300 });
    const b = await open('counters-stale', { syncTimeoutMs: 300 });
    await a.replace('k', () => ({ count: 1, by: 'a' }));
    await b.sync();
    assert.equal(b.get('k')?.value.count, 1);
    // b lags for certain from here on: its watch is gone.
    b.stop();
    await a.replace('k', (current) => ({ count: current!.count + 1, by: 'a' }));
    assert.equal(b.get('k')?.value.count, 1, 'b has not seen the second write');

    const rejected = await b.sync().then(
      () => undefined,
      (error: unknown) => error,
    );
    assert.ok(rejected instanceof CowherdError && rejected.code === GrpcStatus.UNAVAILABLE, 'sync does not pretend a stale view is current');

    // An increment decided on b's stale view (1) would store 11 and lose a's write; it must store 12.
    const result = await b.replace('k', (current) => ({ count: current!.count + 10, by: 'b' }));
    assert.deepEqual([result.written, result.previous?.count, result.value?.count], [true, 2, 12]);
    assert.equal((await a.store.get('k'))?.value.count, 12);

    // A delete at the revision b saw before a's next write deletes nothing.
    const seen = b.get('k')!.revision;
    await a.replace('k', (current) => ({ count: current!.count + 1, by: 'a' }));
    assert.equal(await b.remove('k', seen), false);
    assert.equal((await a.store.get('k'))?.value.count, 13, 'the newer value survives');
    // removeWhile decides again on the newer value: b's stale view says 12, KV holds 13, so it stays...
    assert.equal(b.get('k')?.value.count, 12);
    assert.equal(await b.removeWhile('k', (current) => current.count === 12), false);
    assert.equal((await a.store.get('k'))?.value.count, 13);
    // ...and goes when the predicate holds for the newer value.
    assert.equal(await b.removeWhile('k', (current) => current.count === 13), true);
    assert.equal(await a.store.get('k'), undefined);
    await a.sync();
    assert.equal(a.get('k'), undefined, 'a saw the delete');
  });

  it('orders the VM index by resource name, kept in place while keys come and go', async () => {
    const a = await open('vms-order', { orderOf: vmNameOfKey });
    const b = await open('vms-order', { orderOf: vmNameOfKey });
    const ids = ['vm-000', 'vm-00.web', 'vm-001', 'vm-0.a.b', 'web-1', 'web.1', 'web0', 'a', 'Z'];
    const keyOf = (host: string, id: string): string => `${host}.${id.replace(/\./g, '=')}`;
    for (const host of ['h1', 'h-1', 'h1a']) for (const id of ids) await a.replace(keyOf(host, id), () => ({ count: 0, by: id }));
    await b.sync();
    const expected = (index: ResourceIndex<Counter>): string[] => [...index.keys()].map(vmNameOfKey).sort();
    for (const index of [a, b]) {
      const names = index.valuesWithPrefix('').map((entry) => entry.order);
      assert.deepEqual(names, expected(index), 'every name, in name order');
      assert.deepEqual(
        index.valuesWithPrefix('hosts/h1/virtualMachines/').map((entry) => entry.order),
        [...ids].sort().map((id) => VIRTUAL_MACHINE_NAME.format({ host: 'h1', virtualMachine: id })),
        "one host's VMs by prefix (not h1a's, not h-1's)",
      );
    }
    // Paging walks the same order, resuming after the last name, with and without a filter.
    const pageAll = (prefix: string, matches: (value: Counter) => boolean): string[] => {
      const seen: string[] = [];
      let after = '';
      for (;;) {
        const { entries, more } = b.page(prefix, after, 4, matches);
        seen.push(...entries.map((entry) => entry.order));
        if (!more) return seen;
        after = entries.at(-1)!.order;
      }
    };
    assert.deepEqual(
      pageAll('', () => true),
      expected(b),
    );
    assert.deepEqual(
      pageAll('hosts/h1/virtualMachines/', (value) => value.by.startsWith('vm-')),
      ['vm-0.a.b', 'vm-00.web', 'vm-000', 'vm-001'].map((id) => VIRTUAL_MACHINE_NAME.format({ host: 'h1', virtualMachine: id })),
    );
    assert.deepEqual(
      b.page('hosts/h1/virtualMachines/', 'hosts/h1/virtualMachines/vm-001', 4, () => true).entries.map((entry) => entry.order),
      ['web-1', 'web.1', 'web0'].map((id) => VIRTUAL_MACHINE_NAME.format({ host: 'h1', virtualMachine: id })),
    );
    // Splices on insert and delete keep the same order a full sort gives.
    await a.remove(keyOf('h1', 'vm-00.web'));
    await a.replace(keyOf('h1', 'vm-00.0'), () => ({ count: 0, by: 'new' }));
    await a.remove(keyOf('h-1', 'Z'));
    await b.sync();
    for (const index of [a, b])
      assert.deepEqual(
        index.valuesWithPrefix('').map((entry) => entry.order),
        expected(index),
      );
    assert.ok(!b.valuesWithPrefix('').some((entry) => entry.order === 'hosts/h1/virtualMachines/vm-00.web'));
  });
});
