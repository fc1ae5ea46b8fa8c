/**
 * The local fleet on the embedded default: one machine, NATS as a child process with its data under the
 * state directory, the four services and a local agent as child processes, mutual TLS everywhere.
 *
 * The launcher is the fleet's init step. It makes (first start) or loads the CA, and signs directly only
 * what must exist before the CA service runs: NATS's server certificate, the CA service's own certificate
 * and a one-hour bootstrap admin certificate kept in memory. Everything else goes through the CA like in
 * any fleet: service certificates and the operator's admin bundle from IssueCertificate, the local agent's
 * certificate from a join token. The CA keeps NATS's allow-list (one user per active certificate). A
 * second start reuses the CA, every credential that is not due for renewal, the agent's identity and the
 * NATS data.
 */
import { createWriteStream, existsSync, type WriteStream } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CertificateAuthorityServiceClient } from '../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { loadOrCreateCertificateAuthority } from '../common/ca-files.js';
import { renewalTime } from '../common/certificate-renewal.js';
import { startDaemon, type Daemon } from '../common/child-process.js';
import { createClient } from '../common/client.js';
import { credentialFiles, issueCredentials, writeAtomically, writeCredentials, type Credentials } from '../common/credential-files.js';
import { startEmbeddedNats, freePort, type EmbeddedNats } from '../common/embedded-nats.js';
import { identityUri, isPrincipalName, parseIdentity } from '../common/identity.js';
import { defaultHostId } from '../common/resource-names.js';
import { identityPrincipal } from '../common/nats-authorization.js';
import { createCsr, generateKeyPair, inspectCertificate, type CertificateAndKey } from '../common/pki.js';
import { DEFAULT_PORTS, type ProcessName } from '../common/service-process.js';
import { mutualTlsChannelCredentialsFromPem, type TlsFiles } from '../common/tls.js';
import { checkHealth, type HealthReport } from './health-check.js';

const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));
/** Start order: the CA first (everyone else gets certificates from it), the agent last. */
export const FLEET_PROCESSES: readonly ProcessName[] = ['certificate-authority', 'inventory', 'distribution', 'cloning', 'agent'];
const ENROLL_PORT = 7441;
const SERVICE_CERTIFICATE_DAYS = 7;
const ADMIN_CERTIFICATE_DAYS = 30;

/** Options of {@link startLocalFleet}. */
export interface LocalFleetOptions {
  /** Everything the fleet keeps: CA, credentials, NATS data, logs, fleet.json. */
  readonly stateDirectory: string;
  /** Pick free ports instead of the documented defaults (tests, or a second fleet on one machine). */
  readonly dynamicPorts?: boolean;
  /** Progress lines for the operator. */
  readonly say: (line: string) => void;
  /** The libvirt the local agent drives; default qemu:///system (scripts/libvirtd.sh starts it). */
  readonly libvirtUri?: string;
}

/** Where a process of the fleet answers. */
export interface FleetEndpoint {
  readonly name: ProcessName | 'nats';
  readonly address: string;
  readonly healthAddress?: string;
  readonly pid: number;
}

/** A running local fleet. */
export interface LocalFleet {
  readonly endpoints: readonly FleetEndpoint[];
  readonly adminCredentials: TlsFiles;
  readonly health: readonly HealthReport[];
  /** Stops every process, newest first, then NATS. */
  stop(): Promise<void>;
}

/** Starts NATS and every process, checks health on both ports, writes fleet.json. */
export async function startLocalFleet(options: LocalFleetOptions): Promise<LocalFleet> {
  const state = options.stateDirectory;
  const credentialsDirectory = join(state, 'credentials');
  await mkdir(join(state, 'logs'), { recursive: true });
  const caKeyFile = join(state, 'ca', 'ca-key.pem');
  const caCertificateFile = join(state, 'ca', 'ca.pem');
  const ca = await loadOrCreateCertificateAuthority(caKeyFile, caCertificateFile, () => options.say(`creating the fleet's certificate authority in ${join(state, 'ca')}`));
  const hostname = defaultHostId();
  const port = async (name: ProcessName, kind: 'grpc' | 'health'): Promise<number> => (options.dynamicPorts ? freePort() : DEFAULT_PORTS[name][kind]);

  const started: Array<{ stop: () => Promise<void> }> = [];
  const stop = async (): Promise<void> => {
    for (const process of started.reverse()) await process.stop().catch(() => undefined);
    started.length = 0;
  };
  const closers: Array<{ close(): void }> = [];
  try {
    // 1. What must exist before the CA service: NATS's certificate and the CA service's own.
    const natsTls = await ensureDirectCredentials(ca, join(credentialsDirectory, 'nats'), identityUri('service', 'nats'), ['localhost']);
    const caTls = await ensureDirectCredentials(ca, join(credentialsDirectory, 'certificate-authority'), identityUri('service', 'certificate-authority'), ['localhost', 'certificate-authority']);
    const caIdentity = parseIdentity(identityUri('service', 'certificate-authority'))!;
    const nats: EmbeddedNats = await startEmbeddedNats({
      directory: join(state, 'nats'),
      tls: natsTls,
      port: options.dynamicPorts ? 0 : 4222,
      bootstrapUsers: [identityPrincipal(caIdentity)],
      onLine: lineWriter(join(state, 'logs', 'nats.log')),
    });
    started.push({ stop: () => nats.stop() });
    options.say(`nats          ${nats.url} (JetStream data in ${join(state, 'nats')})`);
    const endpoints: FleetEndpoint[] = [{ name: 'nats', address: nats.url, pid: nats.daemon.pid }];
    // With dynamic ports (tests) the metrics ports are any free ones too, so two fleets never collide.
    const common = { COWHERD_NATS_URL: nats.url, COWHERD_STATE_DIR: state, ...(options.dynamicPorts ? { COWHERD_METRICS_ADDRESS: 'localhost:0' } : {}) };

    // 2. The CA service; it keeps NATS's users from now on.
    const caPort = await port('certificate-authority', 'grpc');
    const enrollPort = options.dynamicPorts ? await freePort() : ENROLL_PORT;
    const caAddress = `localhost:${caPort}`;
    endpoints.push(
      await startFleetProcess('certificate-authority', caTls, caPort, await port('certificate-authority', 'health'), {
        ...common,
        COWHERD_CA_KEY_FILE: caKeyFile,
        COWHERD_CA_CERT_FILE: caCertificateFile,
        COWHERD_ENROLL_ADDRESS: `localhost:${enrollPort}`,
        COWHERD_NATS_AUTHORIZATION_FILE: nats.authorizationFile,
        COWHERD_NATS_PID_FILE: nats.pidFile,
        COWHERD_NATS_STATIC_IDENTITIES: caIdentity.uri,
      }),
    );

    // 3. Everything else through the CA, with a short-lived bootstrap admin certificate.
    const bootstrap = await issueCredentials(ca, identityUri('admin', 'fleet-bootstrap'), { ttlSeconds: 3600 });
    const caClient = createClient(CertificateAuthorityServiceClient, caAddress, mutualTlsChannelCredentialsFromPem(bootstrap), { defaultDeadlineMs: 30_000 });
    closers.push(caClient);
    const admin = await ensureIssuedCredentials(caClient, ca, join(credentialsDirectory, 'admin'), identityUri('admin', userName()), [], ADMIN_CERTIFICATE_DAYS);
    for (const name of ['inventory', 'distribution', 'cloning'] as const) {
      const tls = await ensureIssuedCredentials(caClient, ca, join(credentialsDirectory, name), identityUri('service', name), ['localhost', name], SERVICE_CERTIFICATE_DAYS);
      const inventoryAddress = endpoints.find((endpoint) => endpoint.name === 'inventory')?.address;
      const distributionAddress = endpoints.find((endpoint) => endpoint.name === 'distribution')?.address;
      const tracker: Record<string, string> = name === 'distribution' ? { COWHERD_TRACKER_ADDRESS: `localhost:${options.dynamicPorts ? await freePort() : 7463}` } : {};
      endpoints.push(
        await startFleetProcess(name, tls, await port(name, 'grpc'), await port(name, 'health'), {
          ...common,
          COWHERD_CA_ADDRESS: caAddress,
          ...tracker,
          ...(inventoryAddress === undefined ? {} : { COWHERD_INVENTORY_ADDRESS: inventoryAddress }),
          ...(distributionAddress === undefined ? {} : { COWHERD_DISTRIBUTION_ADDRESS: distributionAddress }),
        }),
      );
    }

    // 4. The local agent joins like any host: with a join token on its first start, by itself afterwards.
    const agentCredentials = join(state, 'agent', 'credentials');
    const agentPort = await port('agent', 'grpc');
    const agentEnv: Record<string, string> = {
      ...common,
      COWHERD_CA_ADDRESS: caAddress,
      COWHERD_HOST_ID: hostname,
      COWHERD_CREDENTIALS_DIR: agentCredentials,
      COWHERD_ENROLL_ADDRESS: `localhost:${enrollPort}`,
      COWHERD_INVENTORY_ADDRESS: endpoints.find((endpoint) => endpoint.name === 'inventory')!.address,
      COWHERD_ADVERTISE_ADDRESS: `localhost:${agentPort}`,
      COWHERD_IMAGE_DIR: join(state, 'agent', 'images'),
      COWHERD_LIBVIRT_URI: options.libvirtUri ?? 'qemu:///system',
      ...(options.dynamicPorts ? { COWHERD_TORRENT_PORT: '0', COWHERD_WEB_SEED_ADDRESS: `localhost:${await freePort()}` } : {}),
    };
    if (!(await hasValidCredentials(agentCredentials, ca.certificatePem, identityUri('host', hostname)))) {
      const token = await new Promise<string>((resolve, reject) => caClient.createJoinToken({ host: hostname, ttl: { seconds: '600', nanos: 0 }, requestId: '' }, (error, response) => (error ? reject(error) : resolve(response.token))));
      agentEnv['COWHERD_JOIN_TOKEN'] = token;
      options.say(`agent         enrolling host ${hostname} with a join token`);
    }
    endpoints.push(await startFleetProcess('agent', undefined, agentPort, await port('agent', 'health'), agentEnv));

    const health = await Promise.all(endpoints.filter((endpoint) => endpoint.healthAddress).map((endpoint) => checkHealth(endpoint.name, endpoint.address, endpoint.healthAddress!, admin)));
    await writeAtomically(join(state, 'fleet.json'), `${JSON.stringify({ endpoints, admin, caAddress, enrollAddress: `localhost:${enrollPort}`, startedAt: new Date().toISOString() }, null, 2)}\n`, 0o644);
    for (const client of closers) client.close();
    return { endpoints, adminCredentials: admin, health, stop };
  } catch (error) {
    for (const client of closers) client.close();
    await stop();
    throw error;
  }

  async function startFleetProcess(name: ProcessName, tls: TlsFiles | undefined, grpcPort: number, healthPort: number, env: Record<string, string>): Promise<FleetEndpoint> {
    const daemon = await startProcess(
      name,
      {
        COWHERD_LISTEN_ADDRESS: `localhost:${grpcPort}`,
        COWHERD_HEALTH_ADDRESS: `localhost:${healthPort}`,
        ...(tls === undefined ? {} : { COWHERD_TLS_CERT: tls.certificateFile, COWHERD_TLS_KEY: tls.privateKeyFile, COWHERD_TLS_CA: tls.caFile }),
        ...env,
      },
      join(state, 'logs', `${name}.log`),
    );
    started.push({ stop: () => daemon.stop(25_000) });
    options.say(`${name.padEnd(13)} localhost:${grpcPort} (health localhost:${healthPort}, pid ${daemon.pid})`);
    return { name, address: `localhost:${grpcPort}`, healthAddress: `localhost:${healthPort}`, pid: daemon.pid };
  }
}

async function startProcess(name: ProcessName, env: Record<string, string>, logFile: string): Promise<Daemon> {
  return startDaemon(process.execPath, ['--import', 'tsx', join(REPOSITORY, 'services', name, 'main.ts')], {
    readyPattern: /"msg":"serving"/,
    readyTimeoutMs: 60_000,
    cwd: REPOSITORY,
    env: { ...filteredEnvironment(), ...env },
    onLine: lineWriter(logFile),
  });
}

/** The parent's environment minus cowherd variables, which the fleet sets itself. */
function filteredEnvironment(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) if (value !== undefined && !key.startsWith('COWHERD_')) env[key] = value;
  return env;
}

function lineWriter(path: string): (line: string) => void {
  let stream: WriteStream | undefined;
  return (line) => {
    stream ??= createWriteStream(path, { flags: 'a' });
    stream.write(`${line}\n`);
  };
}

/** True when `directory` holds credentials from this CA for `identity` that are not due for renewal. */
async function hasValidCredentials(directory: string, caPem: string, identity: string): Promise<boolean> {
  const files = credentialFiles(directory);
  if (!existsSync(files.certificateFile) || !existsSync(files.privateKeyFile) || !existsSync(files.caFile)) return false;
  const facts = inspectCertificate(await readFile(files.certificateFile, 'utf8'));
  return (await readFile(files.caFile, 'utf8')) === caPem && facts.identity?.uri === identity && Date.now() < renewalTime(facts.notBefore, facts.notAfter).getTime();
}

/** Credentials signed directly with the CA key: only for what must exist before the CA service runs. */
async function ensureDirectCredentials(ca: CertificateAndKey, directory: string, identity: string, dnsNames: readonly string[]): Promise<TlsFiles> {
  if (await hasValidCredentials(directory, ca.certificatePem, identity)) return credentialFiles(directory);
  return writeCredentials(directory, await issueCredentials(ca, identity, { dnsNames, ttlSeconds: SERVICE_CERTIFICATE_DAYS * 86_400 }));
}

/** Credentials from the CA service's IssueCertificate (recorded, revocable, admitted to NATS). */
async function ensureIssuedCredentials(client: CertificateAuthorityServiceClient, ca: CertificateAndKey, directory: string, identity: string, dnsNames: readonly string[], days: number): Promise<TlsFiles> {
  if (await hasValidCredentials(directory, ca.certificatePem, identity)) return credentialFiles(directory);
  const keys = await generateKeyPair(2048);
  const csrPem = createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity, dnsNames });
  const certificatePem = await new Promise<string>((resolve, reject) =>
    client.issueCertificate({ csrPem, identity, dnsNames: [...dnsNames], ttl: { seconds: String(days * 86_400), nanos: 0 }, requestId: '' }, (error, response) => (error ? reject(error) : resolve(response.certificatePem))),
  );
  const credentials: Credentials = { certificatePem, privateKeyPem: keys.privateKeyPem, caPem: ca.certificatePem };
  return writeCredentials(directory, credentials);
}

function userName(): string {
  const name = userInfo().username.toLowerCase().replace(/[^a-z0-9-]/g, '-');
  return isPrincipalName(name) ? name : 'operator';
}
