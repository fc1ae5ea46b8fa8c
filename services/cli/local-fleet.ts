/**
 * The local fleet on the embedded default: one machine, NATS as a child process on a free port with its
 * data under the state directory, every service and a local agent as child processes, mutual TLS
 * everywhere from a CA made on first start. A second start reuses the CA, the credentials (renewed
 * when a third of their life is left) and the NATS data.
 */
import { createWriteStream, existsSync, type WriteStream } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { hostname as osHostname, userInfo } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { credentialFiles, issueCredentials, writeAtomically, writeCredentials } from '../common/credential-files.js';
import { startDaemon, type Daemon } from '../common/child-process.js';
import { startEmbeddedNats, freePort, type EmbeddedNats } from '../common/embedded-nats.js';
import { identityUri, isPrincipalName } from '../common/identity.js';
import { createCertificateAuthority, inspectCertificate, type CertificateAndKey } from '../common/pki.js';
import { DEFAULT_PORTS, type ProcessName } from '../common/service-process.js';
import type { TlsFiles } from '../common/tls.js';
import { checkHealth, type HealthReport } from './health-check.js';

const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));
/** Start order: the CA first (others will enroll against it), the agent last. */
export const FLEET_PROCESSES: readonly ProcessName[] = ['certificate-authority', 'inventory', 'distribution', 'cloning', 'agent'];

/** Options of {@link startLocalFleet}. */
export interface LocalFleetOptions {
  /** Everything the fleet keeps: CA, credentials, NATS data, logs, fleet.json. */
  readonly stateDirectory: string;
  /** Pick free ports instead of the documented defaults (tests, or a second fleet on one machine). */
  readonly dynamicPorts?: boolean;
  /** Progress lines for the operator. */
  readonly say: (line: string) => void;
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
  await mkdir(join(state, 'logs'), { recursive: true });
  const ca = await ensureCertificateAuthority(join(state, 'ca'), options.say);
  const hostname = localHostname();
  const admin = await ensureCredentials(ca, join(state, 'credentials', 'admin'), identityUri('admin', userName()), []);
  const natsTls = await ensureCredentials(ca, join(state, 'credentials', 'nats'), identityUri('service', 'nats'), ['localhost']);

  const started: Array<{ name: string; stop: () => Promise<void> }> = [];
  const stop = async (): Promise<void> => {
    for (const process of started.reverse()) await process.stop().catch(() => undefined);
    started.length = 0;
  };
  try {
    const natsPort = options.dynamicPorts ? 0 : 4222;
    const nats: EmbeddedNats = await startEmbeddedNats({ directory: join(state, 'nats'), tls: natsTls, port: natsPort, onLine: lineWriter(join(state, 'logs', 'nats.log')) });
    started.push({ name: 'nats', stop: () => nats.stop() });
    options.say(`nats          ${nats.url} (JetStream data in ${join(state, 'nats')})`);
    const endpoints: FleetEndpoint[] = [{ name: 'nats', address: nats.url, pid: nats.daemon.pid }];

    for (const name of FLEET_PROCESSES) {
      const identity = name === 'agent' ? identityUri('host', hostname) : identityUri('service', name);
      const tls = await ensureCredentials(ca, join(state, 'credentials', name), identity, ['localhost', name]);
      const grpcPort = options.dynamicPorts ? await freePort() : DEFAULT_PORTS[name].grpc;
      const healthPort = options.dynamicPorts ? await freePort() : DEFAULT_PORTS[name].health;
      const daemon = await startProcess(name, {
        COWHERD_LISTEN_ADDRESS: `localhost:${grpcPort}`,
        COWHERD_HEALTH_ADDRESS: `localhost:${healthPort}`,
        COWHERD_TLS_CERT: tls.certificateFile,
        COWHERD_TLS_KEY: tls.privateKeyFile,
        COWHERD_TLS_CA: tls.caFile,
        COWHERD_NATS_URL: nats.url,
        COWHERD_STATE_DIR: state,
      }, join(state, 'logs', `${name}.log`));
      started.push({ name, stop: () => daemon.stop(25_000) });
      endpoints.push({ name, address: `localhost:${grpcPort}`, healthAddress: `localhost:${healthPort}`, pid: daemon.pid });
      options.say(`${name.padEnd(13)} localhost:${grpcPort} (health localhost:${healthPort}, pid ${daemon.pid})`);
    }

    const health = await Promise.all(endpoints.filter((endpoint) => endpoint.healthAddress).map((endpoint) => checkHealth(endpoint.name, endpoint.address, endpoint.healthAddress!, admin)));
    await writeAtomically(join(state, 'fleet.json'), `${JSON.stringify({ endpoints, admin, startedAt: new Date().toISOString() }, null, 2)}\n`, 0o644);
    return { endpoints, adminCredentials: admin, health, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}

async function startProcess(name: ProcessName, env: Record<string, string>, logFile: string): Promise<Daemon> {
  const write = lineWriter(logFile);
  return startDaemon(process.execPath, ['--import', 'tsx', join(REPOSITORY, 'services', name, 'main.ts')], {
    readyPattern: /"msg":"serving"/,
    readyTimeoutMs: 60_000,
    cwd: REPOSITORY,
    env: { ...filteredEnvironment(), ...env },
    onLine: write,
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

/** Loads the CA from `directory`, or makes one (RSA 3072, key 0600) on the first start. */
async function ensureCertificateAuthority(directory: string, say: (line: string) => void): Promise<CertificateAndKey> {
  const certificateFile = join(directory, 'ca.pem');
  const keyFile = join(directory, 'ca-key.pem');
  if (existsSync(certificateFile) && existsSync(keyFile)) {
    return { certificatePem: await readFile(certificateFile, 'utf8'), privateKeyPem: await readFile(keyFile, 'utf8') };
  }
  say(`creating the fleet's certificate authority in ${directory}`);
  await mkdir(directory, { recursive: true, mode: 0o700 });
  const ca = await createCertificateAuthority({ commonName: 'cowherd local fleet CA' });
  await writeFile(keyFile, ca.privateKeyPem, { mode: 0o600 });
  await writeFile(certificateFile, ca.certificatePem, { mode: 0o644 });
  return ca;
}

/** Reuses credentials in `directory` unless missing, from another CA, or past two thirds of their life. */
async function ensureCredentials(ca: CertificateAndKey, directory: string, identity: string, dnsNames: readonly string[]): Promise<TlsFiles> {
  const files = credentialFiles(directory);
  if (existsSync(files.certificateFile) && existsSync(files.privateKeyFile) && existsSync(files.caFile)) {
    const facts = inspectCertificate(await readFile(files.certificateFile, 'utf8'));
    const sameCa = (await readFile(files.caFile, 'utf8')) === ca.certificatePem;
    const renewAt = facts.notBefore.getTime() + ((facts.notAfter.getTime() - facts.notBefore.getTime()) * 2) / 3;
    if (sameCa && facts.identity?.uri === identity && Date.now() < renewAt) return files;
  }
  return writeCredentials(directory, await issueCredentials(ca, identity, { dnsNames, ttlSeconds: 7 * 86_400 }));
}

function localHostname(): string {
  const name = osHostname().toLowerCase().split('.')[0] ?? '';
  return isPrincipalName(name) ? name : 'localhost';
}

function userName(): string {
  const name = userInfo().username.toLowerCase().replace(/[^a-z0-9-]/g, '-');
  return isPrincipalName(name) ? name : 'operator';
}
