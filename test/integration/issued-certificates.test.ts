/**
 * Only certificates the CA issued are admitted by the gRPC servers, as NATS admits only issued serials:
 * real CA, inventory, distribution, cloning and agent processes on real NATS. A certificate signed with the
 * CA key that the CA never recorded, and a client certificate that is itself a CA (or has no clientAuth
 * usage), are refused UNAUTHENTICATED with an ErrorInfo reason by every server; a certificate issued a
 * moment ago is accepted at once by every server (a miss makes the server ask the CA again).
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus, type Client, type ServiceError } from '@grpc/grpc-js';
import forge from 'node-forge';
import { AgentServiceClient } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { CloningServiceClient, DeleteVirtualMachineRequest } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DeleteImageRequest, DistributionServiceClient } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { ServerReflectionClient } from '../../services/gen/grpc/reflection/v1/reflection.js';
import { createClient } from '../../services/common/platform/client.js';
import { readServiceError } from '../../services/common/platform/errors.js';
import { issueCredentials, type Credentials } from '../../services/common/platform/credential-files.js';
import { identityUri } from '../../services/common/platform/identity.js';
import { jsonCodec, KvStore } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { createCsr, generateKeyPair, inspectCertificate } from '../../services/common/platform/pki.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import type { CertificateRecord } from '../../services/common/domain/ca-records.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call } from '../harness/grpc.js';
import { startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** Past authentication and authorization: any answer but a refusal of the caller (UNIMPLEMENTED and NOT_FOUND included). */
function admitted(result: { code: GrpcStatus }): boolean {
  return ![GrpcStatus.UNAUTHENTICATED, GrpcStatus.UNAVAILABLE, GrpcStatus.PERMISSION_DENIED].includes(result.code);
}

/** One RPC per server that the given credentials' kind may call; resolves to the call's status code. */
type Probe = (credentials: Credentials) => Promise<{ code: GrpcStatus; reason?: string | undefined }>;

describe('only issued certificates are admitted by the gRPC servers', () => {
  const resources = new Resources();
  const closers: Client[] = [];
  let pki: TestPki;
  let ca: ServiceProcess & { enrollAddress: string };
  let inventory: ServiceProcess;
  let distribution: ServiceProcess;
  let cloning: ServiceProcess;
  let agent: ServiceProcess;
  let admin: CertificateAuthorityServiceClient;
  let certificates: KvStore<CertificateRecord>;

  function client<C extends Client>(Constructor: new (...args: never[]) => C, address: string, credentials: Credentials): C {
    const made = createClient(Constructor as never, address, mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem }), {
      defaultDeadlineMs: 15_000,
      maxAttempts: 1,
    }) as C;
    closers.push(made);
    return made;
  }
  async function outcome(
    invoke: (callback: (error: ServiceError | null, response: unknown) => void) => void,
  ): Promise<{ code: GrpcStatus; reason?: string | undefined }> {
    try {
      await call(invoke);
      return { code: GrpcStatus.OK };
    } catch (error) {
      const received = readServiceError(error as ServiceError);
      return { code: received.code, reason: received.reason };
    }
  }

  /** Admin-callable RPCs on the CA, inventory, distribution and cloning. */
  const adminProbes: Record<string, Probe> = {
    'certificate-authority': (credentials) =>
      outcome((cb) => client(CertificateAuthorityServiceClient, ca.address, credentials).listJoinTokens({ pageSize: 1, pageToken: '', filter: '' }, cb)),
    inventory: (credentials) =>
      outcome((cb) => client(InventoryServiceClient, inventory.address, credentials).listHosts({ pageSize: 1, pageToken: '', filter: '' }, cb)),
    distribution: (credentials) =>
      outcome((cb) =>
        client(DistributionServiceClient, distribution.address, credentials).deleteImage(
          DeleteImageRequest.fromPartial({ name: 'images/never-published' }),
          cb,
        ),
      ),
    cloning: (credentials) =>
      outcome((cb) =>
        client(CloningServiceClient, cloning.address, credentials).deleteVirtualMachine(
          DeleteVirtualMachineRequest.fromPartial({ name: 'hosts/kvm-issued/virtualMachines/nothing' }),
          cb,
        ),
      ),
  };
  /** The agent serves only services: inventory may ask it for its host facts. */
  const agentProbe: Probe = (credentials) => outcome((cb) => client(AgentServiceClient, agent.address, credentials).getHostInfo({}, cb));

  /** A certificate signed with the CA key outside the CA: valid for TLS, never recorded as issued. */
  function forged(kind: 'admin' | 'service', name: string): Promise<Credentials> {
    return issueCredentials(pki.ca, identityUri(kind, name), { dnsNames: ['localhost'], ttlSeconds: 3600 });
  }

  /** A client certificate with the CA bit set (or no extended key usage at all), recorded as if issued. */
  async function recordedOddity(kind: 'admin' | 'service', name: string, oddity: 'ca' | 'no-client-usage'): Promise<Credentials> {
    const keys = await generateKeyPair(2048);
    const authority = forge.pki.certificateFromPem(pki.ca.certificatePem);
    const certificate = forge.pki.createCertificate();
    certificate.publicKey = forge.pki.publicKeyFromPem(keys.publicKeyPem);
    certificate.serialNumber = `1${forge.util.bytesToHex(forge.random.getBytesSync(15))}`;
    certificate.validity.notBefore = new Date(Date.now() - 60_000);
    certificate.validity.notAfter = new Date(Date.now() + 3600_000);
    certificate.setSubject([
      { name: 'organizationName', value: 'cowherd' },
      { name: 'commonName', value: `${kind}/${name}` },
    ]);
    certificate.setIssuer(authority.subject.attributes);
    certificate.setExtensions([
      oddity === 'ca' ? { name: 'basicConstraints', cA: true, critical: true } : { name: 'basicConstraints', cA: false, critical: true },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
      ...(oddity === 'ca' ? [{ name: 'extKeyUsage', serverAuth: true, clientAuth: true }] : []),
      {
        name: 'subjectAltName',
        critical: true,
        altNames: [
          { type: 6, value: identityUri(kind, name) },
          { type: 2, value: 'localhost' },
        ],
      },
      { name: 'authorityKeyIdentifier', keyIdentifier: authority.generateSubjectKeyIdentifier().getBytes() },
    ]);
    certificate.sign(forge.pki.privateKeyFromPem(pki.ca.privateKeyPem), forge.md.sha256.create());
    const certificatePem = forge.pki.certificateToPem(certificate);
    const facts = inspectCertificate(certificatePem);
    // Written straight into the CA's records: by serial it is issued, so only its shape can refuse it.
    await certificates.create(`certificate.${facts.serialNumber}`, {
      serialNumber: facts.serialNumber,
      identity: identityUri(kind, name),
      dnsNames: facts.dnsNames,
      issueTime: facts.notBefore.toISOString(),
      expireTime: facts.notAfter.toISOString(),
      certificatePem,
      issuer: identityUri('admin', 'alice'),
    });
    return { certificatePem, privateKeyPem: keys.privateKeyPem, caPem: pki.ca.certificatePem };
  }

  /** A certificate from IssueCertificate, used the moment it is returned. */
  async function freshlyIssued(kind: 'admin' | 'service', name: string): Promise<Credentials> {
    const keys = await generateKeyPair(2048);
    const identity = identityUri(kind, name);
    const csrPem = createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity, dnsNames: [] });
    const issued = await call<{ certificatePem: string }>((cb) =>
      admin.issueCertificate({ csrPem, identity, dnsNames: [], ttl: { seconds: '3600', nanos: 0 }, requestId: '' }, cb),
    );
    return { certificatePem: issued.certificatePem, privateKeyPem: keys.privateKeyPem, caPem: pki.ca.certificatePem };
  }

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    ca = await startCertificateAuthorityProcess(resources, pki, nats);
    inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    distribution = await startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
    });
    cloning = await startServiceProcess(resources, 'cloning', await pki.files('service', 'cloning'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_DISTRIBUTION_ADDRESS: distribution.address,
    });
    admin = client(CertificateAuthorityServiceClient, ca.address, await pki.credentials('admin', 'alice'));
    const token = await call<{ token: string }>((cb) => admin.createJoinToken({ host: 'kvm-issued', ttl: undefined, requestId: '' }, cb));
    const hostDirectory = await resources.tempDir('cowherd-agent-');
    agent = await startServiceProcess(resources, 'agent', undefined, nats.url, {
      COWHERD_HOST_ID: 'kvm-issued',
      COWHERD_JOIN_TOKEN: token.token,
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: join(hostDirectory, 'credentials'),
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_LIBVIRT_URI: 'test:///default',
      COWHERD_IMAGE_DIR: join(hostDirectory, 'images'),
    });
    const connection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'cloning'), name: 'test', log });
    resources.defer(() => connection.close());
    certificates = await KvStore.open(connection.jetstream, 'ca', jsonCodec<CertificateRecord>());
  });
  after(async () => {
    for (const made of closers) made.close();
    await resources.release();
  });

  it('admits the certificates the fleet was started with (bootstrap and enrolled) on every server', async () => {
    const alice = await pki.credentials('admin', 'alice');
    for (const [server, probe] of Object.entries(adminProbes)) {
      const result = await probe(alice);
      assert.ok(admitted(result), `${server} answered ${GrpcStatus[result.code]} ${result.reason ?? ''}`);
    }
    const atAgent = await agentProbe(await pki.credentials('service', 'inventory'));
    assert.ok(admitted(atAgent), `the agent answered ${GrpcStatus[atAgent.code]} ${atAgent.reason ?? ''}`);
  });

  it('refuses a certificate signed with the CA key that the CA never issued, on every server and the agent', async () => {
    const forgedAdmin = await forged('admin', 'mallory');
    for (const [server, probe] of Object.entries(adminProbes)) {
      const result = await probe(forgedAdmin);
      assert.equal(result.code, GrpcStatus.UNAUTHENTICATED, `${server} answered ${GrpcStatus[result.code]}`);
      assert.equal(result.reason, 'ERROR_REASON_CERTIFICATE_NOT_ISSUED', server);
    }
    const forgedService = await forged('service', 'inventory');
    const atAgent = await agentProbe(forgedService);
    assert.equal(atAgent.code, GrpcStatus.UNAUTHENTICATED, `the agent answered ${GrpcStatus[atAgent.code]}`);
    assert.equal(atAgent.reason, 'ERROR_REASON_CERTIFICATE_NOT_ISSUED');
    // Nothing was done for it: no join token for a host the forger named.
    const refused = await outcome((cb) =>
      client(CertificateAuthorityServiceClient, ca.address, forgedAdmin).createJoinToken({ host: 'kvm-forged', ttl: undefined, requestId: '' }, cb),
    );
    assert.equal(refused.code, GrpcStatus.UNAUTHENTICATED);
    const tokens = await call<{ joinTokens: unknown[] }>((cb) => admin.listJoinTokens({ pageSize: 100, pageToken: '', filter: 'host = "kvm-forged"' }, cb));
    assert.equal(tokens.joinTokens.length, 0);
  });

  it('refuses the never-issued certificate on server reflection too (the bidirectional stream) and serves an issued one', async () => {
    const reflect = (credentials: Credentials): Promise<{ code: GrpcStatus; reason?: string | undefined; services?: number }> =>
      new Promise((resolve) => {
        const reflection = client(ServerReflectionClient, inventory.address, credentials);
        const stream = reflection.serverReflectionInfo();
        stream.on('data', (response: { messageResponse?: { $case: string; value: { service?: unknown[] } } }) => {
          resolve({
            code: GrpcStatus.OK,
            services: response.messageResponse?.$case === 'listServicesResponse' ? (response.messageResponse.value.service?.length ?? 0) : 0,
          });
          stream.cancel();
        });
        stream.on('error', (error: ServiceError) => {
          const received = readServiceError(error);
          resolve({ code: received.code, reason: received.reason });
        });
        stream.write({ host: '', messageRequest: { $case: 'listServices', value: '' } });
      });
    const refused = await reflect(await forged('admin', 'mallory'));
    assert.equal(refused.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(refused.reason, 'ERROR_REASON_CERTIFICATE_NOT_ISSUED');
    const served = await reflect(await pki.credentials('admin', 'alice'));
    assert.equal(served.code, GrpcStatus.OK);
    assert.ok((served.services ?? 0) > 0);
  });

  it('refuses a client certificate that is itself a CA, or has no clientAuth usage, though its serial is recorded', async () => {
    for (const oddity of ['ca', 'no-client-usage'] as const) {
      const adminOddity = await recordedOddity('admin', `odd-${oddity}`, oddity);
      for (const [server, probe] of Object.entries(adminProbes)) {
        const result = await probe(adminOddity);
        assert.equal(result.code, GrpcStatus.UNAUTHENTICATED, `${oddity} at ${server}: ${GrpcStatus[result.code]}`);
        assert.equal(result.reason, 'ERROR_REASON_CERTIFICATE_NOT_FOR_CLIENTS', `${oddity} at ${server}`);
      }
      const atAgent = await agentProbe(await recordedOddity('service', 'inventory', oddity));
      assert.equal(atAgent.code, GrpcStatus.UNAUTHENTICATED, `${oddity} at the agent: ${GrpcStatus[atAgent.code]}`);
      assert.equal(atAgent.reason, 'ERROR_REASON_CERTIFICATE_NOT_FOR_CLIENTS');
    }
  });

  it('accepts a certificate issued a moment ago at once, on every server and the agent', async () => {
    // Each server is asked first with its own new certificate, before any periodic refresh could list it.
    for (const [server, probe] of Object.entries(adminProbes)) {
      const started = Date.now();
      const result = await probe(await freshlyIssued('admin', `fresh-${server}`));
      assert.ok(admitted(result), `${server} answered ${GrpcStatus[result.code]} ${result.reason ?? ''}`);
      assert.ok(Date.now() - started < 5_000, `${server} took ${Date.now() - started} ms`);
    }
    const result = await agentProbe(await freshlyIssued('service', 'inventory'));
    assert.ok(admitted(result), `the agent answered ${GrpcStatus[result.code]} ${result.reason ?? ''}`);
  });
});
