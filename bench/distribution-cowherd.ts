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
import { availableParallelism } from 'node:os';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { DistributeImageResponse } from '../services/gen/cowherd/distribution/v1/distribution_service.js';
import { unpack } from '../services/common/domain/operations.js';
import { Resources } from '../test/harness/index.js';
import { call } from '../test/harness/grpc.js';
import { processCpuSeconds as cpuSeconds, startBenchFleet, waitOperation } from './cowherd-fleet.js';
import { ORIGIN, Stopwatch, receiverHosts, type DistributionMethod } from './distribution-method.js';
import type { Operation } from '../services/gen/google/longrunning/operations.js';

const run = promisify(execFile);
const responseType = DistributeImageResponse;

/** How long the agents' idle CPU is sampled before the transfer. */
const IDLE_SAMPLE_MS = 3_000;

export const cowherdMethod: DistributionMethod = async (bed, image) => {
  const resources = new Resources();
  const say = (text: string): void => void process.stderr.write(`distribution: cowherd: ${text}\n`);
  try {
    // The control plane here, one agent per host in its namespace (cowherd-fleet.ts).
    const hosts = [ORIGIN, ...receiverHosts(bed)];
    const fleet = await startBenchFleet(bed, resources, { hosts });
    const agentPids = fleet.agentPids;
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
    const imageId = `bench-${suffix}`;
    const record = await fleet.publishDomain({ host: ORIGIN, domain: vm, xmlFile: join(vmDirectory, `${vm}.xml`), imageId, description: 'bench:distribution' });
    const bytes = record.files.reduce((sum, file) => sum + Number(file.sizeBytes), 0);
    const diskFile = record.files.find((file) => file.targetDevice === 'vda')!;
    say(`published images/${imageId}: ${record.files.length} files, ${bytes} bytes, info-hash ${record.torrent?.infoHash}`);

    // image.available per receiver, as the agents publish it.
    const stopwatch = new Stopwatch(bed);
    const receivers = receiverHosts(bed);
    await fleet.watchImageAvailable(imageId, (host) => {
      if (receivers.includes(host)) stopwatch.finished(host);
    });

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
    await fleet.waitForPeerInTracker(record.torrent!.infoHash, ORIGIN);
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
      fleet.distribution.distributeImage({ image: `images/${imageId}`, hosts: receivers.map((host) => `hosts/${host}`), requestId: '' }, cb),
    );
    const done = await waitOperation(fleet.distributionOperations, operation.name, 24 * 3_600_000);
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
