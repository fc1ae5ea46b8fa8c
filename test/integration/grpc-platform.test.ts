/**
 * The gRPC platform with real servers on port 0 and real certificates: per-RPC authorization and
 * revocation at the boundary, error details on the wire, the deadline-and-retry interceptor, and
 * certificate hot reload.
 */
import assert from 'node:assert/strict';
import { connect as tlsConnect } from 'node:tls';
import { after, before, describe, it } from 'node:test';
import { readFile } from 'node:fs/promises';
import { Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { createClient } from '../../services/common/client.js';
import { CowherdError, readServiceError } from '../../services/common/errors.js';
import { writeCredentials } from '../../services/common/credential-files.js';
import { createLogger } from '../../services/common/logger.js';
import { readDescriptorSet } from '../../services/common/reflection.js';
import { adaptService, type RevocationCheck } from '../../services/common/rpc.js';
import { startServer, type RunningServer } from '../../services/common/server.js';
import { mutualTlsChannelCredentialsFromPem, mutualTlsServerCredentials, type TlsFiles } from '../../services/common/tls.js';
import { inspectCertificate } from '../../services/common/pki.js';
import { INVENTORY_POLICY } from '../../services/inventory/access-policy.js';
import { InventoryServiceClient, InventoryServiceService } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host, Host_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Resources, TestPki } from '../harness/index.js';
import { call } from '../harness/grpc.js';

const log = createLogger({ service: 'test', level: 'silent' });


describe('gRPC platform', () => {
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
    const client = createClient(InventoryServiceClient, `localhost:${server.port}`, mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem }), { defaultDeadlineMs: 5_000, initialBackoffMs: 10 });
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
    server = await startServer({ log, address: 'localhost:0', healthAddress: 'localhost:0', credentials: mutualTlsServerCredentials(serverFiles, 200), services: [service], descriptorSet: readDescriptorSet(), revocations });
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
    const error = await call((cb) => host.heartbeat({ host: 'hosts/kvm-02', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb)).then(() => undefined, (e: ServiceError) => e);
    assert.ok(error);
    const received = readServiceError(error);
    assert.equal(received.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(received.reason, 'ERROR_REASON_HOST_MISMATCH');
    assert.equal(heartbeatCalls, before, 'the handler never ran');
  });

  it('refuses a host identity on an admin RPC and an admin on an agent-only RPC', async () => {
    const host = await clientFor('host', 'kvm-01');
    const denied = await call((cb) => host.updateHost({ host: undefined, updateMask: undefined }, cb)).then(() => undefined, (e: ServiceError) => e);
    assert.equal(denied?.code, GrpcStatus.PERMISSION_DENIED);
    const admin = await clientFor('admin', 'alice');
    const adminHeartbeat = await call((cb) => admin.heartbeat({ host: 'hosts/kvm-01', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb)).then(() => undefined, (e: ServiceError) => e);
    assert.equal(adminHeartbeat?.code, GrpcStatus.PERMISSION_DENIED);
  });

  it('sends INVALID_ARGUMENT with the field named, NOT_FOUND, and UNIMPLEMENTED for RPCs without handlers', async () => {
    const admin = await clientFor('admin', 'alice');
    const invalid = readServiceError(await call((cb) => admin.updateHost({ host: undefined, updateMask: undefined }, cb)).then(() => { throw new Error('no error'); }, (e: ServiceError) => e));
    assert.equal(invalid.code, GrpcStatus.INVALID_ARGUMENT);
    assert.deepEqual(invalid.fields, ['update_mask']);
    const missing = readServiceError(await call((cb) => admin.getHost({ name: 'hosts/nope' }, cb)).then(() => { throw new Error('no error'); }, (e: ServiceError) => e));
    assert.equal(missing.code, GrpcStatus.NOT_FOUND);
    assert.equal(missing.reason, 'ERROR_REASON_RESOURCE_NOT_FOUND');
    const unimplemented = await call((cb) => admin.listHosts({ pageSize: 0, pageToken: '', filter: '' }, cb)).then(() => undefined, (e: ServiceError) => e);
    assert.equal(unimplemented?.code, GrpcStatus.UNIMPLEMENTED);
  });

  it('refuses a revoked certificate with UNAUTHENTICATED (CERTIFICATE_REVOKED)', async () => {
    const credentials = await pki.credentials('admin', 'mallory');
    const client = createClient(InventoryServiceClient, `localhost:${server.port}`, mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem }));
    clients.push(client);
    await call((cb) => client.getHost({ name: 'hosts/kvm-01' }, cb));
    revoked.add(inspectCertificate(credentials.certificatePem).serialNumber);
    const error = readServiceError(await call((cb) => client.getHost({ name: 'hosts/kvm-01' }, cb)).then(() => { throw new Error('no error'); }, (e: ServiceError) => e));
    assert.equal(error.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(error.reason, 'ERROR_REASON_CERTIFICATE_REVOKED');
  });

  it('retries UNAVAILABLE within the deadline and returns other codes at once', async () => {
    const host = await clientFor('host', 'kvm-01');
    unavailableLeft = 2;
    const start = heartbeatCalls;
    await call((cb) => host.heartbeat({ host: 'hosts/kvm-01', memoryFreeBytes: '0', imageDirectoryFreeBytes: '0', imageDirectoryTotalBytes: '0' }, cb));
    assert.equal(heartbeatCalls - start, 3, 'two failures and one success');
    const admin = await clientFor('admin', 'alice');
    const slow = await call((cb) => admin.getHost({ name: 'hosts/slow' }, new Metadata(), { deadline: Date.now() + 300 }, cb)).then(() => undefined, (e: ServiceError) => e);
    assert.equal(slow?.code, GrpcStatus.DEADLINE_EXCEEDED);
  });

  it('serves a replaced certificate on new connections without a restart', async () => {
    const serialOnWire = (): Promise<string> =>
      new Promise((resolve, reject) => {
        const socket = tlsConnect({ host: 'localhost', port: server.port, ca: pki.ca.certificatePem, servername: 'localhost', ALPNProtocols: ['h2'] }, () => {
          const serial = socket.getPeerCertificate().serialNumber.toLowerCase().replace(/^0+/, '');
          socket.destroy();
          resolve(serial);
        });
        socket.on('error', reject);
      });
    const before = await serialOnWire();
    assert.equal(before, inspectCertificate(await readFile(serverFiles.certificateFile, 'utf8')).serialNumber);
    const renewed = await pki.credentials('service', 'inventory');
    await writeCredentials(serverFiles.certificateFile.replace(/\/cert\.pem$/, ''), renewed);
    const expected = inspectCertificate(renewed.certificatePem).serialNumber;
    const deadline = Date.now() + 5_000;
    let now = before;
    while (now !== expected && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      now = await serialOnWire();
    }
    assert.equal(now, expected, 'new connections see the renewed certificate');
    const admin = await clientFor('admin', 'alice');
    await call((cb) => admin.getHost({ name: 'hosts/kvm-01' }, cb));
  });
});
