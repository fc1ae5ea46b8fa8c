/**
 * Image lineage on real parts: a replica or an image that any VM depends on is never deleted (the
 * dependents are named in the error), an unused replica and image can be deleted, and the agent removes
 * the replica's files.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { ImageReplica, ImageReplica_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Resources } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { startCloneStack, type CloneStack } from '../harness/clone-stack.js';
import { HOST_IMAGE_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);

describe('image lineage: nothing a VM depends on is deleted', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  let stack: CloneStack;
  const suffix = Math.random().toString(36).slice(2, 7);
  const used = `used-${suffix}`;
  const unused = `unused-${suffix}`;

  before(async () => {
    stack = await startCloneStack(resources, 'lineage-host');
    const directory = await resources.tempDir('cowherd-test-');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(directory, 'base.qcow2'), '64M']);
    await stack.addImage(used, join(directory, 'base.qcow2'));
    await stack.addImage(unused, join(directory, 'base.qcow2'));
    const deadline = Date.now() + 20_000;
    while (
      Date.now() < deadline &&
      !(await call<{ state: number }>((cb) => stack.inventory.getHost({ name: 'hosts/lineage-host' }, cb)).then(
        (host) => host.state === 1,
        () => false,
      ))
    )
      await new Promise((resolve) => setTimeout(resolve, 200));
    stack.track(`${used}-1`);
    const operation = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: IMAGE_NAME.format({ image: used }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: ['hosts/lineage-host'], maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: 1,
          nameTemplate: `${used}-{index}`,
          start: false,
          requestId: '',
        },
        cb,
      ),
    );
    const done = await stack.wait(operation.name);
    assert.equal(done.result?.$case, 'response');
    // Inventory must know the clone's lineage before the rule can see it.
    const until = Date.now() + 15_000;
    while (Date.now() < until) {
      const page = await call<{ virtualMachines: unknown[] }>((cb) =>
        stack.inventory.listVirtualMachines(
          { parent: 'hosts/-', pageSize: 10, pageToken: '', filter: `source_image = "${IMAGE_NAME.format({ image: used })}"` },
          cb,
        ),
      );
      if (page.virtualMachines.length > 0) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  });
  after(() => resources.release());

  it('collects an unused replica that is neither an origin nor the last AVAILABLE one', async () => {
    const spare = `spare-${suffix}`;
    const directory = await resources.tempDir('cowherd-test-');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(directory, 'spare.qcow2'), '16M']);
    await stack.addImage(spare, join(directory, 'spare.qcow2'));
    // This host's copy is a received one; the origin copy lives on another host.
    await stack.putReplica(
      ImageReplica.fromPartial({
        name: HOST_IMAGE_NAME.format({ host: 'lineage-host', image: spare }),
        image: IMAGE_NAME.format({ image: spare }),
        host: 'hosts/lineage-host',
        state: ImageReplica_State.STATE_AVAILABLE,
        origin: false,
      }),
    );
    await stack.putReplica(
      ImageReplica.fromPartial({
        name: HOST_IMAGE_NAME.format({ host: 'ghost-host', image: spare }),
        image: IMAGE_NAME.format({ image: spare }),
        host: 'hosts/ghost-host',
        state: ImageReplica_State.STATE_AVAILABLE,
        origin: true,
      }),
    );
    const dry = await call<{ replicas: ImageReplica[] }>((cb) =>
      stack.distribution.collectImageReplicas({ parent: 'hosts/-', filter: '', validateOnly: true }, cb),
    );
    assert.deepEqual(
      dry.replicas.map((replica) => replica.name),
      [HOST_IMAGE_NAME.format({ host: 'lineage-host', image: spare })],
      'only the spare, never the used image or an origin',
    );
    assert.ok(existsSync(join(stack.imageDirectory, 'images', spare)), 'validate_only deletes nothing');
    const collected = await call<{ replicas: ImageReplica[]; failures: unknown[] }>((cb) =>
      stack.distribution.collectImageReplicas(
        { parent: 'hosts/lineage-host', filter: `image = "${IMAGE_NAME.format({ image: spare })}"`, validateOnly: false },
        cb,
      ),
    );
    assert.equal(collected.replicas.length, 1);
    assert.deepEqual(collected.failures, []);
    assert.ok(!existsSync(join(stack.imageDirectory, 'images', spare)), 'the spare replica files are gone');
    assert.ok(existsSync(join(stack.imageDirectory, 'images', used)), 'the used image stays');
  });

  it('refuses to delete a used replica or image, naming the dependents, and changes nothing', async () => {
    const replica = await failure((cb) => stack.distribution.deleteImageReplica({ name: HOST_IMAGE_NAME.format({ host: 'lineage-host', image: used }) }, cb));
    assert.equal(replica.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(replica.reason, 'ERROR_REASON_IMAGE_IN_USE');
    assert.match(replica.metadata['dependents'] ?? '', new RegExp(`${used}-1`));
    const image = await failure((cb) => stack.distribution.deleteImage({ name: IMAGE_NAME.format({ image: used }), requestId: '' }, cb));
    assert.equal(image.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(image.reason, 'ERROR_REASON_IMAGE_IN_USE');
    assert.ok(existsSync(join(stack.imageDirectory, 'images', used)), 'the files are still there');
    assert.equal(
      (await failure((cb) => stack.distribution.deleteImageReplica({ name: 'hosts/lineage-host/images/../x' }, cb))).code,
      GrpcStatus.INVALID_ARGUMENT,
    );
    assert.equal((await failure((cb) => stack.distribution.deleteImage({ name: 'images/absent', requestId: '' }, cb))).code, GrpcStatus.NOT_FOUND);
  });

  it('deletes an unused image with its replica files, and the used one once its clone is gone', async () => {
    const last = await failure((cb) => stack.distribution.deleteImageReplica({ name: HOST_IMAGE_NAME.format({ host: 'lineage-host', image: unused }) }, cb));
    assert.equal(last.reason, 'ERROR_REASON_LAST_AVAILABLE_REPLICA');
    const operation = await call<Operation>((cb) => stack.distribution.deleteImage({ name: IMAGE_NAME.format({ image: unused }), requestId: '' }, cb));
    const done = await stack.wait(operation.name, 60_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    assert.ok(!existsSync(join(stack.imageDirectory, 'images', unused)), 'replica files removed');
    assert.equal((await failure((cb) => stack.inventory.getImage({ name: IMAGE_NAME.format({ image: unused }), view: 0 }, cb))).code, GrpcStatus.NOT_FOUND);

    await call((cb) =>
      stack.cloning.deleteVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host: 'lineage-host', virtualMachine: `${used}-1` }), force: false }, cb),
    );
    const until = Date.now() + 15_000;
    let deleted: Operation | undefined;
    while (Date.now() < until && !deleted) {
      deleted = await call<Operation>((cb) => stack.distribution.deleteImage({ name: IMAGE_NAME.format({ image: used }), requestId: '' }, cb)).catch(
        async () => {
          await new Promise((resolve) => setTimeout(resolve, 300));
          return undefined;
        },
      );
    }
    assert.ok(deleted, 'the image can be deleted once nothing depends on it');
    assert.equal((await stack.wait(deleted.name, 60_000, stack.distributionOperations)).result?.$case, 'response');
    assert.ok(!existsSync(join(stack.imageDirectory, 'images', used)));
  });
});
