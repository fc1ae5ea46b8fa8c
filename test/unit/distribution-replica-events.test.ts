/** Unit tests of distribute.ts's applyReplicaEvent over an in-memory KV: agents' events become replica records. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import pino from 'pino';
import { applyReplicaEvent } from '../../services/distribution/distribute.js';
import { IMAGE_AVAILABLE, IMAGE_REPLICA_DAMAGED, IMAGE_TRANSFER_FAILED, IMAGE_TRANSFER_PROGRESS } from '../../services/common/domain/event-types.js';
import type { KvStore } from '../../services/common/platform/kv.js';
import { Image, Image_State, ImageReplica, ImageReplica_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { HOST_NAME } from '../../services/common/domain/resource-names.js';

function memoryKv<T>(): KvStore<T> & { values: Map<string, T> } {
  const values = new Map<string, T>();
  return {
    values,
    get: async (key: string) => (values.has(key) ? { key, value: values.get(key)!, revision: 1 } : undefined),
    mutate: async (key: string, change: (current: T | undefined) => T | undefined) => {
      const next = change(values.get(key));
      if (next === undefined) return undefined;
      values.set(key, next);
      return { key, value: next, revision: 1 };
    },
  } as unknown as KvStore<T> & { values: Map<string, T> };
}

describe('applyReplicaEvent', () => {
  const log = pino({ level: 'silent' });
  const images = memoryKv<Image>();
  images.values.set('img', Image.fromPartial({ name: 'images/img', state: Image_State.STATE_AVAILABLE }));
  const replicas = memoryKv<ImageReplica>();
  const deps = { images, replicas };
  const event = (
    type: typeof IMAGE_AVAILABLE | typeof IMAGE_TRANSFER_PROGRESS | typeof IMAGE_TRANSFER_FAILED | typeof IMAGE_REPLICA_DAMAGED,
    payload: object,
    host = 'kvm-1',
  ) =>
    ({
      subject: `cowherd.events.x.${host}`,
      host,
      typeName: type.typeName,
      payload: { image: 'images/img', host: HOST_NAME.format({ host }), ...payload },
      sequence: 1,
      deliveries: 1,
    }) as never;

  it('moves a record through progress to AVAILABLE, and ignores older events delivered late', async () => {
    replicas.values.set(
      'kvm-1.img',
      ImageReplica.fromPartial({ name: 'hosts/kvm-1/images/img', state: ImageReplica_State.STATE_TRANSFERRING, updateTime: new Date(0) }),
    );
    const before = new Date();
    await applyReplicaEvent(deps, event(IMAGE_TRANSFER_PROGRESS, { state: ImageReplica_State.STATE_VERIFYING, occurTime: before }), log);
    assert.equal(replicas.values.get('kvm-1.img')!.state, ImageReplica_State.STATE_VERIFYING);
    await applyReplicaEvent(deps, event(IMAGE_AVAILABLE, { totalBytes: '10', origin: false, occurTime: new Date() }), log);
    assert.equal(replicas.values.get('kvm-1.img')!.state, ImageReplica_State.STATE_AVAILABLE);
    // A progress or failure event from before AVAILABLE, redelivered after it, changes nothing.
    await applyReplicaEvent(deps, event(IMAGE_TRANSFER_PROGRESS, { state: ImageReplica_State.STATE_TRANSFERRING, occurTime: before }), log);
    await applyReplicaEvent(deps, event(IMAGE_TRANSFER_FAILED, { occurTime: before }), log);
    assert.equal(replicas.values.get('kvm-1.img')!.state, ImageReplica_State.STATE_AVAILABLE);
    // A newer one (the agent fetches changed files again) does.
    await applyReplicaEvent(
      deps,
      event(IMAGE_TRANSFER_PROGRESS, { state: ImageReplica_State.STATE_TRANSFERRING, occurTime: new Date(Date.now() + 1000) }),
      log,
    );
    assert.equal(replicas.values.get('kvm-1.img')!.state, ImageReplica_State.STATE_TRANSFERRING);
  });

  it('image.replica_damaged turns an AVAILABLE record FAILED and lists a generation kept for its dependents; a late copy after the repair changes nothing', async () => {
    replicas.values.set(
      'kvm-4.img',
      ImageReplica.fromPartial({
        name: 'hosts/kvm-4/images/img',
        state: ImageReplica_State.STATE_AVAILABLE,
        generation: '1',
        path: '/i/images/img',
        updateTime: new Date(0),
      }),
    );
    const found = new Date();
    const damage = {
      replica: 'hosts/kvm-4/images/img',
      generation: '1',
      path: '/i/images/img',
      damagedFiles: ['vda.qcow2'],
      badPieces: 1,
      dependentVirtualMachines: ['hosts/kvm-4/virtualMachines/web-1'],
      occurTime: found,
    };
    await applyReplicaEvent(deps, event(IMAGE_REPLICA_DAMAGED, damage, 'kvm-4'), log);
    const failed = replicas.values.get('kvm-4.img')!;
    assert.equal(failed.state, ImageReplica_State.STATE_FAILED);
    assert.equal(failed.error?.message, 'hosts/kvm-4/images/img: vda.qcow2 damaged after verification (1 bad pieces)');
    assert.deepEqual(
      failed.damagedGenerations.map((entry) => [entry.generation, entry.path, entry.dependentVirtualMachines]),
      [['1', '/i/images/img', ['hosts/kvm-4/virtualMachines/web-1']]],
    );
    // The repair (generation 2) is recorded, then the damage event is delivered again: nothing moves back.
    replicas.values.set('kvm-4.img', {
      ...failed,
      state: ImageReplica_State.STATE_AVAILABLE,
      generation: '2',
      path: '/i/images/img.generation-2',
      error: undefined,
      updateTime: new Date(found.getTime() + 1000),
    });
    await applyReplicaEvent(deps, event(IMAGE_REPLICA_DAMAGED, damage, 'kvm-4'), log);
    assert.equal(replicas.values.get('kvm-4.img')!.state, ImageReplica_State.STATE_AVAILABLE);
    assert.equal(replicas.values.get('kvm-4.img')!.damagedGenerations.length, 1);
  });

  it('a late copy of an earlier image.available neither undoes damage found since nor goes back a generation', async () => {
    const available = new Date(Date.now() - 5000);
    replicas.values.set(
      'kvm-5.img',
      ImageReplica.fromPartial({ name: 'hosts/kvm-5/images/img', state: ImageReplica_State.STATE_TRANSFERRING, generation: '1', updateTime: new Date(0) }),
    );
    await applyReplicaEvent(deps, event(IMAGE_AVAILABLE, { totalBytes: '10', generation: '1', occurTime: available }, 'kvm-5'), log);
    assert.equal(replicas.values.get('kvm-5.img')!.state, ImageReplica_State.STATE_AVAILABLE);
    await applyReplicaEvent(
      deps,
      event(
        IMAGE_REPLICA_DAMAGED,
        {
          replica: 'hosts/kvm-5/images/img',
          generation: '1',
          path: '/i/images/img',
          damagedFiles: ['vda.qcow2'],
          badPieces: 1,
          dependentVirtualMachines: [],
          occurTime: new Date(),
        },
        'kvm-5',
      ),
      log,
    );
    assert.equal(replicas.values.get('kvm-5.img')!.state, ImageReplica_State.STATE_FAILED);
    // The first availability again (redelivered, or stored twice after a long NATS outage): the damage stands.
    await applyReplicaEvent(deps, event(IMAGE_AVAILABLE, { totalBytes: '10', generation: '1', occurTime: available }, 'kvm-5'), log);
    assert.equal(replicas.values.get('kvm-5.img')!.state, ImageReplica_State.STATE_FAILED);
    // The repair's availability (a new generation) is applied and records its generation.
    await applyReplicaEvent(deps, event(IMAGE_AVAILABLE, { totalBytes: '10', generation: '2', occurTime: new Date(Date.now() + 1000) }, 'kvm-5'), log);
    assert.equal(replicas.values.get('kvm-5.img')!.state, ImageReplica_State.STATE_AVAILABLE);
    assert.equal(replicas.values.get('kvm-5.img')!.generation, '2');
    // Generation 1's availability after that changes nothing.
    replicas.values.set('kvm-5.img', { ...replicas.values.get('kvm-5.img')!, state: ImageReplica_State.STATE_TRANSFERRING });
    await applyReplicaEvent(deps, event(IMAGE_AVAILABLE, { totalBytes: '10', generation: '1', occurTime: new Date(Date.now() + 2000) }, 'kvm-5'), log);
    assert.equal(replicas.values.get('kvm-5.img')!.state, ImageReplica_State.STATE_TRANSFERRING);
    assert.equal(replicas.values.get('kvm-5.img')!.generation, '2');
  });

  it('drops events whose payload names another host than the subject vouches for', async () => {
    await applyReplicaEvent(deps, { ...(event(IMAGE_AVAILABLE, { totalBytes: '10', occurTime: new Date() }, 'kvm-2') as object), host: 'kvm-3' } as never, log);
    assert.equal(replicas.values.has('kvm-3.img'), false);
    assert.equal(replicas.values.has('kvm-2.img'), false);
  });
});
