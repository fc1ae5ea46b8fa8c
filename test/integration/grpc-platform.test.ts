/**
 * The gRPC platform with real servers on port 0 and real certificates: per-RPC authorization and
 * revocation at the boundary (server reflection included), error details on the wire, the
 * deadline-and-retry interceptor, clients that accept only the server identity they dial, and
 * certificate hot reload.
 */
import assert from 'node:assert/strict';
import { pbkdf2 } from 'node:crypto';
import { connect as tlsConnect } from 'node:tls';
import { after, before, describe, it } from 'node:test';
import { readFile } from 'node:fs/promises';
import {
  makeGenericClientConstructor,
  Metadata,
  status as GrpcStatus,
  type ChannelCredentials,
  type ClientDuplexStream,
  type ServiceError,
} from '@grpc/grpc-js';
import { AgentClients } from '../../services/common/domain/agent-clients.js';
import { createClient } from '../../services/common/platform/client.js';
import { CowherdError, readServiceError } from '../../services/common/platform/errors.js';
import { issueCredentials, writeCredentials, type Credentials } from '../../services/common/platform/credential-files.js';
import { identityUri } from '../../services/common/platform/identity.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { readDescriptorSet } from '../../services/common/platform/reflection.js';
import { adaptService, type RevocationCheck } from '../../services/common/platform/rpc.js';
import { startServer, type RunningServer } from '../../services/common/platform/server.js';
import {
  mutualTlsChannelCredentialsFromPem,
  mutualTlsClientCredentials,
  mutualTlsServerCredentials,
  type TlsFiles,
} from '../../services/common/platform/tls.js';
import { inspectCertificate } from '../../services/common/platform/pki.js';
import { AGENT_POLICY } from '../../services/agent/access-policy.js';
import { INVENTORY_POLICY } from '../../services/inventory/access-policy.js';
import { AgentServiceService } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { ServerReflectionService, type ServerReflectionRequest, type ServerReflectionResponse } from '../../services/gen/grpc/reflection/v1/reflection.js';
import { InventoryServiceClient, InventoryServiceService } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host, Host_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Resources, TestPki } from '../harness/index.js';
import { call, failure } from '../harness/grpc.js';

const log = createLogger({ service: 'test', level: 'silent' });

describe('gRPC platform', () => {
  /** The serial of the certificate a server presents in a TLS handshake now. */
  const serialOnWire = (port: number): Promise<string> =>
    new Promise((resolve, reject) => {
      const socket = tlsConnect({ host: 'localhost', port, ca: pki.ca.certificatePem, servername: 'localhost', ALPNProtocols: ['h2'] }, () => {
        const serial = socket.getPeerCertificate().serialNumber.toLowerCase().replace(/^0+/, '');
        socket.destroy();
        resolve(serial);
      });
      socket.on('error', reject);
    });

  const resources = new Resources();
  let pki: TestPki;
  let server: RunningServer;
  let serverFiles: TlsFiles;
  const revoked = new Set<string>();
  let heartbeatCalls = 0;
  let unavailableLeft = 0;
  const clients: InventoryServiceClient[] = [];

  async function clientFor(kind: 'admin' | 'host' | 'service', name: string): Promise<InventoryServiceClient> {
    const credentials = await pki.credentials(kind, name);
    const client = createClient(
      InventoryServiceClient,
      `localhost:${server.port}`,
      mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 5_000, initialBackoffMs: 10 },
    );
    clients.push(client);
    return client;
  }

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    serverFiles = await pki.files('service', 'inventory');
    const revocations: RevocationCheck = { isRevoked: (serial) => revoked.has(serial) };
    const service = adaptService(
      InventoryServiceService,
      {
        heartbeat: async () => {
          heartbeatCalls++;
          if (unavailableLeft > 0) {
            unavailableLeft--;
            throw new CowherdError(GrpcStatus.UNAVAILABLE, 'try again', { reason: 0 });
          }
          return { heartbeatInterval: { seconds: '10', nanos: 0 }, transferLimits: undefined };
        },
        getHost: async (request) => {
          if (request.name === 'hosts/slow') await new Promise((resolve) => setTimeout(resolve, 3_000));
          if (request.name !== 'hosts/kvm-01') throw CowherdError.notFound(request.name);
          return Host.fromPartial({ name: 'hosts/kvm-01', state: Host_State.STATE_READY });
        },
        updateHost: async () => {
          throw CowherdError.invalidArgument('update_mask', 'names a field that is not updatable');
        },
      },
      INVENTORY_POLICY,
      { log, revocations },
    );
    server = await startServer({
      log,
      address: 'localhost:0',
      healthAddress: 'localhost:0',
      credentials: mutualTlsServerCredentials(serverFiles, 200),
      services: [service],
      descriptorSet: readDescriptorSet(),
      revocations,
    });
    resources.defer(() => server.stop(1_000));
  });
  after(async () => {
    for (const client of clients) client.close();
    await resources.release();
  });

  it('lets a host act for itself and refuses it for another host, with HOST_MISMATCH', async () => {
    const host = await clientFor('host', 'kvm-01');
    await call((cb) => host.heartbeat({ host: 'hosts/kvm-01', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb));
    const before = heartbeatCalls;
    const error = await call((cb) =>
      host.heartbeat({ host: 'hosts/kvm-02', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb),
    ).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    assert.ok(error);
    const received = readServiceError(error);
    assert.equal(received.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(received.reason, 'ERROR_REASON_HOST_MISMATCH');
    assert.equal(heartbeatCalls, before, 'the handler never ran');
  });

  it('refuses a host identity on an admin RPC and an admin on an agent-only RPC', async () => {
    const host = await clientFor('host', 'kvm-01');
    const denied = await call((cb) => host.updateHost({ host: undefined, updateMask: undefined }, cb)).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    assert.equal(denied?.code, GrpcStatus.PERMISSION_DENIED);
    const admin = await clientFor('admin', 'alice');
    const adminHeartbeat = await call((cb) =>
      admin.heartbeat({ host: 'hosts/kvm-01', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb),
    ).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    assert.equal(adminHeartbeat?.code, GrpcStatus.PERMISSION_DENIED);
  });

  it('sends INVALID_ARGUMENT with the field named, NOT_FOUND, and UNIMPLEMENTED for RPCs without handlers', async () => {
    const admin = await clientFor('admin', 'alice');
    const invalid = readServiceError(
      await call((cb) => admin.updateHost({ host: undefined, updateMask: undefined }, cb)).then(
        () => {
          throw new Error('no error');
        },
        (e: ServiceError) => e,
      ),
    );
    assert.equal(invalid.code, GrpcStatus.INVALID_ARGUMENT);
    assert.deepEqual(invalid.fields, ['update_mask']);
    const missing = readServiceError(
      await call((cb) => admin.getHost({ name: 'hosts/nope' }, cb)).then(
        () => {
          throw new Error('no error');
        },
        (e: ServiceError) => e,
      ),
    );
    assert.equal(missing.code, GrpcStatus.NOT_FOUND);
    assert.equal(missing.reason, 'ERROR_REASON_RESOURCE_NOT_FOUND');
    const unimplemented = await call((cb) => admin.listHosts({ pageSize: 0, pageToken: '', filter: '' }, cb)).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    assert.equal(unimplemented?.code, GrpcStatus.UNIMPLEMENTED);
  });

  it('refuses a revoked certificate with UNAUTHENTICATED (CERTIFICATE_REVOKED)', async () => {
    const credentials = await pki.credentials('admin', 'mallory');
    const client = createClient(
      InventoryServiceClient,
      `localhost:${server.port}`,
      mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem }),
    );
    clients.push(client);
    await call((cb) => client.getHost({ name: 'hosts/kvm-01' }, cb));
    revoked.add(inspectCertificate(credentials.certificatePem).serialNumber);
    const error = readServiceError(
      await call((cb) => client.getHost({ name: 'hosts/kvm-01' }, cb)).then(
        () => {
          throw new Error('no error');
        },
        (e: ServiceError) => e,
      ),
    );
    assert.equal(error.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(error.reason, 'ERROR_REASON_CERTIFICATE_REVOKED');
  });

  it('puts server reflection (v1 and v1alpha) behind the same identity and revocation checks as every RPC', async () => {
    const v1alpha = {
      serverReflectionInfo: { ...ServerReflectionService.serverReflectionInfo, path: '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo' },
    };
    type ReflectionClient = { serverReflectionInfo(): ClientDuplexStream<ServerReflectionRequest, ServerReflectionResponse>; close(): void };
    const listServices = (credentials: ChannelCredentials, alpha: boolean): Promise<string[]> =>
      new Promise((resolve, reject) => {
        const Client = makeGenericClientConstructor(
          alpha ? v1alpha : ServerReflectionService,
          alpha ? 'grpc.reflection.v1alpha.ServerReflection' : 'grpc.reflection.v1.ServerReflection',
        );
        const client = new Client(`localhost:${server.port}`, credentials) as unknown as ReflectionClient;
        const stream = client.serverReflectionInfo();
        const names: string[] = [];
        stream.on('data', (response: ServerReflectionResponse) => {
          if (response.messageResponse?.$case === 'listServicesResponse') names.push(...response.messageResponse.value.service.map((service) => service.name));
        });
        stream.on('error', (error: ServiceError) => {
          client.close();
          reject(error);
        });
        stream.on('end', () => {
          client.close();
          resolve(names);
        });
        stream.write({ host: '', messageRequest: { $case: 'listServices', value: '' } });
        stream.end();
      });
    const credentialsOf = (credentials: Credentials): ChannelCredentials =>
      mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem });
    const refused = (credentials: ChannelCredentials, alpha: boolean) =>
      listServices(credentials, alpha).then(
        () => assert.fail('reflection answered'),
        (error: ServiceError) => readServiceError(error),
      );

    // Any cowherd identity whose certificate stands may use it: hosts too (the schemas are public).
    const host = credentialsOf(await pki.credentials('host', 'kvm-01'));
    for (const alpha of [false, true]) assert.ok((await listServices(host, alpha)).includes('cowherd.inventory.v1.InventoryService'));

    const trudyCredentials = await pki.credentials('admin', 'trudy');
    const trudy = credentialsOf(trudyCredentials);
    assert.ok((await listServices(trudy, false)).includes('grpc.health.v1.Health'), 'accepted before revocation');
    revoked.add(inspectCertificate(trudyCredentials.certificatePem).serialNumber);
    for (const alpha of [false, true]) {
      const error = await refused(trudy, alpha);
      assert.equal(error.code, GrpcStatus.UNAUTHENTICATED, `v1${alpha ? 'alpha' : ''}`);
      assert.equal(error.reason, 'ERROR_REASON_CERTIFICATE_REVOKED');
    }

    // A certificate from the right CA that names no cowherd identity.
    const stranger = credentialsOf(await issueCredentials(pki.ca, 'spiffe://elsewhere/service/inventory', { dnsNames: ['localhost'] }));
    assert.equal((await refused(stranger, false)).code, GrpcStatus.UNAUTHENTICATED);
  });

  it('makes clients refuse a server that proves another identity than the one they dial', async () => {
    const handled: string[] = [];
    const startImpostor = async (credentials: Credentials, service: 'inventory' | 'agent'): Promise<RunningServer> => {
      const files = await writeCredentials(await resources.tempDir('cowherd-impostor-'), credentials);
      const registration =
        service === 'inventory'
          ? adaptService(
              InventoryServiceService,
              { getHost: async (request) => (handled.push(`inventory ${request.name}`), Host.fromPartial({ name: request.name })) },
              INVENTORY_POLICY,
              { log, revocations: { isRevoked: () => false } },
            )
          : adaptService(AgentServiceService, { getHostInfo: async () => (handled.push('agent'), Host.fromPartial({ name: 'hosts/kvm-01' })) }, AGENT_POLICY, {
              log,
              revocations: { isRevoked: () => false },
            });
      const running = await startServer({
        log,
        address: 'localhost:0',
        credentials: mutualTlsServerCredentials(files, 200),
        services: [registration],
        descriptorSet: readDescriptorSet(),
        revocations: { isRevoked: () => false },
      });
      resources.defer(() => running.stop(1_000));
      // The file watcher loads the certificate shortly after the bind: wait until handshakes present it.
      const expected = inspectCertificate(credentials.certificatePem).serialNumber;
      const deadline = Date.now() + 5_000;
      while ((await serialOnWire(running.port).catch(() => '')) !== expected) {
        if (Date.now() > deadline) throw new Error('the impostor never presented its certificate');
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      return running;
    };

    // An agent (a host certificate, DNS name localhost like every host's) answering where a client expects inventory.
    const agentFiles = await pki.files('host', 'kvm-07');
    const credentialsFor = mutualTlsClientCredentials(agentFiles, 200);
    const hostAsInventory = await startImpostor(await pki.credentials('host', 'kvm-66'), 'inventory');
    const fooled = createClient(InventoryServiceClient, `localhost:${hostAsInventory.port}`, credentialsFor(identityUri('service', 'inventory')), {
      defaultDeadlineMs: 5_000,
      maxAttempts: 1,
    });
    clients.push(fooled);
    const refusedInventory = await failure((cb) => fooled.getHost({ name: 'hosts/kvm-07' }, cb));
    assert.equal(refusedInventory.code, GrpcStatus.UNAVAILABLE, 'the handshake fails');
    assert.match(refusedInventory.message, /is spiffe:\/\/cowherd\/host\/kvm-66, not spiffe:\/\/cowherd\/service\/inventory/);
    // The same credentials reach the real inventory (service/inventory certificate).
    const real = createClient(InventoryServiceClient, `localhost:${server.port}`, credentialsFor(identityUri('service', 'inventory')), {
      defaultDeadlineMs: 5_000,
      maxAttempts: 1,
    });
    clients.push(real);
    assert.equal((await failure((cb) => real.getHost({ name: 'hosts/kvm-07' }, cb))).code, GrpcStatus.NOT_FOUND, 'reached the real inventory, which answered');

    // A service (here: a cloning certificate that even carries the host's DNS name) where an agent is expected.
    const distribution = new AgentClients(mutualTlsClientCredentials(await pki.files('service', 'distribution'), 200));
    resources.defer(() => distribution.close());
    const serviceAsAgent = await startImpostor(
      await issueCredentials(pki.ca, identityUri('service', 'cloning'), { dnsNames: ['kvm-01', 'localhost'] }),
      'agent',
    );
    const refusedAgent = await failure((cb) =>
      distribution.clientFor({ name: 'hosts/kvm-01', agentEndpoint: `localhost:${serviceAsAgent.port}` }).getHostInfo({}, cb),
    );
    assert.equal(refusedAgent.code, GrpcStatus.UNAVAILABLE);
    assert.match(refusedAgent.message, /is spiffe:\/\/cowherd\/service\/cloning, not spiffe:\/\/cowherd\/host\/kvm-01/);
    // Another host's certificate with that DNS name is refused too; the host itself is accepted.
    const otherHost = await startImpostor(await issueCredentials(pki.ca, identityUri('host', 'kvm-02'), { dnsNames: ['kvm-01', 'localhost'] }), 'agent');
    assert.equal(
      (await failure((cb) => distribution.clientFor({ name: 'hosts/kvm-01', agentEndpoint: `localhost:${otherHost.port}` }).getHostInfo({}, cb))).code,
      GrpcStatus.UNAVAILABLE,
    );
    assert.deepEqual(handled, [], 'no impostor saw a request');
    const genuine = await startImpostor(await issueCredentials(pki.ca, identityUri('host', 'kvm-01'), { dnsNames: ['kvm-01', 'localhost'] }), 'agent');
    const answer = await call<Host>((cb) => distribution.clientFor({ name: 'hosts/kvm-01', agentEndpoint: `localhost:${genuine.port}` }).getHostInfo({}, cb));
    assert.equal(answer.name, 'hosts/kvm-01');
    assert.deepEqual(handled, ['agent']);
  });

  it('presents its certificate to the first caller after the bind, even with the thread pool busy', async () => {
    const files = await pki.files('service', 'inventory');
    const credentials = mutualTlsServerCredentials(files, 200);
    // A process starting up on a loaded machine: with the certificate still being read when the server binds,
    // grpc-js would drop every connection until the read is done, although the server said it serves.
    for (let i = 0; i < 4; i++) pbkdf2('cowherd', 'salt', 1_000_000, 32, 'sha256', () => undefined);
    const running = await startServer({
      log,
      address: 'localhost:0',
      credentials,
      services: [],
      descriptorSet: readDescriptorSet(),
      revocations: { isRevoked: () => false },
    });
    resources.defer(() => running.stop(1_000));
    assert.equal(await serialOnWire(running.port), inspectCertificate(await readFile(files.certificateFile, 'utf8')).serialNumber);
  });

  it('retries UNAVAILABLE within the deadline and returns other codes at once', async () => {
    const host = await clientFor('host', 'kvm-01');
    unavailableLeft = 2;
    const start = heartbeatCalls;
    await call((cb) => host.heartbeat({ host: 'hosts/kvm-01', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb));
    assert.equal(heartbeatCalls - start, 3, 'two failures and one success');
    const admin = await clientFor('admin', 'alice');
    const slow = await call((cb) => admin.getHost({ name: 'hosts/slow' }, new Metadata(), { deadline: Date.now() + 300 }, cb)).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    assert.equal(slow?.code, GrpcStatus.DEADLINE_EXCEEDED);
  });

  it('serves a replaced certificate on new connections without a restart', async () => {
    const before = await serialOnWire(server.port);
    assert.equal(before, inspectCertificate(await readFile(serverFiles.certificateFile, 'utf8')).serialNumber);
    const renewed = await pki.credentials('service', 'inventory');
    await writeCredentials(serverFiles.certificateFile.replace(/\/cert\.pem$/, ''), renewed);
    const expected = inspectCertificate(renewed.certificatePem).serialNumber;
    const deadline = Date.now() + 5_000;
    let now = before;
    while (now !== expected && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      now = await serialOnWire(server.port);
    }
    assert.equal(now, expected, 'new connections see the renewed certificate');
    const admin = await clientFor('admin', 'alice');
    await call((cb) => admin.getHost({ name: 'hosts/kvm-01' }, cb));
  });
});
