/**
 * PublishImage through the public API on real parts: a powered-off VM on a real libvirtd becomes an
 * immutable image (flattened disk, sanitized template, SHA-256 of every file) registered in the catalog
 * with its origin replica, image.published is published, and the image clones through CloneVirtualMachines.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { Image, Image_State, ImageReplica_State, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { unpack } from '../../services/common/domain/operations.js';
import { Resources } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { startCloneStack, type CloneStack } from '../harness/clone-stack.js';
import { HOST_IMAGE_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);

describe('publishing an image from a powered-off VM', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  let stack: CloneStack;
  const suffix = Math.random().toString(36).slice(2, 7);
  const vm = `pub-src-${suffix}`;

  before(async () => {
    stack = await startCloneStack(resources, 'publish-host');
    const vmDirectory = join(stack.imageDirectory, 'vms');
    await mkdir(vmDirectory, { recursive: true });
    const raw = join(vmDirectory, 'data.raw');
    await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=8', 'status=none']);
    await run('qemu-img', ['convert', '-q', '-O', 'qcow2', raw, join(vmDirectory, `${vm}.qcow2`)]);
    const xml = `<domain type='qemu'><name>${vm}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${join(vmDirectory, `${vm}.qcow2`)}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface></devices></domain>`;
    await writeFile(join(vmDirectory, `${vm}.xml`), xml);
    await stack.virsh('define', join(vmDirectory, `${vm}.xml`));
    stack.track(vm);
    // Inventory must see the host READY and the VM powered off.
    const deadline = Date.now() + 20_000;
    while (
      Date.now() < deadline &&
      !(await call<{ state: number }>((cb) =>
        stack.inventory.getVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host: 'publish-host', virtualMachine: vm }) }, cb),
      ).then(
        (found) => found.state === 3,
        () => false,
      ))
    )
      await new Promise((resolve) => setTimeout(resolve, 200));
  });
  after(() => resources.release());

  it('publishes, registers, and clones the image', async () => {
    const started = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        {
          imageId: `img-${suffix}`,
          sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: 'publish-host', virtualMachine: vm }),
          description: 'test image',
          labels: { os: 'none' },
          requestId: '',
        },
        cb,
      ),
    );
    const done = await stack.wait(started.name, 120_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const image = unpack(Image, done.result.value);
    assert.equal(image.state, Image_State.STATE_AVAILABLE);
    assert.equal(image.originHost, 'hosts/publish-host');
    const disk = image.files.find((file) => file.targetDevice === 'vda');
    assert.ok(disk, JSON.stringify(image.files));
    const path = join(stack.imageDirectory, 'images', `img-${suffix}`, disk.path);
    assert.equal(
      createHash('sha256')
        .update(await readFile(path))
        .digest('hex'),
      disk.sha256,
    );
    assert.equal((await stat(path)).mode & 0o222, 0, 'image files are read-only');
    const template = await readFile(join(stack.imageDirectory, 'images', `img-${suffix}`, 'domain-template.xml'), 'utf8');
    assert.doesNotMatch(template, /52:54:00:12:34:56|<name>|<uuid>/, 'the template is sanitized');
    const replica = await call<ImageReplica>((cb) =>
      stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: 'publish-host', image: `img-${suffix}` }) }, cb),
    );
    assert.equal(replica.state, ImageReplica_State.STATE_AVAILABLE);

    const clone = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: IMAGE_NAME.format({ image: `img-${suffix}` }) },
          placement: { strategy: Placement_Strategy.STRATEGY_WHERE_IMAGE_IS, hosts: [], maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: 2,
          nameTemplate: `img-${suffix}-{index}`,
          start: false,
          requestId: '',
        },
        cb,
      ),
    );
    stack.track(`img-${suffix}-1`, `img-${suffix}-2`);
    const cloned = await stack.wait(clone.name);
    assert.equal(cloned.result?.$case, 'response', JSON.stringify(cloned.result));
  });

  it('refuses bad publish requests before any operation exists', async () => {
    const request = {
      imageId: `bad-${suffix}`,
      sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: 'publish-host', virtualMachine: vm }),
      description: '',
      labels: {},
      requestId: '',
    };
    assert.deepEqual((await failure((cb) => stack.distribution.publishImage({ ...request, imageId: '../etc' }, cb))).fields, ['image_id']);
    assert.deepEqual((await failure((cb) => stack.distribution.publishImage({ ...request, imageId: 'a/b' }, cb))).fields, ['image_id']);
    // Onto an existing image id, publishing adds the next version.
    const added = await call<Operation>((cb) => stack.distribution.publishImage({ ...request, imageId: `img-${suffix}` }, cb));
    const addedDone = await stack.wait(added.name, 120_000, stack.distributionOperations);
    assert.equal(addedDone.result?.$case, 'response', JSON.stringify(addedDone.result));
    const version = unpack(Image, addedDone.result.value);
    assert.equal(version.name, `images/img-${suffix}/versions/2`);
    assert.equal(version.version, '2');
    assert.equal(
      (await failure((cb) => stack.distribution.publishImage({ ...request, sourceVirtualMachine: 'hosts/publish-host/virtualMachines/none' }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
    await stack.virsh('start', vm);
    // Once inventory knows the VM runs, publishing it is refused before anything changes.
    const deadline = Date.now() + 10_000;
    while (
      Date.now() < deadline &&
      !(await call<{ state: number }>((cb) => stack.inventory.getVirtualMachine({ name: request.sourceVirtualMachine }, cb)).then(
        (found) => found.state === 1,
        () => false,
      ))
    )
      await new Promise((resolve) => setTimeout(resolve, 100));
    const running = await failure((cb) => stack.distribution.publishImage(request, cb));
    assert.equal(running.code, GrpcStatus.FAILED_PRECONDITION, 'a running VM is not published');
    assert.equal(running.reason, 'ERROR_REASON_VIRTUAL_MACHINE_RUNNING');
    assert.equal(
      (await failure((cb) => stack.inventory.getImage({ name: IMAGE_NAME.format({ image: `bad-${suffix}` }), view: 0 }, cb))).code,
      GrpcStatus.NOT_FOUND,
      'nothing was registered',
    );
    await stack.virsh('destroy', vm);
  });
});
