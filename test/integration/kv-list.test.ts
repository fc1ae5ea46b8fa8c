/**
 * KvStore.list on a real nats-server while the listed keys are being written, as distribution's replica
 * records are while transfers run: every key exactly once, none missing, no hang.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { jsonCodec, KvStore } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';

describe('KvStore.list under concurrent writes', () => {
  const resources = new Resources();
  let store: KvStore<{ host: string; step: number }>;

  before(async () => {
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    const connection = await connectNats({
      servers: [nats.url],
      tls: await pki.files('service', 'distribution'),
      name: 'kv-list-test',
      log: createLogger({ service: 'test', level: 'silent' }),
    });
    resources.defer(() => connection.close());
    store = await KvStore.open(connection.jetstream, 'kv-list-test', jsonCodec<{ host: string; step: number }>());
  });
  after(() => resources.release());

  it('lists every key once while they are updated', { timeout: 60_000 }, async () => {
    const hosts = ['a', 'b', 'c', 'd'];
    await store.put('origin.img', { host: 'origin', step: 0 });
    await store.put('other.img2', { host: 'other', step: 0 });
    let stop = false;
    const writers = hosts.map(async (host) => {
      for (let step = 0; !stop; step++) {
        await store.put(`${host}.img`, { host, step });
        await new Promise((resolve) => setTimeout(resolve, Math.random() * 30));
      }
    });
    const problems: string[] = [];
    try {
      await new Promise((resolve) => setTimeout(resolve, 50));
      for (let round = 0; round < 300; round++) {
        const started = performance.now();
        const listed = (await store.list('*.img')).map((entry) => entry.value.host);
        if (performance.now() - started > 1_500) problems.push(`list ${round} took ${Math.round(performance.now() - started)} ms`);
        const expected = ['origin', ...hosts];
        if (listed.length !== expected.length || !expected.every((host) => listed.includes(host))) problems.push(`list ${round}: ${listed.join(' ')}`);
      }
    } finally {
      stop = true;
      await Promise.all(writers);
    }
    assert.deepEqual(problems.slice(0, 10), [], `${problems.length} of 300 lists were wrong`);
    // Ordered by revision, deleted keys left out.
    await store.delete('b.img');
    const final = await store.list('*.img');
    assert.deepEqual(final.map((entry) => entry.value.host).sort(), ['a', 'c', 'd', 'origin']);
    assert.deepEqual(
      final.map((entry) => entry.revision),
      [...final.map((entry) => entry.revision)].sort((x, y) => x - y),
    );
    assert.deepEqual(await store.list('*.nothing'), []);
  });
});
