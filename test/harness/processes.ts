/** Starts cowherd processes (services/<name>/main.ts) as real child processes on free ports. */
import { appendFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { startDaemon, type Daemon } from '../../services/common/platform/child-process.js';
import { call, createClient } from '../../services/common/platform/client.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { serviceNodeOptions } from '../../services/common/platform/node-options.js';
import type { ProcessName } from '../../services/common/platform/service-process.js';
import type { TlsFiles } from '../../services/common/platform/tls.js';
import type { Resources } from './index.js';

/** The repository root. */
export const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));

/** A started service process. */
export interface ServiceProcess {
  readonly name: ProcessName;
  readonly daemon: Daemon;
  /** localhost:<mTLS port> */
  readonly address: string;
  /** localhost:<plaintext health port> */
  readonly healthAddress: string;
  /** localhost:<Prometheus metrics port>; undefined when the process serves none (COWHERD_METRICS_ADDRESS=off). */
  readonly metricsAddress: string | undefined;
  /** Every JSON log line so far. */
  readonly logs: Array<Record<string, unknown>>;
}

/** Starts `services/<name>/main.ts` on free ports and waits for its "serving" log line. */
export async function startServiceProcess(
  resources: Resources,
  name: ProcessName,
  tls: TlsFiles | undefined,
  natsUrl: string,
  extraEnv: Record<string, string> = {},
): Promise<ServiceProcess> {
  const logs: Array<Record<string, unknown>> = [];
  const daemon = await startDaemon(process.execPath, ['--import', 'tsx', ...serviceNodeOptions(name), join(REPOSITORY, 'services', name, 'main.ts')], {
    readyPattern: /"msg":"serving"/,
    readyTimeoutMs: 60_000,
    cwd: REPOSITORY,
    env: {
      ...withoutCowherdVariables(process.env),
      COWHERD_LISTEN_ADDRESS: 'localhost:0',
      COWHERD_HEALTH_ADDRESS: 'localhost:0',
      COWHERD_METRICS_ADDRESS: 'localhost:0',
      COWHERD_TRACKER_ADDRESS: 'localhost:0',
      // Agents: any free BitTorrent and web seed port, so that several agents (and tests) run side by side.
      COWHERD_TORRENT_PORT: '0',
      COWHERD_WEB_SEED_ADDRESS: '127.0.0.1:0',
      ...(tls === undefined ? {} : { COWHERD_TLS_CERT: tls.certificateFile, COWHERD_TLS_KEY: tls.privateKeyFile, COWHERD_TLS_CA: tls.caFile }),
      COWHERD_NATS_URL: natsUrl,
      COWHERD_SHUTDOWN_GRACE_SECONDS: '5',
      ...extraEnv,
    },
    onLine: (line) => {
      try {
        logs.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        logs.push({ raw: line });
      }
    },
  });
  resources.defer(() => daemon.stop(10_000));
  const serving = logs.find((line) => line['msg'] === 'serving');
  if (!serving) throw new Error(`${name} printed no serving line`);
  const metricsAddress = typeof serving['metricsPort'] === 'number' ? `localhost:${serving['metricsPort']}` : undefined;
  return { name, daemon, address: `localhost:${String(serving['port'])}`, healthAddress: `localhost:${String(serving['healthPort'])}`, metricsAddress, logs };
}

/** The environment minus COWHERD_* variables, so a developer's settings never leak into a test process. */
function withoutCowherdVariables(env: NodeJS.ProcessEnv): Record<string, string> {
  const result: Record<string, string> = {};
  for (const [key, value] of Object.entries(env)) if (value !== undefined && !key.startsWith('COWHERD_')) result[key] = value;
  return result;
}

/**
 * Writes the test CA as the CA process's key and certificate files and starts it; returns it with its
 * enrollment address. With `createCa` no files are written: the process makes its own CA on this first
 * start (its own TLS certificate still comes from `pki`), and `caKeyFile`/`caCertificateFile` say where.
 */
export async function startCertificateAuthorityProcess(
  resources: Resources,
  pki: {
    ca: { certificatePem: string; privateKeyPem: string };
    files: (kind: 'service', name: string) => Promise<TlsFiles>;
    /** What the test PKI issued: recorded by the CA as bootstrap certificates, as the fleet's seeds are. */
    issued?: ReadonlyArray<{ certificatePem: string }>;
    onIssue?: (listener: (certificate: { certificatePem: string }) => Promise<void>) => () => void;
  },
  nats: { url: string; authorizationFile?: string; pidFile?: string },
  options: { natsStaticIdentities?: readonly string[]; env?: Readonly<Record<string, string>>; createCa?: boolean } = {},
): Promise<ServiceProcess & { enrollAddress: string; caKeyFile: string; caCertificateFile: string }> {
  const natsUrl = nats.url;
  const directory = await resources.tempDir('cowherd-ca-');
  const caKeyFile = join(directory, options.createCa ? 'made-on-first-start' : '', 'ca-key.pem');
  const caCertificateFile = join(directory, options.createCa ? 'made-on-first-start' : '', 'ca.pem');
  if (!options.createCa) {
    await writeFile(caKeyFile, pki.ca.privateKeyPem, { mode: 0o600 });
    await writeFile(caCertificateFile, pki.ca.certificatePem, { mode: 0o644 });
  }
  const tls = await pki.files('service', 'certificate-authority');
  // Servers admit only serials the CA recorded: every certificate the test PKI signs (before and after this
  // start) goes into the CA's bootstrap file, which it reads again before it answers for an unknown serial.
  const bootstrapFile = join(directory, 'bootstrap-certificates.pem');
  await writeFile(bootstrapFile, (pki.issued ?? []).map((certificate) => certificate.certificatePem).join(''));
  let recorder: CertificateAuthorityServiceClient | undefined;
  if (pki.onIssue) {
    resources.defer(
      pki.onIssue(async (certificate) => {
        await appendFile(bootstrapFile, certificate.certificatePem);
        // Recorded before pki.credentials returns, as a certificate from IssueCertificate is: the CA reads
        // the changed file before it answers this (tests that compare the CA's records see no late change).
        // Best effort: with the CA stopped, the file is read when it next answers.
        if (recorder) await call((cb) => recorder!.getIssuedSerialList({}, cb)).catch(() => undefined);
      }),
    );
  }
  const process = await startServiceProcess(resources, 'certificate-authority', tls, natsUrl, {
    COWHERD_CA_BOOTSTRAP_CERTIFICATES: bootstrapFile,
    COWHERD_CA_KEY_FILE: caKeyFile,
    COWHERD_CA_CERT_FILE: caCertificateFile,
    COWHERD_ENROLL_ADDRESS: 'localhost:0',
    // With the NATS files given, the CA manages NATS users: the test services stay in by identity.
    ...(nats.authorizationFile && nats.pidFile
      ? {
          COWHERD_NATS_AUTHORIZATION_FILE: nats.authorizationFile,
          COWHERD_NATS_PID_FILE: nats.pidFile,
          COWHERD_NATS_STATIC_IDENTITIES: (
            options.natsStaticIdentities ?? ['certificate-authority', 'inventory', 'distribution', 'cloning'].map((name) => `spiffe://cowherd/service/${name}`)
          ).join(','),
        }
      : {}),
    ...options.env,
  });
  if (!options.createCa) {
    const own = {
      certificatePem: await readFile(tls.certificateFile, 'utf8'),
      privateKeyPem: await readFile(tls.privateKeyFile, 'utf8'),
      caPem: pki.ca.certificatePem,
    };
    recorder = createClient(CertificateAuthorityServiceClient, process.address, mutualTlsChannelCredentialsFromPem(own), {
      defaultDeadlineMs: 5_000,
      maxAttempts: 1,
    });
    const client = recorder;
    resources.defer(() => client.close());
  }
  const enrollPort = process.logs.find((line) => line['msg'] === 'enrollment port open')?.['enrollPort'];
  if (typeof enrollPort !== 'number') throw new Error('the CA printed no enrollment port');
  return { ...process, enrollAddress: `localhost:${enrollPort}`, caKeyFile, caCertificateFile };
}
