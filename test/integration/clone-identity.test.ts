/**
 * Per-clone guest identity under TCG, through the real services: a bootable image (the guest kit's kernel and
 * busybox initramfs, published from a powered-off VM) is cloned three times by CloneVirtualMachines with a
 * guest configuration. Each clone gets its own NoCloud seed disk (label `cidata`); each guest's /init mounts
 * it, sets its hostname and prints hostname, instance-id, the seed's files and user-data's SHA-256 on its
 * serial console, then writes its marker and powers off. The test reads the three consoles and finds three
 * different, correct identities (hostname from the template, instance-id = the clone's UUID). The user-data's
 * secret is in no operation record in KV; deleting a clone removes its seed with its directory.
 *
 *   node --import tsx --test test/integration/clone-identity.test.ts    (root: libvirtd)
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { access, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { Kvm } from '@nats-io/kv';
import { CloneVirtualMachinesResponse, Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { GuestConfiguration } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { unpack } from '../../services/common/domain/operations.js';
import { guestDomainXml } from '../../services/launcher/story.js';
import { Resources } from '../harness/index.js';
import { call } from '../harness/grpc.js';
import { guestIdentityLines, guestKit } from '../harness/guest.js';
import { startCloneStack, type CloneStack } from '../harness/clone-stack.js';

const run = promisify(execFile);
const HOST = 'identity-host';
const suffix = Math.random().toString(36).slice(2, 7);
const BOOT_TIMEOUT_MS = 240_000;
const SECRET = `s3cret-${suffix}`;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('three clones boot under TCG with three identities from their seed disks', {
  skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false,
}, () => {
  const resources = new Resources();
  let stack: CloneStack;
  let image: string;

  before(async () => {
    const [kit, started] = await Promise.all([guestKit(), startCloneStack(resources, HOST)]);
    stack = started;
    // The master: the guest kit by direct kernel boot, a small qcow2 disk under the image directory.
    const master = `identity-master-${suffix}`;
    const vmDirectory = join(stack.imageDirectory, 'vms');
    await mkdir(vmDirectory, { recursive: true });
    const disk = join(vmDirectory, `${master}.qcow2`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']);
    await writeFile(
      join(vmDirectory, `${master}.xml`),
      guestDomainXml({
        name: master,
        memoryMib: 192,
        kernel: kit.kernel,
        initrd: kit.initrd,
        commandLine: `console=ttyS0 quiet panic=-1 marker=${suffix}`,
        disk,
        console: join(vmDirectory, `${master}.console.log`),
      }),
    );
    await stack.virsh('define', join(vmDirectory, `${master}.xml`));
    stack.track(master);
    const deadline = Date.now() + 60_000;
    while (
      Date.now() < deadline &&
      !(await call<{ state: number }>((cb) => stack.inventory.getVirtualMachine({ name: `hosts/${HOST}/virtualMachines/${master}` }, cb)).then(
        (vm) => vm.state === 3,
        () => false,
      ))
    )
      await sleep(200);
    image = `identity-${suffix}`;
    const publishing = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        { imageId: image, sourceVirtualMachine: `hosts/${HOST}/virtualMachines/${master}`, description: 'guest identity test', labels: {}, requestId: '' },
        cb,
      ),
    );
    const published = await stack.wait(publishing.name, 300_000, stack.distributionOperations);
    assert.equal(published.result?.$case, 'response', JSON.stringify(published.result));
  });
  after(() => resources.release());

  it('each guest prints its own hostname and instance-id (its UUID) from its cidata volume', async (t) => {
    const guest = GuestConfiguration.fromPartial({
      hostnameTemplate: 'guest-{index}-{host}',
      sshAuthorizedKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIdentityIdentityIdentityIdentityIdentity00 ops@{name}'],
      userData: `#cloud-config\n# ${SECRET}\nruncmd:\n  - echo {name} {index} {uuid}\n`,
      networkConfig: 'network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n',
    });
    const names = [1, 2, 3].map((index) => `${image}-vm-${index}`);
    stack.track(...names);
    const operation = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          source: { $case: 'image', value: `images/${image}` },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [`hosts/${HOST}`], maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: 3,
          nameTemplate: `${image}-vm-{index}`,
          start: true,
          requestId: '',
          guestConfiguration: guest,
        },
        cb,
      ),
    );
    const done = await stack.wait(operation.name, 180_000);
    if (done.result?.$case !== 'response') throw new Error(`the clone operation failed: ${JSON.stringify(done.result)}`);
    const response = unpack(CloneVirtualMachinesResponse, done.result.value);
    assert.deepEqual(
      response.clones.map((clone) => [clone.domainName, clone.error?.code ?? 0, clone.started]),
      names.map((name) => [name, 0, true]),
      JSON.stringify(response.clones.map((clone) => clone.error)),
    );

    // Nothing of the user-data in any operation record (the request is stored without it; the metadata has the digest).
    const kv = await new Kvm(stack.connection.jetstream).open('operations');
    for await (const key of await kv.keys()) {
      const entry = await kv.get(key);
      assert.ok(
        !Buffer.from(entry?.value ?? new Uint8Array())
          .toString('latin1')
          .includes(SECRET),
        `the operation record ${key} holds the user-data`,
      );
    }
    assert.ok(!JSON.stringify(done).includes(SECRET));

    // Each guest reads its seed, prints its identity, writes its marker and powers off.
    const startedAt = Date.now();
    for (const name of names) {
      while (Date.now() - startedAt < BOOT_TIMEOUT_MS && (await stack.virsh('domstate', name)).stdout.trim() !== 'shut off') await sleep(250);
    }
    t.diagnostic(`three guests booted and powered off in ${Date.now() - startedAt} ms`);
    const identities = new Set<string>();
    for (const [position, name] of names.entries()) {
      const clone = response.clones[position]!;
      const directory = join(stack.imageDirectory, 'clones', name);
      const consoleOutput = await readFile(join(directory, 'serial-0.out'), 'utf8').catch((error: unknown) => `(no console: ${(error as Error).message})`);
      const context = `console of ${name}:\n${consoleOutput.slice(-3000)}`;
      assert.equal((await stack.virsh('domstate', name)).stdout.trim(), 'shut off', `did not power off; ${context}`);
      const hostname = `guest-${position + 1}-${HOST}`;
      const userData = guest.userData
        .replace('{name}', name)
        .replace('{index}', String(position + 1))
        .replace('{uuid}', clone.uuid);
      assert.deepEqual(
        guestIdentityLines(consoleOutput),
        {
          hostname,
          instanceId: clone.uuid,
          seedFiles: ['meta-data', 'network-config', 'user-data'],
          userDataSha256: createHash('sha256').update(userData).digest('hex'),
        },
        context,
      );
      assert.match(consoleOutput, /cowherd-guest: marker written/, context);
      identities.add(`${hostname}/${clone.uuid}`);
      const xml = (await stack.virsh('dumpxml', name)).stdout;
      assert.match(xml, /<source file='[^']*\/cidata\.iso'[^>]*\/>\s*<target dev='vdb' bus='virtio'\/>\s*<readonly\/>/, xml);
    }
    assert.equal(identities.size, 3, 'three different identities');

    // Deleting a clone removes its seed with its directory.
    const first = join(stack.imageDirectory, 'clones', names[0]!);
    await access(join(first, 'cidata.iso'));
    await call((cb) => stack.cloning.deleteVirtualMachine({ name: `hosts/${HOST}/virtualMachines/${names[0]}`, force: false }, cb));
    await assert.rejects(access(first), 'the clone directory and its seed are gone');
  });
});
