/**
 * The agent and inventory on real parts: an agent enrolls against a real CA, a domain defined in the
 * real libvirtd appears in inventory with its disks, backing chain and state; start and destroy change
 * the state; killing the agent (SIGKILL) marks the host UNREACHABLE and leaves no `virsh event` behind;
 * restarting it marks it READY with nothing duplicated or re-created; re-enrolling with a second join token
 * and a fresh key keeps the host's record; deleting the host revokes the agent's certificate. Extra agents
 * use test:///default.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { Certificate_State } from '../../services/gen/cowherd/certauthority/v1/resources.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host_State, VirtualMachine_State, type Host, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { createClient } from '../../services/common/platform/client.js';
import { inspectCertificate } from '../../services/common/platform/pki.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const run = promisify(execFile);
const URI = 'qemu:///system';
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });

/** Pids of the `virsh event` processes whose parent is `pid`. */
async function eventWatchersOf(pid: number): Promise<number[]> {
  const found: number[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const status = await readFile(`/proc/${entry}/status`, 'utf8').catch(() => '');
    if (Number(/^PPid:\s+(\d+)/m.exec(status)?.[1]) !== pid) continue;
    const commandLine = (await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (commandLine[0]?.endsWith('virsh') && commandLine.some((arg) => arg.includes('event --all --loop'))) found.push(Number(entry));
  }
  return found;
}

/** True while `pid` runs (a zombie waiting to be reaped counts as gone). */
async function isRunning(pid: number): Promise<boolean> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  return status !== '' && !/^State:\s+Z/m.test(status);
}

describe('agent and inventory on real parts', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  let pki: TestPki;
  let natsUrl: string;
  let ca: Awaited<ReturnType<typeof startCertificateAuthorityProcess>>;
  let inventory: ServiceProcess;
  let admin: InventoryServiceClient;
  let caAdmin: CertificateAuthorityServiceClient;
  let directory: string;
  const domain = `cowherd-e2e-${Math.random().toString(36).slice(2, 8)}`;
  let agentEnv: Record<string, string>;
  /** The e2e-host agent running now. */
  let currentAgent: ServiceProcess;

  async function waitFor<T>(what: string, read: () => Promise<T>, ok: (value: T) => boolean, ms = 20_000): Promise<T> {
    const deadline = Date.now() + ms;
    let last: T | undefined;
    for (;;) {
      last = await read().catch(() => undefined as T);
      if (last !== undefined && ok(last)) return last;
      if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}: ${JSON.stringify(last)}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
  /** Exactly one record of the host and of the domain, both as they were (identity, labels, creation). */
  async function assertSameRecords(before: { host: Host; vm: VirtualMachine }): Promise<void> {
    const hosts = await call<{ hosts: Host[] }>((cb) => admin.listHosts({ pageSize: 1000, pageToken: '', filter: '' }, cb));
    assert.equal(hosts.hosts.filter((item) => item.name === 'hosts/e2e-host' || item.hostname === before.host.hostname).length, 1, 'one host record');
    const host = await getHost();
    assert.deepEqual(host.enrollTime, before.host.enrollTime, 'enroll time kept');
    assert.deepEqual(host.labels, { rack: 'r7' }, 'labels kept');
    const vms = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 1000, pageToken: '', filter: `domain_name = "${domain}"` }, cb),
    );
    assert.deepEqual(
      vms.virtualMachines.map((vm) => vm.name),
      [`hosts/e2e-host/virtualMachines/${domain}`],
      'one VM record',
    );
    assert.deepEqual(vms.virtualMachines[0]!.createTime, before.vm.createTime, 'VM create time kept');
    assert.equal(vms.virtualMachines[0]!.uuid, before.vm.uuid);
  }
  const getVm = (): Promise<VirtualMachine> => call((cb) => admin.getVirtualMachine({ name: `hosts/e2e-host/virtualMachines/${domain}` }, cb));
  const getHost = (host = 'e2e-host'): Promise<Host> => call((cb) => admin.getHost({ name: `hosts/${host}` }, cb));

  before(async () => {
    await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    natsUrl = nats.url;
    ca = await startCertificateAuthorityProcess(resources, pki, nats);
    inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), natsUrl, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_HEARTBEAT_SECONDS: '1',
      COWHERD_MISSED_HEARTBEATS: '3',
    });
    const adminCredentials = { ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem };
    admin = createClient(InventoryServiceClient, inventory.address, mutualTlsChannelCredentialsFromPem(adminCredentials), { defaultDeadlineMs: 10_000 });
    caAdmin = createClient(CertificateAuthorityServiceClient, ca.address, mutualTlsChannelCredentialsFromPem(adminCredentials), { defaultDeadlineMs: 10_000 });
    directory = await resources.tempDir('cowherd-e2e-');
    // A real qcow2 overlay on a base, defined (not started) in the real libvirtd.
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(directory, 'base.qcow2'), '64M']);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(directory, 'base.qcow2'), '-F', 'qcow2', join(directory, 'disk.qcow2')]);
    const xml = `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${join(directory, 'disk.qcow2')}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`;
    const { writeFile } = await import('node:fs/promises');
    await writeFile(join(directory, 'domain.xml'), xml);
    resources.defer(async () => {
      await virsh('destroy', domain).catch(() => undefined);
      await virsh('undefine', domain).catch(() => undefined);
    });
    agentEnv = {
      COWHERD_HOST_ID: 'e2e-host',
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: join(directory, 'credentials'),
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_LIBVIRT_URI: URI,
      COWHERD_IMAGE_DIR: join(directory, 'images'),
    };
  });
  after(async () => {
    admin?.close();
    caAdmin?.close();
    await resources.release();
  });

  it('enrolls, registers the host, reports a real domain with its disks, backing chain and state changes, and survives SIGKILL', async () => {
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host: 'e2e-host', ttl: undefined, requestId: '' }, cb));
    const agent = await startServiceProcess(resources, 'agent', undefined, natsUrl, { ...agentEnv, COWHERD_JOIN_TOKEN: token.token });
    currentAgent = agent;
    const host = await waitFor(
      'the host to register',
      () => getHost(),
      (value) => value.state === Host_State.STATE_READY,
    );
    assert.equal(host.hypervisor, Hypervisor.HYPERVISOR_KVM);
    assert.equal(host.libvirtUri, URI);
    assert.ok(host.cpuCount >= 1 && Number(host.memoryBytes) > 0 && Number(host.imageDirectoryTotalBytes) > 0, JSON.stringify(host));
    assert.match(host.hypervisorDetail, /qemu|QEMU|TCG/);

    await virsh('define', join(directory, 'domain.xml'));
    const defined = await waitFor('the domain to appear', getVm, (vm) => vm.state === VirtualMachine_State.STATE_SHUT_OFF);
    assert.equal(defined.domainName, domain);
    assert.equal(defined.disks.length, 1);
    assert.equal(defined.disks[0]!.target, 'vda');
    assert.equal(defined.disks[0]!.path, join(directory, 'disk.qcow2'));
    assert.deepEqual(
      defined.disks[0]!.backingChain.map((file) => file.path),
      [join(directory, 'base.qcow2')],
    );

    const startedAt = Date.now();
    await virsh('start', domain);
    await waitFor('running', getVm, (vm) => vm.state === VirtualMachine_State.STATE_RUNNING, 10_000);
    const latency = Date.now() - startedAt;
    assert.ok(latency < 5_000, `state reached inventory after ${latency} ms`);
    await virsh('destroy', domain);
    await waitFor('shut off', getVm, (vm) => vm.state === VirtualMachine_State.STATE_SHUT_OFF, 10_000);

    // Killed with SIGKILL (no shutdown code runs): UNREACHABLE after the missed heartbeats, and its
    // `virsh event` watcher dies with it instead of living on as an orphan.
    await call((cb) => admin.updateHost({ host: { ...host, labels: { rack: 'r7' } }, updateMask: ['labels'] }, cb));
    const before = { host: await getHost(), vm: await getVm() };
    const watchers = await eventWatchersOf(agent.daemon.pid);
    assert.ok(watchers.length >= 1, 'the agent runs a virsh event watcher');
    process.kill(agent.daemon.pid, 'SIGKILL');
    await agent.daemon.exited;
    await waitFor(
      'the virsh event watcher to die with the agent',
      async () => (await Promise.all(watchers.map(isRunning))).filter(Boolean).length,
      (running) => running === 0,
      10_000,
    );
    await waitFor(
      'unreachable',
      () => getHost(),
      (value) => value.state === Host_State.STATE_UNREACHABLE,
      10_000,
    );

    // Restarted (no token: it keeps its identity): READY, and nothing duplicated or re-created.
    currentAgent = await startServiceProcess(resources, 'agent', undefined, natsUrl, agentEnv);
    await waitFor(
      'ready again',
      () => getHost(),
      (value) => value.state === Host_State.STATE_READY,
      20_000,
    );
    await assertSameRecords(before);
  });

  it('keeps the host record when the host re-enrolls with a second join token and a fresh key', async () => {
    const before = { host: await getHost(), vm: await getVm() };
    const firstCertificate = await readFile(join(directory, 'credentials', 'cert.pem'), 'utf8');
    await currentAgent.daemon.stop();
    // A reinstalled host: no credentials left, a new join token for the same host name.
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host: 'e2e-host', ttl: undefined, requestId: '' }, cb));
    const credentials = join(directory, 'credentials-reinstalled');
    currentAgent = await startServiceProcess(resources, 'agent', undefined, natsUrl, {
      ...agentEnv,
      COWHERD_CREDENTIALS_DIR: credentials,
      COWHERD_JOIN_TOKEN: token.token,
    });
    const secondCertificate = await readFile(join(credentials, 'cert.pem'), 'utf8');
    assert.notEqual(inspectCertificate(secondCertificate).serialNumber, inspectCertificate(firstCertificate).serialNumber);
    assert.notEqual(
      await readFile(join(credentials, 'key.pem'), 'utf8'),
      await readFile(join(directory, 'credentials', 'key.pem'), 'utf8'),
      'a fresh key pair',
    );
    assert.equal(inspectCertificate(secondCertificate).identity?.uri, 'spiffe://cowherd/host/e2e-host');
    await waitFor(
      'registered again with the new certificate',
      () => getHost(),
      (value) => value.state === Host_State.STATE_READY && (value.lastHeartbeatTime?.getTime() ?? 0) > (before.host.lastHeartbeatTime?.getTime() ?? 0),
      20_000,
    );
    await assertSameRecords(before);

    await virsh('undefine', domain);
    await waitFor(
      'the domain to disappear',
      () =>
        getVm().then(
          () => 'present',
          (error: { code?: number }) => (error.code === GrpcStatus.NOT_FOUND ? 'gone' : 'error'),
        ),
      (value) => value === 'gone',
      10_000,
    );
  });

  it('runs extra agents on test:///default, each its own host, seen across hosts', async () => {
    for (const host of ['extra-1', 'extra-2']) {
      const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host, ttl: undefined, requestId: '' }, cb));
      await startServiceProcess(resources, 'agent', undefined, natsUrl, {
        ...agentEnv,
        COWHERD_HOST_ID: host,
        COWHERD_JOIN_TOKEN: token.token,
        COWHERD_CREDENTIALS_DIR: join(directory, `credentials-${host}`),
        COWHERD_IMAGE_DIR: join(directory, `images-${host}`),
        COWHERD_LIBVIRT_URI: 'test:///default',
      });
    }
    const all = await waitFor(
      'the test domains of both extra hosts',
      () =>
        call<{ virtualMachines: VirtualMachine[] }>((cb) =>
          admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 1000, pageToken: '', filter: 'domain_name = "test"' }, cb),
        ),
      (page) => page.virtualMachines.length >= 2,
    );
    assert.deepEqual(all.virtualMachines.map((vm) => vm.host).sort(), ['hosts/extra-1', 'hosts/extra-2']);
  });

  it('deleting a host revokes its certificate', async () => {
    const certificatePem = await readFile(join(directory, 'credentials-extra-2', 'cert.pem'), 'utf8');
    const serial = inspectCertificate(certificatePem).serialNumber;
    await call((cb) => admin.deleteHost({ name: 'hosts/extra-2', force: true }, cb));
    await waitFor(
      'the certificate to be revoked',
      () => call<{ state: Certificate_State }>((cb) => caAdmin.getCertificate({ name: `certificates/${serial}` }, cb)),
      (certificate) => certificate.state === Certificate_State.STATE_REVOKED,
      10_000,
    );
    assert.equal((await failure((cb) => admin.getHost({ name: 'hosts/extra-2' }, cb))).code, GrpcStatus.NOT_FOUND);
  });
});
