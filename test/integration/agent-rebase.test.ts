/**
 * RebaseClones on a real agent process with a real libvirtd and qemu-img: clones of version 1 of an image,
 * each with a persistent data disk holding bytes written into it, moved onto version 2 (same name, UUID and
 * MAC, the system disk a fresh overlay on version 2's disk, the data disk's bytes intact, lineage showing
 * version 2 and the previous version 1, version 1's base unchanged, clone.rebased once per clone), then back;
 * a running clone that does not shut down in time stays running and unchanged; per-clone and whole-call
 * errors. Needs root (libvirtd).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { AgentServiceClient, type CreateCloneResult, type RebaseCloneResult } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import type { VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { CloneRebased } from '../../services/gen/cowherd/events/v1/events.js';
import { createClient } from '../../services/common/platform/client.js';
import { CLONE_REBASED } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { readCloneMetadata, sanitizeDomainTemplate } from '../../services/agent/hypervisor/index.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure, waitFor } from '../harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess } from '../harness/processes.js';

const run = promisify(execFile);
const URI = 'qemu:///system';
const log = createLogger({ service: 'test', level: 'silent' });
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
const sha256 = async (path: string) =>
  createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
const suffix = Math.random().toString(36).slice(2, 7);
const HOST = 'rebase-host';

describe('RebaseClones on a real agent and libvirtd', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  let agentClient: AgentServiceClient;
  let admin: InventoryServiceClient;
  let imageDirectory: string;
  const image = `rb-${suffix}`;
  const other = `rb-other-${suffix}`;
  const domains: string[] = [];
  const rebased: CloneRebased[] = [];
  const clones = [`rb1-${suffix}`, `rb2-${suffix}`];
  const vmName = (name: string) => `hosts/${HOST}/virtualMachines/${name}`;
  const replicaDisks = new Map<string, string>();
  const diskOf = (key: string) => replicaDisks.get(key)!;
  const operation = `operations/00000000-0000-4000-8000-${suffix.padStart(12, '0')}`;

  /** A replica laid out as distribution leaves it: the sanitized template and a disk holding `pattern`. */
  async function placeReplica(key: string, pattern: number, scratch: string): Promise<string> {
    const disk = join(scratch, `${key}.qcow2`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '64M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', `write -P ${pattern} 0 64k`, disk]);
    const xml = `<domain type='qemu'><name>template</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><model type='virtio'/></interface></devices></domain>`;
    const template = sanitizeDomainTemplate(xml);
    const replica = join(imageDirectory, 'images', key);
    await mkdir(replica, { recursive: true });
    await run('cp', [disk, join(replica, template.disks[0]!.fileName)]);
    await writeFile(join(replica, 'domain-template.xml'), template.xml);
    return join(replica, template.disks[0]!.fileName);
  }

  async function createClones(imageName: string, names: string[], dataDiskBytes: string): Promise<CreateCloneResult[]> {
    domains.push(...names);
    const response = await call<{ results: CreateCloneResult[] }>((cb) =>
      agentClient.createClones(
        {
          dataDiskBytes,
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          source: { $case: 'image', value: imageName },
          clones: names.map((domainName) => ({ domainName, start: false, index: 0 })),
          operation: '',
          requestId: `create-${names.join(',')}`,
          stream: false,
          diskBackend: 0,
          validateOnly: false,
        },
        cb,
      ),
    );
    return response.results;
  }

  function rebase(imageVersion: string, names: string[], extra: { restart?: boolean; seconds?: number; operation?: string } = {}) {
    return call<{ results: RebaseCloneResult[] }>((cb) =>
      agentClient.rebaseClones(
        {
          imageVersion,
          virtualMachines: names.map(vmName),
          restart: extra.restart ?? false,
          newInstanceId: false,
          shutdownTimeout: extra.seconds === undefined ? undefined : { seconds: String(extra.seconds), nanos: 0 },
          operation: extra.operation ?? operation,
        },
        cb,
      ),
    );
  }

  const backingOf = async (path: string): Promise<string> =>
    (JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', path])).stdout) as { 'backing-filename': string })['backing-filename'];
  const macOf = async (name: string): Promise<string> => ((await virsh('domiflist', name)).stdout.match(/([0-9a-f]{2}:){5}[0-9a-f]{2}/) ?? [''])[0];

  before(async () => {
    await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    const ca = await startCertificateAuthorityProcess(resources, pki, nats);
    const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    const directory = await resources.tempDir('cowherd-rebase-');
    imageDirectory = join(directory, 'images-root');
    await mkdir(join(imageDirectory, 'images'), { recursive: true });
    for (const [key, pattern] of [
      [image, 0x11],
      [`${image}_v2`, 0x22],
      [other, 0x33],
    ] as const)
      replicaDisks.set(key, await placeReplica(key, pattern, directory));
    resources.defer(async () => {
      for (const domain of domains) {
        await virsh('destroy', domain).catch(() => undefined);
        await virsh('undefine', domain, '--nvram').catch(() => virsh('undefine', domain).catch(() => undefined));
      }
    });
    const caAdmin = createClient(
      CertificateAuthorityServiceClient,
      ca.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem }),
    );
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host: HOST, ttl: undefined, requestId: '' }, cb));
    caAdmin.close();
    const agent = await startServiceProcess(resources, 'agent', undefined, nats.url, {
      COWHERD_HOST_ID: HOST,
      COWHERD_JOIN_TOKEN: token.token,
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: join(directory, 'credentials'),
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_LIBVIRT_URI: URI,
      COWHERD_IMAGE_DIR: imageDirectory,
    });
    agentClient = createClient(
      AgentServiceClient,
      agent.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('service', 'cloning')), caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 120_000 },
    );
    admin = createClient(
      InventoryServiceClient,
      inventory.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem }),
    );
    const connection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'cloning'), name: 'test', log });
    resources.defer(() => connection.close());
    const consumer = await consumeEvents(connection.jetstream, connection.manager, {
      durable: 'test-rebase-events',
      types: [CLONE_REBASED] as never[],
      log,
      handle: async (event) => void rebased.push(event.payload as CloneRebased),
    });
    resources.defer(() => consumer.stop());
  });
  after(async () => {
    agentClient?.close();
    admin?.close();
    await resources.release();
  });

  it('makes clones with a persistent data disk, rounded up to a MiB, on the system disk bus, recorded in the lineage', async () => {
    const results = await createClones(`images/${image}`, clones, String(2 * 2 ** 20 + 1));
    for (const result of results) assert.equal(result.status?.code ?? 0, 0, JSON.stringify(result.status));
    assert.equal(results[0]!.virtualMachine?.sourceImage, `images/${image}`);
    assert.equal(results[0]!.virtualMachine?.sourceImageVersion, `images/${image}/versions/1`);
    for (const name of clones) {
      const data = join(imageDirectory, 'clones', name, 'data.qcow2');
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', data])).stdout) as { 'virtual-size': number; 'backing-filename'?: string };
      assert.equal(info['virtual-size'], 3 * 2 ** 20, 'rounded up to a whole MiB');
      assert.equal(info['backing-filename'], undefined, 'a data disk stands alone');
      const xml = (await virsh('dumpxml', '--inactive', name)).stdout;
      assert.match(xml, new RegExp(`<source file='${data.replaceAll('.', '\\.')}'/>\\s*<target dev='vdb' bus='virtio'/>`));
      const metadata = readCloneMetadata(xml);
      assert.deepEqual(metadata?.persistentDisks, ['vdb']);
      assert.equal(metadata?.imageVersion, `images/${image}/versions/1`);
      // The guest's data: bytes written into the data disk while the clone is off.
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', data]);
    }
    const vm = await waitFor('the clone in inventory with its persistent disk', async () => {
      const read = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: vmName(clones[0]!) }, cb));
      return read.disks.some((disk) => disk.persistent) ? read : undefined;
    });
    assert.equal(vm.sourceImageVersion, `images/${image}/versions/1`);
    assert.deepEqual(
      vm.disks.filter((disk) => disk.persistent).map((disk) => disk.target),
      ['vdb'],
    );
    const invalid = await failure((cb) =>
      agentClient.createClones(
        {
          dataDiskBytes: '-1',
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          source: { $case: 'image', value: `images/${image}` },
          clones: [{ domainName: `bad-${suffix}`, start: false, index: 0 }],
          operation: '',
          requestId: '',
          stream: false,
          diskBackend: 0,
          validateOnly: false,
        },
        cb,
      ),
    );
    assert.equal(invalid.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(invalid.fields[0], 'data_disk_bytes');
    assert.ok(!existsSync(join(imageDirectory, 'clones', `bad-${suffix}`)), 'nothing made for an invalid request');
  });

  it('moves the clones onto version 2 keeping name, UUID, MAC and data, then back to version 1', async () => {
    const v1 = diskOf(image);
    const v2 = diskOf(`${image}_v2`);
    const v1Sum = await sha256(v1);
    const v2Sum = await sha256(v2);
    const identity = new Map<string, [string, string]>();
    for (const name of clones) identity.set(name, [(await virsh('domuuid', name)).stdout.trim(), await macOf(name)]);

    const moved = await rebase(`images/${image}/versions/2`, clones);
    for (const [index, result] of moved.results.entries()) {
      assert.equal(result.status?.code ?? 0, 0, JSON.stringify(result.status));
      assert.equal(result.virtualMachine, vmName(clones[index]!));
      assert.equal(result.previousImageVersion, `images/${image}/versions/1`);
      assert.equal(result.restarted, false);
      assert.ok(result.swapDuration, 'swap_duration is filled');
      assert.equal(result.virtualMachineState?.sourceImageVersion, `images/${image}/versions/2`);
      assert.equal(result.virtualMachineState?.lineage?.previousImageVersion, `images/${image}/versions/1`);
    }
    for (const name of clones) {
      assert.deepEqual([(await virsh('domuuid', name)).stdout.trim(), await macOf(name)], identity.get(name), 'same UUID and MAC');
      assert.equal(await backingOf(join(imageDirectory, 'clones', name, 'vda.qcow2')), v2);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x5a 0 64k', join(imageDirectory, 'clones', name, 'data.qcow2')]);
      const metadata = readCloneMetadata((await virsh('dumpxml', '--inactive', name)).stdout);
      assert.equal(metadata?.imageVersion, `images/${image}/versions/2`);
      assert.equal(metadata?.previousImageVersion, `images/${image}/versions/1`);
      assert.deepEqual(metadata?.persistentDisks, ['vdb'], 'the data disk is still persistent');
      assert.deepEqual(
        (await readdir(join(imageDirectory, 'clones', name))).filter((entry) => entry.startsWith('.')),
        [],
        'no work file is left',
      );
    }
    assert.equal(await sha256(v1), v1Sum, 'version 1 is unchanged');
    assert.equal(await sha256(v2), v2Sum, 'version 2 is unchanged');
    assert.deepEqual(
      (await readdir(join(imageDirectory, 'clones'))).filter((entry) => entry.startsWith('.prototype-')),
      [],
      'the prototype overlay is gone',
    );

    // A retry finds the clones on the version: OK, nothing changes, no second event.
    const again = await rebase(`images/${image}/versions/2`, clones);
    assert.ok(again.results.every((result) => (result.status?.code ?? 0) === 0 && !result.swapDuration));
    await waitFor('clone.rebased of both clones', async () => (rebased.length >= 2 ? true : undefined), 10_000);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.deepEqual(rebased.map((event) => event.virtualMachine).sort(), clones.map(vmName).sort(), 'clone.rebased once per clone');
    assert.ok(rebased.every((event) => event.imageVersion === `images/${image}/versions/2` && event.previousImageVersion === `images/${image}/versions/1`));
    assert.ok(rebased.every((event) => event.operation === operation));

    const vm = await waitFor('inventory shows version 2', async () => {
      const read = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: vmName(clones[0]!) }, cb));
      return read.sourceImageVersion === `images/${image}/versions/2` ? read : undefined;
    });
    assert.equal(vm.lineage?.previousImageVersion, `images/${image}/versions/1`);
    assert.equal(vm.lineage?.replica, `hosts/${HOST}/images/${image}/versions/2`);

    const back = await rebase(`images/${image}/versions/1`, clones, { operation: `${operation}1` });
    for (const result of back.results) {
      assert.equal(result.status?.code ?? 0, 0, JSON.stringify(result.status));
      assert.equal(result.previousImageVersion, `images/${image}/versions/2`);
    }
    for (const name of clones) {
      assert.equal(await backingOf(join(imageDirectory, 'clones', name, 'vda.qcow2')), v1);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x5a 0 64k', join(imageDirectory, 'clones', name, 'data.qcow2')]);
    }
    assert.equal(await sha256(v1), v1Sum, 'version 1 is unchanged');
  });

  it('leaves a running clone that does not shut down in time running on its version (DEADLINE_EXCEEDED)', async () => {
    const name = clones[0]!;
    const overlay = join(imageDirectory, 'clones', name, 'vda.qcow2');
    const before = await sha256(overlay);
    await virsh('start', name);
    try {
      // A guest without an operating system does not answer ACPI.
      const response = await rebase(`images/${image}/versions/2`, [name], { seconds: 1 });
      assert.equal(response.results[0]!.status?.code, GrpcStatus.DEADLINE_EXCEEDED);
      assert.equal((await virsh('domstate', name)).stdout.trim(), 'running');
      assert.equal(await backingOf(overlay), diskOf(image));
      assert.equal(readCloneMetadata((await virsh('dumpxml', '--inactive', name)).stdout)?.imageVersion, `images/${image}/versions/1`);
    } finally {
      await virsh('destroy', name).catch(() => undefined);
    }
    assert.equal(await sha256(overlay), before, 'the overlay was not replaced');
  });

  it('refuses per clone: another image, unknown; and for the whole call: a bad or absent version, bad names', async () => {
    const stranger = `rb-o-${suffix}`;
    const made = await createClones(`images/${other}`, [stranger], '0');
    assert.equal(made[0]!.status?.code ?? 0, 0);
    const response = await rebase(`images/${image}/versions/2`, [stranger, `absent-${suffix}`, clones[1]!]);
    assert.equal(response.results[0]!.status?.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(response.results[1]!.status?.code, GrpcStatus.NOT_FOUND);
    assert.equal(response.results[2]!.status?.code ?? 0, 0, 'the others move');
    assert.equal(await backingOf(join(imageDirectory, 'clones', stranger, 'vda.qcow2')), diskOf(other));

    const latest = await failure((cb) =>
      agentClient.rebaseClones(
        {
          imageVersion: `images/${image}`,
          virtualMachines: [vmName(clones[0]!)],
          restart: false,
          newInstanceId: false,
          shutdownTimeout: undefined,
          operation: '',
        },
        cb,
      ),
    );
    assert.equal(latest.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(latest.fields[0], 'image_version');
    const absent = await failure((cb) =>
      agentClient.rebaseClones(
        {
          imageVersion: `images/${image}/versions/7`,
          virtualMachines: [vmName(clones[0]!)],
          restart: false,
          newInstanceId: false,
          shutdownTimeout: undefined,
          operation: '',
        },
        cb,
      ),
    );
    assert.equal(absent.code, GrpcStatus.NOT_FOUND);
    const badName = await failure((cb) =>
      agentClient.rebaseClones(
        {
          imageVersion: `images/${image}/versions/2`,
          virtualMachines: ['hosts/other/virtualMachines/x'],
          restart: false,
          newInstanceId: false,
          shutdownTimeout: undefined,
          operation: '',
        },
        cb,
      ),
    );
    assert.equal(badName.fields[0], 'virtual_machines[0]');
  });
});
