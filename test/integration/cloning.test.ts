/**
 * CloneVirtualMachines through the public API on real parts: the cloning service plans, asks the real
 * agent on the private libvirtd, and reports per clone; inventory shows the clones with their lineage;
 * bad input is refused before any operation exists.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CloneVirtualMachinesResponse, CloneResult_State, Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import type { VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { unpack } from '../../services/common/domain/operations.js';
import { Resources } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { startCloneStack, type CloneStack } from '../harness/clone-stack.js';
import { IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);

describe('cloning through the public API', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  let stack: CloneStack;
  let base: string;
  const image = `api-${Math.random().toString(36).slice(2, 7)}`;

  before(async () => {
    stack = await startCloneStack(resources, 'api-host');
    const directory = await resources.tempDir('cowherd-test-');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(directory, 'base.qcow2'), '256M']);
    base = await stack.addImage(image, join(directory, 'base.qcow2'));
    // The agent must be READY in inventory before cloning places anything on it.
    const deadline = Date.now() + 20_000;
    while (
      Date.now() < deadline &&
      !(await call<{ state: number }>((cb) => stack.inventory.getHost({ name: 'hosts/api-host' }, cb)).then(
        (host) => host.state === 1,
        () => false,
      ))
    )
      await new Promise((resolve) => setTimeout(resolve, 200));
  });
  after(() => resources.release());

  it('clones an image on a host and reports every clone', async () => {
    const before = createHash('sha256')
      .update(await readFile(base))
      .digest('hex');
    const started = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: IMAGE_NAME.format({ image }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: ['hosts/api-host'], maxClonesPerHost: 0 },
          count: 5,
          nameTemplate: `${image}-{index}`,
          delivery: 0,
          diskBackend: 0,
          start: false,
          requestId: `11111111-1111-4111-8111-${image.padStart(12, '0').slice(-12)}`,
        },
        cb,
      ),
    );
    const names = Array.from({ length: 5 }, (_, i) => `${image}-${i + 1}`);
    stack.track(...names);
    const done = await stack.wait(started.name);
    assert.equal(done.done, true);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const response = unpack(CloneVirtualMachinesResponse, done.result.value);
    assert.deepEqual(
      response.clones.map((clone) => [clone.domainName, clone.state]),
      names.map((name) => [name, CloneResult_State.STATE_DONE]),
    );
    for (const name of names) assert.equal((await stack.virsh('domstate', name)).stdout.trim(), 'shut off');
    assert.equal(
      createHash('sha256')
        .update(await readFile(base))
        .digest('hex'),
      before,
      'the base is unchanged',
    );

    const deadline = Date.now() + 15_000;
    let vms: VirtualMachine[] = [];
    while (Date.now() < deadline && vms.length < 5) {
      vms = (
        await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
          stack.inventory.listVirtualMachines(
            { parent: 'hosts/-', pageSize: 1000, pageToken: '', filter: `source_image = "${IMAGE_NAME.format({ image })}"` },
            cb,
          ),
        )
      ).virtualMachines;
      if (vms.length < 5) await new Promise((resolve) => setTimeout(resolve, 200));
    }
    assert.deepEqual(vms.map((vm) => vm.domainName).sort(), [...names].sort());
    assert.ok(vms.every((vm) => vm.managed && vm.lineage?.image === IMAGE_NAME.format({ image }) && vm.lineage.overlays.length === 1));

    // A retry with the same request_id returns the same operation.
    const again = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: IMAGE_NAME.format({ image }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: ['hosts/api-host'], maxClonesPerHost: 0 },
          count: 5,
          nameTemplate: `${image}-{index}`,
          delivery: 0,
          diskBackend: 0,
          start: false,
          requestId: `11111111-1111-4111-8111-${image.padStart(12, '0').slice(-12)}`,
        },
        cb,
      ),
    );
    assert.equal(again.name, started.name);
  });

  it('starts, stops (an operation) and deletes a clone through the public API', async () => {
    const name = VIRTUAL_MACHINE_NAME.format({ host: 'api-host', virtualMachine: `${image}-1` });
    const started = await call<VirtualMachine>((cb) => stack.cloning.startVirtualMachine({ name }, cb));
    assert.equal(started.state, 1, 'RUNNING');
    const stopping = await call<Operation>((cb) => stack.cloning.stopVirtualMachine({ name, force: true, timeout: undefined, requestId: '' }, cb));
    const stopped = await stack.wait(stopping.name);
    assert.equal(stopped.result?.$case, 'response', JSON.stringify(stopped.result));
    assert.equal((await stack.virsh('domstate', `${image}-1`)).stdout.trim(), 'shut off');
    await call((cb) => stack.cloning.deleteVirtualMachine({ name, force: false }, cb));
    await assert.rejects(stack.virsh('domstate', `${image}-1`));
    const deadline = Date.now() + 10_000;
    let code = 0;
    while (code !== GrpcStatus.NOT_FOUND && Date.now() < deadline) {
      code = (await failure((cb) => stack.inventory.getVirtualMachine({ name }, cb)).catch(() => ({ code: 0 }))).code;
      if (code !== GrpcStatus.NOT_FOUND) await new Promise((resolve) => setTimeout(resolve, 200));
    }
    assert.equal(code, GrpcStatus.NOT_FOUND, 'inventory forgets the deleted clone');
    assert.equal(
      (await failure((cb) => stack.cloning.deleteVirtualMachine({ name: 'hosts/api-host/virtualMachines/none', force: false }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
  });

  it('refuses bad input before any operation exists', async () => {
    const request = {
      source: { $case: 'image' as const, value: IMAGE_NAME.format({ image }) },
      placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: ['hosts/api-host'], maxClonesPerHost: 0 },
      count: 1,
      nameTemplate: '',
      delivery: 0,
      diskBackend: 0,
      start: false,
      requestId: '',
      guestConfiguration: undefined,
      dataDiskBytes: '0',
    };
    const list = async () =>
      (
        await call<{ operations: unknown[] }>((cb) =>
          stack.operations.listOperations({ name: 'operations', filter: '', pageSize: 1000, pageToken: '', returnPartialSuccess: false }, cb),
        )
      ).operations.length;
    const count = await list();
    assert.deepEqual((await failure((cb) => stack.cloning.cloneVirtualMachines({ ...request, count: 0 }, cb))).fields, ['count']);
    assert.deepEqual((await failure((cb) => stack.cloning.cloneVirtualMachines({ ...request, count: 1001 }, cb))).fields, ['count']);
    assert.equal(
      (await failure((cb) => stack.cloning.cloneVirtualMachines({ ...request, nameTemplate: '../{random}' }, cb))).code,
      GrpcStatus.INVALID_ARGUMENT,
    );
    assert.equal(
      (await failure((cb) => stack.cloning.cloneVirtualMachines({ ...request, count: 2, nameTemplate: 'same-name' }, cb))).code,
      GrpcStatus.INVALID_ARGUMENT,
    );
    assert.equal(
      (await failure((cb) => stack.cloning.cloneVirtualMachines({ ...request, source: { $case: 'image', value: 'images/absent' } }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
    assert.equal(
      (await failure((cb) => stack.cloning.cloneVirtualMachines({ ...request, source: { $case: 'image', value: 'images/../etc' } }, cb))).code,
      GrpcStatus.INVALID_ARGUMENT,
    );
    assert.equal(
      (await failure((cb) => stack.cloning.cloneVirtualMachines({ ...request, placement: { ...request.placement, hosts: ['hosts/nope'] } }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
    assert.equal(await list(), count, 'no operation was created');
  });

  it("checks a source VM on its agent before any operation exists: refuses what it cannot clone, clones a VM that boots an image's kernel", async () => {
    const suffix = Math.random().toString(36).slice(2, 7);
    const vmDirectory = join(stack.imageDirectory, 'vms');
    await mkdir(vmDirectory, { recursive: true });
    const outside = await resources.tempDir('cowherd-outside-');
    const replica = join(stack.imageDirectory, 'images', image);
    // A kernel file as a clone of a direct-boot image has it: `boot-kernel` in the replica's directory.
    await writeFile(join(replica, 'boot-kernel'), 'not a real kernel: the clones are never started');
    await writeFile(join(outside, 'vmlinuz'), 'not a real kernel');
    const defineVm = async (name: string, options: { kernel?: string; diskDirectory?: string }): Promise<string> => {
      const disk = join(options.diskDirectory ?? vmDirectory, `${name}.qcow2`);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']);
      const kernel = options.kernel === undefined ? '' : `<kernel>${options.kernel}</kernel><cmdline>console=ttyS0</cmdline>`;
      const xml = `<domain type='qemu'><name>${name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type>${kernel}</os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`;
      const file = join(outside, `${name}.xml`);
      await writeFile(file, xml);
      await stack.virsh('define', file);
      stack.track(name);
      const deadline = Date.now() + 20_000;
      while (
        Date.now() < deadline &&
        !(await call<VirtualMachine>((cb) =>
          stack.inventory.getVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host: 'api-host', virtualMachine: name }) }, cb),
        ).then(
          (vm) => vm.state === 3,
          () => false,
        ))
      )
        await new Promise((resolve) => setTimeout(resolve, 200));
      return VIRTUAL_MACHINE_NAME.format({ host: 'api-host', virtualMachine: name });
    };
    const cloneOf = (source: string, template: string) => ({
      source: { $case: 'virtualMachine' as const, value: source },
      placement: undefined,
      dataDiskBytes: '0',
      count: 2,
      nameTemplate: template,
      delivery: 0,
      diskBackend: 0,
      start: false,
      requestId: '',
      guestConfiguration: undefined,
    });
    const operationCount = async () =>
      (
        await call<{ operations: unknown[] }>((cb) =>
          stack.operations.listOperations({ name: 'operations', filter: '', pageSize: 1000, pageToken: '', returnPartialSuccess: false }, cb),
        )
      ).operations.length;
    const domains = async () => (await stack.virsh('list', '--all', '--name')).stdout.split('\n').map((line) => line.trim());
    const cloneDirectories = async () => readdir(join(stack.imageDirectory, 'clones')).catch(() => [] as string[]);

    const refusals: Array<{ what: string; source: string; reason: string; message: RegExp }> = [
      {
        what: 'a kernel outside the image directory',
        source: await defineVm(`kernel-out-${suffix}`, { kernel: join(outside, 'vmlinuz') }),
        reason: 'ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY',
        message: /boots <kernel> .*vmlinuz, which is outside the image directory/,
      },
      {
        what: 'a disk outside the image directory',
        source: await defineVm(`disk-out-${suffix}`, { diskDirectory: outside }),
        reason: 'ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY',
        message: /disk vda .* is outside the image directory/,
      },
    ];
    const operationsBefore = await operationCount();
    const domainsBefore = await domains();
    const directoriesBefore = await cloneDirectories();
    for (const refusal of refusals) {
      const started = performance.now();
      const refused = await failure((cb) => stack.cloning.cloneVirtualMachines(cloneOf(refusal.source, `refused-${suffix}-{index}`), cb));
      assert.equal(refused.code, GrpcStatus.FAILED_PRECONDITION, `${refusal.what}: ${refused.message}`);
      assert.equal(refused.reason, refusal.reason, refusal.what);
      assert.match(refused.message, refusal.message, refusal.what);
      assert.ok(performance.now() - started < 10_000, `${refusal.what}: answered at once`);
    }
    assert.equal(await operationCount(), operationsBefore, 'no operation was created');
    assert.deepEqual(await domains(), domainsBefore, 'no domain was defined');
    assert.deepEqual(await cloneDirectories(), directoriesBefore, 'no clone directory or overlay was made');

    // A VM that boots the replica's kernel (a clone of a direct-boot image) clones, its clones boot the same file.
    const bootsImageKernel = await defineVm(`kernel-in-${suffix}`, { kernel: join(replica, 'boot-kernel') });
    const operation = await call<Operation>((cb) => stack.cloning.cloneVirtualMachines(cloneOf(bootsImageKernel, `kin-${suffix}-{index}`), cb));
    stack.track(`kin-${suffix}-1`, `kin-${suffix}-2`);
    const done = await stack.wait(operation.name);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const response = unpack(CloneVirtualMachinesResponse, done.result.value);
    assert.deepEqual(
      response.clones.map((clone) => [clone.domainName, clone.state]),
      [
        [`kin-${suffix}-1`, CloneResult_State.STATE_DONE],
        [`kin-${suffix}-2`, CloneResult_State.STATE_DONE],
      ],
      JSON.stringify(response.clones.map((clone) => clone.error)),
    );
    const xml = (await stack.virsh('dumpxml', '--inactive', `kin-${suffix}-1`)).stdout;
    assert.match(xml, new RegExp(`<kernel>${join(replica, 'boot-kernel')}</kernel>`));
  });
});
