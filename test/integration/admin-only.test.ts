/**
 * The admin-only RPCs, table-driven, on the real services (NATS, certificate authority, inventory,
 * distribution, cloning as processes, real certificates): every one refuses a host certificate and a
 * service certificate that is not on its list with PERMISSION_DENIED, and leaves every record as it was
 * (same KV revisions, no operation, no token, no certificate). The one exception the design makes,
 * DistributeImage for service/cloning (cloning brings a missing image to the host it clones onto), is
 * checked to be exactly that: cloning passes authorization, no other service does.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { CloneVirtualMachinesRequest, CloningServiceClient } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributeImageRequest, DistributionServiceClient, PublishImageRequest } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import {
  Host,
  Host_State,
  Image,
  Image_State,
  ImageReplica,
  ImageReplica_State,
  VirtualMachine,
  VirtualMachine_State,
} from '../../services/gen/cowherd/inventory/v1/resources.js';
import { OperationsClient } from '../../services/gen/google/longrunning/operations.js';
import { createClient } from '../../services/common/platform/client.js';
import type { Credentials } from '../../services/common/platform/credential-files.js';
import type { IdentityKind } from '../../services/common/platform/identity.js';
import { jsonCodec, KvStore, protoCodec } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';
import { startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** The clients of one caller, one per service. */
interface Clients {
  readonly ca: CertificateAuthorityServiceClient;
  readonly inventory: InventoryServiceClient;
  readonly distribution: DistributionServiceClient;
  readonly cloning: CloningServiceClient;
}

type Callback = (error: ServiceError | null, response: unknown) => void;

/** One admin-only RPC with a request an admin could make (every record it names exists). */
interface AdminOnlyCall {
  readonly rpc: string;
  readonly invoke: (clients: Clients, callback: Callback) => void;
}

const ADMIN_ONLY: readonly AdminOnlyCall[] = [
  {
    rpc: 'DistributionService.PublishImage',
    invoke: (c, cb) =>
      c.distribution.publishImage(
        PublishImageRequest.fromPartial({ imageId: 'fresh', sourceVirtualMachine: 'hosts/kvm-01/virtualMachines/web-1', requestId: '' }),
        cb,
      ),
  },
  {
    rpc: 'DistributionService.DistributeImage',
    invoke: (c, cb) =>
      c.distribution.distributeImage(DistributeImageRequest.fromPartial({ image: 'images/golden', hosts: ['hosts/kvm-01'], requestId: '' }), cb),
  },
  { rpc: 'DistributionService.DeleteImage', invoke: (c, cb) => c.distribution.deleteImage({ name: 'images/golden', requestId: '' }, cb) },
  { rpc: 'DistributionService.DeleteImageReplica', invoke: (c, cb) => c.distribution.deleteImageReplica({ name: 'hosts/kvm-01/images/golden' }, cb) },
  {
    rpc: 'DistributionService.CollectImageReplicas',
    invoke: (c, cb) => c.distribution.collectImageReplicas({ parent: 'hosts/-', filter: '', validateOnly: false }, cb),
  },
  {
    rpc: 'CloningService.CloneVirtualMachines',
    invoke: (c, cb) =>
      c.cloning.cloneVirtualMachines(
        CloneVirtualMachinesRequest.fromPartial({
          source: { $case: 'image', value: 'images/golden' },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: ['hosts/kvm-01'] },
          count: 2,
        }),
        cb,
      ),
  },
  { rpc: 'CloningService.StartVirtualMachine', invoke: (c, cb) => c.cloning.startVirtualMachine({ name: 'hosts/kvm-01/virtualMachines/web-1' }, cb) },
  {
    rpc: 'CloningService.StopVirtualMachine',
    invoke: (c, cb) => c.cloning.stopVirtualMachine({ name: 'hosts/kvm-01/virtualMachines/web-1', force: true, timeout: undefined, requestId: '' }, cb),
  },
  {
    rpc: 'CloningService.DeleteVirtualMachine',
    invoke: (c, cb) => c.cloning.deleteVirtualMachine({ name: 'hosts/kvm-01/virtualMachines/web-1', force: true }, cb),
  },
  { rpc: 'InventoryService.DeleteHost', invoke: (c, cb) => c.inventory.deleteHost({ name: 'hosts/kvm-01', force: true }, cb) },
  {
    rpc: 'InventoryService.UpdateHost',
    invoke: (c, cb) => c.inventory.updateHost({ host: Host.fromPartial({ name: 'hosts/kvm-01', labels: { rack: 'evil' } }), updateMask: ['labels'] }, cb),
  },
  { rpc: 'CertificateAuthorityService.CreateJoinToken', invoke: (c, cb) => c.ca.createJoinToken({ host: 'kvm-99', ttl: undefined, requestId: '' }, cb) },
  { rpc: 'CertificateAuthorityService.DeleteJoinToken', invoke: (c, cb) => c.ca.deleteJoinToken({ name: 'joinTokens/0000000000000000' }, cb) },
  {
    rpc: 'CertificateAuthorityService.IssueCertificate',
    invoke: (c, cb) => c.ca.issueCertificate({ csrPem: '', identity: 'spiffe://cowherd/admin/mallory', dnsNames: [], ttl: undefined, requestId: '' }, cb),
  },
  { rpc: 'CertificateAuthorityService.RevokeCertificate', invoke: (c, cb) => c.ca.revokeCertificate({ name: 'certificates/1', reason: 0 }, cb) },
];

/** Callers that must be refused everything above: a host, and services that are on no admin-only list. */
const REFUSED_CALLERS: ReadonlyArray<{ kind: IdentityKind; name: string }> = [
  { kind: 'host', name: 'kvm-01' },
  { kind: 'service', name: 'inventory' },
  { kind: 'service', name: 'distribution' },
];

describe('admin-only RPCs', () => {
  const resources = new Resources();
  const closers: Array<{ close(): void }> = [];
  let pki: TestPki;
  let processes: Record<'ca' | 'inventory' | 'distribution' | 'cloning', ServiceProcess>;
  let adminClients: Clients;
  /** What must stay as it is: every seeded record's KV revision, the operations, tokens and certificates. */
  let snapshot: () => Promise<{ revisions: Record<string, number | undefined> } & Record<string, unknown>>;

  function clientsFor(credentials: Credentials): Clients {
    const channel = mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem });
    const options = { defaultDeadlineMs: 15_000, maxAttempts: 1 };
    const clients = {
      ca: createClient(CertificateAuthorityServiceClient, processes.ca.address, channel, options),
      inventory: createClient(InventoryServiceClient, processes.inventory.address, channel, options),
      distribution: createClient(DistributionServiceClient, processes.distribution.address, channel, options),
      cloning: createClient(CloningServiceClient, processes.cloning.address, channel, options),
    };
    closers.push(...Object.values(clients));
    return clients;
  }

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    const ca = await startCertificateAuthorityProcess(resources, pki, nats);
    // A long heartbeat interval: the seeded host has no agent, and must not turn UNREACHABLE (a write) mid-test.
    const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_HEARTBEAT_SECONDS: '3600',
    });
    const distribution = await startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
    });
    const cloning = await startServiceProcess(resources, 'cloning', await pki.files('service', 'cloning'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_DISTRIBUTION_ADDRESS: distribution.address,
    });
    processes = { ca, inventory, distribution, cloning };
    adminClients = clientsFor(await pki.credentials('admin', 'alice'));

    // A host, an image with a replica on it, and a VM: what the RPCs above would change or delete.
    const connection = await connectNats({
      servers: [nats.url],
      tls: await pki.files('service', 'distribution', { subdirectory: 'test-connection' }),
      name: 'test',
      log,
    });
    resources.defer(() => connection.close());
    const now = new Date();
    const stores = {
      hosts: await KvStore.open(connection.jetstream, 'hosts', protoCodec(Host)),
      images: await KvStore.open(connection.jetstream, 'images', protoCodec(Image)),
      replicas: await KvStore.open(connection.jetstream, 'replicas', protoCodec(ImageReplica)),
      vms: await KvStore.open(connection.jetstream, 'vms', protoCodec(VirtualMachine)),
    };
    await stores.hosts.put(
      'kvm-01',
      Host.fromPartial({
        name: 'hosts/kvm-01',
        state: Host_State.STATE_READY,
        agentEndpoint: 'localhost:1',
        enrollTime: now,
        lastHeartbeatTime: now,
        updateTime: now,
      }),
    );
    await stores.images.put(
      'golden',
      Image.fromPartial({ name: 'images/golden', state: Image_State.STATE_AVAILABLE, originHost: 'hosts/kvm-01', createTime: now, updateTime: now }),
    );
    await stores.replicas.put(
      'kvm-01.golden',
      ImageReplica.fromPartial({
        name: 'hosts/kvm-01/images/golden',
        image: 'images/golden',
        host: 'hosts/kvm-01',
        state: ImageReplica_State.STATE_AVAILABLE,
        createTime: now,
        updateTime: now,
      }),
    );
    await stores.vms.put(
      'kvm-01.web-1',
      VirtualMachine.fromPartial({ name: 'hosts/kvm-01/virtualMachines/web-1', state: VirtualMachine_State.STATE_SHUT_OFF }),
    );
    const operations = await KvStore.open(connection.jetstream, 'operations', jsonCodec<unknown>());
    const adminChannel = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem });
    const operationsOf = (address: string) => {
      const client = createClient(OperationsClient, address, adminChannel, { defaultDeadlineMs: 15_000 });
      closers.push(client);
      return async () =>
        (
          await call<{ operations: Array<{ name: string }> }>((cb) =>
            client.listOperations({ name: '', filter: '', pageSize: 1000, pageToken: '', returnPartialSuccess: false }, cb),
          )
        ).operations.map((operation) => operation.name);
    };
    const distributionOperations = operationsOf(distribution.address);
    const cloningOperations = operationsOf(cloning.address);
    snapshot = async () => ({
      revisions: {
        host: (await stores.hosts.get('kvm-01'))?.revision,
        image: (await stores.images.get('golden'))?.revision,
        replica: (await stores.replicas.get('kvm-01.golden'))?.revision,
        vm: (await stores.vms.get('kvm-01.web-1'))?.revision,
      },
      operationRecords: (await operations.list()).map((entry) => entry.key),
      distributionOperations: await distributionOperations(),
      cloningOperations: await cloningOperations(),
      joinTokens: (
        await call<{ joinTokens: Array<{ name: string; state: number }> }>((cb) =>
          adminClients.ca.listJoinTokens({ pageSize: 1000, pageToken: '', filter: '' }, cb),
        )
      ).joinTokens,
      certificates: (
        await call<{ certificates: Array<{ name: string; state: number }> }>((cb) =>
          adminClients.ca.listCertificates({ pageSize: 1000, pageToken: '', filter: '' }, cb),
        )
      ).certificates.map((certificate) => [certificate.name, certificate.state]),
      inventoryHost: await call((cb) => adminClients.inventory.getHost({ name: 'hosts/kvm-01' }, cb)),
    });
  });
  after(async () => {
    for (const client of closers) client.close();
    await resources.release();
  });

  for (const caller of REFUSED_CALLERS) {
    it(`refuses every admin-only RPC to ${caller.kind}/${caller.name} with PERMISSION_DENIED and changes nothing`, async () => {
      const clients = clientsFor(await pki.credentials(caller.kind, caller.name));
      const before = await snapshot();
      assert.ok(
        Object.values(before.revisions).every((revision) => revision !== undefined),
        'the records exist',
      );
      for (const entry of ADMIN_ONLY) {
        const refused = await failure((cb) => entry.invoke(clients, cb));
        assert.equal(refused.code, GrpcStatus.PERMISSION_DENIED, `${entry.rpc} as ${caller.kind}/${caller.name}: ${refused.message}`);
        assert.match(refused.message, new RegExp(`${caller.kind}/${caller.name} may not call`), entry.rpc);
      }
      assert.deepEqual(await snapshot(), before, 'no record, operation, token or certificate changed');
    });
  }

  it('lets service/cloning, and no other service, past authorization for DistributeImage', async () => {
    const cloning = clientsFor(await pki.credentials('service', 'cloning'));
    const before = await snapshot();
    // An image that does not exist: the call gets past the access table and is answered by the handler.
    const missing = await failure((cb) =>
      cloning.distribution.distributeImage(DistributeImageRequest.fromPartial({ image: 'images/missing', hosts: ['hosts/kvm-01'], requestId: '' }), cb),
    );
    assert.notEqual(missing.code, GrpcStatus.PERMISSION_DENIED, missing.message);
    assert.equal(missing.code, GrpcStatus.NOT_FOUND, missing.message);
    // Everything else admin-only stays closed to cloning too.
    for (const entry of ADMIN_ONLY.filter((candidate) => candidate.rpc !== 'DistributionService.DistributeImage')) {
      assert.equal((await failure((cb) => entry.invoke(cloning, cb))).code, GrpcStatus.PERMISSION_DENIED, entry.rpc);
    }
    assert.deepEqual(await snapshot(), before);
  });

  it('control: the same UpdateHost request from an admin changes the host, and the snapshot sees it', async () => {
    const before = await snapshot();
    const update = ADMIN_ONLY.find((entry) => entry.rpc === 'InventoryService.UpdateHost')!;
    await call((cb) => update.invoke(adminClients, cb));
    const after = await snapshot();
    assert.notEqual(after.revisions['host'], before.revisions['host'], 'an admin request as in the table is a real change');
  });
});
