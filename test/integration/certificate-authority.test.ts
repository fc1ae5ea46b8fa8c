/**
 * The certificate authority and fleet identity on real processes, real NATS and real certificates:
 * enrollment end to end, every refusal the design names (with its gRPC code, and nothing changed),
 * automatic renewal without restart, revocation reaching other servers, and the CA key never leaving.
 */
import assert from 'node:assert/strict';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ChannelCredentials, status as GrpcStatus } from '@grpc/grpc-js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { Certificate_State, JoinToken_State, RevocationReason } from '../../services/gen/cowherd/certauthority/v1/resources.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { ensureEnrolled } from '../../services/agent/host/enrollment.js';
import { createClient } from '../../services/common/platform/client.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { HOST_ENROLLED } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { jsonCodec, KvStore } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { createCsr, generateKeyPair, inspectCertificate } from '../../services/common/platform/pki.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import type { Credentials } from '../../services/common/platform/credential-files.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure, waitFor } from '../harness/grpc.js';
import { startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';
import { CERTIFICATE_NAME, JOIN_TOKEN_NAME } from '../../services/common/domain/resource-names.js';

const log = createLogger({ service: 'test', level: 'silent' });

describe('certificate authority and fleet identity', () => {
  const resources = new Resources();
  let pki: TestPki;
  let natsUrl: string;
  let ca: ServiceProcess & { enrollAddress: string; caKeyFile: string };
  let inventory: ServiceProcess;
  let admin: CertificateAuthorityServiceClient;
  const closers: Array<{ close(): void }> = [];
  const responses: string[] = [];

  function caClient(credentials: Credentials | undefined, address = ca.address): CertificateAuthorityServiceClient {
    const channel = credentials ? mutualTlsChannelCredentialsFromPem(credentials) : ChannelCredentials.createSsl(Buffer.from(pki.ca.certificatePem));
    const client = createClient(CertificateAuthorityServiceClient, address, channel, { defaultDeadlineMs: 10_000, maxAttempts: 1 });
    closers.push(client);
    return client;
  }
  function inventoryClient(credentials: Credentials): InventoryServiceClient {
    const client = createClient(InventoryServiceClient, inventory.address, mutualTlsChannelCredentialsFromPem(credentials), {
      defaultDeadlineMs: 10_000,
      maxAttempts: 1,
    });
    closers.push(client);
    return client;
  }
  async function token(host: string): Promise<string> {
    const created = await call<{ token: string; name: string }>((cb) => admin.createJoinToken({ host, ttl: { seconds: '600', nanos: 0 }, requestId: '' }, cb));
    responses.push(JSON.stringify(created));
    return created.token;
  }
  async function csrFor(
    identity: string,
    extra: { uris?: string[]; dnsNames?: string[]; ips?: string[] } = {},
  ): Promise<{ csrPem: string; privateKeyPem: string }> {
    const keys = await generateKeyPair();
    let csrPem = createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity, dnsNames: extra.dnsNames ?? [] });
    if (extra.uris || extra.ips) {
      const forge = (await import('node-forge')).default;
      const csr = forge.pki.createCertificationRequest();
      csr.publicKey = forge.pki.publicKeyFromPem(keys.publicKeyPem);
      csr.setSubject([{ name: 'commonName', value: 'x' }]);
      const altNames = [
        ...[identity, ...(extra.uris ?? [])].map((value) => ({ type: 6, value })),
        ...(extra.dnsNames ?? []).map((value) => ({ type: 2, value })),
        ...(extra.ips ?? []).map((ip) => ({ type: 7, ip })),
      ];
      csr.setAttributes([{ name: 'extensionRequest', extensions: [{ name: 'subjectAltName', altNames }] }]);
      csr.sign(forge.pki.privateKeyFromPem(keys.privateKeyPem), forge.md.sha256.create());
      csrPem = forge.pki.certificationRequestToPem(csr);
    }
    return { csrPem, privateKeyPem: keys.privateKeyPem };
  }

  /** The CA's certificate records for one identity, as an admin lists them. */
  async function certificatesOf(identity: string): Promise<Array<{ name: string; state: Certificate_State; revocationReason: RevocationReason }>> {
    return (
      await call<{ certificates: Array<{ name: string; state: Certificate_State; revocationReason: RevocationReason }> }>((cb) =>
        admin.listCertificates({ pageSize: 1000, pageToken: '', filter: `identity = "${identity}"` }, cb),
      )
    ).certificates;
  }
  async function tokenState(name: string): Promise<JoinToken_State> {
    return (await call<{ state: JoinToken_State }>((cb) => admin.getJoinToken({ name }, cb))).state;
  }

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    natsUrl = nats.url;
    // The CA manages NATS users here, as in the local fleet: hosts get in only with the certificates it issued.
    ca = await startCertificateAuthorityProcess(resources, pki, nats);
    inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), natsUrl, { COWHERD_CA_ADDRESS: ca.address });
    admin = caClient({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem });
  });
  after(async () => {
    for (const client of closers) client.close();
    await resources.release();
  });

  it('enrolls an agent end to end: token -> CSR -> certificate -> its identity is accepted by inventory', async () => {
    const nats = await connectNats({ servers: [natsUrl], tls: await pki.files('service', 'cloning'), name: 'test', log });
    resources.defer(() => nats.close());
    const enrolled: string[] = [];
    const consumer = await consumeEvents(nats.jetstream, nats.manager, {
      durable: 'test-enrolled',
      types: [HOST_ENROLLED],
      log,
      handle: async (event) => void enrolled.push(event.payload.host),
    });
    resources.defer(() => consumer.stop());

    const credentialsDirectory = join(await resources.tempDir('cowherd-agent-'), 'credentials');
    const agent = await startServiceProcess(resources, 'agent', undefined, natsUrl, {
      COWHERD_HOST_ID: 'kvm-07',
      COWHERD_JOIN_TOKEN: await token('kvm-07'),
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: credentialsDirectory,
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_LIBVIRT_URI: 'test:///default',
      COWHERD_IMAGE_DIR: join(credentialsDirectory, '..', 'images'),
    });
    assert.ok(agent.logs.some((line) => line['msg'] === 'enrolled'));
    const certificatePem = await readFile(join(credentialsDirectory, 'cert.pem'), 'utf8');
    assert.equal(inspectCertificate(certificatePem).identity?.uri, 'spiffe://cowherd/host/kvm-07');
    assert.equal((await stat(join(credentialsDirectory, 'key.pem'))).mode & 0o777, 0o600);
    // Short-lived by default (24 h, plus the minute it is backdated by) and usable as TLS server and client.
    const x509 = new X509Certificate(certificatePem);
    const lifetimeSeconds = (Date.parse(x509.validTo) - Date.parse(x509.validFrom)) / 1000;
    assert.ok(lifetimeSeconds >= 86_400 && lifetimeSeconds <= 86_400 + 120, `host certificate lasts ${lifetimeSeconds} s`);
    assert.deepEqual([...(x509.keyUsage ?? [])].sort(), ['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2'], 'extended key usage: serverAuth and clientAuth');

    const host = inventoryClient({
      certificatePem,
      privateKeyPem: await readFile(join(credentialsDirectory, 'key.pem'), 'utf8'),
      caPem: pki.ca.certificatePem,
    });
    // Authenticated and authorized for its own host: the agent registered itself with this identity.
    const deadlineRegistered = Date.now() + 10_000;
    let own: { name: string } | undefined;
    while (!own && Date.now() < deadlineRegistered)
      own = await call<{ name: string }>((cb) => host.getHost({ name: 'hosts/kvm-07' }, cb)).catch(() => undefined);
    assert.equal(own?.name, 'hosts/kvm-07');
    const other = await failure((cb) => host.getHost({ name: 'hosts/kvm-08' }, cb));
    assert.equal(other.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(other.reason, 'ERROR_REASON_HOST_MISMATCH');
    const deadline = Date.now() + 10_000;
    while (!enrolled.includes('hosts/kvm-07') && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(enrolled, ['hosts/kvm-07'], 'host.enrolled published once');

    // A restart keeps the identity: no token needed, same key.
    await agent.daemon.stop();
    const again = await startServiceProcess(resources, 'agent', undefined, natsUrl, {
      COWHERD_HOST_ID: 'kvm-07',
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: credentialsDirectory,
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_LIBVIRT_URI: 'test:///default',
      COWHERD_IMAGE_DIR: join(credentialsDirectory, '..', 'images'),
    });
    assert.ok(!again.logs.some((line) => line['msg'] === 'enrolled'));
    assert.equal(await readFile(join(credentialsDirectory, 'cert.pem'), 'utf8'), certificatePem);
  });

  it('refuses reused, expired, forged and CA-mismatched tokens, and bad CSRs, leaving the token as it was', async () => {
    const enroll = caClient(undefined, ca.enrollAddress);
    const good = await csrFor('spiffe://cowherd/host/kvm-20', { dnsNames: ['kvm-20'] });

    // A CSR for another host, one with an extra (admin) URI SAN, a malformed one: refused, token stays PENDING.
    const tokenString = await token('kvm-20');
    const tokenName = JOIN_TOKEN_NAME.format({ joinToken: tokenString.split('.')[1] });
    const empty = await failure((cb) => enroll.enrollHost({ token: tokenString, csrPem: '' }, cb));
    assert.equal(empty.code, GrpcStatus.INVALID_ARGUMENT, 'an empty CSR is INVALID_ARGUMENT');
    const wrongHost = await failure(async (cb) => enroll.enrollHost({ token: tokenString, csrPem: (await csrFor('spiffe://cowherd/host/kvm-21')).csrPem }, cb));
    assert.equal(wrongHost.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(wrongHost.reason, 'ERROR_REASON_CSR_IDENTITY_MISMATCH');
    const extraSan = await failure(async (cb) =>
      enroll.enrollHost({ token: tokenString, csrPem: (await csrFor('spiffe://cowherd/host/kvm-20', { uris: ['spiffe://cowherd/admin/root'] })).csrPem }, cb),
    );
    assert.equal(extraSan.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(extraSan.reason, 'ERROR_REASON_CSR_IDENTITY_MISMATCH');
    const serviceIdentity = await failure(async (cb) =>
      enroll.enrollHost({ token: tokenString, csrPem: (await csrFor('spiffe://cowherd/service/inventory')).csrPem }, cb),
    );
    assert.equal(serviceIdentity.code, GrpcStatus.PERMISSION_DENIED);
    // The right URI SAN with a service's DNS name besides the host's, or with an IP SAN: refused.
    const serviceDnsName = await failure(async (cb) =>
      enroll.enrollHost({ token: tokenString, csrPem: (await csrFor('spiffe://cowherd/host/kvm-20', { dnsNames: ['kvm-20', 'inventory'] })).csrPem }, cb),
    );
    assert.equal(serviceDnsName.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(serviceDnsName.reason, 'ERROR_REASON_CSR_IDENTITY_MISMATCH');
    assert.match(serviceDnsName.message, /inventory/);
    const ipSan = await failure(async (cb) =>
      enroll.enrollHost(
        { token: tokenString, csrPem: (await csrFor('spiffe://cowherd/host/kvm-20', { dnsNames: ['kvm-20'], ips: ['127.0.0.1'] })).csrPem },
        cb,
      ),
    );
    assert.equal(ipSan.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(ipSan.reason, 'ERROR_REASON_CSR_IDENTITY_MISMATCH');
    const malformed = await failure((cb) =>
      enroll.enrollHost({ token: tokenString, csrPem: '-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n' }, cb),
    );
    assert.equal(malformed.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(malformed.reason, 'ERROR_REASON_CSR_INVALID');
    const caMismatch = await failure((cb) =>
      enroll.enrollHost({ token: tokenString.replace(/\.[0-9a-f]{64}$/, `.${'0'.repeat(64)}`), csrPem: good.csrPem }, cb),
    );
    assert.equal(caMismatch.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(caMismatch.reason, 'ERROR_REASON_JOIN_TOKEN_CA_MISMATCH');
    assert.equal(await tokenState(tokenName), JoinToken_State.STATE_PENDING, 'nothing changed');
    assert.equal((await certificatesOf('spiffe://cowherd/host/kvm-20')).length, 0, 'no certificate was issued by the refused calls');

    // Now it works once, and never again.
    const enrolled = await call<{ certificate?: { certificatePem: string } }>((cb) => enroll.enrollHost({ token: tokenString, csrPem: good.csrPem }, cb));
    assert.equal(inspectCertificate(enrolled.certificate!.certificatePem).identity?.uri, 'spiffe://cowherd/host/kvm-20');
    const issuedOnce = await certificatesOf('spiffe://cowherd/host/kvm-20');
    assert.equal(issuedOnce.length, 1);
    const reused = await failure(async (cb) =>
      enroll.enrollHost({ token: tokenString, csrPem: (await csrFor('spiffe://cowherd/host/kvm-20', { dnsNames: ['kvm-20'] })).csrPem }, cb),
    );
    assert.equal(reused.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(reused.reason, 'ERROR_REASON_JOIN_TOKEN_INVALID');
    assert.deepEqual(await certificatesOf('spiffe://cowherd/host/kvm-20'), issuedOnce, 'the reused token issued nothing and revoked nothing');

    // Forged: the id of a token that is still PENDING, with a secret of the right shape that is not its own.
    const pending = await token('kvm-23');
    const pendingName = JOIN_TOKEN_NAME.format({ joinToken: pending.split('.')[1] });
    const [version, id, , pin] = pending.split('.');
    const forgedSecret = [version, id, 'A'.repeat(43), pin].join('.');
    assert.notEqual(forgedSecret, pending);
    const forged = await failure(async (cb) =>
      enroll.enrollHost({ token: forgedSecret, csrPem: (await csrFor('spiffe://cowherd/host/kvm-23', { dnsNames: ['kvm-23'] })).csrPem }, cb),
    );
    assert.equal(forged.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(forged.reason, 'ERROR_REASON_JOIN_TOKEN_INVALID');
    assert.equal(await tokenState(pendingName), JoinToken_State.STATE_PENDING, 'the forged attempt did not touch the real token');
    assert.equal((await certificatesOf('spiffe://cowherd/host/kvm-23')).length, 0, 'nor issue anything');
    assert.equal((await failure((cb) => enroll.enrollHost({ token: 'not-a-token', csrPem: good.csrPem }, cb))).code, GrpcStatus.UNAUTHENTICATED);

    // Expired: move a fresh token's expiry into the past in the CA's records.
    const expiring = await token('kvm-22');
    const nats = await connectNats({ servers: [natsUrl], tls: await pki.files('service', 'certificate-authority'), name: 'test', log });
    resources.defer(() => nats.close());
    const tokens = await KvStore.open(nats.jetstream, 'ca', jsonCodec<{ expireTime: string }>());
    await tokens.mutate(`token.${expiring.split('.')[1]}`, (current) => current && { ...current, expireTime: new Date(Date.now() - 1000).toISOString() });
    const expired = await failure(async (cb) => enroll.enrollHost({ token: expiring, csrPem: (await csrFor('spiffe://cowherd/host/kvm-22')).csrPem }, cb));
    assert.equal(expired.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(expired.reason, 'ERROR_REASON_JOIN_TOKEN_INVALID');
    assert.equal(await tokenState(JOIN_TOKEN_NAME.format({ joinToken: expiring.split('.')[1] })), JoinToken_State.STATE_EXPIRED);
    assert.equal((await certificatesOf('spiffe://cowherd/host/kvm-22')).length, 0, 'the expired token issued nothing');
  });

  it('makes the agent refuse a CA that is not the one its token pins, before it sends anything', async () => {
    const real = await token('kvm-25');
    const name = JOIN_TOKEN_NAME.format({ joinToken: real.split('.')[1] });
    const credentialsDirectory = join(await resources.tempDir('cowherd-agent-'), 'credentials');
    const pinnedToZeros = real.replace(/\.[0-9a-f]{64}$/, `.${'0'.repeat(64)}`);
    await assert.rejects(
      ensureEnrolled({
        credentialsDirectory,
        host: 'kvm-25',
        joinToken: pinnedToZeros,
        enrollAddress: ca.enrollAddress,
        dnsNames: ['kvm-25', 'localhost'],
        log,
      }),
      (error: unknown) =>
        error instanceof CowherdError && error.code === GrpcStatus.FAILED_PRECONDITION && error.reason === ErrorReason.ERROR_REASON_JOIN_TOKEN_CA_MISMATCH,
    );
    assert.ok(!existsSync(credentialsDirectory) || (await readdir(credentialsDirectory)).length === 0, 'no key, certificate or CA written');
    assert.equal(await tokenState(name), JoinToken_State.STATE_PENDING, 'the token was never presented');
    assert.equal((await certificatesOf('spiffe://cowherd/host/kvm-25')).length, 0);
  });

  it('refuses a host renewing for another host or with names it does not hold', async () => {
    const holder = await pki.credentials('host', 'kvm-32');
    const client = caClient({ ...holder, caPem: pki.ca.certificatePem });
    const otherHost = await failure(async (cb) =>
      client.renewCertificate({ csrPem: (await csrFor('spiffe://cowherd/host/kvm-33', { dnsNames: ['localhost'] })).csrPem }, cb),
    );
    assert.equal(otherHost.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(otherHost.reason, 'ERROR_REASON_CSR_IDENTITY_MISMATCH');
    const serviceName = await failure(async (cb) =>
      client.renewCertificate({ csrPem: (await csrFor('spiffe://cowherd/host/kvm-32', { dnsNames: ['localhost', 'inventory'] })).csrPem }, cb),
    );
    assert.equal(serviceName.code, GrpcStatus.PERMISSION_DENIED);
    assert.equal(serviceName.reason, 'ERROR_REASON_CSR_IDENTITY_MISMATCH');
    assert.equal((await certificatesOf('spiffe://cowherd/host/kvm-33')).length, 0, 'nothing issued for the other host');
    // The caller's own certificate is recorded (the test PKI's are bootstrap certificates); nothing else is.
    const held = CERTIFICATE_NAME.format({ certificate: inspectCertificate(holder.certificatePem).serialNumber });
    assert.deepEqual(
      (await certificatesOf('spiffe://cowherd/host/kvm-32')).map((certificate) => certificate.name),
      [held],
      'nor for the caller',
    );
    // Its own identity and names: renewed.
    const renewed = await call<{ certificate?: { certificatePem: string } }>(async (cb) =>
      client.renewCertificate({ csrPem: (await csrFor('spiffe://cowherd/host/kvm-32', { dnsNames: ['localhost'] })).csrPem }, cb),
    );
    assert.equal(inspectCertificate(renewed.certificate!.certificatePem).identity?.uri, 'spiffe://cowherd/host/kvm-32');
  });

  it('refuses join tokens for host names reserved for services, NATS and localhost, naming the field', async () => {
    for (const host of ['certificate-authority', 'inventory', 'distribution', 'cloning', 'agent', 'nats', 'nats-0', 'nats-headless', 'localhost', 'cowherd']) {
      const refused = await failure((cb) => admin.createJoinToken({ host, ttl: undefined, requestId: '' }, cb));
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, host);
      assert.deepEqual(refused.fields, ['host'], host);
      const tokens = await call<{ joinTokens: unknown[] }>((cb) => admin.listJoinTokens({ pageSize: 1000, pageToken: '', filter: `host = "${host}"` }, cb));
      assert.equal(tokens.joinTokens.length, 0, `no token for ${host}`);
    }
  });

  it('re-enrolls a reinstalled host with a new token and revokes the certificate it held (SUPERSEDED)', async () => {
    const enroll = caClient(undefined, ca.enrollAddress);
    const first = await csrFor('spiffe://cowherd/host/kvm-50', { dnsNames: ['kvm-50'] });
    const old = await call<{ certificate?: { name: string; certificatePem: string } }>(async (cb) =>
      enroll.enrollHost({ token: await token('kvm-50'), csrPem: first.csrPem }, cb),
    );
    const oldClient = caClient({ certificatePem: old.certificate!.certificatePem, privateKeyPem: first.privateKeyPem, caPem: pki.ca.certificatePem });
    await call((cb) => oldClient.getRevocationList({}, cb));

    // The machine is reinstalled: its key is gone. An admin may make a token for a host that holds live certificates.
    const second = await csrFor('spiffe://cowherd/host/kvm-50', { dnsNames: ['kvm-50'] });
    const fresh = await call<{ certificate?: { name: string; certificatePem: string } }>(async (cb) =>
      enroll.enrollHost({ token: await token('kvm-50'), csrPem: second.csrPem }, cb),
    );
    const states = new Map((await certificatesOf('spiffe://cowherd/host/kvm-50')).map((certificate) => [certificate.name, certificate]));
    assert.equal(states.size, 2);
    assert.equal(states.get(fresh.certificate!.name)?.state, Certificate_State.STATE_ACTIVE);
    assert.equal(states.get(old.certificate!.name)?.state, Certificate_State.STATE_REVOKED);
    assert.equal(states.get(old.certificate!.name)?.revocationReason, RevocationReason.REVOCATION_REASON_SUPERSEDED);
    const refused = await failure((cb) => oldClient.getRevocationList({}, cb));
    assert.equal(refused.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(refused.reason, 'ERROR_REASON_CERTIFICATE_REVOKED');
    const freshClient = caClient({ certificatePem: fresh.certificate!.certificatePem, privateKeyPem: second.privateKeyPem, caPem: pki.ca.certificatePem });
    await call((cb) => freshClient.getRevocationList({}, cb));
  });

  it('exposes only GetCaBundle and EnrollHost on the enrollment port', async () => {
    const enroll = caClient(undefined, ca.enrollAddress);
    const bundle = await call<{ caCertificatePem: string }>((cb) => enroll.getCaBundle({}, cb));
    assert.equal(bundle.caCertificatePem, pki.ca.certificatePem);
    const denied = await failure((cb) => enroll.createJoinToken({ host: 'kvm-30', ttl: undefined, requestId: '' }, cb));
    assert.equal(denied.code, GrpcStatus.PERMISSION_DENIED);
    const list = await failure((cb) => enroll.listCertificates({ pageSize: 0, pageToken: '', filter: '' }, cb));
    assert.equal(list.code, GrpcStatus.PERMISSION_DENIED);
  });

  it('refuses no certificate, another CA, an expired certificate, and a host calling admin RPCs', async () => {
    const noCertificate = await failure((cb) => caClient(undefined).createJoinToken({ host: 'kvm-31', ttl: undefined, requestId: '' }, cb));
    assert.equal(noCertificate.code, GrpcStatus.UNAVAILABLE);
    const otherPki = await TestPki.create(await resources.tempDir(), 'other CA');
    const foreign = await failure(async (cb) =>
      caClient({ ...(await otherPki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem }).createJoinToken(
        { host: 'kvm-31', ttl: undefined, requestId: '' },
        cb,
      ),
    );
    assert.equal(foreign.code, GrpcStatus.UNAVAILABLE);
    const expiredCredentials = await pki.credentials('admin', 'alice', { notBefore: new Date(Date.now() - 7200_000), ttlSeconds: 60 });
    const expired = await failure((cb) =>
      caClient({ ...expiredCredentials, caPem: pki.ca.certificatePem }).createJoinToken({ host: 'kvm-31', ttl: undefined, requestId: '' }, cb),
    );
    assert.equal(expired.code, GrpcStatus.UNAVAILABLE);
    const hostClient = caClient({ ...(await pki.credentials('host', 'kvm-31')), caPem: pki.ca.certificatePem });
    type Attempt = (callback: (error: import('@grpc/grpc-js').ServiceError | null, response: unknown) => void) => void;
    for (const attempt of [
      (cb: never) => hostClient.createJoinToken({ host: 'kvm-31', ttl: undefined, requestId: '' }, cb),
      (cb: never) => hostClient.issueCertificate({ csrPem: '', identity: 'spiffe://cowherd/admin/root', dnsNames: [], ttl: undefined, requestId: '' }, cb),
      (cb: never) => hostClient.revokeCertificate({ name: 'certificates/1', reason: 0 }, cb),
      (cb: never) => hostClient.listCertificates({ pageSize: 0, pageToken: '', filter: '' }, cb),
    ] as unknown as Attempt[]) {
      assert.equal((await failure(attempt)).code, GrpcStatus.PERMISSION_DENIED);
    }
    const tokens = await call<{ joinTokens: Array<{ host: string }> }>((cb) =>
      admin.listJoinTokens({ pageSize: 1000, pageToken: '', filter: 'host = "kvm-31"' }, cb),
    );
    assert.equal(tokens.joinTokens.length, 0, 'nothing was created');
    // Filter values a token or certificate cannot have are refused, naming the value and what is allowed.
    for (const [list, message] of [
      [
        (cb: never) => admin.listJoinTokens({ pageSize: 0, pageToken: '', filter: 'state = USED_UP' }, cb),
        /"USED_UP" is not a value of state; allowed: PENDING, USED, EXPIRED, REVOKED/,
      ],
      [
        (cb: never) => admin.listJoinTokens({ pageSize: 0, pageToken: '', filter: 'host = "hosts/kvm-31"' }, cb),
        /host value "hosts\/kvm-31" is not of the form \{host\}/,
      ],
      [
        (cb: never) => admin.listCertificates({ pageSize: 0, pageToken: '', filter: 'state = VALID' }, cb),
        /"VALID" is not a value of state; allowed: ACTIVE, REVOKED, EXPIRED/,
      ],
      [
        (cb: never) => admin.listCertificates({ pageSize: 0, pageToken: '', filter: 'identity = "admin/bob"' }, cb),
        /identity value "admin\/bob" is not a cowherd identity/,
      ],
    ] as unknown as Array<[Attempt, RegExp]>) {
      const refused = await failure(list);
      assert.deepEqual([refused.code, refused.fields], [GrpcStatus.INVALID_ARGUMENT, ['filter']]);
      assert.match(refused.message, message);
    }
  });

  it('revokes a certificate: every server refuses it within the stated bound', async () => {
    const keys = await csrFor('spiffe://cowherd/admin/bob');
    const issued = await call<{ name: string; certificatePem: string }>((cb) =>
      admin.issueCertificate(
        { csrPem: keys.csrPem, identity: 'spiffe://cowherd/admin/bob', dnsNames: [], ttl: { seconds: '3600', nanos: 0 }, requestId: '' },
        cb,
      ),
    );
    const bob = { certificatePem: issued.certificatePem, privateKeyPem: keys.privateKeyPem, caPem: pki.ca.certificatePem };
    const bobInventory = inventoryClient(bob);
    await call((cb) => bobInventory.listHosts({ pageSize: 0, pageToken: '', filter: '' }, cb)); // accepted before revocation
    const started = Date.now();
    const revoked = await call<{ state: Certificate_State }>((cb) =>
      admin.revokeCertificate({ name: issued.name, reason: RevocationReason.REVOCATION_REASON_KEY_COMPROMISE }, cb),
    );
    assert.equal(revoked.state, Certificate_State.STATE_REVOKED);
    // The CA itself refuses at once.
    const bobAtCa = caClient(bob);
    const atCa = await failure((cb) => bobAtCa.getRevocationList({}, cb));
    assert.equal(atCa.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(atCa.reason, 'ERROR_REASON_CERTIFICATE_REVOKED');
    // A revoked admin certificate creates nothing.
    const mutating = await failure((cb) => bobAtCa.createJoinToken({ host: 'kvm-bob', ttl: undefined, requestId: '' }, cb));
    assert.equal(mutating.code, GrpcStatus.UNAUTHENTICATED);
    assert.equal(mutating.reason, 'ERROR_REASON_CERTIFICATE_REVOKED');
    const bobTokens = await call<{ joinTokens: unknown[] }>((cb) => admin.listJoinTokens({ pageSize: 1000, pageToken: '', filter: 'host = "kvm-bob"' }, cb));
    assert.equal(bobTokens.joinTokens.length, 0, 'nothing was created');
    // Inventory follows the CA's list (event-driven, 30 s at worst).
    let code: GrpcStatus = GrpcStatus.OK;
    while (code !== GrpcStatus.UNAUTHENTICATED && Date.now() - started < 35_000) {
      code = await call((cb) => bobInventory.listHosts({ pageSize: 0, pageToken: '', filter: '' }, cb)).then(
        () => GrpcStatus.OK,
        (error: { code: GrpcStatus }) => error.code,
      );
      if (code !== GrpcStatus.UNAUTHENTICATED) await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(code, GrpcStatus.UNAUTHENTICATED);
    assert.ok(Date.now() - started < 30_000, `refused after ${Date.now() - started} ms`);
    const list = await call<{ serialNumbers: string[] }>((cb) => admin.getRevocationList({}, cb));
    assert.ok(list.serialNumbers.includes(inspectCertificate(issued.certificatePem).serialNumber));
  });

  it('admits an enrolled host to NATS for its own subjects only, and refuses it there once revoked', async () => {
    const enroll = caClient(undefined, ca.enrollAddress);
    const request = await csrFor('spiffe://cowherd/host/kvm-40', { dnsNames: ['kvm-40'] });
    const enrolled = await call<{ certificate?: { name: string; certificatePem: string } }>(async (cb) =>
      enroll.enrollHost({ token: await token('kvm-40'), csrPem: request.csrPem }, cb),
    );
    const directory = await resources.tempDir('cowherd-host-');
    const { writeCredentials } = await import('../../services/common/platform/credential-files.js');
    const files = await writeCredentials(directory, {
      certificatePem: enrolled.certificate!.certificatePem,
      privateKeyPem: request.privateKeyPem,
      caPem: pki.ca.certificatePem,
    });
    const host = await connectNats({ servers: [natsUrl], tls: files, name: 'kvm-40', log, connectTimeoutMs: 5_000 });
    const { JetStreamEventPublisher } = await import('../../services/common/platform/events.js');
    const { IMAGE_AVAILABLE } = await import('../../services/common/domain/event-types.js');
    const publisher = new JetStreamEventPublisher(host.jetstream, log);
    const payload = {
      image: 'images/x',
      host: 'hosts/kvm-40',
      replica: 'hosts/kvm-40/images/x',
      totalBytes: '1',
      files: [],
      origin: false,
      transferDuration: undefined,
      operation: '',
      occurTime: undefined,
      generation: '1',
    };
    await publisher.publish(IMAGE_AVAILABLE, payload, { host: 'kvm-40', id: 'test/kvm-40' });
    await assert.rejects(publisher.publish(IMAGE_AVAILABLE, payload, { host: 'kvm-41', id: 'test/kvm-41' }), "another host's subject is refused");
    await host.close().catch(() => undefined);

    const started = Date.now();
    await call((cb) => admin.revokeCertificate({ name: enrolled.certificate!.name, reason: RevocationReason.REVOCATION_REASON_KEY_COMPROMISE }, cb));
    await assert.rejects(
      connectNats({ servers: [natsUrl], tls: files, name: 'kvm-40', log, connectTimeoutMs: 3_000 }),
      /Authorization|Permissions|timeout|TIMEOUT/i,
    );
    assert.ok(Date.now() - started < 5_000);
  });

  it('renews a short-lived service certificate by itself at two thirds of its life, without a restart', async () => {
    const files = await pki.files('service', 'distribution', { ttlSeconds: 9, subdirectory: 'short-lived' });
    const first = inspectCertificate(await readFile(files.certificateFile, 'utf8')).serialNumber;
    const distribution = await startServiceProcess(resources, 'distribution', files, natsUrl, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_TLS_REFRESH_SECONDS: '1',
    });
    const deadline = Date.now() + 30_000;
    let current = first;
    while (current === first && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 250));
      current = inspectCertificate(await readFile(files.certificateFile, 'utf8')).serialNumber;
    }
    assert.notEqual(current, first, 'the certificate file was renewed');
    // The log line follows the file write and comes through the child's stdout: wait for it, do not race it.
    await waitFor('the renewal in the log', async () => (distribution.logs.some((line) => line['msg'] === 'certificate renewed') ? true : undefined), 5_000);
    // Past the first certificate's expiry the process still serves, with the renewed one.
    const { check } = await import('../../services/launcher/health-check.js');
    await new Promise((resolve) => setTimeout(resolve, 10_000));
    const adminCredentials = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem });
    assert.equal(await check(distribution.address, adminCredentials), 'SERVING');
  });

  it('makes its own CA on the first start: RSA of at least 3072 bits, key file 0600, never logged', async () => {
    // Its own NATS, so that this second CA's records stay apart from the fleet above.
    const nats = await startTestNats(resources, pki);
    const fresh = await startCertificateAuthorityProcess(resources, pki, nats, { createCa: true });
    assert.ok(fresh.logs.some((line) => line['msg'] === 'creating the CA (first start)'));
    assert.equal((await stat(fresh.caKeyFile)).mode & 0o777, 0o600);
    const keyPem = await readFile(fresh.caKeyFile, 'utf8');
    const details = createPrivateKey(keyPem).asymmetricKeyDetails;
    assert.equal(createPrivateKey(keyPem).asymmetricKeyType, 'rsa');
    assert.ok((details?.modulusLength ?? 0) >= 3072, `CA key has ${details?.modulusLength} bits`);
    const certificatePem = await readFile(fresh.caCertificateFile, 'utf8');
    assert.ok(new X509Certificate(certificatePem).ca, 'a CA certificate');
    assert.ok(new X509Certificate(certificatePem).checkPrivateKey(createPrivateKey(keyPem)));
    // The CA it serves is the one it made (the enrollment port's own TLS certificate is the test PKI's).
    const bundle = await call<{ caCertificatePem: string }>((cb) => caClient(undefined, fresh.enrollAddress).getCaBundle({}, cb));
    assert.equal(bundle.caCertificatePem, certificatePem);
    assert.doesNotMatch(fresh.daemon.output(), /PRIVATE KEY/);
    const body = keyPem
      .split('\n')
      .filter((line) => !line.startsWith('-----'))
      .join('');
    assert.ok(
      !fresh.daemon
        .output()
        .replace(/\\n|\s/g, '')
        .includes(body.slice(100, 164)),
    );
  });

  it('never shows the CA private key in any log line or response', async () => {
    const key = (await readFile(ca.caKeyFile, 'utf8')).trim();
    const body = key
      .split('\n')
      .filter((line) => !line.startsWith('-----'))
      .join('');
    const chunks = [body.slice(0, 64), body.slice(200, 264), body.slice(-64)];
    const texts = [ca.daemon.output(), inventory.daemon.output(), ...responses, JSON.stringify(await call((cb) => admin.getCaBundle({}, cb)))];
    for (const text of texts) {
      assert.doesNotMatch(text, /PRIVATE KEY/);
      for (const chunk of chunks) assert.ok(!text.replace(/\\n|\s/g, '').includes(chunk), 'a piece of the CA key appears');
    }
  });
});
