/**
 * bench:distribution's cowherd method: the real thing. NATS, the CA, inventory and distribution (with its
 * tracker) run here in the root namespace, joined to the test bed's switch unshaped at 198.18.0.254 (name
 * `cowherd-control` in every host's /etc/hosts, which every service certificate carries); one agent per host
 * runs inside the host's namespace and joins with a join token, as on a real host. The origin's agent
 * publishes the image from a powered-off libvirt domain whose disk is the bench's image converted to qcow2
 * (untimed), then the clock starts and DistributeImage sends it to every receiver. A receiver is done when its
 * agent publishes image.available (after it verified every file's SHA-256 and fsynced); the bench then checks
 * every copy's SHA-256 itself.
 *
 * S for this method is the image as cowherd moves it: the qcow2 disk (the raw image plus qcow2's metadata,
 * ~0.1%) and the domain template.
 */
import { createHash } from 'node:crypto';
import { appendFileSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
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
import { CertificateAuthorityServiceClient } from '../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { DistributeImageResponse, DistributionServiceClient } from '../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Host_State, Image, type Host } from '../services/gen/cowherd/inventory/v1/resources.js';
import { InventoryServiceClient } from '../services/gen/cowherd/inventory/v1/inventory_service.js';
import { OperationsClient, type Operation } from '../services/gen/google/longrunning/operations.js';
import { Resources, TestPki, startTestNats } from '../test/harness/index.js';
import { call, waitFor } from '../test/harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess } from '../test/harness/processes.js';
import { ORIGIN, Stopwatch, receiverHosts, type DistributionMethod } from './distribution-method.js';
import { CONTROL_ADDRESS, CONTROL_NAME, testBedAgentEnvironment } from './testbed.js';

const run = promisify(execFile);
const LOG_DIRECTORY = process.env['COWHERD_BENCH_LOG_DIR'];
/** COWHERD_BENCH_CPU_PROF=<dir>: every agent writes V8 CPU profiles when it stops, one per thread, into `<dir>/<host>/`. */
const PROFILE_DIRECTORY = process.env['COWHERD_BENCH_CPU_PROF'];
/** COWHERD_BENCH_AGENT_NODE_ARGS: more node options for every agent (space-separated, e.g. `--trace-gc`). */
const AGENT_NODE_ARGS = (process.env['COWHERD_BENCH_AGENT_NODE_ARGS'] ?? '').split(' ').filter(Boolean);
const imageType = Image;
const responseType = DistributeImageResponse;

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

/** How long the agents' idle CPU is sampled before the transfer. */
const IDLE_SAMPLE_MS = 3_000;

/** utime + stime of a process, in seconds (/proc/<pid>/stat, 100 ticks a second). */
function cpuSeconds(pid: number): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return 0;
  }
}

export const cowherdMethod: DistributionMethod = async (bed, image) => {
  const resources = new Resources();
  const say = (text: string): void => void process.stderr.write(`distribution: cowherd: ${text}\n`);
  try {
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
    const tracker = `0.0.0.0:${await import('../services/launcher/embedded-nats.js').then(({ freePort }) => freePort())}`;
    const distribution = await startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
      ...any,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_TRACKER_ADDRESS: tracker,
      COWHERD_TRACKER_ANNOUNCE_URL: `http://${CONTROL_ADDRESS}:${tracker.split(':')[1]}/announce`,
    });
    const admin = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'bench')), caPem: pki.ca.certificatePem });
    const caAdmin = createClient(CertificateAuthorityServiceClient, ca.address, admin);
    const inventoryClient = createClient(InventoryServiceClient, inventory.address, admin, { defaultDeadlineMs: 30_000 });
    const distributionClient = createClient(DistributionServiceClient, distribution.address, admin, { defaultDeadlineMs: 30_000 });
    const operations = createClient(OperationsClient, distribution.address, admin, { defaultDeadlineMs: 60_000 });
    resources.defer(() => {
      caAdmin.close();
      inventoryClient.close();
      distributionClient.close();
      operations.close();
    });

    // One agent per host, in its namespace, joining with a token.
    const hosts = [ORIGIN, ...receiverHosts(bed)];
    const agentPids = new Map<string, number>();
    if (LOG_DIRECTORY) await mkdir(LOG_DIRECTORY, { recursive: true });
    for (const host of hosts) {
      const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host, ttl: undefined, requestId: '' }, cb));
      const profile = PROFILE_DIRECTORY ? ['--cpu-prof', `--cpu-prof-dir=${join(PROFILE_DIRECTORY, host)}`] : [];
      const daemon = await bed.spawn(
        host,
        process.execPath,
        [...profile, ...AGENT_NODE_OPTIONS, ...AGENT_NODE_ARGS, '--import', 'tsx', join(REPOSITORY, 'services/agent/main.ts')],
        {
          readyPattern: /"msg":"serving"/,
          readyTimeoutMs: 60_000,
          cwd: REPOSITORY,
          // COWHERD_BENCH_LOG_DIR keeps every agent's log lines (<dir>/<host>.log) for a post-mortem.
          ...(LOG_DIRECTORY ? { onLine: (line: string) => appendFileSync(join(LOG_DIRECTORY, `${host}.log`), `${line}\n`) } : {}),
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
    }
    for (const host of hosts) {
      await waitFor(
        `${host} READY`,
        async () => ((await call<Host>((cb) => inventoryClient.getHost({ name: `hosts/${host}` }, cb))).state === Host_State.STATE_READY ? true : undefined),
        60_000,
      );
    }
    say(`control plane and ${hosts.length} agents up`);

    // The master: a powered-off domain whose disk is the bench image as qcow2, under the origin agent's directory.
    const vmDirectory = join(bed.directory(ORIGIN), 'images-root', 'vms');
    await mkdir(vmDirectory, { recursive: true });
    const suffix = Math.random().toString(36).slice(2, 8);
    const vm = `bench-master-${suffix}`;
    const disk = join(vmDirectory, `${vm}.qcow2`);
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', image.path, disk]);
    const xml = `<domain type='qemu'><name>${vm}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`;
    await writeFile(join(vmDirectory, `${vm}.xml`), xml);
    await run('virsh', ['-c', 'qemu:///system', 'define', join(vmDirectory, `${vm}.xml`)]);
    resources.defer(() =>
      run('virsh', ['-c', 'qemu:///system', 'undefine', vm]).then(
        () => undefined,
        () => undefined,
      ),
    );
    await waitFor(
      'the master VM in inventory',
      async () =>
        (await call<{ state: number }>((cb) => inventoryClient.getVirtualMachine({ name: `hosts/${ORIGIN}/virtualMachines/${vm}` }, cb))).state === 3
          ? true
          : undefined,
      30_000,
    );
    const imageId = `bench-${suffix}`;
    const published = await call<Operation>((cb) =>
      distributionClient.publishImage(
        { imageId, sourceVirtualMachine: `hosts/${ORIGIN}/virtualMachines/${vm}`, description: 'bench:distribution', labels: {}, requestId: '' },
        cb,
      ),
    );
    let publishDone = await call<Operation>((cb) => operations.getOperation({ name: published.name }, cb));
    while (!publishDone.done)
      publishDone = await call<Operation>((cb) => operations.waitOperation({ name: published.name, timeout: { seconds: '10', nanos: 0 } }, cb));
    if (publishDone.result?.$case !== 'response') throw new Error(`publish failed: ${JSON.stringify(publishDone.result)}`);
    const record = unpack(imageType, publishDone.result.value);
    const bytes = record.files.reduce((sum, file) => sum + Number(file.sizeBytes), 0);
    const diskFile = record.files.find((file) => file.targetDevice === 'vda')!;
    say(`published images/${imageId}: ${record.files.length} files, ${bytes} bytes, info-hash ${record.torrent?.infoHash}`);

    // image.available per receiver, as the agents publish it.
    const watcher = await connectNats({
      servers: [nats.url],
      tls: await pki.files('service', 'distribution', { subdirectory: 'bench-watcher' }),
      name: 'bench',
      log: createLogger({ service: 'bench', level: 'silent' }),
    });
    resources.defer(() => watcher.close());
    const stopwatch = new Stopwatch(bed);
    const receivers = receiverHosts(bed);
    const subscription: Subscription = watcher.connection.subscribe(`${EVENT_SUBJECT_PREFIX}.${IMAGE_AVAILABLE.kind}.*`, {
      callback: (error, message) => {
        if (error) return;
        const event = IMAGE_AVAILABLE.decode(message.data);
        const host = event.host.slice('hosts/'.length);
        if (event.image === `images/${imageId}` && receivers.includes(host)) stopwatch.finished(host);
      },
    });
    resources.defer(() => subscription.unsubscribe());
    await watcher.connection.flush();

    // What the agents cost while nothing moves (heartbeats, reports, timers): the floor under every cell's CPU.
    const idleFrom = new Map([...agentPids].map(([host, pid]) => [host, cpuSeconds(pid)]));
    await new Promise((resolve) => setTimeout(resolve, IDLE_SAMPLE_MS));
    const idle = [...agentPids].map(([host, pid]) => cpuSeconds(pid) - (idleFrom.get(host) ?? 0));
    say(
      `agents' CPU while idle, ${IDLE_SAMPLE_MS / 1000} s before the transfer: ${((idle.reduce((sum, seconds) => sum + seconds, 0) / idle.length / IDLE_SAMPLE_MS) * 1000).toFixed(3)} of a core per agent (max ${((Math.max(...idle) / IDLE_SAMPLE_MS) * 1000).toFixed(3)})`,
    );
    const cpuBefore = new Map([...agentPids].map(([host, pid]) => [host, cpuSeconds(pid)]));
    const startedAt = performance.now();
    // Ready to send means the origin is in the swarm: the tracker hands out its address (as the baselines start
    // the clock once their origin has announced as a seed).
    const trackerUrl = `http://127.0.0.1:${tracker.split(':')[1]}/announce`;
    const originPeer = Buffer.from([...bed.address(ORIGIN).split('.').map(Number), 6881 >> 8, 6881 & 0xff]);
    await waitFor(
      'the origin in the tracker',
      async () => ((await trackerPeers(trackerUrl, record.torrent!.infoHash)).includes(originPeer) ? true : undefined),
      30_000,
    );
    await stopwatch.start();
    const startedIso = new Date().toISOString();
    // COWHERD_BENCH_RATES=1: per-second rates of the origin's uplink and r1's downlink, to stderr.
    const rates: string[] = [];
    let last = { origin: await bed.txBytes(ORIGIN), r1: await bed.rxBytes(receivers[0]!) };
    const sampler =
      process.env['COWHERD_BENCH_RATES'] === '1'
        ? setInterval(() => {
            void Promise.all([bed.txBytes(ORIGIN), bed.rxBytes(receivers[0]!)]).then(([origin, r1]) => {
              rates.push(`${((origin - last.origin) / bed.rateBytesPerSecond).toFixed(2)}/${((r1 - last.r1) / bed.rateBytesPerSecond).toFixed(2)}`);
              last = { origin, r1 };
            });
          }, 1000)
        : undefined;
    const operation = await call<Operation>((cb) =>
      distributionClient.distributeImage({ image: `images/${imageId}`, hosts: receivers.map((host) => `hosts/${host}`), requestId: '' }, cb),
    );
    let done = operation;
    while (!done.done) done = await call<Operation>((cb) => operations.waitOperation({ name: operation.name, timeout: { seconds: '10', nanos: 0 } }, cb));
    if (done.result?.$case !== 'response') throw new Error(`DistributeImage failed: ${JSON.stringify(done.result)}`);
    const response = unpack(responseType, done.result.value);
    if (response.failures.length > 0) throw new Error(`hosts failed: ${JSON.stringify(response.failures)}`);
    const copies = receivers.map((host) => join(bed.directory(host), 'images-root', 'images', imageId, diskFile.path));
    const reference = join(bed.directory(ORIGIN), 'images-root', 'images', imageId, diskFile.path);
    const sha256 = createHash('sha256')
      .update(await readFile(reference))
      .digest('hex');
    if (sha256 !== diskFile.sha256) throw new Error('the origin replica does not match its record');
    clearInterval(sampler);
    if (rates.length > 0) say(`per second from ${startedIso}, origin uplink / r1 downlink as a share of the link: ${rates.join(' ')}`);
    const wall = (performance.now() - startedAt) / 1000;
    // Where the time goes: CPU seconds of each agent process while the image moved, against the machine's cores.
    const cpu = [...agentPids].map(([host, pid]) => [host, cpuSeconds(pid) - (cpuBefore.get(host) ?? 0)] as const);
    const total = cpu.reduce((sum, [, seconds]) => sum + seconds, 0);
    say(
      `agents' CPU during the ${wall.toFixed(1)} s: ${cpu.map(([host, seconds]) => `${host} ${seconds.toFixed(1)} s`).join(', ')}; total ${total.toFixed(1)} CPU-s of ${(wall * availableParallelism()).toFixed(1)} available on ${availableParallelism()} cores`,
    );
    const result = await stopwatch.result(receivers, copies, { path: reference, bytes: (await stat(reference)).size, sha256 });
    return { ...result, bytes };
  } finally {
    await resources.release();
  }
};
