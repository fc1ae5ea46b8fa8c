/**
 * A streaming clone boots under TCG before its image has arrived, through the real agents, swarm, streaming server
 * and libvirtd: an image (the guest kit's kernel and busybox initramfs by direct kernel boot, a 96 MiB disk of
 * random data) is published on one host and distributed to a second host whose downloads are capped at 2 MiB/s
 * (the whole replica takes about 50 s). As soon as the replica is arriving, the second host's agent makes a
 * streaming clone (CreateClones with stream) and starts it: its overlay's backing is the replica's disk served
 * over NBD by the host's streaming server. The guest reads its disk, writes its marker and powers off while the
 * replica is still incomplete (the test checks both); its console shows no I/O error. Then the replica completes
 * and verifies (SHA-256 of every file), and the clone, shut off, has its overlay pointed at the local replica.
 *
 *   node --import tsx --test test/integration/streaming-boot.test.ts    (root: libvirtd)
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { AgentServiceClient, type CreateClonesResponse } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest_Delivery,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { unpack } from '../../services/common/domain/operations.js';
import { ImageReplica_State, type Image, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { createClient } from '../../services/common/platform/client.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME } from '../../services/common/domain/resource-names.js';
import { readBackingFileName } from '../../services/agent/hypervisor/index.js';
import { StreamServerClient } from '../../services/agent/streaming/index.js';
import { guestDomainXml } from '../../services/launcher/story.js';
import { Resources } from '../harness/index.js';
import { call, waitFor } from '../harness/grpc.js';
import { guestKit } from '../harness/guest.js';
import { capDownload, startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';

const run = promisify(execFile);
const suffix = Math.random().toString(36).slice(2, 7);
const ORIGIN = `stream-origin-${suffix}`;
const TARGET = `stream-host-${suffix}`;
const MiB = 1024 * 1024;
const DISK_MIB = 96;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('a streaming clone boots before its image has arrived', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false, timeout: 600_000 }, () => {
  const resources = new Resources();
  let stack: CloneStack;
  let target: StackAgent;
  let agent: AgentServiceClient;
  /** The agent as distribution calls it (GetImageReplica is distribution's). */
  let replicas: AgentServiceClient;
  const image = `stream-${suffix}`;
  let record: Image;
  /** Image directories of hosts added by the second case. */
  const thirdDirectories: string[] = [];
  const scoped = { COWHERD_DOMAIN_SCOPE: 'image-directory', COWHERD_STREAM_IDLE_EXIT_MS: '3000', COWHERD_STREAM_PROFILE_WINDOW_MS: '15000' };
  const cap = (host: string, bytesPerSecond: number, agent: Pick<StackAgent, 'process'>): Promise<void> => capDownload(stack, host, bytesPerSecond, agent);

  before(async () => {
    const [kit, started] = await Promise.all([guestKit(), startCloneStack(resources, ORIGIN, { firstAgentEnv: scoped })]);
    stack = started;
    // The master: Debian's bzImage (8 MB: a streamed clone needs its boot files whole before it starts) and the
    // busybox initramfs, a qcow2 disk of random data.
    const master = `stream-master-${suffix}`;
    const vmDirectory = join(stack.imageDirectory, 'vms');
    await mkdir(vmDirectory, { recursive: true });
    const raw = join(vmDirectory, `${master}.raw`);
    await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${DISK_MIB}`, 'status=none']);
    const disk = join(vmDirectory, `${master}.qcow2`);
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, disk]);
    await writeFile(
      join(vmDirectory, `${master}.xml`),
      guestDomainXml({
        name: master,
        memoryMib: 192,
        kernel: kit.vmlinuz,
        initrd: kit.initrd,
        // The guest reads 6 MiB scattered over its disk before its marker (scripts/guest-kernel.sh cowherd.reads).
        commandLine: `console=ttyS0 quiet panic=-1 no_timer_check marker=${suffix} cowherd.reads=24x256@56`,
        disk,
        console: join(vmDirectory, `${master}.console.log`),
      }),
    );
    await stack.virsh('define', join(vmDirectory, `${master}.xml`));
    stack.track(master);
    await waitFor(
      'the master in inventory, shut off',
      async () =>
        await call<{ state: number }>((cb) => stack.inventory.getVirtualMachine({ name: `hosts/${ORIGIN}/virtualMachines/${master}` }, cb)).then(
          (vm) => (vm.state === 3 ? true : undefined),
          () => undefined,
        ),
      60_000,
    );
    const publishing = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        { imageId: image, sourceVirtualMachine: `hosts/${ORIGIN}/virtualMachines/${master}`, description: 'streaming boot test', labels: {}, requestId: '' },
        cb,
      ),
    );
    const published = await stack.wait(publishing.name, 300_000, stack.distributionOperations);
    assert.equal(published.result?.$case, 'response', JSON.stringify(published.result));
    record = await call<Image>((cb) => stack.inventory.getImage({ name: IMAGE_NAME.format({ image }), view: 0 }, cb));

    target = await stack.addAgent(TARGET, scoped);
    await stack.waitHostsReady([TARGET]);
    // A download cap (UpdateHost; the agent applies it at its next heartbeat) makes the replica take ~50 s.
    await cap(TARGET, 2 * MiB, target);
    agent = createClient(
      AgentServiceClient,
      target.process.address,
      mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials('service', 'cloning')), caPem: stack.pki.ca.certificatePem }),
      { defaultDeadlineMs: 180_000 },
    );
    replicas = createClient(
      AgentServiceClient,
      target.process.address,
      mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials('service', 'distribution')), caPem: stack.pki.ca.certificatePem }),
    );
  });
  /** The streaming servers the hosts started (their pid files), read before release removes the directories. */
  const streamingServers = async (): Promise<number[]> => {
    const pids: number[] = [];
    for (const directory of [target?.imageDirectory, ...thirdDirectories])
      if (directory) {
        const pid = Number(await readFile(join(directory, '.streaming', 'server.pid'), 'utf8').catch(() => ''));
        if (pid > 0) pids.push(pid);
      }
    return pids;
  };
  after(async () => {
    agent?.close();
    replicas?.close();
    const servers = await streamingServers();
    await resources.release();
    // A streaming server outlives its agent by design and exits once it has had no guest and no agent for its idle
    // time (3 s here): wait for that, so that no process of this file is left behind; stop one that does not.
    const alive = (pid: number): boolean => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    };
    const deadline = Date.now() + 20_000;
    while (servers.some(alive) && Date.now() < deadline) await sleep(200);
    const stuck = servers.filter(alive);
    for (const pid of stuck) process.kill(pid, 'SIGTERM');
    assert.deepEqual(stuck, [], 'the streaming servers exited once idle');
  });

  it('boots from the stream, writes its marker before the replica is complete, then settles on the local replica', async (t) => {
    const replicaName = HOST_IMAGE_NAME.format({ host: TARGET, image });
    const replica = (): Promise<ImageReplica> => call<ImageReplica>((cb) => replicas.getImageReplica({ name: replicaName }, cb));
    const t0 = performance.now();
    const distributing = await call<Operation>((cb) =>
      stack.distribution.distributeImage({ image: IMAGE_NAME.format({ image }), hosts: [HOST_NAME.format({ host: TARGET })], requestId: '' }, cb),
    );
    await waitFor(
      'the replica arriving',
      async () =>
        (await replica().then(
          (found) => found.state === ImageReplica_State.STATE_TRANSFERRING,
          () => false,
        )) || undefined,
      60_000,
    );

    const arriving = await replica();
    t.diagnostic(`replica ${ImageReplica_State[arriving.state]} ${JSON.stringify(arriving.progress)} after ${Math.round(performance.now() - t0)} ms`);
    const name = `${image}-streamed`;
    stack.track(name);
    const response = await call<CreateClonesResponse>((cb) =>
      agent.createClones(
        {
          source: { $case: 'image', value: IMAGE_NAME.format({ image }) },
          clones: [{ domainName: name, start: true, index: 1 }],
          operation: '',
          requestId: `stream-${suffix}`,
          validateOnly: false,
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          dataDiskBytes: '0',
          stream: true,
          diskBackend: 0,
        },
        cb,
      ),
    );
    const result = response.results[0]!;
    assert.equal(result.status?.code ?? 0, 0, JSON.stringify(result.status));
    assert.equal(result.started, true);
    t.diagnostic(`limits: ${JSON.stringify(target.process.logs.filter((line) => line['msg'] === 'transfer limits applied'))}`);
    t.diagnostic(`replica after the clone: ${JSON.stringify(await replica())}`);
    assert.equal(result.streaming, true, 'made on the replica while it arrives');
    const overlay = result.virtualMachine!.lineage!.overlays[0]!;
    const backing = await readBackingFileName(overlay);
    assert.match(backing ?? '', /^nbd\+unix:\/\/\/.+\?socket=.+\/\.streaming\/nbd\.sock$/, 'the overlay is backed by the streaming server');
    t.diagnostic(`clone started ${Math.round(performance.now() - t0)} ms after the distribution began (boot files fetched first)`);

    // The guest reads its disk (the kernel's partition scan, /init's look at the marker block), writes, powers off.
    await waitFor('the guest powered off', async () => ((await stack.virsh('domstate', name)).stdout.trim() === 'shut off' ? true : undefined), 240_000);
    const offAt = performance.now();
    const during = await replica();
    const consoleOutput = await readFile(join(target.imageDirectory, 'clones', name, 'serial-0.out'), 'utf8');
    const context = `console:\n${consoleOutput.slice(-3000)}`;
    assert.match(consoleOutput, /cowherd-guest: marker written/, context);
    assert.doesNotMatch(consoleOutput, /I\/O error|blk_update_request|Buffer I\/O|EXT4-fs error|print_req_error/i, context);
    const done = Number(during.progress?.bytesDone ?? 0);
    const total = Number(record.torrent!.totalBytes);
    t.diagnostic(`guest off ${Math.round(offAt - t0)} ms after the distribution began, with ${Math.round((100 * done) / total)}% of the replica here`);
    assert.equal(during.state, ImageReplica_State.STATE_TRANSFERRING, 'the replica was still arriving when the guest had written its marker');
    assert.ok(done < total, `${done} of ${total} bytes when the guest was done`);

    const streaming = new StreamServerClient({ directory: join(target.imageDirectory, '.streaming'), onWant: () => undefined });
    const status = await streaming.status();
    streaming.close();
    assert.ok(status, 'the streaming server runs');
    t.diagnostic(`streaming server: ${JSON.stringify(status.statistics)}`);
    assert.ok(status.statistics.reads > 0, 'the guest read through the server');
    assert.equal(status.statistics.failedReads, 0);

    // The replica completes and verifies; the clone, shut off, is pointed at the local file.
    const distributed = await stack.wait(distributing.name, 300_000, stack.distributionOperations);
    assert.equal(distributed.result?.$case, 'response', JSON.stringify(distributed.result));
    assert.equal((await replica()).state, ImageReplica_State.STATE_AVAILABLE);
    for (const file of record.files) {
      const digest = createHash('sha256')
        .update(await readFile(join(target.imageDirectory, 'images', image, file.path)))
        .digest('hex');
      assert.equal(digest, file.sha256, `${file.path} verifies`);
    }
    const local = join(target.imageDirectory, 'images', image, record.files.find((file) => file.path.endsWith('.qcow2'))!.path);
    await waitFor('the overlay pointed at the local replica', async () => ((await readBackingFileName(overlay)) === local ? true : undefined), 30_000);
    const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', '--backing-chain', overlay])).stdout) as Array<{ filename: string }>;
    assert.deepEqual(
      info.map((entry) => entry.filename),
      [overlay, local],
      'the chain names the local replica',
    );
    // The replica counts its clone as a dependent.
    const after = await replica();
    assert.deepEqual(after.dependentVirtualMachines, [`hosts/${TARGET}/virtualMachines/${name}`]);
    // It boots again from the local replica.
    await stack.virsh('start', name);
    await waitFor('the second boot powered off', async () => ((await stack.virsh('domstate', name)).stdout.trim() === 'shut off' ? true : undefined), 240_000);
    const second = await readFile(join(target.imageDirectory, 'clones', name, 'serial-0.out'), 'utf8');
    assert.match(second, new RegExp(`cowherd-guest: system cowherd-was-here-${suffix}`), `the second boot reads the first's marker:\n${second.slice(-2000)}`);
  });

  it('through the cloning service (delivery STREAM): the recorded read profile first, STREAMING with progress, an agent killed while its guest boots, then DONE', async (t) => {
    // The first streamed boot recorded what the guest read; distribution keeps it with the image version.
    const profiled = await waitFor(
      'the read profile in the image record',
      async () => {
        const found = await call<Image>((cb) => stack.inventory.getImage({ name: IMAGE_NAME.format({ image }), view: 0 }, cb));
        return (found.readProfile?.pieces.length ?? 0) > 0 ? found : undefined;
      },
      90_000,
    );
    t.diagnostic(
      `read profile: ${profiled.readProfile!.pieces.length} pieces, ${profiled.readProfile!.bytesRead} bytes read, from ${profiled.readProfile!.host}`,
    );
    assert.equal(profiled.readProfile!.host, HOST_NAME.format({ host: TARGET }));

    const host = `stream-third-${suffix}`;
    const third = await stack.addAgent(host, scoped);
    thirdDirectories.push(third.imageDirectory);
    await stack.waitHostsReady([host]);
    await cap(host, 2 * MiB, third);
    const name = `${image}-cs-1`;
    stack.track(name);
    const t0 = performance.now();
    const operation = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          source: { $case: 'image', value: IMAGE_NAME.format({ image }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [HOST_NAME.format({ host })], maxClonesPerHost: 0 },
          count: 1,
          nameTemplate: `${image}-cs-{index}`,
          start: true,
          requestId: '',
          guestConfiguration: undefined,
          dataDiskBytes: '0',
          delivery: CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM,
          diskBackend: 0,
        },
        cb,
      ),
    );
    const metadata = async (): Promise<CloneVirtualMachinesMetadata> =>
      unpack(CloneVirtualMachinesMetadata, (await call<Operation>((cb) => stack.operations.getOperation({ name: operation.name }, cb))).metadata);
    let last: CloneVirtualMachinesMetadata | undefined;
    const streamingNow = await waitFor(
      'the clone STREAMING',
      async () => {
        last = await metadata();
        return last.clones[0]?.state === CloneResult_State.STATE_STREAMING ? last : undefined;
      },
      120_000,
    ).catch((error: unknown) => {
      const about = (logs: Array<Record<string, unknown>>) => logs.filter((line) => /stream|clone batch|CreateClones|agent/i.test(String(line['msg'])));
      throw new Error(
        `${(error as Error).message}; last metadata ${JSON.stringify(last)}; cloning: ${JSON.stringify(about(stack.cloningProcess.logs))}; agent: ${JSON.stringify(about(third.process.logs))}`,
      );
    });
    const progress = streamingNow.clones[0]!.baseProgress;
    t.diagnostic(`STREAMING ${Math.round(performance.now() - t0)} ms after the request, base ${progress?.bytesDone}/${progress?.bytesTotal}`);
    assert.ok(Number(progress?.bytesTotal ?? 0) > 0, 'base_progress says how much there is');

    // The agent dies while the guest boots; its streaming server keeps the guest's disk (reads of pieces not there wait).
    process.kill(third.process.daemon.pid, 'SIGKILL');
    await third.process.daemon.exited;
    await sleep(3000);
    const restarted = await third.restart();
    t.diagnostic(`agent killed and restarted ${Math.round(performance.now() - t0)} ms after the request`);
    await waitFor('the guest powered off', async () => ((await stack.virsh('domstate', name)).stdout.trim() === 'shut off' ? true : undefined), 240_000);
    const consoleOutput = await readFile(join(third.imageDirectory, 'clones', name, 'serial-0.out'), 'utf8');
    const context = `console:\n${consoleOutput.slice(-3000)}`;
    assert.match(consoleOutput, /cowherd-guest: read 24 blocks/, context);
    assert.match(consoleOutput, /cowherd-guest: marker written/, context);
    assert.doesNotMatch(consoleOutput, /I\/O error|blk_update_request|Buffer I\/O|print_req_error|reads failed/i, context);
    t.diagnostic(
      consoleOutput
        .split('\n')
        .filter((line) => line.includes('cowherd-guest: read') || line.includes('slowest'))
        .join(' | '),
    );

    const done = await stack.wait(operation.name, 300_000);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const response = unpack(CloneVirtualMachinesResponse, done.result.value);
    assert.equal(response.clones[0]?.state, CloneResult_State.STATE_DONE, JSON.stringify(response.clones[0]));
    assert.equal(Number(response.clones[0]?.baseProgress?.bytesDone), Number(response.clones[0]?.baseProgress?.bytesTotal));
    assert.ok(
      [third.process, restarted].some((agent) => agent.logs.some((line) => line['msg'] === 'prefetching the read profile')),
      'the third host fetched the profile first',
    );
  });
});
