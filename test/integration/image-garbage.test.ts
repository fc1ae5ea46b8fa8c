/**
 * CollectImageGarbage on real parts (NATS, CA, inventory, distribution, cloning, two agents on the private
 * libvirtd; the second host's image directory a 64 MiB tmpfs, so that its use is known to the byte): with
 * keep_versions 1 and three versions, only the middle one goes (version 1 is used by a clone, version 3 is the
 * latest); a dry run lists without deleting; above a host's high watermark the least recently used unused replica
 * goes first, and a replica with dependents never goes.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { access, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { unpack } from '../../services/common/domain/operations.js';
import { Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributeImageResponse, type CollectImageGarbageResponse } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Host, Image, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';
import { call, waitFor } from '../harness/grpc.js';
import { Resources } from '../harness/index.js';
import { HOST_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);

describe('garbage collection of image versions and replicas', {
  skip: process.getuid?.() !== 0 ? 'needs root (libvirtd, tmpfs)' : false,
  timeout: 600_000,
}, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const origin = `gc-origin-${suffix}`;
  const vm = `gc-src-${suffix}`;
  const id = `gc-${suffix}`;
  let stack: CloneStack;
  let small: StackAgent;
  let mountPoint: string;

  const exists = (path: string) =>
    access(path).then(
      () => true,
      () => false,
    );

  const collect = (validateOnly: boolean, images: string[] = []) =>
    call<CollectImageGarbageResponse>((cb) => stack.distribution.collectImageGarbage({ images, validateOnly }, cb));

  /** The response of a finished distribution operation, packed. */
  async function succeeded(operation: Operation) {
    const done = await stack.wait(operation.name, 240_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    return done.result.value;
  }

  async function publish(): Promise<Image> {
    const started = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        { imageId: id, sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: origin, virtualMachine: vm }), description: '', labels: {}, requestId: '' },
        cb,
      ),
    );
    const done = await succeeded(started);
    return unpack(Image, done);
  }

  async function distribute(image: string, host: string): Promise<void> {
    const started = await call<Operation>((cb) => stack.distribution.distributeImage({ image, hosts: [HOST_NAME.format({ host })], requestId: '' }, cb));
    const done = await succeeded(started);
    const response = unpack(DistributeImageResponse, done);
    assert.equal(response.failures.length, 0, JSON.stringify(response.failures));
  }

  async function clone(image: string, host: string, name: string): Promise<void> {
    const started = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: image },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [HOST_NAME.format({ host })], maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: 1,
          nameTemplate: name,
          start: false,
          requestId: '',
        },
        cb,
      ),
    );
    stack.track(name);
    const done = await stack.wait(started.name);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    // Garbage collection reads the clones from inventory: wait until it knows this one.
    await waitFor(`${name} in inventory`, async () => {
      const found = await call<VirtualMachine>((cb) =>
        stack.inventory.getVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: name }) }, cb),
      );
      return found.lineage?.imageVersion ? found : undefined;
    });
  }

  const setWatermark = (host: string, percent: number) =>
    call<Host>((cb) =>
      stack.inventory.updateHost(
        {
          host: Host.fromPartial({ name: HOST_NAME.format({ host }), imageDirectoryHighWatermarkPercent: percent }),
          updateMask: ['image_directory_high_watermark_percent'],
        },
        cb,
      ),
    );

  before(async () => {
    stack = await startCloneStack(resources, origin, {
      serviceEnv: { inventory: { COWHERD_HEARTBEAT_SECONDS: '1' }, distribution: { COWHERD_GARBAGE_INTERVAL: '0' } },
    });
    mountPoint = join(await resources.tempDir('cowherd-gc-'), 'images-root');
    await mkdir(mountPoint, { recursive: true });
    await run('mount', ['-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', mountPoint]);
    resources.defer(() => run('umount', ['-l', mountPoint]).then(() => undefined));
    small = await stack.addAgent(`gc-small-${suffix}`, { COWHERD_IMAGE_DIR: mountPoint });
    await stack.defineSourceVm(vm, 4);
    await stack.waitHostsReady([origin, small.host]);
  });
  after(() => resources.release());

  it('keeps the newest keep_versions, the latest and versions in use; a dry run deletes nothing', async () => {
    for (const version of ['1', '2', '3']) assert.equal((await publish()).version, version);
    await clone(`images/${id}/versions/1`, origin, `gc-one-${suffix}`);
    const view = await call<Image>((cb) =>
      stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}`, keepVersions: 1 }), updateMask: ['keep_versions'] }, cb),
    );
    assert.equal(view.keepVersions, 1);

    const dry = await collect(true, [`images/${id}`]);
    assert.deepEqual(dry.versions, [`images/${id}/versions/2`]);
    assert.ok(Number(dry.freedBytes) > 0);
    assert.ok(await exists(join(stack.imageDirectory, 'images', `${id}_v2`)), 'a dry run deletes nothing');

    const done = await collect(false, [`images/${id}`]);
    assert.deepEqual(done.versions, [`images/${id}/versions/2`]);
    assert.equal(done.freedBytes, dry.freedBytes);
    assert.equal(await exists(join(stack.imageDirectory, 'images', `${id}_v2`)), false);
    assert.ok(await exists(join(stack.imageDirectory, 'images', id)), 'version 1 is in use');
    assert.ok(await exists(join(stack.imageDirectory, 'images', `${id}_v3`)), 'version 3 is the latest');
    const after = await call<Image>((cb) =>
      stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}`, keepVersions: 1 }), updateMask: ['keep_versions'] }, cb),
    );
    assert.deepEqual(after.versions, ['1', '3']);
    assert.deepEqual((await collect(false)).versions, [], 'nothing more to collect');
  });

  it('above the watermark removes the least recently used unused replica first, never one with dependents', async () => {
    // Versions 3 and 4, which no VM uses (the agents of this test share one libvirtd, so each host lists the
    // other's clones too: version 1's clone counts on both hosts). Keeping 3 versions, the per-image policy keeps both.
    assert.equal((await publish()).version, '4');
    await call<Image>((cb) =>
      stack.distribution.updateImage({ image: Image.fromPartial({ name: `images/${id}`, keepVersions: 0 }), updateMask: ['keep_versions'] }, cb),
    );
    // Version 4 arrives first, then 3; a clone made from 4 (and deleted again) makes 4 the more recently used,
    // so that least recently used and arrival order disagree.
    await distribute(`images/${id}/versions/4`, small.host);
    await distribute(`images/${id}/versions/3`, small.host);
    await clone(`images/${id}/versions/4`, small.host, `gc-used-${suffix}`);
    await call((cb) =>
      stack.cloning.deleteVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host: small.host, virtualMachine: `gc-used-${suffix}` }), force: false }, cb),
    );
    await waitFor('the deleted clone gone from inventory', async () =>
      (await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
        stack.inventory.listVirtualMachines({ parent: 'hosts/-', pageSize: 100, pageToken: '', filter: `source_image = "images/${id}"` }, cb),
      ).then((page) => page.virtualMachines.some((found) => found.name.endsWith(`/gc-used-${suffix}`))))
        ? undefined
        : true,
    );
    const bytes = (await call<Image>((cb) => stack.inventory.getImage({ name: `images/${id}/versions/4`, view: 0 }, cb))).files.reduce(
      (sum, file) => sum + Number(file.sizeBytes),
      0,
    );
    // The heartbeat (every second here) brings the host's use to inventory.
    const host = await waitFor('the host reports both replicas', async () => {
      const found = await call<Host>((cb) => stack.inventory.getHost({ name: HOST_NAME.format({ host: small.host }) }, cb));
      return Number(found.imageDirectoryTotalBytes) - Number(found.imageDirectoryFreeBytes) >= 2 * bytes ? found : undefined;
    });
    const total = Number(host.imageDirectoryTotalBytes);
    const used = total - Number(host.imageDirectoryFreeBytes);
    const watermark = Math.ceil((used / total) * 100) - 1;
    assert.ok(((used - bytes) / total) * 100 <= watermark, 'removing one replica is enough');
    await setWatermark(small.host, watermark);

    const dry = await collect(true);
    assert.deepEqual(dry.versions, []);
    assert.deepEqual(
      dry.replicas.map((replica) => replica.name),
      [`hosts/${small.host}/images/${id}/versions/3`],
    );
    assert.ok(await exists(join(mountPoint, 'images', `${id}_v3`)), 'a dry run deletes nothing');
    const done = await collect(false);
    assert.deepEqual(
      done.replicas.map((replica) => replica.name),
      [`hosts/${small.host}/images/${id}/versions/3`],
    );
    assert.equal(Number(done.freedBytes), bytes);
    assert.equal(await exists(join(mountPoint, 'images', `${id}_v3`)), false);
    assert.ok(await exists(join(mountPoint, 'images', `${id}_v4`)));

    // A clone stands on version 4 there: even far above the watermark, its replica stays (and origins always do).
    await clone(`images/${id}/versions/4`, small.host, `gc-four-${suffix}`);
    await setWatermark(small.host, 1);
    await setWatermark(origin, 1);
    const kept = await collect(false);
    assert.deepEqual(kept.replicas, []);
    assert.deepEqual(kept.failures, []);
    assert.ok(await exists(join(mountPoint, 'images', `${id}_v4`)));
  });
});
