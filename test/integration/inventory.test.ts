/**
 * Inventory on real NATS with two replicas as real processes, called with real host and admin
 * certificates: registration, heartbeats and UNREACHABLE, VM reports, listing across hosts while VMs
 * change (1,000 VMs, several host identities; once through gRPC clients, once from four real agent
 * processes on libvirt's test driver), the watch stream, filters, one host's reports alternating between
 * the replicas while it is relabelled and deleted, delete (drain), and bad input.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import {
  Host,
  Host_State,
  VirtualMachine,
  VirtualMachine_State,
  VirtualMachineChange_Type,
  type VirtualMachineChange,
} from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { createClient } from '../../services/common/platform/client.js';
import { readServiceError } from '../../services/common/platform/errors.js';
import { HOST_READY, HOST_UNREACHABLE } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';
import { EVERY_HOST, HOST_NAME, hostOf, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';
import { pages, readAllPages, type Page } from '../../services/common/platform/list-pages.js';

const log = createLogger({ service: 'test', level: 'silent' });

function hostFacts(host: string): Host {
  return Host.fromPartial({
    name: HOST_NAME.format({ host }),
    hostname: `${host}.example`,
    hypervisor: Hypervisor.HYPERVISOR_KVM,
    hypervisorDetail: 'test',
    libvirtUri: 'test:///default',
    agentEndpoint: `${host}:7445`,
    cpuCount: 2,
    memoryBytes: '1000',
    imageDirectory: '/images',
    agentVersion: 'test',
  });
}

function vm(host: string, name: string, state = VirtualMachine_State.STATE_SHUT_OFF): VirtualMachine {
  return VirtualMachine.fromPartial({
    name: VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: name }),
    domainName: name,
    uuid: `00000000-0000-4000-8000-${String(name.length).padStart(12, '0')}`,
    state,
    vcpuCount: 1,
    memoryBytes: '536870912',
  });
}

/** A domain of libvirt's test driver. */
interface TestDomain {
  readonly name: string;
  readonly running: boolean;
}

/**
 * A libvirt test-driver node file (`test:///<file>`): every virsh process that connects reads it anew, so
 * the file is the host's state. UUIDs are fixed (the driver makes random ones per connection otherwise).
 */
async function writeTestNode(file: string, host: string, domains: readonly TestDomain[]): Promise<void> {
  const uuid = (name: string): string => {
    const hex = createHash('sha256').update(`${host}/${name}`).digest('hex');
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-8${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
  };
  const domain = ({ name, running }: TestDomain): string =>
    `<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>${name}</name><uuid>${uuid(name)}</uuid><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><test:runstate>${running ? 1 : 5}</test:runstate></domain>`;
  await writeFile(file, `<node>\n${domains.map(domain).join('\n')}\n</node>\n`);
}

describe('inventory', () => {
  const resources = new Resources();
  let pki: TestPki;
  let replicas: ServiceProcess[] = [];
  const clients: InventoryServiceClient[] = [];
  let natsUrl: string;
  let caAddress: string;

  async function as(kind: 'admin' | 'host' | 'service', name: string, replica = 0): Promise<InventoryServiceClient> {
    const client = createClient(
      InventoryServiceClient,
      replicas[replica]!.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials(kind, name)), caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 20_000 },
    );
    clients.push(client);
    return client;
  }
  async function register(client: InventoryServiceClient, host: string): Promise<Host> {
    return call((cb) => client.registerHost({ host: hostFacts(host) }, cb));
  }
  /** One page of ListVirtualMachines, as the page readers take it. */
  async function listVirtualMachines(
    client: InventoryServiceClient,
    request: { parent: string; pageSize: number; pageToken: string },
  ): Promise<Page<VirtualMachine>> {
    const page = await call<{ virtualMachines: VirtualMachine[]; nextPageToken: string }>((cb) => client.listVirtualMachines({ ...request, filter: '' }, cb));
    return { items: page.virtualMachines, nextPageToken: page.nextPageToken };
  }
  async function listAll(client: InventoryServiceClient, parent: string, pageSize: number, between?: () => Promise<void>): Promise<string[]> {
    const names: string[] = [];
    for await (const page of pages((pageToken) => listVirtualMachines(client, { parent, pageSize, pageToken }))) {
      names.push(...page.map((item) => item.name));
      if (between) await between();
    }
    return names;
  }

  /** The VM records of `host` among every host's (hosts/-), page by page: what a deleted host left behind. */
  async function fleetVmsOf(client: InventoryServiceClient, host: string): Promise<VirtualMachine[]> {
    const all = await readAllPages((pageToken) => listVirtualMachines(client, { parent: EVERY_HOST, pageSize: 1000, pageToken }));
    return all.filter((item) => hostOf(item.name) === host);
  }

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    natsUrl = nats.url;
    const ca = await startCertificateAuthorityProcess(resources, pki, { url: nats.url });
    caAddress = ca.address;
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
    assert.deepEqual(
      hosts.hosts.map((host) => host.name),
      ['hosts/kvm-01'],
      'a host name is unique in the fleet',
    );
  });

  it('marks a silent host UNREACHABLE and READY again when heartbeats resume, once each', async () => {
    const nats = await connectNats({ servers: [natsUrl], tls: await pki.files('service', 'cloning'), name: 'test', log });
    resources.defer(() => nats.close());
    const seen: string[] = [];
    const consumer = await consumeEvents(nats.jetstream, nats.manager, {
      durable: 'test-host-states',
      types: [HOST_UNREACHABLE, HOST_READY] as never[],
      host: 'kvm-02',
      log,
      startAt: 'new',
      handle: async (event) => void seen.push(event.typeName),
    });
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
    const heartbeat = await call<{ heartbeatInterval?: { seconds: string } }>((cb) =>
      agent.heartbeat({ host: 'hosts/kvm-02', memoryFreeBytes: '1', imageDirectoryFreeBytes: '2', imageDirectoryTotalBytes: '3' }, cb),
    );
    assert.equal(heartbeat.heartbeatInterval?.seconds, '1');
    await waitFor(Host_State.STATE_READY, 2_000);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.deepEqual(seen, [HOST_READY.typeName, HOST_UNREACHABLE.typeName, HOST_READY.typeName]);
  });

  it('lists 1,000 VMs across hosts completely, each once, in name order, while VMs change', async () => {
    const hosts = ['bulk-a', 'bulk-b', 'bulk-c', 'bulk-d', 'bulk-e'];
    // Ids with dots are stored under keys with '=' ('vm-00.web' as 'vm-00=web'), which sort after 'vm-000'
    // where the names sort before it: the list must follow the names.
    const bulkNames = Array.from({ length: 200 }, (_, i) => (i < 190 ? `vm-${String(i).padStart(3, '0')}` : `vm-${String(i - 190).padStart(2, '0')}.web`));
    const agents = await Promise.all(hosts.map((host) => as('host', host)));
    const expected: string[] = [];
    await Promise.all(
      agents.map(async (agent, index) => {
        const host = hosts[index]!;
        await register(agent, host);
        const vms = bulkNames.map((name) => vm(host, name));
        expected.push(...vms.map((item) => item.name));
        const result = await call<{ changedCount: number }>((cb) =>
          agent.reportVirtualMachines({ parent: HOST_NAME.format({ host }), virtualMachines: vms, fullSnapshot: true, removedVirtualMachines: [] }, cb),
        );
        assert.equal(result.changedCount, 200);
      }),
    );
    const admin = await as('admin', 'alice', 1);
    // Replica 2 catches up through its KV watch.
    const deadline = Date.now() + 10_000;
    while ((await listAll(admin, EVERY_HOST, 1000)).filter((name) => name.includes('/bulk-')).length < 1000 && Date.now() < deadline)
      await new Promise((resolve) => setTimeout(resolve, 100));

    // Page through with small pages while agents start VMs, add new ones and remove extras.
    let round = 0;
    const churn = async (): Promise<void> => {
      round++;
      const agent = agents[round % agents.length]!;
      const host = hosts[round % hosts.length]!;
      await call((cb) =>
        agent.reportVirtualMachines(
          {
            parent: HOST_NAME.format({ host }),
            virtualMachines: [vm(host, bulkNames[round % 200]!, VirtualMachine_State.STATE_RUNNING), vm(host, `extra-${round}`)],
            fullSnapshot: false,
            removedVirtualMachines: round > 2 ? [VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: `extra-${round - 2}` })] : [],
          },
          cb,
        ),
      );
    };
    const listed = (await listAll(admin, EVERY_HOST, 37, churn)).filter(
      (name) =>
        ['bulk-a', 'bulk-b', 'bulk-c', 'bulk-d', 'bulk-e'].includes(hostOf(name) ?? '') &&
        VIRTUAL_MACHINE_NAME.parse(name)?.virtualMachine.startsWith('vm-') === true,
    );
    assert.equal(new Set(listed).size, listed.length, 'no VM twice');
    assert.deepEqual([...listed].sort(), [...expected].sort(), 'none missing');
    const sorted = [...listed].sort();
    assert.deepEqual(listed, sorted, 'ordered by name');
    assert.ok(
      listed.indexOf('hosts/bulk-a/virtualMachines/vm-00.web') < listed.indexOf('hosts/bulk-a/virtualMachines/vm-000'),
      'vm-00.web (key vm-00=web) before vm-000',
    );

    // Filters and one host's VMs.
    const running = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/bulk-a', pageSize: 1000, pageToken: '', filter: 'state = RUNNING' }, cb),
    );
    assert.ok(
      running.virtualMachines.length > 0 &&
        running.virtualMachines.every((item) => item.state === VirtualMachine_State.STATE_RUNNING && item.host === 'hosts/bulk-a'),
    );
  });

  it('pages 1,000 VMs of four real agents completely, each once, in name order, while an agent restarts with changed VMs', { timeout: 300_000 }, async () => {
    // Four agent processes, each its own host identity, on libvirt's test driver with 250 domains each
    // (ten of them with a dot in the name), reporting to the two replicas.
    const directory = await resources.tempDir('cowherd-test-agents-');
    const hosts = ['agent-a', 'agent-b', 'agent-c', 'agent-d'];
    const domainsOf = new Map<string, TestDomain[]>();
    const names = (host: string, domains: readonly TestDomain[]): string[] =>
      domains.map((domain) => VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: domain.name }));
    const start = async (host: string, index: number): Promise<ServiceProcess> =>
      startServiceProcess(resources, 'agent', await pki.files('host', host), natsUrl, {
        COWHERD_HOST_ID: host,
        COWHERD_INVENTORY_ADDRESS: replicas[index % 2]!.address,
        COWHERD_CA_ADDRESS: caAddress,
        COWHERD_LIBVIRT_URI: `test://${join(directory, `${host}.xml`)}`,
        COWHERD_IMAGE_DIR: join(directory, host, 'images'),
        COWHERD_CREDENTIALS_DIR: join(directory, host, 'credentials'),
      });
    for (const host of hosts) {
      await mkdir(join(directory, host), { recursive: true });
      const domains = Array.from(
        { length: 250 },
        (_, i): TestDomain => ({ name: i < 240 ? `d-${String(i).padStart(3, '0')}` : `d-${String(i - 240).padStart(2, '0')}.x`, running: i % 3 === 0 }),
      );
      domainsOf.set(host, domains);
      await writeTestNode(join(directory, `${host}.xml`), host, domains);
    }
    const agents = await Promise.all(hosts.map((host, index) => start(host, index)));
    const admin = await as('admin', 'alice', 0);
    const vmsOf = async (host: string): Promise<string[]> => {
      const page = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
        admin.listVirtualMachines({ parent: HOST_NAME.format({ host }), pageSize: 1000, pageToken: '', filter: '' }, cb),
      );
      return page.virtualMachines.map((item) => item.name);
    };
    const holds = async (host: string, domains: readonly TestDomain[]): Promise<boolean> =>
      JSON.stringify(await vmsOf(host)) === JSON.stringify(names(host, domains).sort());
    const waitUntil = async (what: string, ok: () => Promise<boolean>, ms = 60_000): Promise<void> => {
      const deadline = Date.now() + ms;
      while (!(await ok().catch(() => false))) {
        if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    };
    for (const host of hosts) await waitUntil(`${host}'s 250 VMs`, () => holds(host, domainsOf.get(host)!));

    // agent-b's host changes while the listing is in the middle of its VMs: eleven domains go and ten come
    // (on either side of the cursor), twenty change state; its agent restarts and reports anew.
    const before = domainsOf.get('agent-b')!;
    const changed: TestDomain[] = before
      .filter((_, i) => !(i % 24 === 5))
      .map((domain, i) => (i % 12 === 1 ? { ...domain, running: !domain.running } : domain))
      .concat(Array.from({ length: 10 }, (_, i) => ({ name: i < 5 ? `d-00${i}.new` : `d-2${i}0.new`, running: true })));
    const stable = new Set([
      ...hosts.filter((host) => host !== 'agent-b').flatMap((host) => names(host, domainsOf.get(host)!)),
      ...names('agent-b', before).filter((name) => names('agent-b', changed).includes(name)),
    ]);
    const existed = new Set([...stable, ...names('agent-b', before), ...names('agent-b', changed)]);

    const ours = (name: string): boolean => ['agent-a', 'agent-b', 'agent-c', 'agent-d'].includes(hostOf(name) ?? '');
    const listed: string[] = [];
    let changedMidway = false;
    let cursor = '';
    for await (const page of pages((pageToken) => listVirtualMachines(admin, { parent: EVERY_HOST, pageSize: 41, pageToken }))) {
      listed.push(...page.map((item) => item.name).filter(ours));
      if (!changedMidway && listed.length >= 375) {
        changedMidway = true;
        cursor = listed.at(-1)!;
        assert.equal(hostOf(cursor), 'agent-b', "the cursor is inside agent-b's VMs");
        await writeTestNode(join(directory, 'agent-b.xml'), 'agent-b', changed);
        await agents[1]!.daemon.stop();
        agents[1] = await start('agent-b', 1);
        await waitUntil("agent-b's new VMs in the inventory", () => holds('agent-b', changed));
      }
    }
    assert.ok(changedMidway);

    assert.equal(new Set(listed).size, listed.length, 'no VM twice');
    assert.deepEqual(
      [...stable].filter((name) => !listed.includes(name)),
      [],
      'none missing of those that existed throughout',
    );
    assert.deepEqual(
      listed.filter((name) => !existed.has(name)),
      [],
      'nothing that never existed',
    );
    assert.deepEqual(listed, [...listed].sort(), 'in name order (d-00.x before d-000)');
    // Of agent-b's new VMs, exactly those after the cursor were listed; of those removed, exactly those
    // before it (listed before they went).
    const added = names('agent-b', changed).filter((name) => name.endsWith('.new'));
    assert.deepEqual(added.filter((name) => listed.includes(name)).sort(), added.filter((name) => name > cursor).sort());
    assert.ok(added.some((name) => name < cursor) && added.some((name) => name > cursor));
    const dropped = names('agent-b', before).filter((name) => !names('agent-b', changed).includes(name));
    assert.deepEqual(dropped.filter((name) => listed.includes(name)).sort(), dropped.filter((name) => name <= cursor).sort());
    assert.ok(dropped.some((name) => name < cursor) && dropped.some((name) => name > cursor));

    // The states the restarted agent reported.
    const running = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/agent-b', pageSize: 1000, pageToken: '', filter: 'state = RUNNING' }, cb),
    );
    assert.deepEqual(
      running.virtualMachines.map((item) => item.name),
      names(
        'agent-b',
        changed.filter((domain) => domain.running),
      ).sort(),
    );
    for (const agent of agents) await agent.daemon.stop();
  });

  it('streams VM changes to a watcher', async () => {
    const agent = await as('host', 'kvm-03');
    await register(agent, 'kvm-03');
    await call((cb) =>
      agent.reportVirtualMachines({ parent: 'hosts/kvm-03', virtualMachines: [vm('kvm-03', 'web-1')], fullSnapshot: true, removedVirtualMachines: [] }, cb),
    );
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
    await call((cb) =>
      agent.reportVirtualMachines(
        {
          parent: 'hosts/kvm-03',
          virtualMachines: [vm('kvm-03', 'web-1', VirtualMachine_State.STATE_RUNNING)],
          fullSnapshot: false,
          removedVirtualMachines: [],
        },
        cb,
      ),
    );
    await call((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-03', virtualMachines: [], fullSnapshot: true, removedVirtualMachines: [] }, cb));
    await waitFor(4);
    stream.cancel();
    assert.deepEqual(
      changes.map((change) => change.type),
      [
        VirtualMachineChange_Type.TYPE_ADDED,
        VirtualMachineChange_Type.TYPE_SYNCED,
        VirtualMachineChange_Type.TYPE_MODIFIED,
        VirtualMachineChange_Type.TYPE_REMOVED,
      ],
    );
    assert.equal(changes[2]!.virtualMachine?.state, VirtualMachine_State.STATE_RUNNING);
  });

  it('refuses bad input with a clear error and changes nothing', async () => {
    const agent = await as('host', 'kvm-04');
    const admin = await as('admin', 'alice');
    const unknown = await failure((cb) =>
      agent.heartbeat({ host: 'hosts/kvm-04', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb),
    );
    assert.equal(unknown.code, GrpcStatus.NOT_FOUND, 'heartbeat of an unregistered host');
    assert.equal((await failure((cb) => admin.getHost({ name: 'hosts/nope' }, cb))).code, GrpcStatus.NOT_FOUND);
    const malformed = await failure((cb) => admin.getHost({ name: 'hosts/../etc' }, cb));
    assert.equal(malformed.code, GrpcStatus.INVALID_ARGUMENT);
    assert.deepEqual(malformed.fields, ['name']);
    assert.equal(
      (await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/a/b', pageSize: 0, pageToken: '', filter: '' }, cb))).code,
      GrpcStatus.INVALID_ARGUMENT,
    );
    assert.equal(
      (await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter: 'colour = red' }, cb))).fields[0],
      'filter',
    );
    const page = await call<{ nextPageToken: string }>((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 1, pageToken: '', filter: '' }, cb));
    const tampered = await failure((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 1, pageToken: `${page.nextPageToken.slice(0, -2)}AA`, filter: '' }, cb),
    );
    assert.equal(tampered.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(tampered.reason, 'ERROR_REASON_PAGE_TOKEN_INVALID');
    const otherQuery = await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/bulk-a', pageSize: 1, pageToken: page.nextPageToken, filter: '' }, cb));
    assert.equal(otherQuery.reason, 'ERROR_REASON_PAGE_TOKEN_INVALID');

    // A host reporting for another host, or smuggling another host's VM into its own report.
    await register(agent, 'kvm-04');
    const before = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/kvm-03', pageSize: 1000, pageToken: '', filter: '' }, cb),
    );
    const forOther = await failure((cb) =>
      agent.reportVirtualMachines({ parent: 'hosts/kvm-03', virtualMachines: [vm('kvm-03', 'evil')], fullSnapshot: true, removedVirtualMachines: [] }, cb),
    );
    assert.equal(forOther.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(forOther.reason, 'ERROR_REASON_HOST_MISMATCH');
    const smuggled = await failure((cb) =>
      agent.reportVirtualMachines(
        { parent: 'hosts/kvm-04', virtualMachines: [vm('kvm-04', 'ok'), vm('kvm-03', 'evil')], fullSnapshot: false, removedVirtualMachines: [] },
        cb,
      ),
    );
    assert.equal(smuggled.code, GrpcStatus.PERMISSION_DENIED);
    const badName = await failure((cb) =>
      agent.reportVirtualMachines(
        {
          parent: 'hosts/kvm-04',
          virtualMachines: [{ ...vm('kvm-04', 'x'), name: 'hosts/kvm-04/virtualMachines/../../x' }],
          fullSnapshot: false,
          removedVirtualMachines: [],
        },
        cb,
      ),
    );
    assert.equal(badName.code, GrpcStatus.INVALID_ARGUMENT);
    const after = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/kvm-03', pageSize: 1000, pageToken: '', filter: '' }, cb),
    );
    assert.deepEqual(
      after.virtualMachines.map((item) => item.name),
      before.virtualMachines.map((item) => item.name),
    );
    const ownAfter = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/kvm-04', pageSize: 1000, pageToken: '', filter: '' }, cb),
    );
    assert.deepEqual(ownAfter.virtualMachines, [], 'the refused report wrote nothing');
    // Registering or heartbeating as another host, a report from a host that never registered, and malformed
    // or foreign names among the removed VMs: refused with the field or reason named, nothing written.
    const otherBefore = await call<Host>((cb) => admin.getHost({ name: 'hosts/kvm-03' }, cb));
    const registerOther = await failure((cb) => agent.registerHost({ host: { ...hostFacts('kvm-03'), hostname: 'evil.example' } }, cb));
    assert.equal(registerOther.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(registerOther.reason, 'ERROR_REASON_HOST_MISMATCH');
    const heartbeatOther = await failure((cb) =>
      agent.heartbeat({ host: 'hosts/kvm-03', memoryFreeBytes: '7', imageDirectoryFreeBytes: '7', imageDirectoryTotalBytes: '7' }, cb),
    );
    assert.equal(heartbeatOther.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(heartbeatOther.reason, 'ERROR_REASON_HOST_MISMATCH');
    const otherAfter = await call<Host>((cb) => admin.getHost({ name: 'hosts/kvm-03' }, cb));
    // (Its state may have turned UNREACHABLE meanwhile: kvm-03 never heartbeats.)
    assert.deepEqual(
      [otherAfter.hostname, otherAfter.lastHeartbeatTime, otherAfter.memoryFreeBytes],
      [otherBefore.hostname, otherBefore.lastHeartbeatTime, otherBefore.memoryFreeBytes],
      "the other host's record is untouched",
    );

    const stranger = await as('host', 'kvm-06');
    const unregistered = await failure((cb) =>
      stranger.reportVirtualMachines({ parent: 'hosts/kvm-06', virtualMachines: [vm('kvm-06', 'ghost')], fullSnapshot: true, removedVirtualMachines: [] }, cb),
    );
    assert.equal(unregistered.code, GrpcStatus.NOT_FOUND);
    assert.ok(unregistered.message.includes('hosts/kvm-06'), unregistered.message);
    assert.equal((await failure((cb) => admin.getHost({ name: 'hosts/kvm-06' }, cb))).code, GrpcStatus.NOT_FOUND, 'a report registers nothing');
    // Not an empty list: a host that does not exist is NOT_FOUND as the parent of every list and the watch.
    const ghosts = await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-06', pageSize: 1000, pageToken: '', filter: '' }, cb));
    assert.deepEqual([ghosts.code, ghosts.reason], [GrpcStatus.NOT_FOUND, 'ERROR_REASON_RESOURCE_NOT_FOUND']);

    await call((cb) =>
      agent.reportVirtualMachines({ parent: 'hosts/kvm-04', virtualMachines: [vm('kvm-04', 'keep')], fullSnapshot: true, removedVirtualMachines: [] }, cb),
    );
    const kept = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: 'hosts/kvm-04/virtualMachines/keep' }, cb));
    for (const [index, removed] of [
      [0, ['hosts/kvm-04/virtualMachines/../keep']],
      [1, ['hosts/kvm-04/virtualMachines/keep', 'keep']],
      [0, ['hosts/kvm-04/virtualMachines/keep/disks']],
      [0, ['hosts/kvm-04/virtualMachines/']],
    ] as const) {
      const malformed = await failure((cb) =>
        agent.reportVirtualMachines(
          { parent: 'hosts/kvm-04', virtualMachines: [vm('kvm-04', 'new-one')], fullSnapshot: false, removedVirtualMachines: [...removed] },
          cb,
        ),
      );
      assert.equal(malformed.code, GrpcStatus.INVALID_ARGUMENT, JSON.stringify(removed));
      assert.deepEqual(malformed.fields, [`removed_virtual_machines[${index}]`]);
    }
    const foreignRemoval = await failure((cb) =>
      agent.reportVirtualMachines(
        { parent: 'hosts/kvm-04', virtualMachines: [], fullSnapshot: false, removedVirtualMachines: ['hosts/kvm-03/virtualMachines/web-1'] },
        cb,
      ),
    );
    assert.equal(foreignRemoval.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(foreignRemoval.reason, 'ERROR_REASON_HOST_MISMATCH');
    const ownFinally = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/kvm-04', pageSize: 1000, pageToken: '', filter: '' }, cb),
    );
    assert.deepEqual(ownFinally.virtualMachines, [kept], 'no refused report added or removed anything');
    assert.deepEqual(
      (
        await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
          admin.listVirtualMachines({ parent: 'hosts/kvm-03', pageSize: 1000, pageToken: '', filter: '' }, cb),
        )
      ).virtualMachines.map((item) => item.name),
      before.virtualMachines.map((item) => item.name),
    );

    assert.equal((await failure((cb) => agent.updateHost({ host: hostFacts('kvm-04'), updateMask: ['labels'] }, cb))).code, GrpcStatus.PERMISSION_DENIED);
    assert.equal((await failure((cb) => admin.updateHost({ host: hostFacts('kvm-04'), updateMask: ['hostname'] }, cb))).fields[0], 'update_mask');
  });

  it('answers NOT_FOUND for a parent host that does not exist, on every list and the watch (hosts/- stays the wildcard)', async () => {
    const admin = await as('admin', 'alice');
    const agent = await as('host', 'kvm-07');
    await register(agent, 'kvm-07');
    for (const parent of ['hosts/no-such-host', 'hosts/kvm-07x']) {
      const vms = await failure((cb) => admin.listVirtualMachines({ parent, pageSize: 0, pageToken: '', filter: '' }, cb));
      assert.deepEqual([vms.code, vms.reason], [GrpcStatus.NOT_FOUND, 'ERROR_REASON_RESOURCE_NOT_FOUND'], `ListVirtualMachines ${parent}`);
      assert.match(vms.message, new RegExp(parent));
      const replicas = await failure((cb) => admin.listImageReplicas({ parent, pageSize: 0, pageToken: '', filter: '' }, cb));
      assert.deepEqual([replicas.code, replicas.reason], [GrpcStatus.NOT_FOUND, 'ERROR_REASON_RESOURCE_NOT_FOUND'], `ListImageReplicas ${parent}`);
      const started = performance.now();
      const watched = await new Promise<{ code: number; ms: number }>((resolve) => {
        const stream = admin.watchVirtualMachines({ parent, sendInitialState: true }, { deadline: new Date(Date.now() + 20_000) });
        stream.on('data', () => undefined);
        stream.on('error', (error: { code: number }) => resolve({ code: error.code, ms: performance.now() - started }));
        stream.on('end', () => resolve({ code: GrpcStatus.OK, ms: performance.now() - started }));
      });
      assert.equal(watched.code, GrpcStatus.NOT_FOUND, `WatchVirtualMachines ${parent}`);
      assert.ok(watched.ms < 2_000, `WatchVirtualMachines ${parent} answered after ${Math.round(watched.ms)} ms`);
    }
    // Bad input stays INVALID_ARGUMENT whatever the host: the filter is checked before the parent's existence.
    assert.equal(
      (await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/no-such-host', pageSize: 0, pageToken: '', filter: 'state = RUNING' }, cb))).code,
      GrpcStatus.INVALID_ARGUMENT,
    );
    // An existing host without VMs or replicas, and the wildcard, are OK.
    assert.deepEqual(
      (
        await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
          admin.listVirtualMachines({ parent: 'hosts/kvm-07', pageSize: 0, pageToken: '', filter: '' }, cb),
        )
      ).virtualMachines,
      [],
    );
    assert.deepEqual(
      (await call<{ imageReplicas: unknown[] }>((cb) => admin.listImageReplicas({ parent: 'hosts/kvm-07', pageSize: 0, pageToken: '', filter: '' }, cb)))
        .imageReplicas,
      [],
    );
    await call((cb) => admin.listImageReplicas({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter: '' }, cb));
    await call((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter: '' }, cb));
  });

  it('refuses filter values that the field cannot hold, naming the value and the allowed ones, on every List', async () => {
    const admin = await as('admin', 'alice');
    const cases: Array<[string, (filter: string) => Promise<unknown>, string, RegExp]> = [
      [
        'ListVirtualMachines',
        (filter) => call((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter }, cb)),
        'state = RUNING',
        /"RUNING" is not a value of state; allowed: RUNNING, PAUSED, SHUT_OFF/,
      ],
      [
        'ListVirtualMachines',
        (filter) => call((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter }, cb)),
        'state = 7',
        /"7" is not a value of state/,
      ],
      [
        'ListVirtualMachines',
        (filter) => call((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter }, cb)),
        'managed = maybe',
        /"maybe" is not a value of managed; allowed: true, false/,
      ],
      [
        'ListVirtualMachines',
        (filter) => call((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter }, cb)),
        'source_image = debian-12',
        /source_image value "debian-12" is not of the form images\/\{image\}/,
      ],
      [
        'ListHosts',
        (filter) => call((cb) => admin.listHosts({ pageSize: 0, pageToken: '', filter }, cb)),
        'state = UP',
        /"UP" is not a value of state; allowed: READY, UNREACHABLE, DRAINING/,
      ],
      [
        'ListHosts',
        (filter) => call((cb) => admin.listHosts({ pageSize: 0, pageToken: '', filter }, cb)),
        'hypervisor = hyperv',
        /"hyperv" is not a value of hypervisor; allowed: KVM, XEN/,
      ],
      [
        'ListHosts',
        (filter) => call((cb) => admin.listHosts({ pageSize: 0, pageToken: '', filter }, cb)),
        'draining = 1',
        /"1" is not a value of draining; allowed: true, false/,
      ],
      [
        'ListImages',
        (filter) => call((cb) => admin.listImages({ pageSize: 0, pageToken: '', filter, view: 0 }, cb)),
        'state = READY',
        /"READY" is not a value of state; allowed: .*AVAILABLE/,
      ],
      [
        'ListImages',
        (filter) => call((cb) => admin.listImages({ pageSize: 0, pageToken: '', filter, view: 0 }, cb)),
        'origin_host = kvm-01',
        /origin_host value "kvm-01" is not of the form hosts\/\{host\}/,
      ],
      [
        'ListImageReplicas',
        (filter) => call((cb) => admin.listImageReplicas({ parent: 'hosts/-', pageSize: 0, pageToken: '', filter }, cb)),
        'state = RUNNING',
        /"RUNNING" is not a value of state; allowed: .*AVAILABLE/,
      ],
    ];
    for (const [method, list, filter, message] of cases) {
      const refused = await list(filter).then(
        () => undefined,
        (error: ServiceError) => readServiceError(error),
      );
      assert.ok(refused, `${method} accepted ${filter}`);
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, `${method} ${filter}`);
      assert.deepEqual(refused.fields, ['filter'], `${method} ${filter}`);
      assert.match(refused.message, message, `${method} ${filter}`);
    }
    // Values the fields can hold still list.
    await call((cb) =>
      admin.listVirtualMachines(
        { parent: 'hosts/-', pageSize: 0, pageToken: '', filter: 'state = RUNNING AND managed = true AND source_image = "images/debian-12"' },
        cb,
      ),
    );
    await call((cb) => admin.listHosts({ pageSize: 0, pageToken: '', filter: 'state = READY AND hypervisor = KVM AND draining = false' }, cb));
    await call((cb) => admin.listImages({ pageSize: 0, pageToken: '', filter: 'state = AVAILABLE AND origin_host = "hosts/kvm-01"', view: 0 }, cb));
  });

  it('filters VMs by source image and managed, and keeps a source image the agent stops reporting', async () => {
    const agent = await as('host', 'kvm-07');
    const admin = await as('admin', 'alice', 1);
    await register(agent, 'kvm-07');
    const cloned = (name: string, image: string): VirtualMachine => ({
      ...vm('kvm-07', name),
      sourceImage: image,
      managed: true,
      lineage: { imageVersion: '', previousImageVersion: '', image, replica: `hosts/kvm-07/${image}`, sourceVirtualMachine: '', overlays: [], diskBackend: 0 },
    });
    await call((cb) =>
      agent.reportVirtualMachines(
        {
          parent: 'hosts/kvm-07',
          virtualMachines: [
            cloned('web-1', 'images/debian-12'),
            cloned('web-2', 'images/debian-12'),
            cloned('db-1', 'images/alpine-3'),
            vm('kvm-07', 'hand-made'),
          ],
          fullSnapshot: true,
          removedVirtualMachines: [],
        },
        cb,
      ),
    );
    const names = async (parent: string, filter: string): Promise<string[]> => {
      // Replica 2 serves the reads: wait until it has all four.
      const deadline = Date.now() + 5_000;
      while (
        (
          await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
            admin.listVirtualMachines({ parent: 'hosts/kvm-07', pageSize: 1000, pageToken: '', filter: '' }, cb),
          )
        ).virtualMachines.length < 4 &&
        Date.now() < deadline
      )
        await new Promise((resolve) => setTimeout(resolve, 50));
      const page = await call<{ virtualMachines: VirtualMachine[] }>((cb) => admin.listVirtualMachines({ parent, pageSize: 1000, pageToken: '', filter }, cb));
      return page.virtualMachines.map((item) => item.name);
    };
    const named = (...vms: string[]): string[] => vms.map((name) => VIRTUAL_MACHINE_NAME.format({ host: 'kvm-07', virtualMachine: name }));
    assert.deepEqual(await names('hosts/kvm-07', 'source_image = "images/debian-12"'), named('web-1', 'web-2'));
    assert.deepEqual(await names('hosts/-', 'source_image = "images/alpine-3"'), named('db-1'), 'across hosts');
    assert.deepEqual(await names('hosts/kvm-07', 'source_image != "images/debian-12"'), named('db-1', 'hand-made'));
    assert.deepEqual(await names('hosts/kvm-07', 'managed = true'), named('db-1', 'web-1', 'web-2'));
    assert.deepEqual(await names('hosts/kvm-07', 'managed = false AND source_image = ""'), named('hand-made'));
    assert.deepEqual(await names('hosts/kvm-07', 'managed = true AND source_image = "images/debian-12" AND domain_name = "web-2"'), named('web-2'));
    assert.deepEqual(await names('hosts/kvm-07', 'source_image = "images/none"'), []);
    const prefixed = await failure((cb) =>
      admin.listVirtualMachines({ parent: 'hosts/kvm-07', pageSize: 0, pageToken: '', filter: 'source_image = "images/deb*"' }, cb),
    );
    assert.equal(prefixed.code, GrpcStatus.INVALID_ARGUMENT, 'source_image takes no prefix');
    assert.deepEqual(prefixed.fields, ['filter']);

    // A later report without the lineage (an agent that lost its metadata) does not drop it.
    await call((cb) =>
      agent.reportVirtualMachines(
        {
          parent: 'hosts/kvm-07',
          virtualMachines: [vm('kvm-07', 'web-1', VirtualMachine_State.STATE_RUNNING)],
          fullSnapshot: false,
          removedVirtualMachines: [],
        },
        cb,
      ),
    );
    const deadline = Date.now() + 5_000;
    let web1: VirtualMachine | undefined;
    while (web1?.state !== VirtualMachine_State.STATE_RUNNING && Date.now() < deadline)
      web1 = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: 'hosts/kvm-07/virtualMachines/web-1' }, cb));
    assert.equal(web1?.sourceImage, 'images/debian-12');
    assert.equal(web1?.managed, true);
    assert.deepEqual(await names('hosts/kvm-07', 'source_image = "images/debian-12" AND state = RUNNING'), named('web-1'));
  });

  it("stays consistent when one host's reports alternate between replicas while admins update and delete it on the other", async () => {
    const admins = [await as('admin', 'alice', 0), await as('admin', 'alice', 1)];
    const waitUntil = async (what: string, ok: () => Promise<boolean>): Promise<void> => {
      const deadline = Date.now() + 10_000;
      while (!(await ok())) {
        if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    };
    const vmsOn = async (replica: number, host: string): Promise<Map<string, VirtualMachine_State>> => {
      // A deleted host is NOT_FOUND as a parent: then look for records it left behind across the fleet.
      const page = await call<{ virtualMachines: VirtualMachine[] }>((cb) =>
        admins[replica]!.listVirtualMachines({ parent: HOST_NAME.format({ host }), pageSize: 1000, pageToken: '', filter: '' }, cb),
      ).catch(async (error: ServiceError) => {
        if (error.code !== GrpcStatus.NOT_FOUND) throw error;
        return { virtualMachines: await fleetVmsOf(admins[replica]!, host) };
      });
      return new Map(page.virtualMachines.map((item) => [item.domainName, item.state]));
    };
    const same = (a: ReadonlyMap<string, unknown>, b: ReadonlyMap<string, unknown>): boolean => JSON.stringify([...a].sort()) === JSON.stringify([...b].sort());

    // 1. No lost update: the agent's reports go back to back, each to the other replica than the last (whose
    // index may not have seen the last one yet); each flips VMs the previous one wrote, removes the VM the
    // previous one added, and every fifth is a full snapshot. Meanwhile, on the other replica, an admin
    // relabels the host and the agent re-registers and heartbeats.
    const host = 'race-01';
    const agents = [await as('host', host, 0), await as('host', host, 1)];
    await register(agents[0]!, host);
    const model = new Map<string, VirtualMachine_State>(Array.from({ length: 5 }, (_, i) => [`base-${i}`, VirtualMachine_State.STATE_SHUT_OFF]));
    await call((cb) =>
      agents[0]!.reportVirtualMachines(
        {
          parent: HOST_NAME.format({ host }),
          virtualMachines: [...model].map(([name, state]) => vm(host, name, state)),
          fullSnapshot: true,
          removedVirtualMachines: [],
        },
        cb,
      ),
    );
    const ROUNDS = 60;
    let reportsDone = false;
    let lastLabel = '';
    let lastCpuCount = 0;
    const admin = (async () => {
      for (let round = 1; !reportsDone; round++) {
        const side = round % 2;
        await Promise.all([
          call((cb) => admins[side]!.updateHost({ host: { ...hostFacts(host), labels: { round: String(round) } }, updateMask: ['labels'] }, cb)).then(
            () => void (lastLabel = String(round)),
          ),
          call((cb) => agents[side]!.registerHost({ host: { ...hostFacts(host), cpuCount: round } }, cb)).then(() => void (lastCpuCount = round)),
          call((cb) =>
            agents[1 - side]!.heartbeat(
              { host: HOST_NAME.format({ host }), memoryFreeBytes: String(round), imageDirectoryFreeBytes: '1', imageDirectoryTotalBytes: '2' },
              cb,
            ),
          ),
        ]);
      }
    })();
    for (let round = 1; round <= ROUNDS; round++) {
      const flipped = round % 2 === 0 ? VirtualMachine_State.STATE_SHUT_OFF : VirtualMachine_State.STATE_RUNNING;
      model.set('flip', flipped);
      model.set(`base-${round % 5}`, flipped);
      model.delete(`extra-${round - 1}`);
      model.set(`extra-${round}`, VirtualMachine_State.STATE_RUNNING);
      const report =
        round % 5 === 0
          ? { virtualMachines: [...model].map(([name, state]) => vm(host, name, state)), fullSnapshot: true, removedVirtualMachines: [] }
          : {
              virtualMachines: [
                vm(host, 'flip', flipped),
                vm(host, `base-${round % 5}`, flipped),
                vm(host, `extra-${round}`, VirtualMachine_State.STATE_RUNNING),
              ],
              fullSnapshot: false,
              removedVirtualMachines: round > 1 ? [VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: `extra-${round - 1}` })] : [],
            };
      await call((cb) => agents[round % 2]!.reportVirtualMachines({ parent: HOST_NAME.format({ host }), ...report }, cb));
    }
    reportsDone = true;
    await admin;
    for (const replica of [0, 1]) {
      await waitUntil(`replica ${replica} to hold the last report`, async () => same(await vmsOn(replica, host), model)).catch(async (error: unknown) => {
        assert.deepEqual(
          Object.fromEntries([...(await vmsOn(replica, host))].sort()),
          Object.fromEntries([...model].sort()),
          `replica ${replica}: ${String(error)}`,
        );
      });
      await waitUntil(`replica ${replica} to hold the last update`, async () => {
        const record = await call<Host>((cb) => admins[replica]!.getHost({ name: HOST_NAME.format({ host }) }, cb));
        return record.labels['round'] === lastLabel && record.cpuCount === lastCpuCount;
      }).catch(async (error: unknown) => {
        const record = await call<Host>((cb) => admins[replica]!.getHost({ name: HOST_NAME.format({ host }) }, cb));
        assert.deepEqual(
          [record.labels, record.cpuCount],
          [{ round: lastLabel }, lastCpuCount],
          `replica ${replica}: neither the labels nor the facts were lost (${String(error)})`,
        );
      });
    }

    // 2. No orphans: a host is deleted on one replica while its reports keep arriving at both. Afterwards
    // neither replica (nor KV) holds a VM of the deleted host, and reports after the deletion are NOT_FOUND.
    for (let attempt = 0; attempt < 8; attempt++) {
      const doomed = `race-del-${attempt}`;
      const doomedAgents = [await as('host', doomed, 0), await as('host', doomed, 1)];
      await register(doomedAgents[attempt % 2]!, doomed);
      let deleted = false;
      let reports = 0;
      let finished = false;
      const reporting = (async () => {
        for (let round = 0; round < 200; round++) {
          const side = round % 2;
          try {
            await call((cb) =>
              doomedAgents[side]!.reportVirtualMachines(
                {
                  parent: HOST_NAME.format({ host: doomed }),
                  virtualMachines: Array.from({ length: 5 }, (_, i) => vm(doomed, `r${round}-${i}`)),
                  fullSnapshot: round % 7 === 3,
                  removedVirtualMachines: [],
                },
                cb,
              ),
            );
            reports++;
          } catch (error) {
            assert.equal((error as { code?: number }).code, GrpcStatus.NOT_FOUND, `report ${round}: ${String(error)}`);
            // Another report may pass between deletion and its own re-check; once the delete returned, none does.
            if (deleted) return;
          }
        }
      })().finally(() => void (finished = true));
      // Delete once a few reports have landed, at a different moment of a report each attempt.
      while (reports < 2 + (attempt % 3) && !finished) await new Promise((resolve) => setTimeout(resolve, 2));
      await new Promise((resolve) => setTimeout(resolve, attempt * 3));
      await call((cb) => admins[(reports + 1) % 2]!.deleteHost({ name: HOST_NAME.format({ host: doomed }), force: true }, cb));
      deleted = true;
      await reporting;
      for (const replica of [0, 1]) {
        await waitUntil(
          `replica ${replica} to drop ${doomed}`,
          async () => (await failure((cb) => admins[replica]!.getHost({ name: HOST_NAME.format({ host: doomed }) }, cb))).code === GrpcStatus.NOT_FOUND,
        );
      }
      // Give late writes (a report racing the deletion on the other replica) time to land, then look.
      await new Promise((resolve) => setTimeout(resolve, 300));
      for (const replica of [0, 1]) {
        const left = await vmsOn(replica, doomed);
        assert.deepEqual([...left.keys()], [], `attempt ${attempt}: replica ${replica} still lists VMs of the deleted host`);
      }
    }
  });

  it('drains and deletes a host: refused while managed VMs exist, unless forced', async () => {
    const agent = await as('host', 'kvm-05');
    const admin = await as('admin', 'alice');
    await register(agent, 'kvm-05');
    await call((cb) =>
      agent.reportVirtualMachines(
        { parent: 'hosts/kvm-05', virtualMachines: [{ ...vm('kvm-05', 'clone-1'), managed: true }], fullSnapshot: true, removedVirtualMachines: [] },
        cb,
      ),
    );
    const drained = await call<Host>((cb) =>
      admin.updateHost({ host: { ...hostFacts('kvm-05'), draining: true, labels: { rack: 'r3' } }, updateMask: ['draining', 'labels'] }, cb),
    );
    assert.equal(drained.state, Host_State.STATE_DRAINING);
    assert.deepEqual(drained.labels, { rack: 'r3' });
    const refused = await failure((cb) => admin.deleteHost({ name: 'hosts/kvm-05', force: false }, cb));
    assert.equal(refused.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(refused.reason, 'ERROR_REASON_HOST_NOT_EMPTY');
    assert.match(refused.metadata['dependents'] ?? '', /clone-1/);
    await call((cb) => admin.deleteHost({ name: 'hosts/kvm-05', force: true }, cb));
    assert.equal((await failure((cb) => admin.getHost({ name: 'hosts/kvm-05' }, cb))).code, GrpcStatus.NOT_FOUND);
    // The host is gone (NOT_FOUND as a parent), and so is every record of its VMs across the fleet.
    assert.equal(
      (await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-05', pageSize: 1000, pageToken: '', filter: '' }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
    assert.deepEqual(await fleetVmsOf(admin, 'kvm-05'), []);
  });
});
