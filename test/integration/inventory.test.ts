/**
 * Inventory on real NATS with two replicas as real processes, called with real host and admin
 * certificates: registration, heartbeats and UNREACHABLE, VM reports, listing across hosts while VMs
 * change (1,000 VMs, several host identities), the watch stream, delete (drain), and bad input.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host, Host_State, VirtualMachine, VirtualMachine_State, VirtualMachineChange_Type, type VirtualMachineChange } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { createClient } from '../../services/common/client.js';
import { HOST_READY, HOST_UNREACHABLE } from '../../services/common/event-types.js';
import { consumeEvents } from '../../services/common/events.js';
import { createLogger } from '../../services/common/logger.js';
import { connectNats } from '../../services/common/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/tls.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const log = createLogger({ service: 'test', level: 'silent' });

function hostFacts(host: string): Host {
  return Host.fromPartial({ name: `hosts/${host}`, hostname: `${host}.example`, hypervisor: Hypervisor.HYPERVISOR_KVM, hypervisorDetail: 'test', libvirtUri: 'test:///default', agentEndpoint: `${host}:7445`, cpuCount: 2, memoryBytes: '1000', imageDirectory: '/images', agentVersion: 'test' });
}

function vm(host: string, name: string, state = VirtualMachine_State.STATE_SHUT_OFF): VirtualMachine {
  return VirtualMachine.fromPartial({ name: `hosts/${host}/virtualMachines/${name}`, domainName: name, uuid: `00000000-0000-4000-8000-${String(name.length).padStart(12, '0')}`, state, vcpuCount: 1, memoryBytes: '536870912' });
}

describe('inventory', () => {
  const resources = new Resources();
  let pki: TestPki;
  let replicas: ServiceProcess[] = [];
  const clients: InventoryServiceClient[] = [];
  let natsUrl: string;

  async function as(kind: 'admin' | 'host' | 'service', name: string, replica = 0): Promise<InventoryServiceClient> {
    const client = createClient(InventoryServiceClient, replicas[replica]!.address, mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials(kind, name)), caPem: pki.ca.certificatePem }), { defaultDeadlineMs: 20_000 });
    clients.push(client);
    return client;
  }
  async function register(client: InventoryServiceClient, host: string): Promise<Host> {
    return call((cb) => client.registerHost({ host: hostFacts(host) }, cb));
  }
  async function listAll(client: InventoryServiceClient, parent: string, pageSize: number, between?: () => Promise<void>): Promise<string[]> {
    const names: string[] = [];
    let pageToken = '';
    do {
      const page = await call<{ virtualMachines: VirtualMachine[]; nextPageToken: string }>((cb) => client.listVirtualMachines({ parent, pageSize, pageToken, filter: '' }, cb));
      names.push(...page.virtualMachines.map((item) => item.name));
      pageToken = page.nextPageToken;
      if (between) await between();
    } while (pageToken !== '');
    return names;
  }

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    natsUrl = nats.url;
    const ca = await startCertificateAuthorityProcess(resources, pki, { url: nats.url });
    const env = { COWHERD_CA_ADDRESS: ca.address, COWHERD_HEARTBEAT_SECONDS: '1', COWHERD_MISSED_HEARTBEATS: '3' };
    replicas = [
      await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory', { subdirectory: 'inventory-1' }), nats.url, env),
      await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory', { subdirectory: 'inventory-2' }), nats.url, env),
    ];
  });
  after(async () => {
    for (const client of clients) client.close();
    await resources.release();
  });

  it('registers hosts, keeps their identity across re-registration, and is seen by every replica', async () => {
    const agent = await as('host', 'kvm-01');
    const first = await register(agent, 'kvm-01');
    assert.equal(first.state, Host_State.STATE_READY);
    const again = await register(agent, 'kvm-01');
    assert.deepEqual(again.enrollTime, first.enrollTime, 'a restarted agent keeps its record');
    const admin = await as('admin', 'alice', 1);
    const deadline = Date.now() + 5_000;
    let seen: Host | undefined;
    while (!seen && Date.now() < deadline) seen = await call<Host>((cb) => admin.getHost({ name: 'hosts/kvm-01' }, cb)).catch(() => undefined);
    assert.equal(seen?.hostname, 'kvm-01.example');
    const hosts = await call<{ hosts: Host[] }>((cb) => admin.listHosts({ pageSize: 0, pageToken: '', filter: 'state = READY AND hypervisor = KVM' }, cb));
    assert.deepEqual(hosts.hosts.map((host) => host.name), ['hosts/kvm-01'], 'a host name is unique in the fleet');
  });

  it('marks a silent host UNREACHABLE and READY again when heartbeats resume, once each', async () => {
    const nats = await connectNats({ servers: [natsUrl], tls: await pki.files('service', 'cloning'), name: 'test', log });
    resources.defer(() => nats.close());
    const seen: string[] = [];
    const consumer = await consumeEvents(nats.jetstream, nats.manager, { durable: 'test-host-states', types: [HOST_UNREACHABLE, HOST_READY] as never[], host: 'kvm-02', log, startAt: 'new', handle: async (event) => void seen.push(event.typeName) });
    resources.defer(() => consumer.stop());
    const agent = await as('host', 'kvm-02');
    const admin = await as('admin', 'alice');
    await register(agent, 'kvm-02');
    const state = async (): Promise<Host_State> => (await call<Host>((cb) => admin.getHost({ name: 'hosts/kvm-02' }, cb))).state;
    const waitFor = async (wanted: Host_State, ms: number): Promise<void> => {
      const deadline = Date.now() + ms;
      while ((await state()) !== wanted) {
        if (Date.now() > deadline) assert.fail(`host never became ${Host_State[wanted]}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    };
    await waitFor(Host_State.STATE_UNREACHABLE, 8_000);
    const heartbeat = await call<{ heartbeatInterval?: { seconds: string } }>((cb) => agent.heartbeat({ host: 'hosts/kvm-02', memoryFreeBytes: '1', imageDirectoryFreeBytes: '2', imageDirectoryTotalBytes: '3' }, cb));
    assert.equal(heartbeat.heartbeatInterval?.seconds, '1');
    await waitFor(Host_State.STATE_READY, 2_000);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.deepEqual(seen, ['cowherd.events.v1.HostReady', 'cowherd.events.v1.HostUnreachable', 'cowherd.events.v1.HostReady']);
  });

  it('lists 1,000 VMs across hosts completely, each once, while VMs change', async () => {
    const hosts = ['bulk-a', 'bulk-b', 'bulk-c', 'bulk-d', 'bulk-e'];
    const agents = await Promise.all(hosts.map((host) => as('host', host)));
    const expected: string[] = [];
    await Promise.all(
      agents.map(async (agent, index) => {
        const host = hosts[index]!;
        await register(agent, host);
        const vms = Array.from({ length: 200 }, (_, i) => vm(host, `vm-${String(i).padStart(3, '0')}`));
        expected.push(...vms.map((item) => item.name));
        const result = await call<{ changedCount: number }>((cb) => agent.reportVirtualMachines({ parent: `hosts/${host}`, virtualMachines: vms, fullSnapshot: true, removedVirtualMachines: [] }, cb));
        assert.equal(result.changedCount, 200);
      }),
    );
    const admin = await as('admin', 'alice', 1);
    // Replica 2 catches up through its KV watch.
    const deadline = Date.now() + 10_000;
    while ((await listAll(admin, 'hosts/-', 1000)).filter((name) => name.includes('/bulk-')).length < 1000 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));

    // Page through with small pages while agents start VMs, add new ones and remove extras.
    let round = 0;
    const churn = async (): Promise<void> => {
      round++;
      const agent = agents[round % agents.length]!;
      const host = hosts[round % hosts.length]!;
      await call((cb) => agent.reportVirtualMachines({ parent: `hosts/${host}`, virtualMachines: [vm(host, `vm-${String(round % 200).padStart(3, '0')}`, VirtualMachine_State.STATE_RUNNING), vm(host, `extra-${round}`)], fullSnapshot: false, removedVirtualMachines: round > 2 ? [`hosts/${host}/virtualMachines/extra-${round - 2}`] : [] }, cb));
    };
    const listed = (await listAll(admin, 'hosts/-', 37, churn)).filter((name) => /\/bulk-[a-e]\/virtualMachines\/vm-/.test(name));
    assert.equal(new Set(listed).size, listed.length, 'no VM twice');
    assert.deepEqual([...listed].sort(), [...expected].sort(), 'none missing');
    const sorted = [...listed].sort();
    assert.deepEqual(listed, sorted, 'ordered by name');

    // Filters and one host's VMs.
    const running = await call<{ virtualMachines: VirtualMachine[] }>((cb) => admin.listVirtualMachines({ parent: 'hosts/bulk-a', pageSize: 1000, pageToken: '', filter: 'state = RUNNING' }, cb));
    assert.ok(running.virtualMachines.length > 0 && running.virtualMachines.every((item) => item.state === VirtualMachine_State.STATE_RUNNING && item.host === 'hosts/bulk-a'));
  });

  it('streams VM changes to a watcher', async () => {
    const agent = await as('host', 'kvm-03');
    await register(agent, 'kvm-03');
    await call((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-03', virtualMachines: [vm('kvm-03', 'web-1')], fullSnapshot: true, removedVirtualMachines: [] }, cb));
    const admin = await as('admin', 'alice');
    const stream = admin.watchVirtualMachines({ parent: 'hosts/kvm-03', sendInitialState: true });
    const changes: VirtualMachineChange[] = [];
    stream.on('data', (change: VirtualMachineChange) => changes.push(change));
    stream.on('error', () => undefined);
    const waitFor = async (count: number): Promise<void> => {
      const deadline = Date.now() + 5_000;
      while (changes.length < count && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    };
    await waitFor(2);
    await call((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-03', virtualMachines: [vm('kvm-03', 'web-1', VirtualMachine_State.STATE_RUNNING)], fullSnapshot: false, removedVirtualMachines: [] }, cb));
    await call((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-03', virtualMachines: [], fullSnapshot: true, removedVirtualMachines: [] }, cb));
    await waitFor(4);
    stream.cancel();
    assert.deepEqual(changes.map((change) => change.type), [VirtualMachineChange_Type.TYPE_ADDED, VirtualMachineChange_Type.TYPE_SYNCED, VirtualMachineChange_Type.TYPE_MODIFIED, VirtualMachineChange_Type.TYPE_REMOVED]);
    assert.equal(changes[2]!.virtualMachine?.state, VirtualMachine_State.STATE_RUNNING);
  });

  it('refuses bad input with a clear error and changes nothing', async () => {
    const agent = await as('host', 'kvm-04');
    const admin = await as('admin', 'alice');
    const unknown = await failure((cb) => agent.heartbeat({ host: 'hosts/kvm-04', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb));
    assert.equal(unknown.code, GrpcStatus.NOT_FOUND, 'heartbeat of an unregistered host');
    assert.equal((await failure((cb) => admin.getHost({ name: 'hosts/nope' }, cb))).code, GrpcStatus.NOT_FOUND);
    const malformed = await failure((cb) => admin.getHost({ name: 'hosts/../etc' }, cb));
    assert.equal(malformed.code, GrpcStatus.INVALID_ARGUMENT);
    assert.deepEqual(malformed.fields, ['name']);
    assert.equal((await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/a/b', pageSize: 0, pageToken: '', filter: '' }, cb))).code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal((await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter: 'colour = red' }, cb))).fields[0], 'filter');
    const page = await call<{ nextPageToken: string }>((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 1, pageToken: '', filter: '' }, cb));
    const tampered = await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 1, pageToken: `${page.nextPageToken.slice(0, -2)}AA`, filter: '' }, cb));
    assert.equal(tampered.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(tampered.reason, 'ERROR_REASON_PAGE_TOKEN_INVALID');
    const otherQuery = await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/bulk-a', pageSize: 1, pageToken: page.nextPageToken, filter: '' }, cb));
    assert.equal(otherQuery.reason, 'ERROR_REASON_PAGE_TOKEN_INVALID');

    // A host reporting for another host, or smuggling another host's VM into its own report.
    await register(agent, 'kvm-04');
    const before = await call<{ virtualMachines: VirtualMachine[] }>((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-03', pageSize: 1000, pageToken: '', filter: '' }, cb));
    const forOther = await failure((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-03', virtualMachines: [vm('kvm-03', 'evil')], fullSnapshot: true, removedVirtualMachines: [] }, cb));
    assert.equal(forOther.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(forOther.reason, 'ERROR_REASON_HOST_MISMATCH');
    const smuggled = await failure((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-04', virtualMachines: [vm('kvm-04', 'ok'), vm('kvm-03', 'evil')], fullSnapshot: false, removedVirtualMachines: [] }, cb));
    assert.equal(smuggled.code, GrpcStatus.PERMISSION_DENIED);
    const badName = await failure((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-04', virtualMachines: [{ ...vm('kvm-04', 'x'), name: 'hosts/kvm-04/virtualMachines/../../x' }], fullSnapshot: false, removedVirtualMachines: [] }, cb));
    assert.equal(badName.code, GrpcStatus.INVALID_ARGUMENT);
    const after = await call<{ virtualMachines: VirtualMachine[] }>((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-03', pageSize: 1000, pageToken: '', filter: '' }, cb));
    assert.deepEqual(after.virtualMachines.map((item) => item.name), before.virtualMachines.map((item) => item.name));
    const ownAfter = await call<{ virtualMachines: VirtualMachine[] }>((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-04', pageSize: 1000, pageToken: '', filter: '' }, cb));
    assert.deepEqual(ownAfter.virtualMachines, [], 'the refused report wrote nothing');
    assert.equal((await failure((cb) => agent.updateHost({ host: hostFacts('kvm-04'), updateMask: ['labels'] }, cb))).code, GrpcStatus.PERMISSION_DENIED);
    assert.equal((await failure((cb) => admin.updateHost({ host: hostFacts('kvm-04'), updateMask: ['hostname'] }, cb))).fields[0], 'update_mask');
  });

  it('drains and deletes a host: refused while managed VMs exist, unless forced', async () => {
    const agent = await as('host', 'kvm-05');
    const admin = await as('admin', 'alice');
    await register(agent, 'kvm-05');
    await call((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-05', virtualMachines: [{ ...vm('kvm-05', 'clone-1'), managed: true }], fullSnapshot: true, removedVirtualMachines: [] }, cb));
    const drained = await call<Host>((cb) => admin.updateHost({ host: { ...hostFacts('kvm-05'), draining: true, labels: { rack: 'r3' } }, updateMask: ['draining', 'labels'] }, cb));
    assert.equal(drained.state, Host_State.STATE_DRAINING);
    assert.deepEqual(drained.labels, { rack: 'r3' });
    const refused = await failure((cb) => admin.deleteHost({ name: 'hosts/kvm-05', force: false }, cb));
    assert.equal(refused.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(refused.reason, 'ERROR_REASON_HOST_NOT_EMPTY');
    assert.match(refused.metadata['dependents'] ?? '', /clone-1/);
    await call((cb) => admin.deleteHost({ name: 'hosts/kvm-05', force: true }, cb));
    assert.equal((await failure((cb) => admin.getHost({ name: 'hosts/kvm-05' }, cb))).code, GrpcStatus.NOT_FOUND);
    const left = await call<{ virtualMachines: VirtualMachine[] }>((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-05', pageSize: 1000, pageToken: '', filter: '' }, cb));
    assert.equal(left.virtualMachines.length, 0);
  });
});
