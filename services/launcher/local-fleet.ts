/**
 * The local fleet on the embedded default: one machine, NATS as a child process with its data under the
 * state directory, the four services and two local agents as child processes, mutual TLS everywhere.
 *
 * The two agents are two hosts of the fleet on this machine's one libvirtd, so that an image can travel
 * from one host to another as it does between machines: `<hostname>` (state in `<state>/agent`) and
 * `<hostname>-2` (state in `<state>/agent-2`). Each has its own image directory, credentials and ports, and
 * runs with COWHERD_DOMAIN_SCOPE=image-directory: it sees only the domains with a disk under its own image
 * directory (its clones, and a master VM whose disk is kept there), never the other's.
 *
 * The launcher is the fleet's init step. It makes (first start) or loads the CA, and signs directly only
 * what must exist before the CA service runs: NATS's server certificate, the CA service's own certificate
 * and a one-hour bootstrap admin certificate kept in memory. Everything else goes through the CA like in
 * any fleet: service certificates and the operator's admin bundle from IssueCertificate, the local agents'
 * certificates from join tokens. The CA keeps NATS's allow-list (one user per active certificate). A
 * second start reuses the CA, every credential that is not due for renewal, the agents' identities and the
 * NATS data.
 */
import { createWriteStream, existsSync, type WriteStream } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CertificateAuthorityServiceClient } from '../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { loadOrCreateCertificateAuthority } from '../common/domain/ca-files.js';
import { renewalTime } from '../common/platform/certificate-renewal.js';
import { startDaemon, type Daemon } from '../common/platform/child-process.js';
import { createClient } from '../common/platform/client.js';
import { credentialFiles, issueCredentials, writeAtomically, writeCredentials, type Credentials } from '../common/platform/credential-files.js';
import { startEmbeddedNats, freePort, type EmbeddedNats } from './embedded-nats.js';
import { identityUri, isPrincipalName, parseIdentity } from '../common/platform/identity.js';
import { defaultHostId } from '../common/domain/resource-names.js';
import { identityPrincipal } from '../common/platform/nats-authorization.js';
import { createCsr, generateKeyPair, inspectCertificate, type CertificateAndKey } from '../common/platform/pki.js';
import { serviceNodeOptions } from '../common/platform/node-options.js';
import { DEFAULT_PORTS, type ProcessName } from '../common/platform/service-process.js';
import { mutualTlsChannelCredentialsFromPem, type TlsFiles } from '../common/platform/tls.js';
import { checkHealth, type HealthReport } from './health-check.js';

const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));
/** Start order: the CA first (everyone else gets certificates from it), the agents last. */
export const FLEET_PROCESSES: readonly ProcessName[] = ['certificate-authority', 'inventory', 'distribution', 'cloning', 'agent'];
const ENROLL_PORT = 7441;
/** The second agent's fixed ports; the first uses the agent's defaults (7445, health 7455, metrics 7475, 7446, 7447). */
const SECOND_AGENT_PORTS = { grpc: 7448, health: 7458, metrics: 7468, torrent: 7456, webSeed: 7457 } as const;
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
  /** Ctrl-C during the start: stop what has started (once the process being started is ready) and throw. */
  readonly signal?: AbortSignal;
}

/** Where a process of the fleet answers. */
export interface FleetEndpoint {
  readonly name: ProcessName | 'nats';
  readonly address: string;
  readonly healthAddress?: string;
  readonly pid: number;
  /** Agents only: the host id it serves. */
  readonly host?: string;
}

/** A host of the local fleet: one agent on this machine's libvirtd. */
export interface LocalHost {
  /** The host id (`hosts/{host}`). */
  readonly host: string;
  /** `agent` or `agent-2`: its log file and its directory in the state directory. */
  readonly label: string;
  /** The agent's gRPC address. */
  readonly address: string;
  /** COWHERD_IMAGE_DIR: replicas in `images/`, clone overlays in `clones/`; a master VM's disk goes in `vms/`. */
  readonly imageDirectory: string;
}

/** A running local fleet. */
export interface LocalFleet {
  readonly endpoints: readonly FleetEndpoint[];
  /** The two local hosts, the first one first. */
  readonly hosts: readonly LocalHost[];
  readonly natsUrl: string;
  readonly libvirtUri: string;
  readonly adminCredentials: TlsFiles;
  readonly health: readonly HealthReport[];
  /**
   * Stops every process, newest first, then NATS, each with SIGTERM and a grace time. Resolves with the
   * processes that did not stop cleanly (exit code other than 0, or killed), as `<label> <how>`.
   */
  stop(): Promise<string[]>;
}

/** Starts NATS and every process, checks health on both ports, writes fleet.json. */
export async function startLocalFleet(options: LocalFleetOptions): Promise<LocalFleet> {
  const state = options.stateDirectory;
  const credentialsDirectory = join(state, 'credentials');
  await mkdir(join(state, 'logs'), { recursive: true });
  const caKeyFile = join(state, 'ca', 'ca-key.pem');
  const caCertificateFile = join(state, 'ca', 'ca.pem');
  const ca = await loadOrCreateCertificateAuthority(caKeyFile, caCertificateFile, () =>
    options.say(`creating the fleet's certificate authority in ${join(state, 'ca')}`),
  );
  const hostname = defaultHostId();
  const libvirtUri = options.libvirtUri ?? 'qemu:///system';
  // Dynamic ports: every port of every process is picked here, each one once, none left to a process to pick
  // (port 0). A port picked for one process is free in the kernel's eyes until that process binds it, and a
  // process of the fleet binding port 0 meanwhile (the other agent starts side by side) could be handed it.
  const picked = new Set<number>();
  const dynamicPort = async (): Promise<number> => {
    for (;;) {
      const candidate = await freePort();
      if (!picked.has(candidate)) {
        picked.add(candidate);
        return candidate;
      }
    }
  };
  const port = async (name: ProcessName, kind: 'grpc' | 'health'): Promise<number> => (options.dynamicPorts ? dynamicPort() : DEFAULT_PORTS[name][kind]);

  // Every process runs in a process group of its own: a terminal's Ctrl-C reaches only this process, which
  // stops them in order (the agents before the services they report to, NATS last) instead of all at once.
  const started: Array<{ label: string; daemon: Daemon; graceMs: number }> = [];
  const stop = async (): Promise<string[]> => {
    const unclean: string[] = [];
    for (const { label, daemon, graceMs } of started.reverse()) {
      await daemon.stop(graceMs).catch(() => undefined);
      const code = await daemon.exited;
      if (code !== 0) unclean.push(`${label} ${code === undefined ? 'was killed' : `exited ${code}`}`);
    }
    started.length = 0;
    return unclean;
  };
  const closers: Array<{ close(): void }> = [];
  try {
    options.signal?.throwIfAborted();
    // 1. What must exist before the CA service: NATS's certificate and the CA service's own.
    const natsTls = await ensureDirectCredentials(ca, join(credentialsDirectory, 'nats'), identityUri('service', 'nats'), ['localhost']);
    const caTls = await ensureDirectCredentials(ca, join(credentialsDirectory, 'certificate-authority'), identityUri('service', 'certificate-authority'), [
      'localhost',
      'certificate-authority',
    ]);
    const caIdentity = parseIdentity(identityUri('service', 'certificate-authority'))!;
    const nats: EmbeddedNats = await startEmbeddedNats({
      directory: join(state, 'nats'),
      tls: natsTls,
      port: options.dynamicPorts ? 0 : 4222,
      bootstrapUsers: [identityPrincipal(caIdentity)],
      onLine: lineWriter(join(state, 'logs', 'nats.log')),
      ownProcessGroup: true,
    });
    started.push({ label: 'nats', daemon: nats.daemon, graceMs: 10_000 });
    options.say(`nats          ${nats.url} (JetStream data in ${join(state, 'nats')})`);
    const endpoints: FleetEndpoint[] = [{ name: 'nats', address: nats.url, pid: nats.daemon.pid }];
    const common = { COWHERD_NATS_URL: nats.url, COWHERD_STATE_DIR: state };

    // 2. The CA service; it keeps NATS's users from now on. What was signed with the CA key before it runs
    // (NATS's, its own, and a short-lived bootstrap admin to ask it for the rest) it records as issued:
    // servers admit only serials the CA has recorded.
    const bootstrap = await issueCredentials(ca, identityUri('admin', 'fleet-bootstrap'), { ttlSeconds: 3600 });
    const bootstrapCertificatesFile = join(credentialsDirectory, 'bootstrap-certificates.pem');
    const seeds = await Promise.all([natsTls, caTls].map((files) => readFile(files.certificateFile, 'utf8')));
    await writeAtomically(bootstrapCertificatesFile, [...seeds, bootstrap.certificatePem].join(''), 0o644);
    const caPort = await port('certificate-authority', 'grpc');
    const enrollPort = options.dynamicPorts ? await dynamicPort() : ENROLL_PORT;
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
        COWHERD_CA_BOOTSTRAP_CERTIFICATES: bootstrapCertificatesFile,
      }),
    );

    // 3. Everything else through the CA, with the short-lived bootstrap admin certificate.
    const caClient = createClient(
      CertificateAuthorityServiceClient,
      caAddress,
      mutualTlsChannelCredentialsFromPem(bootstrap, identityUri('service', 'certificate-authority')),
      { defaultDeadlineMs: 30_000 },
    );
    closers.push(caClient);
    const admin = await ensureIssuedCredentials(
      caClient,
      ca,
      join(credentialsDirectory, 'admin'),
      identityUri('admin', userName()),
      [],
      ADMIN_CERTIFICATE_DAYS,
    );
    for (const name of ['inventory', 'distribution', 'cloning'] as const) {
      const tls = await ensureIssuedCredentials(
        caClient,
        ca,
        join(credentialsDirectory, name),
        identityUri('service', name),
        ['localhost', name],
        SERVICE_CERTIFICATE_DAYS,
      );
      const inventoryAddress = endpoints.find((endpoint) => endpoint.name === 'inventory')?.address;
      const distributionAddress = endpoints.find((endpoint) => endpoint.name === 'distribution')?.address;
      const tracker: Record<string, string> =
        name === 'distribution' ? { COWHERD_TRACKER_ADDRESS: `localhost:${options.dynamicPorts ? await dynamicPort() : 7463}` } : {};
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

    // 4. The local agents join like any host: with a join token on their first start, by themselves afterwards.
    const inventoryAddress = endpoints.find((endpoint) => endpoint.name === 'inventory')!.address;
    const hostSpecs = [
      { host: hostname, label: 'agent', fixed: undefined },
      { host: secondHostId(hostname), label: 'agent-2', fixed: SECOND_AGENT_PORTS },
    ];
    const hosts: LocalHost[] = [];
    const agents: Array<{ label: string; host: string; grpcPort: number; healthPort: number; env: Record<string, string> }> = [];
    for (const spec of hostSpecs) {
      const agentCredentials = join(state, spec.label, 'credentials');
      const imageDirectory = join(state, spec.label, 'images');
      const grpcPort = options.dynamicPorts ? await dynamicPort() : (spec.fixed?.grpc ?? DEFAULT_PORTS.agent.grpc);
      const healthPort = options.dynamicPorts ? await dynamicPort() : (spec.fixed?.health ?? DEFAULT_PORTS.agent.health);
      const env: Record<string, string> = {
        ...common,
        COWHERD_CA_ADDRESS: caAddress,
        COWHERD_HOST_ID: spec.host,
        COWHERD_CREDENTIALS_DIR: agentCredentials,
        COWHERD_ENROLL_ADDRESS: `localhost:${enrollPort}`,
        COWHERD_INVENTORY_ADDRESS: inventoryAddress,
        COWHERD_ADVERTISE_ADDRESS: `localhost:${grpcPort}`,
        COWHERD_IMAGE_DIR: imageDirectory,
        COWHERD_LIBVIRT_URI: libvirtUri,
        // Both agents drive this machine's one libvirtd: each sees only the domains with a disk in its image dir.
        COWHERD_DOMAIN_SCOPE: 'image-directory',
        ...(options.dynamicPorts
          ? { COWHERD_TORRENT_PORT: String(await dynamicPort()), COWHERD_WEB_SEED_ADDRESS: `localhost:${await dynamicPort()}` }
          : spec.fixed
            ? {
                COWHERD_METRICS_ADDRESS: `0.0.0.0:${spec.fixed.metrics}`,
                COWHERD_TORRENT_PORT: String(spec.fixed.torrent),
                COWHERD_WEB_SEED_ADDRESS: `0.0.0.0:${spec.fixed.webSeed}`,
              }
            : {}),
      };
      if (!(await hasValidCredentials(agentCredentials, ca.certificatePem, identityUri('host', spec.host)))) {
        const token = await new Promise<string>((resolve, reject) =>
          caClient.createJoinToken({ host: spec.host, ttl: { seconds: '600', nanos: 0 }, requestId: '' }, (error, response) =>
            error ? reject(error) : resolve(response.token),
          ),
        );
        env['COWHERD_JOIN_TOKEN'] = token;
        options.say(`${spec.label.padEnd(13)} enrolling host ${spec.host} with a join token`);
      }
      agents.push({ label: spec.label, host: spec.host, grpcPort, healthPort, env });
      hosts.push({ host: spec.host, label: spec.label, address: `localhost:${grpcPort}`, imageDirectory });
    }
    // Side by side: each takes a few seconds to enroll, detect the hypervisor and report. Both settle before a
    // failure (or Ctrl-C) is thrown, so that the stop below finds every agent that did start.
    const agentStarts = await Promise.allSettled(
      agents.map((agent) => startFleetProcess('agent', undefined, agent.grpcPort, agent.healthPort, agent.env, agent.label, agent.host)),
    );
    for (const start of agentStarts) {
      if (start.status === 'rejected') throw start.reason;
      endpoints.push(start.value);
    }

    const health = await Promise.all(
      endpoints
        .filter((endpoint) => endpoint.healthAddress)
        .map((endpoint) =>
          checkHealth(hosts.find((host) => host.host === endpoint.host)?.label ?? endpoint.name, endpoint.address, endpoint.healthAddress!, admin),
        ),
    );
    await writeAtomically(
      join(state, 'fleet.json'),
      `${JSON.stringify({ endpoints, hosts, admin, caAddress, enrollAddress: `localhost:${enrollPort}`, libvirtUri, startedAt: new Date().toISOString() }, null, 2)}\n`,
      0o644,
    );
    for (const client of closers) client.close();
    return { endpoints, hosts, natsUrl: nats.url, libvirtUri, adminCredentials: admin, health, stop };
  } catch (error) {
    for (const client of closers) client.close();
    await stop();
    throw error;
  }

  async function startFleetProcess(
    name: ProcessName,
    tls: TlsFiles | undefined,
    grpcPort: number,
    healthPort: number,
    env: Record<string, string>,
    label: string = name,
    host?: string,
  ): Promise<FleetEndpoint> {
    options.signal?.throwIfAborted();
    const daemon = await startProcess(
      name,
      {
        COWHERD_LISTEN_ADDRESS: `localhost:${grpcPort}`,
        COWHERD_HEALTH_ADDRESS: `localhost:${healthPort}`,
        // With dynamic ports the metrics ports are free ones too, so that two fleets never collide.
        ...(options.dynamicPorts ? { COWHERD_METRICS_ADDRESS: `localhost:${await dynamicPort()}` } : {}),
        ...(tls === undefined ? {} : { COWHERD_TLS_CERT: tls.certificateFile, COWHERD_TLS_KEY: tls.privateKeyFile, COWHERD_TLS_CA: tls.caFile }),
        ...env,
      },
      join(state, 'logs', `${label}.log`),
    );
    started.push({ label, daemon, graceMs: 25_000 });
    options.signal?.throwIfAborted();
    options.say(`${label.padEnd(13)} localhost:${grpcPort} (health localhost:${healthPort}, pid ${daemon.pid})${host === undefined ? '' : `, host ${host}`}`);
    return { name, address: `localhost:${grpcPort}`, healthAddress: `localhost:${healthPort}`, pid: daemon.pid, ...(host === undefined ? {} : { host }) };
  }
}

async function startProcess(name: ProcessName, env: Record<string, string>, logFile: string): Promise<Daemon> {
  return startDaemon(process.execPath, ['--import', 'tsx', ...serviceNodeOptions(name), join(REPOSITORY, 'services', name, 'main.ts')], {
    readyPattern: /"msg":"serving"/,
    readyTimeoutMs: 60_000,
    cwd: REPOSITORY,
    env: { ...filteredEnvironment(), ...env },
    onLine: lineWriter(logFile),
    ownProcessGroup: true,
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
  return (
    (await readFile(files.caFile, 'utf8')) === caPem && facts.identity?.uri === identity && Date.now() < renewalTime(facts.notBefore, facts.notAfter).getTime()
  );
}

/** Credentials signed directly with the CA key: only for what must exist before the CA service runs. */
async function ensureDirectCredentials(ca: CertificateAndKey, directory: string, identity: string, dnsNames: readonly string[]): Promise<TlsFiles> {
  if (await hasValidCredentials(directory, ca.certificatePem, identity)) return credentialFiles(directory);
  return writeCredentials(directory, await issueCredentials(ca, identity, { dnsNames, ttlSeconds: SERVICE_CERTIFICATE_DAYS * 86_400 }));
}

/** Credentials from the CA service's IssueCertificate (recorded, revocable, admitted to NATS). */
async function ensureIssuedCredentials(
  client: CertificateAuthorityServiceClient,
  ca: CertificateAndKey,
  directory: string,
  identity: string,
  dnsNames: readonly string[],
  days: number,
): Promise<TlsFiles> {
  if (await hasValidCredentials(directory, ca.certificatePem, identity)) return credentialFiles(directory);
  const keys = await generateKeyPair(2048);
  const csrPem = createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity, dnsNames });
  const certificatePem = await new Promise<string>((resolve, reject) =>
    client.issueCertificate(
      { csrPem, identity, dnsNames: [...dnsNames], ttl: { seconds: String(days * 86_400), nanos: 0 }, requestId: '' },
      (error, response) => (error ? reject(error) : resolve(response.certificatePem)),
    ),
  );
  const credentials: Credentials = { certificatePem, privateKeyPem: keys.privateKeyPem, caPem: ca.certificatePem };
  return writeCredentials(directory, credentials);
}

/** The second local host's id: `<hostname>-2`, shortened to stay a valid host id. */
export function secondHostId(hostname: string): string {
  return `${hostname.slice(0, 61).replace(/-+$/, '')}-2`;
}

function userName(): string {
  const name = userInfo()
    .username.toLowerCase()
    .replace(/[^a-z0-9-]/g, '-');
  return isPrincipalName(name) ? name : 'operator';
}
