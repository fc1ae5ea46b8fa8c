/**
 * The fault suite's fleet, on real parts: the three-node NATS cluster (nats-cluster.ts), the certificate
 * authority, inventory, distribution and cloning as real processes (test/harness/processes.ts), and one agent
 * per host of a network-namespace test bed (bench/testbed.ts), each joining with a join token, all on this
 * machine's libvirtd (qemu:///system) and qemu-img. The services run here and listen on every address; the
 * agents reach them as `cowherd-control` (198.18.0.254, the test bed's unshaped link to this namespace), which
 * every service certificate names. Running each agent in a namespace of its own is what lets a fault cut one
 * host off the network while its process lives on.
 *
 * Hosts: `origin` (holds the master VM and publishes), `recv1`..`recv3` (receivers; clones go to `origin` and
 * `recv1`) and `small`, whose image directory is a 40 MiB tmpfs mounted before its agent starts (the disk that
 * fills up). Receivers download at most {@link RECEIVER_DOWNLOAD_BYTES_PER_SECOND} (UpdateHost transfer limits),
 * so a distribution of the master image lasts long enough to be caught mid-transfer.
 *
 * Distribution and cloning keep their ports across a restart (the suite SIGKILLs them): cloning reaches
 * distribution at a fixed address, and the agents announce to a fixed tracker.
 */
import { spawnSync } from 'node:child_process';
import { appendFileSync, mkdirSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createClient, call } from '../../services/common/platform/client.js';
import { freePort } from '../../services/launcher/embedded-nats.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { AGENT_NODE_OPTIONS } from '../../services/common/platform/node-options.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { runCommand, type Daemon } from '../../services/common/platform/child-process.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import type { ProcessName } from '../../services/common/platform/service-process.js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { CloningServiceClient } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributionServiceClient } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host, Host_State, VirtualMachine_State, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { OperationsClient } from '../../services/gen/google/longrunning/operations.js';
import { CONTROL_ADDRESS, CONTROL_NAME, TestBed, testBedAgentEnvironment } from '../../bench/testbed.js';
import { Resources, TestPki } from '../harness/index.js';
import { setDownloadLimit } from '../harness/clone-stack.js';
import { waitFor } from '../harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';
import { startNatsCluster, withoutCowherdVariables, type NatsCluster } from './nats-cluster.js';
import { HOST_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

export const ORIGIN = 'origin';
export const RECEIVERS = ['recv1', 'recv2', 'recv3'] as const;
export const SMALL = 'small';
export const HOSTS = [ORIGIN, ...RECEIVERS, SMALL] as const;
/** The master image's disk: random data, so that every byte travels. */
export const MASTER_DISK_MIB = 24;
/** Receivers' download cap: the master image takes ~24 s per receiver. */
export const RECEIVER_DOWNLOAD_BYTES_PER_SECOND = 1024 * 1024;
/** The small host's image directory: room for one image and a little more (a file fills it during the fault). */
export const SMALL_DISK_MIB = 40;
/**
 * Progress deadlines shorter than the defaults (10 and 15 minutes without progress), so that a step that
 * never ends is ended by the services within the suite's bound (row.ts RECOVERY_BOUND_SECONDS): a
 * distribution step fails after 90 s without progress, clones waiting for an image after 120 s (above
 * distribution's, as cloning's README asks), a VERIFYING replica after 30 s plus its bytes at 16 MiB/s. The
 * 60 s network cut stays below them: a host that comes back must finish its work, not fail it.
 */
export const PROGRESS_DEADLINES = {
  distribution: { COWHERD_DISTRIBUTE_STALL_SECONDS: '90', COWHERD_DISTRIBUTE_VERIFY_FLOOR_SECONDS: '30' },
  cloning: { COWHERD_IMAGE_WAIT_STALL_SECONDS: '120', COWHERD_IMAGE_WAIT_VERIFY_FLOOR_SECONDS: '30' },
} as const;
/** Every RPC the suite makes has this deadline unless it says otherwise. */
export const RPC_DEADLINE_MS = 15_000;

/** An agent in its namespace. */
export interface FleetAgent {
  readonly host: string;
  readonly imageDirectory: string;
  /** The running process; undefined after kill() until start(). */
  readonly daemon: Daemon | undefined;
  kill(): Promise<void>;
  start(): Promise<void>;
}

/** A service process that the suite can SIGKILL and start again on the same ports. */
export interface FleetService {
  readonly name: ProcessName;
  readonly process: ServiceProcess | undefined;
  kill(): Promise<void>;
  start(): Promise<void>;
}

/** The running fleet. */
export interface FaultFleet {
  readonly bed: TestBed;
  readonly nats: NatsCluster;
  readonly agents: ReadonlyMap<string, FleetAgent>;
  readonly distribution: FleetService;
  readonly cloning: FleetService;
  readonly clients: {
    readonly inventory: InventoryServiceClient;
    readonly distribution: DistributionServiceClient;
    readonly cloning: CloningServiceClient;
    readonly distributionOperations: OperationsClient;
    readonly cloningOperations: OperationsClient;
  };
  /** A NATS connection with a service identity (reads the event stream). */
  readonly reader: Nats;
  /** The master VM on `origin`: `hosts/origin/virtualMachines/<name>`. */
  readonly masterVm: string;
  /** A prefix unique to this run (domain and image names). */
  readonly runId: string;
  /** Where every process's log lines go. */
  readonly logDirectory: string;
  virsh(...args: string[]): Promise<string>;
  /** Notes for the run's log (stderr). */
  say(text: string): void;
}

/** Builds the whole fleet; everything is released with `resources` (the test bed's namespaces included). */
export async function startFaultFleet(resources: Resources, logDirectory: string): Promise<FaultFleet> {
  const say = (text: string): void => void process.stderr.write(`faults: ${text}\n`);
  mkdirSync(logDirectory, { recursive: true });
  const logTo = (label: string) => (line: string) => appendFileSync(join(logDirectory, `${label}.log`), `${line}\n`);
  const runId = `f${Date.now().toString(36).slice(-5)}`;
  const virsh = (...args: string[]): Promise<string> => runCommand('virsh', ['-c', 'qemu:///system', ...args], { timeoutMs: 120_000 });

  // Loop and tmpfs mounts must exist before libvirtd starts, or it never sees them; the small disk is one, but
  // only its agent needs it (no clones go there), so the order does not matter here.
  // A libvirtd this suite starts is stopped again at the end (as npm test does); one that ran before stays.
  const libvirtdScript = join(REPOSITORY, 'scripts/libvirtd.sh');
  const libvirtdWasRunning = await runCommand('bash', [libvirtdScript, 'status']).then(
    () => true,
    () => false,
  );
  await runCommand('bash', [libvirtdScript, 'start'], { timeoutMs: 120_000 });
  if (!libvirtdWasRunning)
    resources.defer(() =>
      runCommand('bash', [libvirtdScript, 'stop'], { timeoutMs: 60_000 }).then(
        () => undefined,
        () => undefined,
      ),
    );
  // The test bed removes its namespaces and directories by itself on exit; the small disk must be unmounted
  // before that (registered first, so it runs first), or the bed would empty a mounted tmpfs and leave it.
  let mounted: string | undefined;
  const unmountOnExit = (): void => {
    if (mounted) spawnSync('umount', ['-l', mounted]);
  };
  process.once('exit', unmountOnExit);
  resources.defer(() => void process.off('exit', unmountOnExit));
  const signalListeners = { SIGINT: process.listeners('SIGINT'), SIGTERM: process.listeners('SIGTERM') };
  const bed = await TestBed.create({ hosts: [...HOSTS], rateMbit: 1000 });
  // The bed's own SIGINT/SIGTERM handler exits at once; the runner's handler releases everything in order
  // (processes, domains, the mount, then the bed) and exits itself.
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    for (const listener of process.listeners(signal))
      if (!signalListeners[signal].includes(listener)) process.off(signal, listener as (signal: NodeJS.Signals) => void);
  }
  resources.defer(() => bed.destroy());
  await bed.connectRoot(CONTROL_ADDRESS);
  await bed.setHostNames({ [CONTROL_NAME]: CONTROL_ADDRESS });
  const smallImages = join(bed.directory(SMALL), 'images-root');
  await mkdir(smallImages, { recursive: true });
  await runCommand('mount', ['-t', 'tmpfs', '-o', `size=${SMALL_DISK_MIB}m`, 'cowherd-faults-small', smallImages]);
  mounted = smallImages;
  // Registered after the test bed, so it runs before the bed removes the directory.
  resources.defer(async () => {
    await runCommand('umount', ['-l', smallImages]);
    mounted = undefined;
  });

  const pki = await TestPki.create(await resources.tempDir('cowherd-test-faults-'));
  pki.extraDnsNames = [CONTROL_NAME];
  const nats = await startNatsCluster(resources, {
    tls: await pki.files('service', 'nats', { subdirectory: 'nats-server' }),
    directory: await resources.tempDir('cowherd-nats-'),
    onLine: (label, line) => logTo(label)(line),
  });
  const caPort = await freePort();
  await nats.startSidecars(`localhost:${caPort}`);
  say(`NATS cluster up (${nats.urls.join(', ')}), buckets replicated 3 times`);

  const natsUrl = nats.urls.join(',');
  const common = { COWHERD_EVENT_STREAM_REPLICAS: '3', COWHERD_LOG_LEVEL: 'info' };
  const ca = await startCertificateAuthorityProcess(
    resources,
    pki,
    { url: natsUrl },
    { env: { ...common, COWHERD_LISTEN_ADDRESS: `0.0.0.0:${caPort}`, COWHERD_ENROLL_ADDRESS: `0.0.0.0:${await freePort()}` } },
  );
  const withLogs = (label: string, process: ServiceProcess): ServiceProcess => {
    for (const line of process.logs) logTo(label)(JSON.stringify(line));
    const push = process.logs.push.bind(process.logs);
    process.logs.push = (...lines) => {
      for (const line of lines) logTo(label)(JSON.stringify(line));
      return push(...lines);
    };
    return process;
  };
  withLogs('certificate-authority', ca);
  const inventory = withLogs(
    'inventory',
    await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), natsUrl, {
      ...common,
      COWHERD_LISTEN_ADDRESS: `0.0.0.0:${await freePort()}`,
      COWHERD_CA_ADDRESS: ca.address,
    }),
  );

  const distributionPort = await freePort();
  const trackerPort = await freePort();
  const distributionEnv = {
    ...common,
    COWHERD_LISTEN_ADDRESS: `0.0.0.0:${distributionPort}`,
    COWHERD_HEALTH_ADDRESS: `localhost:${await freePort()}`,
    COWHERD_METRICS_ADDRESS: `localhost:${await freePort()}`,
    COWHERD_CA_ADDRESS: ca.address,
    COWHERD_INVENTORY_ADDRESS: inventory.address,
    COWHERD_TRACKER_ADDRESS: `0.0.0.0:${trackerPort}`,
    COWHERD_TRACKER_ANNOUNCE_URL: `http://${CONTROL_ADDRESS}:${trackerPort}/announce`,
    ...PROGRESS_DEADLINES.distribution,
  };
  const distributionTls = await pki.files('service', 'distribution');
  const cloningPort = await freePort();
  const cloningEnv = {
    ...common,
    COWHERD_LISTEN_ADDRESS: `0.0.0.0:${cloningPort}`,
    COWHERD_HEALTH_ADDRESS: `localhost:${await freePort()}`,
    COWHERD_METRICS_ADDRESS: `localhost:${await freePort()}`,
    COWHERD_CA_ADDRESS: ca.address,
    COWHERD_INVENTORY_ADDRESS: inventory.address,
    COWHERD_DISTRIBUTION_ADDRESS: `localhost:${distributionPort}`,
    ...PROGRESS_DEADLINES.cloning,
  };
  const cloningTls = await pki.files('service', 'cloning');
  const restartable = (name: 'distribution' | 'cloning', tls: typeof cloningTls, env: Record<string, string>): FleetService => {
    let current: ServiceProcess | undefined;
    return {
      name,
      get process() {
        return current;
      },
      kill: async () => {
        const victim = current;
        current = undefined;
        if (!victim) return;
        process.kill(victim.daemon.pid, 'SIGKILL');
        await victim.daemon.exited;
      },
      start: async () => {
        current = withLogs(name, await startServiceProcess(resources, name, tls, natsUrl, env));
      },
    };
  };
  const distribution = restartable('distribution', distributionTls, distributionEnv);
  await distribution.start();
  const cloning = restartable('cloning', cloningTls, cloningEnv);
  await cloning.start();
  say('certificate authority, inventory, distribution and cloning up');

  const admin = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'faults')), caPem: pki.ca.certificatePem });
  const caAdmin = createClient(CertificateAuthorityServiceClient, ca.address, admin, { defaultDeadlineMs: RPC_DEADLINE_MS });
  const clients = {
    inventory: createClient(InventoryServiceClient, inventory.address, admin, { defaultDeadlineMs: RPC_DEADLINE_MS }),
    distribution: createClient(DistributionServiceClient, `localhost:${distributionPort}`, admin, { defaultDeadlineMs: RPC_DEADLINE_MS }),
    cloning: createClient(CloningServiceClient, `localhost:${cloningPort}`, admin, { defaultDeadlineMs: RPC_DEADLINE_MS }),
    distributionOperations: createClient(OperationsClient, `localhost:${distributionPort}`, admin, { defaultDeadlineMs: RPC_DEADLINE_MS }),
    cloningOperations: createClient(OperationsClient, `localhost:${cloningPort}`, admin, { defaultDeadlineMs: RPC_DEADLINE_MS }),
  };
  resources.defer(() => {
    caAdmin.close();
    for (const client of Object.values(clients)) client.close();
  });

  // Every domain of this run (the master and every clone) is undefined at the end, after the agents stopped
  // (registered first, so it runs last) and in one virsh process: one by one, with five agents re-reading
  // libvirt after each change, 200 domains took minutes.
  resources.defer(async () => {
    const names = (await virsh('list', '--all', '--name').catch(() => ''))
      .split('\n')
      .map((name) => name.trim())
      .filter((name) => name.startsWith(`${runId}-`));
    if (names.length === 0) return;
    // Names are ours (run id, row, index): no quoting needed beyond virsh's own.
    await virsh(names.map((name) => `undefine --domain ${name}`).join('; ')).catch(() => undefined);
    const left = (await virsh('list', '--all', '--name').catch(() => ''))
      .split('\n')
      .map((name) => name.trim())
      .filter((name) => name.startsWith(`${runId}-`));
    for (const name of left) await virsh('undefine', name).catch(() => undefined);
  });

  // One agent per host, in its namespace, joining with a token like any host.
  const agents = new Map<string, FleetAgent>();
  for (const host of HOSTS) {
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host, ttl: undefined, requestId: '' }, cb));
    const root = bed.directory(host);
    const imageDirectory = join(root, 'images-root');
    const env: Record<string, string> = {
      ...withoutCowherdVariables(process.env),
      ...testBedAgentEnvironment(bed, host, {
        enrollAddress: ca.enrollAddress,
        caAddress: ca.address,
        inventoryAddress: inventory.address,
        natsUrl: nats.urlsFor(CONTROL_NAME).join(','),
      }),
      COWHERD_SHUTDOWN_GRACE_SECONDS: '5',
    };
    let daemon: Daemon | undefined;
    let firstStart = true;
    const agent: FleetAgent = {
      host,
      imageDirectory,
      get daemon() {
        return daemon;
      },
      kill: async () => {
        const victim = daemon;
        daemon = undefined;
        if (!victim) return;
        process.kill(victim.pid, 'SIGKILL');
        await victim.exited;
      },
      start: async () => {
        // The token is spent on the first start; later starts use the stored identity.
        const startEnv = firstStart ? { ...env, COWHERD_JOIN_TOKEN: token.token } : env;
        daemon = await bed.spawn(host, process.execPath, ['--import', 'tsx', ...AGENT_NODE_OPTIONS, join(REPOSITORY, 'services/agent/main.ts')], {
          readyPattern: /"msg":"serving"/,
          readyTimeoutMs: 90_000,
          cwd: REPOSITORY,
          env: startEnv,
          onLine: logTo(`agent-${host}`),
        });
        firstStart = false;
      },
    };
    agents.set(host, agent);
  }
  // One after another, and a join refused with INTERNAL is tried again: each enrollment makes every NATS sidecar
  // reload its server, and during a reload nats-server 2.9 answers JetStream API calls with "no responders" for a
  // moment (seen as EnrollHost INTERNAL when five agents joined at once; reported by the suite's README section).
  for (const agent of agents.values()) {
    for (let attempt = 1; ; attempt++) {
      try {
        await agent.start();
        break;
      } catch (error) {
        if (attempt >= 3 || !/cannot join the fleet: 13 INTERNAL/.test(String((error as Error).message))) throw error;
        say(`${agent.host}: join refused with INTERNAL (attempt ${attempt}); trying again`);
        await new Promise((resolve) => setTimeout(resolve, 2_000));
      }
    }
  }
  resources.defer(async () => {
    for (const agent of agents.values()) await agent.daemon?.stop(10_000);
  });
  for (const host of HOSTS) {
    await waitFor(
      `${host} READY`,
      async () =>
        (await call<Host>((cb) => clients.inventory.getHost({ name: HOST_NAME.format({ host }) }, cb))).state === Host_State.STATE_READY ? true : undefined,
      90_000,
    );
  }
  for (const host of [...RECEIVERS, SMALL]) await setDownloadLimit(clients.inventory, host, RECEIVER_DOWNLOAD_BYTES_PER_SECOND);
  // Inventory hands the limits to each agent with its next heartbeat's answer (10 s apart): the first row must
  // not start before every receiver has one, or its transfer runs unshaped (seen: 25 MB in 3 s).
  const limitsSet = Date.now();
  for (const host of [...RECEIVERS, SMALL]) {
    await waitFor(
      `${host} heartbeat after its transfer limits`,
      async () => {
        const record = await call<Host>((cb) => clients.inventory.getHost({ name: HOST_NAME.format({ host }) }, cb));
        return (record.lastHeartbeatTime?.getTime() ?? 0) > limitsSet + 500 ? true : undefined;
      },
      60_000,
    );
  }
  say(`${HOSTS.length} agents READY in their namespaces (${HOSTS.join(', ')}); receivers capped at ${RECEIVER_DOWNLOAD_BYTES_PER_SECOND} B/s down`);

  // The master VM: a powered-off domain on origin whose disk is random data.
  const vmDirectory = join(agents.get(ORIGIN)!.imageDirectory, 'vms');
  await mkdir(vmDirectory, { recursive: true });
  const vm = `${runId}-master`;
  const raw = join(vmDirectory, `${vm}.raw`);
  const disk = join(vmDirectory, `${vm}.qcow2`);
  await runCommand('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${MASTER_DISK_MIB}`, 'status=none']);
  await runCommand('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, disk]);
  await runCommand('rm', ['-f', raw]);
  const xml = `<domain type='qemu'><name>${vm}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`;
  await writeFile(join(vmDirectory, `${vm}.xml`), xml);
  await virsh('define', join(vmDirectory, `${vm}.xml`));
  const masterVm = VIRTUAL_MACHINE_NAME.format({ host: ORIGIN, virtualMachine: vm });
  await waitFor(
    'the master VM in inventory',
    async () =>
      (await call<VirtualMachine>((cb) => clients.inventory.getVirtualMachine({ name: masterVm }, cb))).state === VirtualMachine_State.STATE_SHUT_OFF
        ? true
        : undefined,
    60_000,
  );

  const reader = await connectNats({
    servers: nats.urls,
    tls: await pki.files('service', 'distribution', { subdirectory: 'fault-reader' }),
    name: 'fault-suite',
    log: createLogger({ service: 'faults', level: 'silent' }),
  });
  resources.defer(() => reader.close());
  return { bed, nats, agents, distribution, cloning, clients, reader, masterVm, runId, logDirectory, virsh, say };
}
