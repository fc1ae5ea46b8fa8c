/**
 * DistributeImage on real parts, on loopback: NATS, CA, inventory, distribution (with its tracker) and four
 * agents on the private libvirtd, each with its own image directory, webtorrent and web seed. An image is
 * published from a real libvirt domain's qcow2 disk and distributed peer-to-peer; every copy is checked
 * (SHA-256 on disk); image.available arrives once per host on a durable consumer; a receiver killed half-way
 * resumes with only the missing part; a tampered replica is fetched again; a full disk fails one host
 * cleanly; the origin can go away once a receiver is complete; bad requests change nothing.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, mkdir, open, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { IMAGE_AVAILABLE } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { KvStore, protoCodec } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { unpack } from '../../services/common/domain/operations.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { CloneResult_State, CloneVirtualMachinesResponse, Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributeImageMetadata, DistributeImageResponse } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import type { ImageAvailable } from '../../services/gen/cowherd/events/v1/events.js';
import { Host, Host_State, Image, ImageReplica_State, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { pieceLengthFor } from '../../services/agent/swarm/torrent.js';
import { startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';
import { createClient } from '../../services/common/platform/client.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { AgentServiceClient } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { call, failure, waitFor } from '../harness/grpc.js';
import { Resources } from '../harness/index.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

describe('distributing an image peer-to-peer', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd, tmpfs)' : false, timeout: 600_000 }, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const vm = `dist-src-${suffix}`;
  const imageId = `dist-${suffix}`;
  let stack: CloneStack;
  const agents = new Map<string, StackAgent>();
  let image: Image;
  const available: Array<{ host: string; operation: string }> = [];

  async function distribute(hosts: string[], requestId = ''): Promise<Operation> {
    return call<Operation>((cb) =>
      stack.distribution.distributeImage(
        { image: IMAGE_NAME.format({ image: imageId }), hosts: hosts.map((host) => HOST_NAME.format({ host })), requestId },
        cb,
      ),
    );
  }

  async function finished(operation: Operation): Promise<DistributeImageResponse> {
    const done = await stack.wait(operation.name, 240_000, stack.distributionOperations);
    assert.equal(done.done, true, 'the operation finished');
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    return unpack(DistributeImageResponse, done.result.value);
  }

  async function assertVerifiedCopy(host: string): Promise<void> {
    const directory = join(agents.get(host)!.imageDirectory, 'images', imageId);
    for (const file of image.files) {
      const digest = createHash('sha256')
        .update(await readFile(join(directory, file.path)))
        .digest('hex');
      assert.equal(digest, file.sha256, `${host}: ${file.path} verifies`);
    }
  }

  function agentLog(agent: StackAgent | { process: { logs: Array<Record<string, unknown>> } }, message: string): Record<string, unknown> | undefined {
    return agent.process.logs.find((line) => line['msg'] === message);
  }

  before(async () => {
    stack = await startCloneStack(resources, `dist-origin-${suffix}`);
    agents.set(`dist-origin-${suffix}`, stack.firstAgent);
    for (const name of ['a', 'b', 'c', 'g']) agents.set(`dist-${name}-${suffix}`, await stack.addAgent(`dist-${name}-${suffix}`));

    // A powered-off domain with a 40 MiB qcow2 disk of random data on the origin.
    await stack.defineSourceVm(vm, 40);
    await stack.waitHostsReady(agents.keys());

    // image.available on a durable consumer of the test's own.
    const consumer = await consumeEvents<ImageAvailable>(stack.connection.jetstream, stack.connection.manager, {
      durable: `test-available-${suffix}`,
      types: [IMAGE_AVAILABLE],
      log: createLogger({ service: 'test', level: 'silent' }),
      handle: async (event) => {
        if (event.payload.image === IMAGE_NAME.format({ image: imageId })) available.push({ host: event.payload.host, operation: event.payload.operation });
      },
    });
    resources.defer(() => consumer.stop());

    const published = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        {
          imageId,
          sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: `dist-origin-${suffix}`, virtualMachine: vm }),
          description: '',
          labels: {},
          requestId: '',
        },
        cb,
      ),
    );
    const done = await stack.wait(published.name, 120_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    image = unpack(Image, done.result.value);
  });
  after(() => resources.release());

  it('publishes a private torrent of the image and a web seed on the origin', async () => {
    assert.match(image.torrent?.infoHash ?? '', /^[0-9a-f]{40}$/);
    assert.equal(Number(image.torrent?.pieceLengthBytes), pieceLengthFor(Number(image.torrent!.totalBytes)), 'the piece length follows the image size');
    assert.ok(image.torrent!.metainfo.includes(Buffer.from('7:privatei1e')), 'the info dictionary is private');
    const origin = await call<ImageReplica>((cb) =>
      stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: `dist-origin-${suffix}`, image: imageId }) }, cb),
    );
    assert.equal(origin.origin, true);
    assert.match(origin.webSeedUrl, /^http:\/\/localhost:\d+\/$/, 'the advertised host name and the web seed port');
    // The web seed answers Range requests for the image's files, and nothing else.
    const disk = image.files.find((file) => file.targetDevice === 'vda')!;
    const ranged = await fetch(`${origin.webSeedUrl}${imageId}/${disk.path}`, { headers: { Range: 'bytes=0-3' } });
    assert.equal(ranged.status, 206);
    assert.deepEqual(Buffer.from(await ranged.arrayBuffer()), Buffer.from('QFI\xfb', 'latin1'));
    assert.equal((await fetch(`${origin.webSeedUrl}${imageId}/..%2f..%2fetc%2fpasswd`)).status, 404);
  });

  it('refuses bad requests before any operation exists, changing nothing', async () => {
    const before = (
      await call<{ operations: unknown[] }>((cb) =>
        stack.distributionOperations.listOperations({ name: 'operations', filter: '', pageSize: 1000, pageToken: '', returnPartialSuccess: false }, cb),
      )
    ).operations.length;
    const request = { image: IMAGE_NAME.format({ image: imageId }), hosts: [HOST_NAME.format({ host: `dist-a-${suffix}` })], requestId: '' };
    assert.equal((await failure((cb) => stack.distribution.distributeImage({ ...request, image: 'images/nope' }, cb))).code, GrpcStatus.NOT_FOUND);
    for (const bad of ['images/../etc', 'images/a/b', 'images/.hidden', `../images/${imageId}`]) {
      const refused = await failure((cb) => stack.distribution.distributeImage({ ...request, image: bad }, cb));
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, bad);
      assert.deepEqual(refused.fields, ['image']);
    }
    assert.deepEqual((await failure((cb) => stack.distribution.distributeImage({ ...request, hosts: [] }, cb))).fields, ['hosts']);
    assert.deepEqual(
      (
        await failure((cb) =>
          stack.distribution.distributeImage(
            { ...request, hosts: [HOST_NAME.format({ host: `dist-a-${suffix}` }), HOST_NAME.format({ host: `dist-a-${suffix}` })] },
            cb,
          ),
        )
      ).fields,
      ['hosts[1]'],
    );
    assert.deepEqual((await failure((cb) => stack.distribution.distributeImage({ ...request, hosts: ['hosts/../x'] }, cb))).fields, ['hosts[0]']);
    assert.equal((await failure((cb) => stack.distribution.distributeImage({ ...request, hosts: ['hosts/no-such-host'] }, cb))).code, GrpcStatus.NOT_FOUND);
    // A Xen host (its record only: no Xen here) must not receive a qcow2 image.
    const hosts = await KvStore.open(stack.connection.jetstream, 'hosts', protoCodec(Host));
    await hosts.put(
      `xen-${suffix}`,
      Host.fromPartial({
        name: HOST_NAME.format({ host: `xen-${suffix}` }),
        hypervisor: Hypervisor.HYPERVISOR_XEN,
        state: Host_State.STATE_READY,
        agentEndpoint: 'localhost:1',
      }),
    );
    await waitFor(
      'the Xen host record',
      async () => (await call<Host>((cb) => stack.inventory.getHost({ name: HOST_NAME.format({ host: `xen-${suffix}` }) }, cb))).name || undefined,
    );
    const mismatch = await failure((cb) =>
      stack.distribution.distributeImage(
        { ...request, hosts: [HOST_NAME.format({ host: `dist-a-${suffix}` }), HOST_NAME.format({ host: `xen-${suffix}` })] },
        cb,
      ),
    );
    assert.equal(mismatch.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(mismatch.reason, 'ERROR_REASON_HYPERVISOR_MISMATCH');
    await hosts.delete(`xen-${suffix}`);
    const afterCount = (
      await call<{ operations: unknown[] }>((cb) =>
        stack.distributionOperations.listOperations({ name: 'operations', filter: '', pageSize: 1000, pageToken: '', returnPartialSuccess: false }, cb),
      )
    ).operations.length;
    assert.equal(afterCount, before, 'no operation was created');
    assert.equal((await readdir(join(agents.get(`dist-a-${suffix}`)!.imageDirectory, 'images'))).length, 0, 'nothing reached the agent');
    // Least privilege between services: cloning may not make an agent fetch, distribution may not make clones.
    const asService = async (name: string) =>
      createClient(
        AgentServiceClient,
        stack.agent.address,
        mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials('service', name)), caPem: stack.pki.ca.certificatePem }),
        { serverName: `dist-origin-${suffix}` },
      );
    const cloningAgent = await asService('cloning');
    const distributionAgent = await asService('distribution');
    assert.equal(
      (await failure((cb) => cloningAgent.fetchImage({ image, trackerAnnounceUrl: 'http://localhost:1/announce', webSeedUrls: [], operation: '' }, cb))).code,
      GrpcStatus.PERMISSION_DENIED,
    );
    assert.equal(
      (
        await failure((cb) =>
          distributionAgent.createClones(
            {
              dataDiskBytes: '0',
              guestConfiguration: undefined,
              guestConfigurationDigest: '',
              source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
              clones: [{ index: 0, domainName: 'nope', start: false }],
              operation: '',
              requestId: '',
              stream: false,
              diskBackend: 0,
              validateOnly: false,
            },
            cb,
          ),
        )
      ).code,
      GrpcStatus.PERMISSION_DENIED,
    );
    cloningAgent.close();
    distributionAgent.close();
    // The tracker refuses an info-hash it does not know (announce with a random one).
    const trackerUrl =
      (stack.distributionProcess.logs.find((line) => line['msg'] === 'agents announce to this tracker URL')?.['trackerAnnounceUrl'] as string) ?? '';
    const unknown = await fetch(`${trackerUrl}?info_hash=${'%01'.repeat(20)}&peer_id=${'%02'.repeat(20)}&port=6881&uploaded=0&downloaded=0&left=0&compact=1`);
    assert.match(await unknown.text(), /failure reason/);
  });

  it('distributes to three hosts from a restarted origin: every copy verifies, image.available once per host, progress in the metadata', async () => {
    // The origin agent restarts first (it verifies its replica again and seeds it on a new web seed port):
    // the distribution must come from the restarted origin alone, peer and web seed.
    const origin = agents.get(`dist-origin-${suffix}`)!;
    await origin.process.daemon.stop(10_000);
    const restarted = await origin.restart();
    agents.set(origin.host, { ...origin, process: restarted });
    await waitFor(
      'the origin seeding again',
      async () => (restarted.logs.some((line) => line['msg'] === 'replica verified and seeding again') ? true : undefined),
      60_000,
    );
    const receivers = [`dist-a-${suffix}`, `dist-b-${suffix}`, `dist-g-${suffix}`];
    const operation = await distribute(receivers, `req-${suffix}-1`);
    const again = await distribute(receivers, `req-${suffix}-1`);
    assert.equal(again.name, operation.name, 'a retried request_id returns the same operation');
    const response = await finished(operation);
    assert.deepEqual(response.failures, []);
    assert.deepEqual(
      response.replicas.map((replica) => replica.host),
      receivers.map((host) => HOST_NAME.format({ host })),
    );
    for (const replica of response.replicas) assert.equal(replica.state, ImageReplica_State.STATE_AVAILABLE);
    for (const host of receivers) await assertVerifiedCopy(host);
    const done = await call<Operation>((cb) => stack.distributionOperations.getOperation({ name: operation.name }, cb));
    const metadata = unpack(DistributeImageMetadata, done.metadata!);
    assert.equal(metadata.hostsDone, 3);
    assert.equal(metadata.hostsTotal, 3);
    assert.ok(metadata.transfers.every((transfer) => transfer.progress?.bytesDone === metadata.bytesTotal));
    // Once per host: wait a little for duplicates that must not come.
    await waitFor('three image.available events', async () => (available.filter((event) => event.operation === operation.name).length >= 3 ? true : undefined));
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const forThis = available
      .filter((event) => event.operation === operation.name)
      .map((event) => event.host)
      .sort();
    assert.deepEqual(forThis, receivers.map((host) => HOST_NAME.format({ host })).sort());
    // The receiving agent's Prometheus metrics count what it downloaded.
    const metrics = agents.get(`dist-a-${suffix}`)!.process.metricsAddress!;
    const downloaded = await waitFor(
      'distribution bytes in the metrics',
      async () => {
        const text = await (await fetch(`http://${metrics}/metrics`)).text();
        const value = Number(new RegExp(`cowherd_distribution_bytes_total\\{image="${imageId}",direction="download"\\} (\\d+)`).exec(text)?.[1] ?? 0);
        return value > 0 ? value : undefined;
      },
      10_000,
    );
    assert.equal(downloaded, Number(image.torrent!.totalBytes));
    // A host that already holds the image counts as done at once, and publishes nothing new.
    const repeat = await finished(await distribute([`dist-a-${suffix}`]));
    assert.equal(repeat.replicas.length, 1);
    assert.equal(available.filter((event) => event.host === HOST_NAME.format({ host: `dist-a-${suffix}` })).length, 1);
  });

  it('a receiver killed half-way resumes after a restart and fetches only what is missing', async () => {
    const host = `dist-c-${suffix}`;
    const agent = agents.get(host)!;
    // A download cap an admin sets in inventory (UpdateHost) slows the receiver down enough to kill it mid-way.
    await call((cb) =>
      stack.inventory.updateHost(
        {
          host: Host.fromPartial({ name: HOST_NAME.format({ host }), transferLimits: { uploadBytesPerSecond: '0', downloadBytesPerSecond: String(4 * MiB) } }),
          updateMask: ['transfer_limits'],
        },
        cb,
      ),
    );
    await waitFor('the cap applied', async () => (agentLog(agent, 'transfer limits applied') ? true : undefined), 30_000);
    const operation = await distribute([host]);
    const total = Number(image.torrent!.totalBytes);
    await waitFor(
      'half of the image on the receiver',
      async () => {
        const current = await call<Operation>((cb) => stack.distributionOperations.getOperation({ name: operation.name }, cb));
        const progress = unpack(DistributeImageMetadata, current.metadata!).transfers[0]?.progress;
        return Number(progress?.bytesDone ?? 0) >= total / 2 ? true : undefined;
      },
      120_000,
    );
    process.kill(agent.process.daemon.pid, 'SIGKILL');
    await agent.process.daemon.exited;
    const restarted = await agent.restart();
    const response = await finished(operation);
    assert.deepEqual(response.failures, []);
    await assertVerifiedCopy(host);
    const resumed = restarted.logs.find((line) => line['msg'] === 'resuming transfer');
    assert.ok(resumed, 'the restarted agent resumed the partial replica by itself');
    assert.ok(Number(resumed['present']) >= total * 0.4, `pieces kept across the kill: ${String(resumed['present'])} of ${total}`);
    const done = restarted.logs.find((line) => line['msg'] === 'replica available')!;
    assert.ok(
      Number(done['received']) <= total - Number(resumed['present']) + 8 * MiB,
      `after the restart it received ${String(done['received'])} bytes, about what was missing`,
    );
    await call((cb) =>
      stack.inventory.updateHost(
        {
          host: Host.fromPartial({ name: HOST_NAME.format({ host }), transferLimits: { uploadBytesPerSecond: '0', downloadBytesPerSecond: '0' } }),
          updateMask: ['transfer_limits'],
        },
        cb,
      ),
    );
    agents.set(host, { ...agent, process: restarted });
  });

  it('a replica tampered with on disk is detected at the next start and fetched again', async () => {
    const host = `dist-b-${suffix}`;
    const agent = agents.get(host)!;
    await agent.process.daemon.stop(10_000);
    const disk = image.files.find((file) => file.targetDevice === 'vda')!;
    const path = join(agent.imageDirectory, 'images', imageId, disk.path);
    await chmod(join(agent.imageDirectory, 'images', imageId), 0o755);
    await chmod(path, 0o644);
    const handle = await open(path, 'r+');
    await handle.write(Buffer.from('tampered'), 0, 8, 6 * MiB);
    await handle.close();
    const restarted = await agent.restart();
    agents.set(host, { ...agent, process: restarted });
    await waitFor('the replica fetched again', async () => (restarted.logs.some((line) => line['msg'] === 'replica available') ? true : undefined), 120_000);
    assert.ok(restarted.logs.some((line) => line['msg'] === 'replica changed on disk: fetching it again'));
    await assertVerifiedCopy(host);
    await waitFor('the record AVAILABLE again', async () =>
      (await call<ImageReplica>((cb) => stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image: imageId }) }, cb))).state ===
      ImageReplica_State.STATE_AVAILABLE
        ? true
        : undefined,
    );
  });

  it('a host whose disk is full fails alone and cleanly; the others complete', async () => {
    const mountPoint = join(await resources.tempDir('cowherd-full-'), 'images-root');
    await mkdir(mountPoint, { recursive: true });
    await run('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mountPoint]);
    resources.defer(() => run('umount', ['-l', mountPoint]).then(() => undefined));
    const full = await stack.addAgent(`dist-full-${suffix}`, { COWHERD_IMAGE_DIR: mountPoint });
    agents.set(full.host, full);
    const extra = await stack.addAgent(`dist-d-${suffix}`);
    agents.set(extra.host, extra);
    for (const host of [full.host, extra.host]) {
      await waitFor(`${host} READY`, async () =>
        (await call<Host>((cb) => stack.inventory.getHost({ name: HOST_NAME.format({ host }) }, cb))).state === Host_State.STATE_READY ? true : undefined,
      );
    }
    const response = await finished(await distribute([full.host, extra.host]));
    assert.deepEqual(
      response.replicas.map((replica) => replica.host),
      [HOST_NAME.format({ host: extra.host })],
    );
    assert.equal(response.failures.length, 1);
    assert.equal(response.failures[0]!.host, HOST_NAME.format({ host: full.host }));
    assert.equal(response.failures[0]!.status?.code, GrpcStatus.RESOURCE_EXHAUSTED, JSON.stringify(response.failures[0]));
    await assertVerifiedCopy(extra.host);
    const left = (await readdir(join(mountPoint, 'images'))).filter((name) => !name.endsWith('.replica.json'));
    assert.deepEqual(left, [], 'no partial replica is left on the full disk');
  });

  it('cloning onto a host without the image has it distributed first, then makes the clones', async () => {
    const target = await stack.addAgent(`dist-f-${suffix}`);
    agents.set(target.host, target);
    await waitFor(`${target.host} READY`, async () =>
      (await call<Host>((cb) => stack.inventory.getHost({ name: HOST_NAME.format({ host: target.host }) }, cb))).state === Host_State.STATE_READY
        ? true
        : undefined,
    );
    const clone = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [HOST_NAME.format({ host: target.host })], maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: 2,
          nameTemplate: `dc-${suffix}-{index}`,
          start: false,
          requestId: '',
        },
        cb,
      ),
    );
    stack.track(`dc-${suffix}-1`, `dc-${suffix}-2`);
    const done = await stack.wait(clone.name, 180_000);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const clones = unpack(CloneVirtualMachinesResponse, done.result.value).clones;
    assert.deepEqual(
      clones.map((result) => result.state),
      [CloneResult_State.STATE_DONE, CloneResult_State.STATE_DONE],
      JSON.stringify(clones),
    );
    await assertVerifiedCopy(target.host);
    const replica = await call<ImageReplica>((cb) =>
      stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: target.host, image: imageId }) }, cb),
    );
    assert.equal(replica.state, ImageReplica_State.STATE_AVAILABLE);
    // The clones' disks are overlays on the distributed base.
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', clones[0]!.overlays[0]!])).stdout) as { 'backing-filename'?: string };
    assert.equal(info['backing-filename'], join(target.imageDirectory, 'images', imageId, image.files.find((file) => file.targetDevice === 'vda')!.path));
  });

  it('the origin can stop once a receiver is complete: the rest finish from peers', async () => {
    const late = await stack.addAgent(`dist-e-${suffix}`);
    agents.set(late.host, late);
    await waitFor(`${late.host} READY`, async () =>
      (await call<Host>((cb) => stack.inventory.getHost({ name: HOST_NAME.format({ host: late.host }) }, cb))).state === Host_State.STATE_READY
        ? true
        : undefined,
    );
    await agents.get(`dist-origin-${suffix}`)!.process.daemon.stop(10_000);
    const response = await finished(await distribute([late.host]));
    assert.deepEqual(response.failures, []);
    await assertVerifiedCopy(late.host);
  });
});
