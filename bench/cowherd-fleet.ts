/**
 * A whole cowherd fleet on a network-namespace test bed, for the benches that run the real thing
 * (bench:distribution's cowherd method, bench:boot): NATS, the CA, inventory, distribution (with its tracker)
 * and, when asked, cloning run here in the root namespace, joined to the test bed's switch unshaped at
 * 198.18.0.254 (name `cowherd-control` in every host's /etc/hosts, which every service certificate carries);
 * one agent per host runs inside the host's namespace and joins with a join token, as on a real host. The
 * hosts share this machine's private libvirtd; each agent sees only the domains of its own image directory.
 *
 * Environment (read here, so that every bench that starts a fleet takes them):
 * - COWHERD_BENCH_LOG_DIR=<dir>: every agent's log lines go to `<dir>/<host>.log` as well;
 * - COWHERD_BENCH_CPU_PROF=<dir>: every agent writes V8 CPU profiles when it stops, one per thread, into `<dir>/<host>/`;
 * - COWHERD_BENCH_AGENT_NODE_ARGS: more node options for every agent (space-separated, e.g. `--trace-gc`);
 * - COWHERD_BENCH_LOG_LEVEL: the agents' log level (default info);
 * - COWHERD_BENCH_AGENT_NICE: the agents' nice value (default 0; e.g. 10 to see what the agents' CPU takes from the
 *   guests on a bed where every host shares this machine's cores).
 */
import { appendFileSync, readdirSync, readFileSync } from 'node:fs';
import { setPriority } from 'node:os';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { Subscription } from '@nats-io/transport-node';
import { createClient } from '../services/common/platform/client.js';
import { AGENT_NODE_OPTIONS } from '../services/common/platform/node-options.js';
import { EVENT_SUBJECT_PREFIX } from '../services/common/platform/events.js';
import { IMAGE_AVAILABLE } from '../services/common/domain/event-types.js';
import { createLogger } from '../services/common/platform/logger.js';
import { connectNats } from '../services/common/platform/nats.js';
import { unpack } from '../services/common/domain/operations.js';
import { mutualTlsChannelCredentialsFromPem } from '../services/common/platform/tls.js';
import { freePort } from '../services/launcher/embedded-nats.js';
import { CertificateAuthorityServiceClient } from '../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { CloningServiceClient } from '../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributionServiceClient } from '../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Host_State, Image, type Host } from '../services/gen/cowherd/inventory/v1/resources.js';
import { InventoryServiceClient } from '../services/gen/cowherd/inventory/v1/inventory_service.js';
import { OperationsClient, type Operation } from '../services/gen/google/longrunning/operations.js';
import { Resources, TestPki, startTestNats } from '../test/harness/index.js';
import { call, waitFor } from '../test/harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess } from '../test/harness/processes.js';
import { CONTROL_ADDRESS, CONTROL_NAME, testBedAgentEnvironment, type TestBed } from './testbed.js';

const run = promisify(execFile);
const LOG_DIRECTORY = process.env['COWHERD_BENCH_LOG_DIR'];
const PROFILE_DIRECTORY = process.env['COWHERD_BENCH_CPU_PROF'];
const AGENT_NODE_ARGS = (process.env['COWHERD_BENCH_AGENT_NODE_ARGS'] ?? '').split(' ').filter(Boolean);
const AGENT_NICE = Number(process.env['COWHERD_BENCH_AGENT_NICE'] ?? '0');
const imageType = Image;
/** libvirt's state for a powered-off domain, as inventory reports it (VirtualMachine_State.STATE_SHUT_OFF). */
const SHUT_OFF = 3;

/** Options of {@link startBenchFleet}. */
export interface BenchFleetOptions {
  /** The test-bed hosts that run an agent. */
  readonly hosts: readonly string[];
  /** Start the cloning service too. */
  readonly cloning?: boolean;
  /** Every line an agent prints (JSON log lines), as it comes. */
  readonly onAgentLine?: (host: string, line: string) => void;
}

/** A running fleet; everything it started is released with the `resources` it was given. */
export interface BenchFleet {
  /** The test CA (credentials for any identity). */
  readonly pki: TestPki;
  /** Every agent's pid (its process in the host's namespace), by host. */
  readonly agentPids: ReadonlyMap<string, number>;
  /** The tracker's port (HTTP announce), on every address of this machine. */
  readonly trackerPort: number;
  readonly inventory: InventoryServiceClient;
  readonly distribution: DistributionServiceClient;
  /** google.longrunning.Operations on the distribution service. */
  readonly distributionOperations: OperationsClient;
  /** Set when the fleet was started with `cloning`. */
  readonly cloning: CloningServiceClient | undefined;
  /** google.longrunning.Operations on the cloning service; set with `cloning`. */
  readonly cloningOperations: OperationsClient | undefined;
  /**
   * Calls `onHost(host)` for every image.available event of `images/<imageId>` (any host) from now on, as the
   * agents publish them; resolves once subscribed. The subscription ends with the fleet.
   */
  watchImageAvailable(imageId: string, onHost: (host: string) => void): Promise<void>;
  /**
   * Defines the powered-off domain `xmlFile` (named `domain`, on `host`: its files under the host's image
   * directory), waits until inventory shows it, and publishes it as `images/<imageId>`; returns the image
   * record. The domain is undefined when the fleet is released.
   */
  publishDomain(options: { host: string; domain: string; xmlFile: string; imageId: string; description: string }): Promise<Image>;
  /** Resolves once the tracker hands out `host`'s agent as a peer of `infoHash` (it is in the swarm). */
  waitForPeerInTracker(infoHash: string, host: string, timeoutMs?: number): Promise<void>;
}

/** Waits for a long-running operation (WaitOperation in 10 s steps) until done or `timeoutMs`. */
export async function waitOperation(operations: OperationsClient, name: string, timeoutMs: number): Promise<Operation> {
  const deadline = Date.now() + timeoutMs;
  let operation = await call<Operation>((cb) => operations.getOperation({ name }, cb));
  while (!operation.done) {
    if (Date.now() > deadline) throw new Error(`${name} not done after ${timeoutMs / 1000} s`);
    operation = await call<Operation>((cb) => operations.waitOperation({ name, timeout: { seconds: '10', nanos: 0 } }, cb));
  }
  return operation;
}

/** The tracker's answer for `infoHash` (compact peers), announcing as a pseudo-peer that leaves at once. */
async function trackerPeers(announceUrl: string, infoHash: string): Promise<Buffer> {
  const escape = (bytes: Buffer): string => [...bytes].map((byte) => `%${byte.toString(16).padStart(2, '0')}`).join('');
  const peerId = Buffer.from('-CB0001-bench-watch!');
  const query = (event: string): string =>
    `info_hash=${escape(Buffer.from(infoHash, 'hex'))}&peer_id=${escape(peerId)}&port=1&uploaded=0&downloaded=0&left=0&compact=1&event=${event}&numwant=200`;
  const response = Buffer.from(await (await fetch(`${announceUrl}?${query('started')}`)).arrayBuffer());
  // And out again at once, so that no receiver is handed this pseudo-peer.
  await fetch(`${announceUrl}?${query('stopped')}`);
  return response;
}

/** utime + stime of a process, in seconds (/proc/<pid>/stat, 100 ticks a second); 0 once it is gone. */
export function processCpuSeconds(pid: number): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return 0;
  }
}

/** Starts the control plane here and one agent per host in its namespace; waits until every host is READY. */
export async function startBenchFleet(bed: TestBed, resources: Resources, options: BenchFleetOptions): Promise<BenchFleet> {
  await bed.connectRoot(CONTROL_ADDRESS);
  await bed.setHostNames({ [CONTROL_NAME]: CONTROL_ADDRESS });
  await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });

  // The control plane, here, listening on every address.
  const pki = await TestPki.create(await resources.tempDir());
  pki.extraDnsNames = [CONTROL_NAME];
  const nats = await startTestNats(resources, pki, { issued: 'ca-managed', host: '0.0.0.0' });
  const ca = await startCertificateAuthorityProcess(resources, pki, nats, {
    env: { COWHERD_LISTEN_ADDRESS: '0.0.0.0:0', COWHERD_ENROLL_ADDRESS: '0.0.0.0:0' },
  });
  const any = { COWHERD_LISTEN_ADDRESS: '0.0.0.0:0', COWHERD_CA_ADDRESS: ca.address };
  const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, any);
  const trackerPort = await freePort();
  const distribution = await startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
    ...any,
    COWHERD_INVENTORY_ADDRESS: inventory.address,
    COWHERD_TRACKER_ADDRESS: `0.0.0.0:${trackerPort}`,
    COWHERD_TRACKER_ANNOUNCE_URL: `http://${CONTROL_ADDRESS}:${trackerPort}/announce`,
  });
  const cloning = options.cloning
    ? await startServiceProcess(resources, 'cloning', await pki.files('service', 'cloning'), nats.url, {
        ...any,
        COWHERD_INVENTORY_ADDRESS: inventory.address,
        COWHERD_DISTRIBUTION_ADDRESS: distribution.address,
      })
    : undefined;
  const admin = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'bench')), caPem: pki.ca.certificatePem });
  const caAdmin = createClient(CertificateAuthorityServiceClient, ca.address, admin);
  const inventoryClient = createClient(InventoryServiceClient, inventory.address, admin, { defaultDeadlineMs: 30_000 });
  const distributionClient = createClient(DistributionServiceClient, distribution.address, admin, { defaultDeadlineMs: 30_000 });
  const distributionOperations = createClient(OperationsClient, distribution.address, admin, { defaultDeadlineMs: 60_000 });
  const cloningClient = cloning ? createClient(CloningServiceClient, cloning.address, admin, { defaultDeadlineMs: 30_000 }) : undefined;
  const cloningOperations = cloning ? createClient(OperationsClient, cloning.address, admin, { defaultDeadlineMs: 60_000 }) : undefined;
  resources.defer(() => {
    caAdmin.close();
    inventoryClient.close();
    distributionClient.close();
    distributionOperations.close();
    cloningClient?.close();
    cloningOperations?.close();
  });

  // One agent per host, in its namespace, joining with a token.
  const agentPids = new Map<string, number>();
  if (LOG_DIRECTORY) await mkdir(LOG_DIRECTORY, { recursive: true });
  for (const host of options.hosts) {
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host, ttl: undefined, requestId: '' }, cb));
    const profile = PROFILE_DIRECTORY ? ['--cpu-prof', `--cpu-prof-dir=${join(PROFILE_DIRECTORY, host)}`] : [];
    const onLine =
      LOG_DIRECTORY || options.onAgentLine
        ? (line: string): void => {
            if (LOG_DIRECTORY) appendFileSync(join(LOG_DIRECTORY, `${host}.log`), `${line}\n`);
            options.onAgentLine?.(host, line);
          }
        : undefined;
    const daemon = await bed.spawn(
      host,
      process.execPath,
      [...profile, ...AGENT_NODE_OPTIONS, ...AGENT_NODE_ARGS, '--import', 'tsx', join(REPOSITORY, 'services/agent/main.ts')],
      {
        readyPattern: /"msg":"serving"/,
        readyTimeoutMs: 60_000,
        cwd: REPOSITORY,
        ...(onLine ? { onLine } : {}),
        env: {
          ...testBedAgentEnvironment(bed, host, {
            enrollAddress: ca.enrollAddress,
            caAddress: ca.address,
            inventoryAddress: inventory.address,
            natsUrl: `tls://${CONTROL_NAME}:${nats.port}`,
          }),
          COWHERD_JOIN_TOKEN: token.token,
          COWHERD_LOG_LEVEL: process.env['COWHERD_BENCH_LOG_LEVEL'] ?? 'info',
        },
      },
    );
    resources.defer(() => daemon.stop(5_000));
    agentPids.set(host, daemon.pid);
    // Every thread of the agent (and what it starts later, such as its streaming server, which inherits it).
    if (AGENT_NICE !== 0) for (const task of readdirSync(`/proc/${daemon.pid}/task`)) setPriority(Number(task), AGENT_NICE);
  }
  for (const host of options.hosts) {
    await waitFor(
      `${host} READY`,
      async () => ((await call<Host>((cb) => inventoryClient.getHost({ name: `hosts/${host}` }, cb))).state === Host_State.STATE_READY ? true : undefined),
      60_000,
    );
  }

  // image.available, as the agents publish it: one NATS connection for every watch.
  let watcher: Awaited<ReturnType<typeof connectNats>> | undefined;
  const watchImageAvailable = async (imageId: string, onHost: (host: string) => void): Promise<void> => {
    if (watcher === undefined) {
      const connection = await connectNats({
        servers: [nats.url],
        tls: await pki.files('service', 'distribution', { subdirectory: 'bench-watcher' }),
        name: 'bench',
        log: createLogger({ service: 'bench', level: 'silent' }),
      });
      resources.defer(() => connection.close());
      watcher = connection;
    }
    const subscription: Subscription = watcher.connection.subscribe(`${EVENT_SUBJECT_PREFIX}.${IMAGE_AVAILABLE.kind}.*`, {
      callback: (error, message) => {
        if (error) return;
        const event = IMAGE_AVAILABLE.decode(message.data);
        if (event.image === `images/${imageId}`) onHost(event.host.slice('hosts/'.length));
      },
    });
    resources.defer(() => subscription.unsubscribe());
    await watcher.connection.flush();
  };

  const publishDomain: BenchFleet['publishDomain'] = async ({ host, domain, xmlFile, imageId, description }) => {
    await run('virsh', ['-c', 'qemu:///system', 'define', xmlFile]);
    resources.defer(() =>
      run('virsh', ['-c', 'qemu:///system', 'undefine', domain]).then(
        () => undefined,
        () => undefined,
      ),
    );
    await waitFor(
      `${domain} in inventory`,
      async () =>
        (await call<{ state: number }>((cb) => inventoryClient.getVirtualMachine({ name: `hosts/${host}/virtualMachines/${domain}` }, cb))).state === SHUT_OFF
          ? true
          : undefined,
      30_000,
    );
    const published = await call<Operation>((cb) =>
      distributionClient.publishImage({ imageId, sourceVirtualMachine: `hosts/${host}/virtualMachines/${domain}`, description, labels: {}, requestId: '' }, cb),
    );
    const done = await waitOperation(distributionOperations, published.name, 1_800_000);
    if (done.result?.$case !== 'response') throw new Error(`publish failed: ${JSON.stringify(done.result)}`);
    return unpack(imageType, done.result.value);
  };

  const waitForPeerInTracker = async (infoHash: string, host: string, timeoutMs = 30_000): Promise<void> => {
    const trackerUrl = `http://127.0.0.1:${trackerPort}/announce`;
    const peer = Buffer.from([...bed.address(host).split('.').map(Number), 6881 >> 8, 6881 & 0xff]);
    await waitFor(`${host} in the tracker`, async () => ((await trackerPeers(trackerUrl, infoHash)).includes(peer) ? true : undefined), timeoutMs);
  };

  return {
    pki,
    agentPids,
    trackerPort,
    inventory: inventoryClient,
    distribution: distributionClient,
    distributionOperations,
    cloning: cloningClient,
    cloningOperations,
    watchImageAvailable,
    publishDomain,
    waitForPeerInTracker,
  };
}
