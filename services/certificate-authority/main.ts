/** The certificate-authority process: wiring only. */
import { readFile } from 'node:fs/promises';
import { Server } from '@grpc/grpc-js';
import { CertificateAuthorityServiceService } from '../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { addressVariable, integerVariable, optionalStringVariable, pathVariable } from '../common/platform/config.js';
import { parseIdentity, type Identity } from '../common/platform/identity.js';
import type { Logger } from '../common/platform/logger.js';
import { PageTokens } from '../common/platform/pagination.js';
import { inspectCertificate } from '../common/platform/pki.js';
import { followIssuedSerials, followRevocations, IssuedSerials, RevocationSet } from '../common/platform/revocation.js';
import { adaptService } from '../common/platform/rpc.js';
import { bind, shutdown } from '../common/platform/server.js';
import { runServiceMain } from '../common/platform/service-process.js';
import { serverOnlyTlsCredentials } from '../common/platform/tls.js';
import { CERTIFICATE_AUTHORITY_POLICY, ENROLLMENT_POLICY } from './access-policy.js';
import { loadOrCreateCertificateAuthority } from '../common/domain/ca-files.js';
import { CertificateAuthority, DEFAULT_CA_POLICY, type CertificateListener } from './certificate-authority.js';
import { RevocationReason } from '../gen/cowherd/certauthority/v1/resources.js';
import { HOST_DELETED } from '../common/domain/event-types.js';
import { consumeEvents } from '../common/platform/events.js';
import { bootstrapCertificates } from './bootstrap-certificates.js';
import { certificateAuthorityHandlers } from './handlers.js';
import { allListeners, eventingListener } from './listener.js';
import { certificateState, natsUsers, openCaRecords, type CertificateRecord, type NatsUsers } from '../common/domain/ca-records.js';
import { CERTIFICATE_NAME } from '../common/domain/resource-names.js';

await runServiceMain({
  name: 'certificate-authority',
  variables: {
    caKeyFile: pathVariable('COWHERD_CA_KEY_FILE', 'the CA private key (0600); created with the certificate on the first start'),
    caCertificateFile: pathVariable('COWHERD_CA_CERT_FILE', 'the CA certificate; created with the key on the first start'),
    enrollAddress: addressVariable('COWHERD_ENROLL_ADDRESS', 'host:port of the enrollment port (server TLS only: GetCaBundle and EnrollHost)', '0.0.0.0:7441'),
    hostCertificateHours: integerVariable('COWHERD_HOST_CERTIFICATE_HOURS', 'lifetime of host certificates issued at enrollment', 24, 1, 24 * 30),
    natsAuthorizationFile: optionalStringVariable(
      'COWHERD_NATS_AUTHORIZATION_FILE',
      'the authorization file nats-server includes; when set, the CA keeps one NATS user per active certificate in it',
    ),
    natsPidFile: optionalStringVariable(
      'COWHERD_NATS_PID_FILE',
      'nats-server pid file, to reload it after the users changed (with COWHERD_NATS_AUTHORIZATION_FILE)',
    ),
    natsStaticIdentities: optionalStringVariable(
      'COWHERD_NATS_STATIC_IDENTITIES',
      'comma-separated SPIFFE URIs admitted to NATS by identity, whatever the serial (bootstrap services)',
    ),
    bootstrapCertificatesFile: optionalStringVariable(
      'COWHERD_CA_BOOTSTRAP_CERTIFICATES',
      'PEM bundle of certificates signed with the CA key before this service ran (seeds, bootstrap admin); recorded as issued at start and whenever the file changes',
    ),
  },
  env: process.env,
  build: async ({ config, boundary, nats, events, log, tls }) => {
    const key = await loadOrCreateCertificateAuthority(config.caKeyFile, config.caCertificateFile, () =>
      log.info({ certificateFile: config.caCertificateFile }, 'creating the CA (first start)'),
    );
    const records = await openCaRecords(nats.jetstream);
    const listCertificates = async () => (await records.certificates.list('certificate.*')).map((entry) => entry.value);
    const syncNats = natsUsersFromConfig(config, listCertificates, log);
    // The CA's own servers refuse a revoked certificate from the moment RevokeCertificate returns.
    const revocations = new RevocationSet();
    // And admit what they issue from the moment it is recorded: an agent that just enrolled calls at once.
    const issued = new IssuedSerials();
    const ownRevocations: CertificateListener = {
      issued: async (record) => issued.add(record.serialNumber),
      revoked: async (record) => revocations.add(record.serialNumber),
    };
    const listener = allListeners(ownRevocations, ...(syncNats ? [syncNats] : []), eventingListener(events));
    const ca = new CertificateAuthority(key, records, listener, log, { ...DEFAULT_CA_POLICY, hostCertificateSeconds: config.hostCertificateHours * 3600 });
    await syncNats?.sync();
    const natsTimer = syncNats ? setInterval(() => void syncNats.sync().catch(() => undefined), 30_000) : undefined;
    const bootstrap = bootstrapCertificates({ file: config.bootstrapCertificatesFile, record: (pem) => ca.recordBootstrapCertificate(pem), log });
    // The CA service's own certificate may be a bootstrap one too (signed before it ran); a renewed one is recorded already.
    await ca
      .recordBootstrapCertificate(await readFile(tls.certificateFile, 'utf8'))
      .catch((error: unknown) => log.warn({ err: error }, 'could not record the CA service certificate'));
    const handlers = certificateAuthorityHandlers(ca, await PageTokens.open(nats.jetstream), () => bootstrap.importChanges());

    // Revocations come straight from the CA's own records, refreshed at once after a revoke by any replica.
    const stopFollowing = await followRevocations({
      set: revocations,
      log,
      nats: nats.connection,
      intervalMs: 5_000,
      fetch: async () => (await ca.revocationList()).serialNumbers,
    });
    // Issued serials likewise, bootstrap certificates read first; a miss looks again (at most once a second).
    const stopFollowingIssued = await followIssuedSerials({
      set: issued,
      log,
      intervalMs: 5_000,
      fetch: async () => {
        await bootstrap.importChanges();
        return ca.issuedSerialList();
      },
    });

    // A host deleted from the inventory loses its certificates (it re-joins only with a new token).
    const self = parseIdentity('spiffe://cowherd/service/certificate-authority')!;
    const hostDeletions = await consumeEvents(nats.jetstream, nats.manager, {
      durable: 'certificate-authority-host-deleted',
      types: [HOST_DELETED],
      log,
      handle: async (event) => {
        const identity = `spiffe://cowherd/host/${event.host}`;
        // Only what was issued before the deletion: a host.deleted delivered again (stored twice after an
        // outage longer than the stream's duplicate window) must not revoke the host's certificates from a
        // later re-join.
        const deletedAt = event.payload.occurTime?.getTime() ?? Number.POSITIVE_INFINITY;
        for (const record of await ca.listCertificates()) {
          if (record.identity === identity && certificateState(record) === 'ACTIVE' && Date.parse(record.issueTime) <= deletedAt)
            await ca.revoke(CERTIFICATE_NAME.format({ certificate: record.serialNumber }), RevocationReason.REVOCATION_REASON_CESSATION_OF_OPERATION, self);
        }
      },
    });

    // The enrollment port: server-auth TLS only, and only the two RPCs a host without a certificate needs.
    const enrollment = new Server();
    const enrollmentService = adaptService(
      CertificateAuthorityServiceService,
      { getCaBundle: handlers.getCaBundle, enrollHost: handlers.enrollHost },
      ENROLLMENT_POLICY,
      boundary,
    );
    enrollment.addService(enrollmentService.definition, enrollmentService.implementation);
    const enrollPort = await bind(enrollment, config.enrollAddress, serverOnlyTlsCredentials(tls, config.tlsRefreshSeconds * 1000));
    log.info({ enrollPort, caSha256: ca.caSha256 }, 'enrollment port open');

    return {
      services: [adaptService(CertificateAuthorityServiceService, handlers, CERTIFICATE_AUTHORITY_POLICY, boundary)],
      revocations,
      issued,
      renew: async (csrPem) => {
        // The CA signs its own renewal in-process, for the identity its current certificate proves.
        const current = inspectCertificate(await readFile(tls.certificateFile, 'utf8'));
        if (!current.identity) throw new Error(`${tls.certificateFile} names no cowherd identity`);
        const record = await ca.renew(current.identity, current, csrPem);
        return { certificatePem: record.certificatePem, caPem: ca.caCertificatePem };
      },
      stop: async () => {
        stopFollowing();
        stopFollowingIssued();
        await hostDeletions.stop();
        clearInterval(natsTimer);
        await shutdown(enrollment, config.shutdownGraceSeconds * 1000);
      },
    };
  },
});

/** The NATS users sync when the CA is told where NATS's authorization file is; undefined otherwise. */
function natsUsersFromConfig(
  config: { natsAuthorizationFile: string | undefined; natsPidFile: string | undefined; natsStaticIdentities: string | undefined },
  listCertificates: () => Promise<CertificateRecord[]>,
  log: Logger,
): NatsUsers | undefined {
  if (config.natsAuthorizationFile === undefined) return undefined;
  if (config.natsPidFile === undefined) throw new Error('COWHERD_NATS_PID_FILE is required with COWHERD_NATS_AUTHORIZATION_FILE');
  const staticIdentities: Identity[] = (config.natsStaticIdentities ?? '')
    .split(',')
    .filter((uri) => uri.trim() !== '')
    .map((uri) => {
      const identity = parseIdentity(uri.trim());
      if (!identity) throw new Error(`COWHERD_NATS_STATIC_IDENTITIES: ${JSON.stringify(uri)} is not a cowherd identity`);
      return identity;
    });
  return natsUsers({ authorizationFile: config.natsAuthorizationFile, pidFile: config.natsPidFile, staticIdentities, listCertificates, log });
}
