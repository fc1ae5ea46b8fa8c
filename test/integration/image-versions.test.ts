/**
 * Image versions through the public API on real parts (NATS, CA, inventory, distribution, two agents on the
 * private libvirtd): publishing onto an existing image id adds version 2 (storage key `<id>_v2`, its own directory
 * on the host), `latest` moves to it, version 1 still distributes by number, aliases are set and cleared with
 * UpdateImage (bad ones refused naming the field) and distribute, one version is deleted alone, and a publish while
 * another version of the id is PUBLISHING is refused before any operation exists.
 */
import assert from 'node:assert/strict';
import { access, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { unpack } from '../../services/common/domain/operations.js';
import { DistributeImageResponse } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Image, Image_State, ImageReplica_State, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';
import { call, failure } from '../harness/grpc.js';
import { Resources } from '../harness/index.js';
import { HOST_IMAGE_NAME, HOST_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

describe('image versions and aliases', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false, timeout: 600_000 }, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const origin = `ver-origin-${suffix}`;
  const vm = `ver-src-${suffix}`;
  const id = `ver-${suffix}`;
  let stack: CloneStack;
  let receiver: StackAgent;

  const publish = (requestId = '') =>
    call<Operation>((cb) =>
      stack.distribution.publishImage(
        { imageId: id, sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: origin, virtualMachine: vm }), description: '', labels: {}, requestId },
        cb,
      ),
    );

  async function finished<T>(operation: Operation, type: { decode(bytes: Uint8Array): T }): Promise<T> {
    const done = await stack.wait(operation.name, 240_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    return unpack(type as never, done.result.value) as T;
  }

  const distribute = (image: string, host: string) =>
    call<Operation>((cb) => stack.distribution.distributeImage({ image, hosts: [HOST_NAME.format({ host })], requestId: '' }, cb));

  const updateImage = (image: Partial<Image>, paths: string[]) =>
    call<Image>((cb) => stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}`, ...image }), updateMask: paths }, cb));

  before(async () => {
    stack = await startCloneStack(resources, origin);
    receiver = await stack.addAgent(`ver-b-${suffix}`);
    await stack.defineSourceVm(vm, 4);
    await stack.waitHostsReady([origin, receiver.host]);
  });
  after(() => resources.release());

  it('publishes version 1, then version 2 onto the same id; latest moves to 2; a second publish meanwhile is refused', async () => {
    const first = await finished(await publish(), Image);
    assert.equal(first.name, `images/${id}`);
    assert.equal(first.version, '1');
    assert.equal(first.state, Image_State.STATE_AVAILABLE);

    const second = await publish();
    // Version 2 is PUBLISHING from the start: another publish onto the id is refused before an operation exists.
    const refused = await failure((cb) =>
      stack.distribution.publishImage(
        { imageId: id, sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: origin, virtualMachine: vm }), description: '', labels: {}, requestId: '' },
        cb,
      ),
    );
    assert.equal(refused.code, GrpcStatus.FAILED_PRECONDITION, JSON.stringify(refused));
    assert.equal(refused.reason, 'ERROR_REASON_RESOURCE_STATE_CONFLICT');
    const v2 = await finished(second, Image);
    assert.equal(v2.name, `images/${id}/versions/2`);
    assert.equal(v2.version, '2');
    assert.equal(v2.state, Image_State.STATE_AVAILABLE);
    await access(join(stack.imageDirectory, 'images', `${id}_v2`, 'domain-template.xml'));
    const replica = await call<ImageReplica>((cb) =>
      stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: origin, image: `${id}_v2` }) }, cb),
    );
    assert.equal(replica.name, `hosts/${origin}/images/${id}/versions/2`);
    assert.equal(replica.image, `images/${id}`);
    assert.equal(replica.imageVersion, `images/${id}/versions/2`);
    assert.equal(replica.origin, true);

    const view = await updateImage({ keepVersions: 5 }, ['keep_versions']);
    assert.equal(view.name, `images/${id}`);
    assert.equal(view.version, '2');
    assert.deepEqual(view.versions, ['1', '2']);
    assert.deepEqual(view.aliases, { latest: '2' });
    assert.equal(view.keepVersions, 5);
  });

  it('distributes version 1 by number while 2 is latest', async () => {
    const response = await finished(await distribute(`images/${id}/versions/1`, receiver.host), DistributeImageResponse);
    assert.deepEqual(
      response.replicas.map((replica) => [replica.name, replica.imageVersion, replica.state]),
      [[`hosts/${receiver.host}/images/${id}`, `images/${id}/versions/1`, ImageReplica_State.STATE_AVAILABLE]],
    );
    await access(join(receiver.imageDirectory, 'images', id, 'domain-template.xml'));
  });

  it('sets and clears aliases with UpdateImage, refusing bad ones by field, and distributes by alias', async () => {
    for (const [aliases, what] of [
      [{ Stable: '1' }, 'an alias that is no DNS label'],
      [{ '9lives': '1' }, 'an alias that starts with a digit'],
      [{ latest: '1' }, 'latest'],
      [{ stable: '7' }, 'an unknown version'],
    ] as const) {
      const error = await failure((cb) =>
        stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}`, aliases }), updateMask: ['aliases'] }, cb),
      );
      assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, what);
      assert.deepEqual(error.fields, ['image.aliases'], what);
    }
    const badMask = await failure((cb) =>
      stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}` }), updateMask: ['description'] }, cb),
    );
    assert.deepEqual(badMask.fields, ['update_mask']);
    const badKeep = await failure((cb) =>
      stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}`, keepVersions: 1001 }), updateMask: ['keep_versions'] }, cb),
    );
    assert.deepEqual(badKeep.fields, ['image.keep_versions']);
    const unknown = await failure((cb) =>
      stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/none-${suffix}` }), updateMask: ['aliases'] }, cb),
    );
    assert.equal(unknown.code, GrpcStatus.NOT_FOUND);

    const set = await updateImage({ aliases: { stable: '2', old: '1' } }, ['aliases']);
    assert.deepEqual(set.aliases, { stable: '2', old: '1', latest: '2' });
    const response = await finished(await distribute(`images/${id}/versions/stable`, receiver.host), DistributeImageResponse);
    assert.deepEqual(
      response.replicas.map((replica) => replica.name),
      [`hosts/${receiver.host}/images/${id}/versions/2`],
    );
    await access(join(receiver.imageDirectory, 'images', `${id}_v2`, 'domain-template.xml'));
    const unknownAlias = await failure((cb) =>
      stack.distribution.distributeImage({ image: `images/${id}/versions/nope`, hosts: [HOST_NAME.format({ host: receiver.host })], requestId: '' }, cb),
    );
    assert.equal(unknownAlias.code, GrpcStatus.NOT_FOUND);

    const cleared = await updateImage({ aliases: { old: '1' } }, ['aliases']);
    assert.deepEqual(cleared.aliases, { old: '1', latest: '2' });
  });

  it('deletes one version alone, not the latest while older ones remain', async () => {
    const latest = await failure((cb) => stack.distribution.deleteImage({ name: `images/${id}/versions/2`, requestId: '' }, cb));
    assert.equal(latest.code, GrpcStatus.FAILED_PRECONDITION, JSON.stringify(latest));
    const deleting = await call<Operation>((cb) => stack.distribution.deleteImage({ name: `images/${id}/versions/old`, requestId: '' }, cb));
    const done = await stack.wait(deleting.name, 120_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    // Version 1's files left both hosts; version 2's stay.
    for (const directory of [stack.imageDirectory, receiver.imageDirectory]) {
      const left = (await readdir(join(directory, 'images'))).filter((name) => !name.endsWith('.replica.json') && name.startsWith(id));
      assert.deepEqual(left, [`${id}_v2`], directory);
    }
    const gone = await failure((cb) => stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: receiver.host, image: id }) }, cb));
    assert.equal(gone.code, GrpcStatus.NOT_FOUND);
    const view = await updateImage({ keepVersions: 0 }, ['keep_versions']);
    assert.deepEqual(view.versions, ['2']);
    assert.deepEqual(view.aliases, { latest: '2' }, 'the alias that pointed at version 1 went with it');

    // The next publish gets version 3: numbers are never reused.
    const third = await finished(await publish(), Image);
    assert.equal(third.name, `images/${id}/versions/3`);

    // images/{image} deletes every version.
    const all = await call<Operation>((cb) => stack.distribution.deleteImage({ name: `images/${id}`, requestId: '' }, cb));
    const allDone = await stack.wait(all.name, 120_000, stack.distributionOperations);
    assert.equal(allDone.result?.$case, 'response', JSON.stringify(allDone.result));
    const none = await failure((cb) => stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}` }), updateMask: ['aliases'] }, cb));
    assert.equal(none.code, GrpcStatus.NOT_FOUND);
  });
});
