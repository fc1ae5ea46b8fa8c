/**
 * The sidecar of every NATS pod in Kubernetes (`node --import tsx deploy/nats/nats-sidecar.ts`), for what
 * the local fleet does inside one machine:
 *
 * 1. NATS users. On one machine the certificate-authority service rewrites nats-server's authorization
 *    file and reloads it by pid. In Kubernetes NATS runs in other pods, so each NATS pod carries this
 *    sidecar, which shares the pod's process namespace (for the reload signal) and an emptyDir holding
 *    the authorization file. It reads the CA's certificate records from the `ca` KV bucket, writes one
 *    NATS user per ACTIVE certificate with the permissions of its kind (services/common/domain/
 *    ca-records.ts, the code the CA itself runs), plus the static identities, and reloads nats-server:
 *    at start, on every change of a `certificate.*` record (issue, renewal, revocation by any CA
 *    replica: a revoked certificate is refused within about a second), and every 30 s (expiries). It
 *    holds no CA key: only the NATS server's own certificate.
 * 2. The NATS server certificate. The seed from the Secret is renewed at two thirds of its life through
 *    the CA's RenewCertificate (like every service), written over the live copy, and picked up by
 *    nats-server at the next reload.
 * 3. Replicated buckets. A KV bucket keeps the replica count it was created with, and the services create
 *    theirs with one replica. The sidecar creates cowherd's buckets with COWHERD_NATS_REPLICAS replicas and
 *    raises any bucket that has fewer, so that the state survives the loss of a NATS node.
 */
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { keepCertificateFresh, type RenewFunction } from '../../services/common/platform/certificate-renewal.js';
import { createClient } from '../../services/common/platform/client.js';
import {
  addressVariable,
  enumVariable,
  integerVariable,
  optionalStringVariable,
  pathVariable,
  readConfig,
  urlListVariable,
} from '../../services/common/platform/config.js';
import { identityUri, parseIdentity, type Identity } from '../../services/common/platform/identity.js';
import { jsonCodec, KvStore } from '../../services/common/platform/kv.js';
import { createLogger, LOG_LEVELS, type Logger } from '../../services/common/platform/logger.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { mutualTlsClientCredentials, type TlsFiles } from '../../services/common/platform/tls.js';
import { natsUsers, openCaRecords } from '../../services/common/domain/ca-records.js';
import type { LevelWithSilent } from 'pino';

/**
 * cowherd's KV buckets (services/inventory/inventory.ts, services/distribution/main.ts,
 * services/common/domain/ca-records.ts, services/common/domain/operations.ts, services/common/platform/pagination.ts,
 * services/common/platform/event-outbox.ts).
 */
export const COWHERD_BUCKETS = ['hosts', 'vms', 'images', 'replicas', 'ca', 'operations', 'operations-request-ids', 'cowherd-config', 'outbox'] as const;

/** The sidecar's variables. */
export const SIDECAR_VARIABLES = {
  certificateFile: pathVariable('COWHERD_TLS_CERT', "the NATS server's certificate (live copy; renewed here)"),
  privateKeyFile: pathVariable('COWHERD_TLS_KEY', "the NATS server's private key (0600)"),
  caFile: pathVariable('COWHERD_TLS_CA', 'the cowherd CA certificate'),
  natsUrls: urlListVariable('COWHERD_NATS_URL', "this pod's NATS server", ['tls://localhost:4222']),
  caAddress: addressVariable('COWHERD_CA_ADDRESS', 'host:port of the certificate-authority mTLS port (renewal)', 'certificate-authority:7440'),
  authorizationFile: pathVariable('COWHERD_NATS_AUTHORIZATION_FILE', 'the authorization file nats-server includes'),
  pidFile: pathVariable('COWHERD_NATS_PID_FILE', "nats-server's pid file (same process namespace)"),
  staticIdentities: optionalStringVariable('COWHERD_NATS_STATIC_IDENTITIES', 'comma-separated SPIFFE URIs admitted by identity whatever their serial'),
  replicas: integerVariable('COWHERD_NATS_REPLICAS', 'replicas of every cowherd KV bucket', 3, 1, 5),
  syncSeconds: integerVariable('COWHERD_NATS_SYNC_SECONDS', 'full re-sync interval (expiries)', 30, 5, 3600),
  logLevel: enumVariable<LevelWithSilent>('COWHERD_LOG_LEVEL', 'pino log level', 'info', LOG_LEVELS),
};

/** Parses COWHERD_NATS_STATIC_IDENTITIES. */
export function parseStaticIdentities(value: string | undefined): Identity[] {
  return (value ?? '')
    .split(',')
    .map((uri) => uri.trim())
    .filter((uri) => uri !== '')
    .map((uri) => {
      const identity = parseIdentity(uri);
      if (!identity) throw new Error(`COWHERD_NATS_STATIC_IDENTITIES: ${JSON.stringify(uri)} is not a cowherd identity`);
      return identity;
    });
}

/** Creates every cowherd bucket with `replicas` replicas, and raises those that have fewer. */
export async function ensureReplicatedBuckets(nats: Nats, replicas: number, log: Logger): Promise<void> {
  for (const bucket of COWHERD_BUCKETS) {
    await KvStore.open(nats.jetstream, bucket, jsonCodec<unknown>(), { replicas });
    const stream = `KV_${bucket}`;
    const info = await nats.manager.streams.info(stream);
    if (info.config.num_replicas < replicas) {
      await nats.manager.streams.update(stream, { ...info.config, num_replicas: replicas });
      log.info({ bucket, from: info.config.num_replicas, to: replicas }, 'bucket replicas raised');
    }
  }
}

/** RenewCertificate at the CA over mTLS with the current certificate. */
function renewThrough(client: CertificateAuthorityServiceClient): RenewFunction {
  return (csrPem) =>
    new Promise((resolve, reject) =>
      client.renewCertificate({ csrPem }, (error, response) =>
        error ? reject(error) : resolve({ certificatePem: response.certificate?.certificatePem ?? '', caPem: response.caCertificatePem }),
      ),
    );
}

async function main(): Promise<void> {
  const config = readConfig(SIDECAR_VARIABLES, process.env);
  const log = createLogger({ service: 'nats-sidecar', level: config.logLevel });
  const tls: TlsFiles = { certificateFile: config.certificateFile, privateKeyFile: config.privateKeyFile, caFile: config.caFile };
  const staticIdentities = parseStaticIdentities(config.staticIdentities);

  const caClient = createClient(
    CertificateAuthorityServiceClient,
    config.caAddress,
    mutualTlsClientCredentials(tls)(identityUri('service', 'certificate-authority')),
    { defaultDeadlineMs: 10_000 },
  );
  const nats = await connectNats({ servers: config.natsUrls, tls, name: 'nats-sidecar', log });
  const records = await openCaRecords(nats.jetstream);
  const users = natsUsers({
    authorizationFile: config.authorizationFile,
    pidFile: config.pidFile,
    staticIdentities,
    listCertificates: async () => (await records.certificates.list('certificate.*')).map((entry) => entry.value),
    log,
  });
  const stopWatching = await records.certificates.watch('certificate.*', () => void users.sync().catch(() => undefined));
  await users.sync();
  const timer = setInterval(() => void users.sync().catch(() => undefined), config.syncSeconds * 1000);
  // The renewed server certificate reaches nats-server with the reload that sync() sends.
  const stopRenewing = await keepCertificateFresh({
    files: tls,
    renew: renewThrough(caClient),
    log,
    onRenewed: () => void users.sync().catch(() => undefined),
  });
  log.info({ staticIdentities: staticIdentities.map((identity) => identity.uri) }, 'NATS users in sync');

  // Buckets need a JetStream quorum (the other servers may still be starting): retry until done.
  let bucketsTimer: NodeJS.Timeout | undefined;
  const ensureBuckets = (): void => {
    ensureReplicatedBuckets(nats, config.replicas, log).then(
      () => log.info({ replicas: config.replicas, buckets: COWHERD_BUCKETS }, 'buckets replicated'),
      (error: unknown) => {
        log.warn({ err: error }, 'buckets not replicated yet; retrying in 5 s');
        bucketsTimer = setTimeout(ensureBuckets, 5_000);
      },
    );
  };
  ensureBuckets();

  let stopping = false;
  const stop = (): void => {
    if (stopping) process.exit(1);
    stopping = true;
    clearInterval(timer);
    clearTimeout(bucketsTimer);
    stopWatching();
    stopRenewing();
    caClient.close();
    nats.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (process.argv[1]?.endsWith('nats-sidecar.ts')) {
  main().catch((error: unknown) => {
    process.stderr.write(`nats-sidecar: ${(error as Error).message}\n`);
    process.exit(error instanceof Error && error.name === 'ConfigError' ? 2 : 1);
  });
}
