/**
 * CreateClones on a real agent process with a real libvirtd and qemu-img: copy-on-write children of a
 * powered-off VM's disk and of an image replica, defined (and started) in libvirt, clone.done once per
 * clone, lineage in inventory, the base read-only and unchanged, and a batch with an impossible clone
 * that reports it, leaves nothing of it behind and keeps the others.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { AgentServiceClient, type CreateCloneResult } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import type { VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { createClient } from '../../services/common/platform/client.js';
import { CLONE_DONE, CLONE_FAILED } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { sanitizeDomainTemplate } from '../../services/agent/hypervisor/index.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const run = promisify(execFile);
const URI = 'qemu:///system';
const log = createLogger({ service: 'test', level: 'silent' });
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
const sha256 = async (path: string) =>
  createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
const suffix = Math.random().toString(36).slice(2, 7);

describe('clones on a real agent and libvirtd', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  let agentClient: AgentServiceClient;
  let admin: InventoryServiceClient;
  let imageDirectory: string;
  let baseDisk: string;
  let agent: ServiceProcess;
  const source = `cowherd-src-${suffix}`;
  const domains: string[] = [];
  const done: string[] = [];
  const failed: string[] = [];

  function cloneRequest(names: string[], start = false, vm = `hosts/clone-host/virtualMachines/${source}`) {
    domains.push(...names);
    return {
      source: { $case: 'virtualMachine' as const, value: vm },
      clones: names.map((domainName) => ({ domainName, start, index: 0 })),
      operation: `operations/00000000-0000-4000-8000-${suffix.padStart(12, '0')}`,
      requestId: `request-${names.join(',')}`,
      validateOnly: false,
      stream: false,
      diskBackend: 0,
      guestConfiguration: undefined,
      guestConfigurationDigest: '',
      dataDiskBytes: '0',
    };
  }

  before(async () => {
    await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    const ca = await startCertificateAuthorityProcess(resources, pki, nats);
    const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    const directory = await resources.tempDir('cowherd-e2e-');
    imageDirectory = join(directory, 'images-root');
    await mkdir(join(imageDirectory, 'vms'), { recursive: true });
    baseDisk = join(imageDirectory, 'vms', `${source}.qcow2`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', baseDisk, '64M']);
    const xml = `<domain type='qemu'><name>${source}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${baseDisk}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><model type='virtio'/></interface></devices></domain>`;
    await writeFile(join(directory, 'source.xml'), xml);
    await virsh('define', join(directory, 'source.xml'));
    domains.push(source);
    resources.defer(async () => {
      for (const domain of domains) {
        await virsh('destroy', domain).catch(() => undefined);
        await virsh('undefine', domain).catch(() => undefined);
      }
    });

    const caAdmin = createClient(
      CertificateAuthorityServiceClient,
      ca.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem }),
    );
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host: 'clone-host', ttl: undefined, requestId: '' }, cb));
    caAdmin.close();
    agent = await startServiceProcess(resources, 'agent', undefined, nats.url, {
      COWHERD_HOST_ID: 'clone-host',
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
      durable: 'test-clone-events',
      types: [CLONE_DONE, CLONE_FAILED] as never[],
      log,
      handle: async (event) => void (event.typeName.endsWith('CloneDone') ? done : failed).push((event.payload as { domainName: string }).domainName),
    });
    resources.defer(() => consumer.stop());
  });
  after(async () => {
    agentClient?.close();
    admin?.close();
    await resources.release();
  });

  it('clones a powered-off VM: overlays on its disk, defined and started, clone.done once each, base read-only and unchanged', async () => {
    const before = await sha256(baseDisk);
    const names = [`c1-${suffix}`, `c2-${suffix}`, `c3-${suffix}`];
    const response = await call<{ results: CreateCloneResult[] }>((cb) => agentClient.createClones(cloneRequest(names, true), cb));
    assert.deepEqual(
      response.results.map((result) => [result.domainName, result.status?.code ?? 0, result.started]),
      names.map((name) => [name, 0, true]),
    );
    for (const name of names) {
      const { stdout: state } = await virsh('domstate', name);
      assert.equal(state.trim(), 'running');
      const overlay = join(imageDirectory, 'clones', name, 'vda.qcow2');
      const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', overlay])).stdout) as {
        'backing-filename': string;
        'actual-size': number;
      };
      assert.equal(info['backing-filename'], baseDisk);
      assert.ok(info['actual-size'] <= 512 * 1024, `overlay is ${info['actual-size']} bytes`);
    }
    assert.equal((await stat(baseDisk)).mode & 0o222, 0, 'the base is read-only on disk');
    const { readdir } = await import('node:fs/promises');
    assert.deepEqual(
      (await readdir(join(imageDirectory, 'clones'))).filter((entry) => entry.startsWith('.prototype-')),
      [],
      'the batch prototype overlay is gone',
    );
    for (const name of names) await virsh('destroy', name);
    assert.equal(await sha256(baseDisk), before, 'the base is unchanged');

    // A retry of the same request returns the same clones instead of failing on their names.
    const retried = await call<{ results: CreateCloneResult[] }>((cb) => agentClient.createClones(cloneRequest(names, false), cb));
    assert.ok(retried.results.every((result) => !result.status || result.status.code === 0));

    const deadline = Date.now() + 10_000;
    while (done.length < 3 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.deepEqual([...done].sort(), [...names].sort(), 'clone.done once per clone');

    // Inventory learns the lineage from the clones' metadata.
    let vm: VirtualMachine | undefined;
    const until = Date.now() + 10_000;
    while (Date.now() < until && !vm?.managed)
      vm = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: `hosts/clone-host/virtualMachines/${names[0]}` }, cb)).catch(() => undefined);
    assert.equal(vm?.managed, true);
    assert.equal(vm?.lineage?.sourceVirtualMachine, `hosts/clone-host/virtualMachines/${source}`);
    assert.deepEqual(vm?.lineage?.overlays, [join(imageDirectory, 'clones', names[0]!, 'vda.qcow2')]);
  });

  it('reports an impossible clone in a batch, leaves nothing of it behind, and keeps the others', async () => {
    const taken = source;
    const names = [`ok1-${suffix}`, taken, `ok2-${suffix}`];
    const response = await call<{ results: CreateCloneResult[] }>((cb) =>
      agentClient.createClones({ ...cloneRequest(names), requestId: `clash-${suffix}` }, cb),
    );
    assert.equal(response.results[0]!.status?.code ?? 0, 0);
    assert.equal(response.results[1]!.status?.code, GrpcStatus.ALREADY_EXISTS);
    assert.equal(response.results[2]!.status?.code ?? 0, 0);
    assert.ok(!existsSync(join(imageDirectory, 'clones', taken)), 'nothing of the failed clone is left');
    const deadline = Date.now() + 10_000;
    while (!failed.includes(taken) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(failed.includes(taken), 'clone.failed published');
  });

  it('clones an image replica on the host', async () => {
    // A replica as distribution leaves it: the sanitized template and the disk file beside it.
    const replica = join(imageDirectory, 'images', `img-${suffix}`);
    await mkdir(replica, { recursive: true });
    const template = sanitizeDomainTemplate((await virsh('dumpxml', '--inactive', source)).stdout);
    await run('qemu-img', ['convert', '-U', '-O', 'qcow2', baseDisk, join(replica, template.disks[0]!.fileName)]);
    await writeFile(join(replica, 'domain-template.xml'), template.xml);
    const name = `img-clone-${suffix}`;
    domains.push(name);
    const response = await call<{ results: CreateCloneResult[] }>((cb) =>
      agentClient.createClones(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          source: { $case: 'image', value: `images/img-${suffix}` },
          clones: [{ index: 0, domainName: name, start: false }],
          operation: '',
          requestId: '',
          validateOnly: false,
          stream: false,
          diskBackend: 0,
        },
        cb,
      ),
    );
    assert.equal(response.results[0]!.status?.code ?? 0, 0, JSON.stringify(response.results[0]?.status));
    assert.equal(response.results[0]!.virtualMachine?.sourceImage, `images/img-${suffix}`);
    const missing = await call<{ results: CreateCloneResult[] }>((cb) =>
      agentClient.createClones(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          source: { $case: 'image', value: 'images/absent' },
          clones: [{ index: 0, domainName: `x-${suffix}`, start: false }],
          operation: '',
          requestId: '',
          validateOnly: false,
          stream: false,
          diskBackend: 0,
        },
        cb,
      ),
    ).then(
      () => undefined,
      (error: { code: number }) => error.code,
    );
    assert.equal(missing, GrpcStatus.FAILED_PRECONDITION);
  });

  it('starts, stops and deletes with the lineage rules: a base VM never starts or goes while clones use it', async () => {
    const sourceName = `hosts/clone-host/virtualMachines/${source}`;
    const startSource = await failure((cb) => agentClient.startVirtualMachine({ name: sourceName }, cb));
    assert.equal(startSource.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(startSource.reason, 'ERROR_REASON_VIRTUAL_MACHINE_HAS_DEPENDENTS');
    assert.match(startSource.metadata['dependents'] ?? '', /c1-/);
    const deleteSource = await failure((cb) => agentClient.deleteVirtualMachine({ name: sourceName, force: true }, cb));
    assert.equal(deleteSource.reason, 'ERROR_REASON_VIRTUAL_MACHINE_HAS_DEPENDENTS', 'even with force');

    const clone = `c1-${suffix}`;
    const cloneName = `hosts/clone-host/virtualMachines/${clone}`;
    const started = await call<VirtualMachine>((cb) => agentClient.startVirtualMachine({ name: cloneName }, cb));
    assert.equal(started.domainName, clone);
    const running = await failure((cb) => agentClient.deleteVirtualMachine({ name: cloneName, force: false }, cb));
    assert.equal(running.reason, 'ERROR_REASON_VIRTUAL_MACHINE_RUNNING');
    await call((cb) => agentClient.stopVirtualMachine({ name: cloneName, force: true, timeout: undefined }, cb));
    assert.equal((await virsh('domstate', clone)).stdout.trim(), 'shut off');
    const before = await sha256(baseDisk);
    await call((cb) => agentClient.deleteVirtualMachine({ name: cloneName, force: false }, cb));
    assert.ok(!existsSync(join(imageDirectory, 'clones', clone)), 'its overlays are gone');
    await assert.rejects(virsh('domstate', clone));
    assert.equal(await sha256(baseDisk), before, 'the base is untouched');
    await call((cb) => agentClient.deleteVirtualMachine({ name: cloneName, force: false }, cb)); // deleting what is gone succeeds

    // A VM cowherd did not make is deleted only with force, and then only its definition.
    const stranger = `stranger-${suffix}`;
    domains.push(stranger);
    const xmlFile = join(imageDirectory, `${stranger}.xml`);
    await writeFile(
      xmlFile,
      `<domain type='qemu'><name>${stranger}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features></domain>`,
    );
    await virsh('define', xmlFile);
    const unmanaged = await failure((cb) => agentClient.deleteVirtualMachine({ name: `hosts/clone-host/virtualMachines/${stranger}`, force: false }, cb));
    assert.equal(unmanaged.reason, 'ERROR_REASON_VIRTUAL_MACHINE_NOT_MANAGED');
    await call((cb) => agentClient.deleteVirtualMachine({ name: `hosts/clone-host/virtualMachines/${stranger}`, force: true }, cb));
    await assert.rejects(virsh('domstate', stranger));
    assert.ok(existsSync(xmlFile), 'a forced delete of an unmanaged VM removes no file');
  });

  it('refuses bad input: running source, disks outside the image dir, unknown VM, bad names, wrong callers', async () => {
    await virsh('start', source).catch(() => undefined);
    await virsh('destroy', source).catch(() => undefined);
    const unknown = await failure((cb) => agentClient.createClones(cloneRequest([`u-${suffix}`], false, 'hosts/clone-host/virtualMachines/no-such-vm'), cb));
    assert.equal(unknown.code, GrpcStatus.NOT_FOUND);
    assert.equal((await failure((cb) => agentClient.createClones(cloneRequest(['bad name']), cb))).fields[0], 'clones[0].domain_name');
    assert.equal((await failure((cb) => agentClient.createClones(cloneRequest(['../../etc']), cb))).code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal((await failure((cb) => agentClient.createClones({ ...cloneRequest([]), clones: [] }, cb))).fields[0], 'clones');
    const otherHost = await failure((cb) => agentClient.createClones(cloneRequest([`o-${suffix}`], false, `hosts/other/virtualMachines/${source}`), cb));
    assert.equal(otherHost.code, GrpcStatus.INVALID_ARGUMENT);
    assert.ok(!existsSync(join(imageDirectory, 'clones', `u-${suffix}`)));
  });
});
