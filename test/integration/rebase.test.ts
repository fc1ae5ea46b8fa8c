/**
 * The issue's rebase (recompose) test, through the real services on two hosts (two agents on the private
 * libvirtd): an image published twice (version 1 and version 2 from two master VMs whose disks carry different
 * system markers at the guest kit's MARKER_OFFSET, and whose kernel command lines differ likewise), 20 clones of
 * version 1 (10 per host) with a 1 MiB persistent data disk and a guest configuration. Every clone is booted once
 * (in batches, under TCG): its /init writes its "file" (`cowherd-data-<instance-id>`) onto the data disk and
 * prints it and the system marker it found. Then RebaseVirtualMachines moves them to version 2 with 2 canaries and
 * restart: every clone boots version 2 (console), its data file intact (console), name, UUID and MAC unchanged,
 * lineage image_version 2 and previous 1, clone.rebased once per clone. Then rolled back to version 1 the same way
 * (without restart): to keep the test within a few minutes on 2 cores, the rollback is checked on the host side
 * for all 20 (the system overlay's backing file is version 1's, the data disk still holds the file) and on the
 * console of 4 clones (2 per host) booted again. Plus: a bad target, a bad parent and an empty selection are
 * refused before any operation exists.
 *
 *   node --import tsx --test test/integration/rebase.test.ts    (root: libvirtd)
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import {
  CloneResult_State,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
  RebaseVirtualMachinesResponse,
  type RebaseVirtualMachinesRequest,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import type { CloneRebased } from '../../services/gen/cowherd/events/v1/events.js';
import { GuestConfiguration, type Image, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { unpack } from '../../services/common/domain/operations.js';
import { CLONE_REBASED } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { guestDomainXml } from '../../services/launcher/story.js';
import { Resources } from '../harness/index.js';
import { call, waitFor } from '../harness/grpc.js';
import { guestDataLine, guestKit, guestSystemLine, MARKER_BLOCK, MARKER_OFFSET } from '../harness/guest.js';
import { startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';

const run = promisify(execFile);
const HOST_A = 'rebase-a';
const HOST_B = 'rebase-b';
const suffix = Math.random().toString(36).slice(2, 7);
const IMAGE = `rebase-${suffix}`;
const V1 = `images/${IMAGE}/versions/1`;
const V2 = `images/${IMAGE}/versions/2`;
const CLONES_PER_HOST = 10;
/** Guests booting at the same time when the test starts them (2 cores, TCG). */
const BOOT_BATCH = 4;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const marker = (version: number) => `v${version}-${suffix}`;

/** What a clone looked like before the rebase. */
interface Seen {
  readonly name: string;
  readonly host: string;
  readonly domainName: string;
  readonly uuid: string;
  readonly mac: string;
  readonly data: string;
}

describe('RebaseVirtualMachines moves 20 clones on two hosts to version 2 and back, keeping identity and data', {
  skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false,
}, () => {
  const resources = new Resources();
  let stack: CloneStack;
  let second: StackAgent;
  const rebased: CloneRebased[] = [];
  const seen = new Map<string, Seen>();

  const imageDirectoryOf = (host: string): string => (host === `hosts/${HOST_A}` ? stack.imageDirectory : second.imageDirectory);
  const consoleOf = (vm: { host: string; domainName: string }) =>
    readFile(join(imageDirectoryOf(vm.host), 'clones', vm.domainName, 'serial-0.out'), 'utf8').catch((error: unknown) => `(no console: ${String(error)})`);
  const domstate = async (domain: string) => (await stack.virsh('domstate', domain)).stdout.trim();
  const macOf = async (domain: string) => /<mac address='([^']+)'/.exec((await stack.virsh('dumpxml', domain)).stdout)?.[1] ?? '';
  const getVm = (name: string) => call<VirtualMachine>((cb) => stack.inventory.getVirtualMachine({ name }, cb));
  const waitShutOff = async (domains: readonly string[], timeoutMs = 240_000) => {
    const deadline = Date.now() + timeoutMs;
    for (const domain of domains) {
      while ((await domstate(domain)) !== 'shut off') {
        if (Date.now() > deadline) throw new Error(`${domain} did not power off within ${timeoutMs} ms`);
        await sleep(300);
      }
    }
  };
  /** Starts the clones in batches and waits for each batch to power off. */
  const bootAll = async (vms: ReadonlyArray<{ readonly virtualMachine?: string; readonly name?: string; readonly domainName: string }>) => {
    for (let start = 0; start < vms.length; start += BOOT_BATCH) {
      const batch = vms.slice(start, start + BOOT_BATCH);
      for (const vm of batch) await call((cb) => stack.cloning.startVirtualMachine({ name: vm.virtualMachine || vm.name || '' }, cb));
      await waitShutOff(batch.map((vm) => vm.domainName));
    }
  };

  /** A master VM on host A whose disk holds the system marker of `version`, defined powered off. */
  async function defineMaster(version: number, kit: Awaited<ReturnType<typeof guestKit>>): Promise<string> {
    const name = `rebase-master-${version}-${suffix}`;
    const directory = join(stack.imageDirectory, 'vms');
    await mkdir(directory, { recursive: true });
    const raw = join(directory, `${name}.raw`);
    const disk = join(directory, `${name}.qcow2`);
    const block = Buffer.alloc(MARKER_BLOCK);
    block.write(`cowherd-was-here-${marker(version)}\n`, 'latin1');
    await writeFile(`${raw}.block`, block);
    await run('truncate', ['-s', '16M', raw]);
    await run('dd', [`if=${raw}.block`, `of=${raw}`, `bs=${MARKER_BLOCK}`, `seek=${MARKER_OFFSET / MARKER_BLOCK}`, 'conv=notrunc', 'status=none']);
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, disk]);
    await rm(raw, { force: true });
    await rm(`${raw}.block`, { force: true });
    await writeFile(
      join(directory, `${name}.xml`),
      guestDomainXml({
        name,
        memoryMib: 160,
        kernel: kit.kernel,
        initrd: kit.initrd,
        // no_timer_check: under TCG on a busy machine the kernel may find the 8254 timer "not connected" and panic.
        commandLine: `console=ttyS0 quiet panic=-1 no_timer_check marker=${marker(version)}`,
        disk,
        console: join(directory, `${name}.console.log`),
      }),
    );
    await stack.virsh('define', join(directory, `${name}.xml`));
    stack.track(name);
    await waitFor(`${name} in inventory`, async () =>
      (await getVm(`hosts/${HOST_A}/virtualMachines/${name}`).catch(() => undefined))?.state === 3 ? true : undefined,
    );
    return `hosts/${HOST_A}/virtualMachines/${name}`;
  }

  async function publish(source: string): Promise<void> {
    const operation = await call<Operation>((cb) =>
      stack.distribution.publishImage({ imageId: IMAGE, sourceVirtualMachine: source, description: 'rebase test', labels: {}, requestId: '' }, cb),
    );
    const done = await stack.wait(operation.name, 300_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
  }

  async function rebase(fields: Partial<RebaseVirtualMachinesRequest>): Promise<{ operation: string; response: RebaseVirtualMachinesResponse }> {
    const operation = await call<Operation>((cb) =>
      stack.cloning.rebaseVirtualMachines(
        {
          parent: 'hosts/-',
          filter: '',
          targetImageVersion: V2,
          canaryCount: 2,
          maxPerHost: 3,
          restart: false,
          newInstanceId: false,
          shutdownTimeout: undefined,
          requestId: randomUUID(),
          ...fields,
        },
        cb,
      ),
    );
    const done = await stack.wait(operation.name, 300_000);
    if (done.result?.$case !== 'response') throw new Error(`the rebase failed: ${JSON.stringify(done.result)}`);
    return { operation: operation.name, response: unpack(RebaseVirtualMachinesResponse, done.result.value) };
  }

  before(async () => {
    // Both agents share the private libvirtd: each takes only the domains with a disk in its image directory.
    const scope = { COWHERD_DOMAIN_SCOPE: 'image-directory' };
    const [kit, started] = await Promise.all([guestKit(), startCloneStack(resources, HOST_A, { firstAgentEnv: scope })]);
    stack = started;
    second = await stack.addAgent(HOST_B, scope);
    await stack.waitHostsReady([HOST_A, HOST_B]);
    const consumer = await consumeEvents(stack.connection.jetstream, stack.connection.manager, {
      durable: `test-rebase-${suffix}`,
      types: [CLONE_REBASED] as never[],
      log: createLogger({ service: 'test', level: 'silent' }),
      handle: async (event) => void rebased.push(event.payload as CloneRebased),
    });
    resources.defer(() => consumer.stop());
    await publish(await defineMaster(1, kit));
    await publish(await defineMaster(2, kit));
    const view = await call<Image>((cb) => stack.inventory.getImage({ name: `images/${IMAGE}`, view: 0 }, cb));
    assert.equal(view.version, '2', 'the second publish added version 2');
  });
  after(() => resources.release());

  it('refuses a bad target, a bad parent and an empty selection before any operation exists', async () => {
    const refused = async (fields: Partial<RebaseVirtualMachinesRequest>, code: GrpcStatus) => {
      const error = await call((cb) =>
        stack.cloning.rebaseVirtualMachines(
          {
            parent: 'hosts/-',
            filter: '',
            targetImageVersion: V2,
            canaryCount: 0,
            maxPerHost: 0,
            restart: false,
            newInstanceId: false,
            shutdownTimeout: undefined,
            requestId: '',
            ...fields,
          },
          cb,
        ),
      ).then(
        () => undefined,
        (caught: { code?: number }) => caught,
      );
      assert.equal(error?.code, code, `${JSON.stringify(fields)}: ${JSON.stringify(error)}`);
    };
    const before = await call<{ operations: Operation[] }>((cb) =>
      stack.operations.listOperations(
        { name: '', filter: 'kind = "cloning.rebase-virtual-machines"', pageSize: 1000, pageToken: '', returnPartialSuccess: false },
        cb,
      ),
    );
    await refused({ targetImageVersion: `images/${IMAGE}/versions/9` }, GrpcStatus.NOT_FOUND);
    await refused({ targetImageVersion: 'images/Not_An_Id' }, GrpcStatus.INVALID_ARGUMENT);
    await refused({ parent: 'hosts' }, GrpcStatus.INVALID_ARGUMENT);
    await refused({ filter: 'source_image = "images/some-other-image"' }, GrpcStatus.INVALID_ARGUMENT);
    // No clone of the image exists yet: the selection is empty.
    await refused({}, GrpcStatus.FAILED_PRECONDITION);
    const afterwards = await call<{ operations: Operation[] }>((cb) =>
      stack.operations.listOperations(
        { name: '', filter: 'kind = "cloning.rebase-virtual-machines"', pageSize: 1000, pageToken: '', returnPartialSuccess: false },
        cb,
      ),
    );
    assert.equal(afterwards.operations.length, before.operations.length, 'no operation was created');
  });

  it('clones version 1 with data disks; each guest writes its file; rebased to version 2 with canaries and restart, then back', async (t) => {
    const started = Date.now();
    // 20 clones of version 1, 10 per host, each with a 1 MiB persistent data disk and a seed (instance-id = UUID).
    const cloning = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          source: { $case: 'image', value: V1 },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [`hosts/${HOST_A}`, `hosts/${HOST_B}`], maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: 2 * CLONES_PER_HOST,
          nameTemplate: `rb-${suffix}-{index}`,
          start: false,
          requestId: '',
          guestConfiguration: GuestConfiguration.fromPartial({ hostnameTemplate: '{name}' }),
          dataDiskBytes: String(2 ** 20),
        },
        cb,
      ),
    );
    const cloned = await stack.wait(cloning.name, 300_000);
    if (cloned.result?.$case !== 'response') throw new Error(`the clone operation failed: ${JSON.stringify(cloned.result)}`);
    const clones = unpack(CloneVirtualMachinesResponse, cloned.result.value).clones;
    stack.track(...clones.map((clone) => clone.domainName));
    assert.deepEqual(
      clones.map((clone) => clone.state),
      clones.map(() => CloneResult_State.STATE_DONE),
      JSON.stringify(clones.map((clone) => clone.error)),
    );
    for (const clone of clones) {
      const vm = await waitFor(`${clone.virtualMachine} in inventory on version 1`, async () => {
        const read = await getVm(clone.virtualMachine).catch(() => undefined);
        return read?.sourceImageVersion === V1 && read.disks.some((disk) => disk.persistent) ? read : undefined;
      });
      assert.equal(vm.lineage?.imageVersion, V1);
    }
    t.diagnostic(`20 clones made in ${Date.now() - started} ms`);

    // First boot: each guest writes its file onto its data disk and prints it and the system it booted.
    let at = Date.now();
    await bootAll(clones);
    t.diagnostic(`20 first boots in ${Date.now() - at} ms`);
    for (const clone of clones) {
      const output = await consoleOf(clone);
      assert.equal(guestSystemLine(output), `cowherd-was-here-${marker(1)}`, `${clone.domainName} booted version 1:\n${output.slice(-2000)}`);
      assert.equal(guestDataLine(output), `cowherd-data-${clone.uuid}`, `${clone.domainName} wrote its data file:\n${output.slice(-2000)}`);
      seen.set(clone.virtualMachine, {
        name: clone.virtualMachine,
        host: clone.host,
        domainName: clone.domainName,
        uuid: clone.uuid,
        mac: await macOf(clone.domainName),
        data: `cowherd-data-${clone.uuid}`,
      });
    }

    // Recompose onto version 2: 2 canaries (one per host), then waves of 3 per host; restart boots each clone.
    at = Date.now();
    const forward = await rebase({ filter: `source_image_version = "${V1}"`, targetImageVersion: `images/${IMAGE}`, restart: true });
    t.diagnostic(`rebase to version 2 (with restart) in ${Date.now() - at} ms`);
    assert.equal(forward.response.results.length, 20);
    assert.deepEqual(
      forward.response.results.slice(0, 2).map((result) => [result.canary, result.virtualMachine.split('/')[1]]),
      [
        [true, HOST_A],
        [true, HOST_B],
      ],
      'two canaries, one per host, listed first',
    );
    for (const result of forward.response.results) {
      assert.deepEqual(
        [result.status?.code, result.imageVersion, result.previousImageVersion, result.restarted, result.pending],
        [GrpcStatus.OK, V2, V1, true, false],
        JSON.stringify(result),
      );
    }
    await waitShutOff([...seen.values()].map((vm) => vm.domainName));
    for (const vm of seen.values()) {
      const output = await consoleOf(vm);
      assert.equal(guestSystemLine(output), `cowherd-was-here-${marker(2)}`, `${vm.domainName} booted version 2:\n${output.slice(-2000)}`);
      assert.equal(guestDataLine(output), vm.data, `${vm.domainName} kept its data file:\n${output.slice(-2000)}`);
      const read = await waitFor(`${vm.name} on version 2 in inventory`, async () => {
        const current = await getVm(vm.name).catch(() => undefined);
        return current?.lineage?.imageVersion === V2 ? current : undefined;
      });
      assert.deepEqual(
        [read.name, read.domainName, read.uuid, read.sourceImageVersion, read.lineage?.previousImageVersion],
        [vm.name, vm.domainName, vm.uuid, V2, V1],
      );
      assert.equal(await macOf(vm.domainName), vm.mac, `${vm.domainName} kept its MAC`);
    }
    await waitFor('clone.rebased of every clone', async () =>
      rebased.filter((event) => event.operation === forward.operation).length >= 20 ? true : undefined,
    );
    const events = rebased.filter((event) => event.operation === forward.operation);
    assert.deepEqual(events.map((event) => event.virtualMachine).sort(), [...seen.keys()].sort(), 'clone.rebased once per clone');
    assert.ok(events.every((event) => event.imageVersion === V2 && event.previousImageVersion === V1));

    // Roll back to version 1 the same way (no restart), checked on the host for all 20 and booted for 4.
    at = Date.now();
    const back = await rebase({ filter: `source_image_version = "${V2}"`, targetImageVersion: V1 });
    t.diagnostic(`rollback to version 1 in ${Date.now() - at} ms`);
    assert.equal(back.response.results.length, 20);
    for (const result of back.response.results) {
      assert.deepEqual([result.status?.code, result.imageVersion, result.previousImageVersion], [GrpcStatus.OK, V1, V2], JSON.stringify(result));
    }
    const scratch = await resources.tempDir('rebase-data-');
    for (const vm of seen.values()) {
      const read = await waitFor(`${vm.name} back on version 1 in inventory`, async () => {
        const current = await getVm(vm.name).catch(() => undefined);
        return current?.lineage?.imageVersion === V1 ? current : undefined;
      });
      assert.deepEqual([read.uuid, read.lineage?.previousImageVersion], [vm.uuid, V2]);
      const system = read.disks.find((disk) => disk.target === 'vda')!;
      const { stdout } = await run('qemu-img', ['info', '-U', '--output=json', system.path]);
      const backing = (JSON.parse(stdout) as { 'full-backing-filename'?: string; 'backing-filename'?: string })['full-backing-filename'] ?? '';
      assert.match(backing, new RegExp(`/images/${IMAGE}/`), `${vm.domainName}'s system overlay stands on version 1: ${backing}`);
      const data = read.disks.find((disk) => disk.persistent)!;
      const raw = join(scratch, `${vm.domainName}.raw`);
      await run('qemu-img', ['convert', '-U', '-O', 'raw', data.path, raw]);
      const block = (await readFile(raw)).subarray(0, 512).toString('latin1').replace(/\0+$/, '').trim();
      assert.equal(block, vm.data, `${vm.domainName}'s data disk still holds its file`);
      assert.equal(await macOf(vm.domainName), vm.mac);
    }
    const sample = [...seen.values()].filter((vm) => vm.host === `hosts/${HOST_A}`).slice(0, 2);
    sample.push(...[...seen.values()].filter((vm) => vm.host === `hosts/${HOST_B}`).slice(0, 2));
    await bootAll(sample);
    for (const vm of sample) {
      const output = await consoleOf(vm);
      assert.equal(guestSystemLine(output), `cowherd-was-here-${marker(1)}`, `${vm.domainName} booted version 1 again:\n${output.slice(-2000)}`);
      assert.equal(guestDataLine(output), vm.data);
    }
    t.diagnostic(`whole test body in ${Date.now() - started} ms`);
  });
});
