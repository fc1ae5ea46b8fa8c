/**
 * Replicas damaged while the agent runs, on real parts (issue 12, item 2): NATS, CA, inventory, distribution,
 * cloning, an origin and two receiving agents on the private libvirtd with real webtorrent on loopback and
 * real qemu-img overlays. A few bytes written into a receiver's verified replica:
 * - with a clone on it: a clone request on the damaged copy is refused (re-verified first, never cloned on),
 *   image.replica_damaged reaches the stream and the record turns FAILED; the next DistributeImage repairs the
 *   replica into a new generation beside the old one: the damaged base keeps its bytes, inode and mtime
 *   (nobody rewrote it, the existing clone still uses it), only about one piece travels, the new generation
 *   verifies, its image.available is a new event, and new clones use it;
 * - found by the background scrub alone (written through a hard link elsewhere, so no inotify event and no
 *   check before use sees it), without dependents: image.replica_damaged, then an in-place repair that
 *   fetches only the bad piece.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { link, mkdir, open, readFile, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { createClient } from '../../services/common/platform/client.js';
import { IMAGE_AVAILABLE, IMAGE_REPLICA_DAMAGED } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { unpack } from '../../services/common/domain/operations.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { AgentServiceClient } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { CloneResult_State, CloneVirtualMachinesResponse, Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributeImageResponse } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import type { ImageAvailable, ImageReplicaDamaged } from '../../services/gen/cowherd/events/v1/events.js';
import { Host, Host_State, Image, ImageReplica_State, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';
import { call, failure, waitFor } from '../harness/grpc.js';
import { Resources } from '../harness/index.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

describe('replicas damaged while the agent runs', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false, timeout: 600_000 }, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const vm = `ri-src-${suffix}`;
  const imageId = `ri-${suffix}`;
  const withClone = `ri-a-${suffix}`;
  const scrubbed = `ri-b-${suffix}`;
  let stack: CloneStack;
  const agents = new Map<string, StackAgent>();
  let image: Image;
  const available: Array<{ host: string }> = [];
  const damaged: ImageReplicaDamaged[] = [];

  const sha256 = async (path: string): Promise<string> =>
    createHash('sha256')
      .update(await readFile(path))
      .digest('hex');
  const diskFile = (): string => image.files.find((file) => file.targetDevice === 'vda')!.path;
  const pieceLength = (): number => Number(image.torrent!.pieceLengthBytes);

  async function distribute(hosts: string[]): Promise<DistributeImageResponse> {
    const operation = await call<Operation>((cb) =>
      stack.distribution.distributeImage(
        { image: IMAGE_NAME.format({ image: imageId }), hosts: hosts.map((host) => HOST_NAME.format({ host })), requestId: '' },
        cb,
      ),
    );
    const done = await stack.wait(operation.name, 240_000, stack.distributionOperations);
    assert.equal(done.done, true, 'the operation finished');
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    return unpack(DistributeImageResponse, done.result.value);
  }

  async function cloneOn(host: string, name: string): Promise<CloneVirtualMachinesResponse> {
    const operation = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [HOST_NAME.format({ host })], maxClonesPerHost: 0 },
          delivery: 0,
          diskBackend: 0,
          count: 1,
          nameTemplate: name,
          start: false,
          requestId: '',
        },
        cb,
      ),
    );
    stack.track(name);
    const done = await stack.wait(operation.name, 180_000);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    return unpack(CloneVirtualMachinesResponse, done.result.value);
  }

  /** Writes `bytes` at `offset` of `path` (root writes through the 0444 mode). */
  async function damage(path: string, offset: number, bytes: Buffer): Promise<void> {
    const handle = await open(path, 'r+');
    await handle.write(bytes, 0, bytes.length, offset);
    await handle.close();
  }

  function agentLogs(host: string): Array<Record<string, unknown>> {
    return agents.get(host)!.process.logs;
  }

  async function replicaRecord(host: string): Promise<ImageReplica> {
    return call<ImageReplica>((cb) => stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image: imageId }) }, cb));
  }

  before(async () => {
    stack = await startCloneStack(resources, `ri-origin-${suffix}`);
    agents.set(`ri-origin-${suffix}`, stack.firstAgent);
    // A fast scrub with a short pause, so that a test sees a pass within seconds.
    // Each agent sees only the domains of its own image directory (they share one libvirtd), as in the local fleet.
    const scrubEnv = { COWHERD_SCRUB_MIB_PER_SECOND: '256', COWHERD_SCRUB_INTERVAL_SECONDS: '1', COWHERD_DOMAIN_SCOPE: 'image-directory' };
    agents.set(withClone, await stack.addAgent(withClone, scrubEnv));
    agents.set(scrubbed, await stack.addAgent(scrubbed, scrubEnv));

    // A powered-off domain with a 40 MiB qcow2 disk of random data on the origin, published as the image.
    await stack.defineSourceVm(vm, 40);
    await stack.waitHostsReady(agents.keys());
    const log = createLogger({ service: 'test', level: 'silent' });
    const availableEvents = await consumeEvents<ImageAvailable>(stack.connection.jetstream, stack.connection.manager, {
      durable: `test-ri-available-${suffix}`,
      types: [IMAGE_AVAILABLE],
      log,
      handle: async (event) => {
        if (event.payload.image === IMAGE_NAME.format({ image: imageId })) available.push({ host: event.payload.host });
      },
    });
    resources.defer(() => availableEvents.stop());
    const damageEvents = await consumeEvents<ImageReplicaDamaged>(stack.connection.jetstream, stack.connection.manager, {
      durable: `test-ri-damaged-${suffix}`,
      types: [IMAGE_REPLICA_DAMAGED],
      log,
      handle: async (event) => {
        if (event.payload.image === IMAGE_NAME.format({ image: imageId })) damaged.push(event.payload);
      },
    });
    resources.defer(() => damageEvents.stop());

    const published = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        {
          imageId,
          sourceVirtualMachine: VIRTUAL_MACHINE_NAME.format({ host: `ri-origin-${suffix}`, virtualMachine: vm }),
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
    const response = await distribute([withClone, scrubbed]);
    assert.deepEqual(response.failures, []);
    await waitFor(
      'image.available from both receivers',
      async () => (available.filter((event) => event.host !== HOST_NAME.format({ host: `ri-origin-${suffix}` })).length >= 2 ? true : undefined),
      30_000,
    );
  });
  after(() => resources.release());

  it('a damaged base with a clone on it is never cloned on or rewritten: a DistributeImage repairs it into a new generation, fetching about one piece', async () => {
    const agent = agents.get(withClone)!;
    const first = await cloneOn(withClone, `ri-old-${suffix}`);
    assert.equal(first.clones[0]!.state, CloneResult_State.STATE_DONE, JSON.stringify(first.clones));
    const oldDirectory = join(agent.imageDirectory, 'images', imageId);
    const base = join(oldDirectory, diskFile());

    // 23 bytes in the middle of the base, while the agent runs.
    await damage(base, 6 * MiB + 100, Buffer.from('twenty-three bytes here'));
    const damagedDigest = await sha256(base);
    const damagedStat = await stat(base, { bigint: true });
    assert.notEqual(damagedDigest, image.files.find((file) => file.path === diskFile())!.sha256);

    // A clone request on the damaged copy: re-verified first and refused, nothing made on it.
    const asCloning = createClient(
      AgentServiceClient,
      agent.process.address,
      mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials('service', 'cloning')), caPem: stack.pki.ca.certificatePem }),
      { serverName: withClone },
    );
    resources.defer(() => asCloning.close());
    const refused = await failure((cb) =>
      asCloning.createClones(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          clones: [{ index: 0, domainName: `ri-refused-${suffix}`, start: false }],
          operation: '',
          requestId: '',
          stream: false,
          diskBackend: 0,
          validateOnly: false,
        },
        cb,
      ),
    );
    assert.equal(refused.code, GrpcStatus.FAILED_PRECONDITION, refused.message);
    assert.equal(refused.reason, 'ERROR_REASON_VERIFICATION_FAILED');
    await assert.rejects(stat(join(agent.imageDirectory, 'clones', `ri-refused-${suffix}`)), /ENOENT/);

    // The damage reaches the stream, names the dependent, and the record turns FAILED.
    const event = await waitFor('image.replica_damaged', async () => damaged.find((entry) => entry.host === HOST_NAME.format({ host: withClone })), 30_000);
    assert.deepEqual(event.damagedFiles, [diskFile()]);
    assert.equal(event.badPieces, 1);
    assert.deepEqual(event.dependentVirtualMachines, [VIRTUAL_MACHINE_NAME.format({ host: withClone, virtualMachine: `ri-old-${suffix}` })]);
    assert.equal(event.path, oldDirectory);
    await waitFor('the record FAILED', async () => ((await replicaRecord(withClone)).state === ImageReplica_State.STATE_FAILED ? true : undefined), 30_000);

    // The next DistributeImage repairs it into a new generation beside the old one.
    const availableBefore = available.filter((entry) => entry.host === HOST_NAME.format({ host: withClone })).length;
    const response = await distribute([withClone]);
    assert.deepEqual(response.failures, []);
    const newDirectory = join(agent.imageDirectory, 'images', `${imageId}.generation-2`);
    for (const file of image.files) assert.equal(await sha256(join(newDirectory, file.path)), file.sha256, `${file.path} of the new generation verifies`);
    // Nobody rewrote the damaged base: same bytes, inode and mtime as right after the damage.
    const after = await stat(base, { bigint: true });
    assert.equal(await sha256(base), damagedDigest);
    assert.equal(after.ino, damagedStat.ino);
    assert.equal(after.mtimeNs, damagedStat.mtimeNs);
    // About one piece travelled, not the file.
    const repaired = agentLogs(withClone)
      .filter((line) => line['msg'] === 'replica available')
      .at(-1)!;
    assert.equal(repaired['generation'], 2);
    assert.ok(Number(repaired['written']) <= 2 * pieceLength(), `the repair wrote ${String(repaired['written'])} bytes (piece ${pieceLength()})`);
    assert.ok(Number(repaired['presentAtStart']) >= Number(image.torrent!.totalBytes) - 2 * pieceLength(), `kept ${String(repaired['presentAtStart'])} bytes`);
    // A new occurrence: a second image.available from this host reached the stream.
    await waitFor(
      "the new generation's image.available",
      async () => (available.filter((entry) => entry.host === HOST_NAME.format({ host: withClone })).length === availableBefore + 1 ? true : undefined),
      30_000,
    );
    // The operator sees both generations and the damage.
    const record = await waitFor(
      'the record AVAILABLE on generation 2',
      async () => {
        const current = await replicaRecord(withClone);
        return current.state === ImageReplica_State.STATE_AVAILABLE && current.generation === '2' ? current : undefined;
      },
      30_000,
    );
    assert.equal(record.path, newDirectory);
    assert.deepEqual(
      record.damagedGenerations.map((entry) => [entry.generation, entry.path, entry.damagedFiles, entry.dependentVirtualMachines]),
      [['1', oldDirectory, [diskFile()], [VIRTUAL_MACHINE_NAME.format({ host: withClone, virtualMachine: `ri-old-${suffix}` })]]],
    );

    // The existing clone keeps its base; a new clone uses the new generation.
    const oldOverlay = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', first.clones[0]!.overlays[0]!])).stdout) as {
      'backing-filename'?: string;
    };
    assert.equal(oldOverlay['backing-filename'], base);
    const second = await cloneOn(withClone, `ri-new-${suffix}`);
    assert.equal(second.clones[0]!.state, CloneResult_State.STATE_DONE, JSON.stringify(second.clones));
    const newOverlay = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', second.clones[0]!.overlays[0]!])).stdout) as {
      'backing-filename'?: string;
    };
    assert.equal(newOverlay['backing-filename'], join(newDirectory, diskFile()));
  });

  it('damage found at a restart, with a clone on the base: the next DistributeImage makes a new generation instead of rewriting the base, and ends', async () => {
    const host = `ri-c-${suffix}`;
    const agent = await stack.addAgent(host);
    agents.set(host, agent);
    await waitFor(`${host} READY`, async () =>
      (await call<Host>((cb) => stack.inventory.getHost({ name: HOST_NAME.format({ host }) }, cb))).state === Host_State.STATE_READY ? true : undefined,
    );
    assert.deepEqual((await distribute([host])).failures, []);
    const clone = await cloneOn(host, `ri-c-old-${suffix}`);
    assert.equal(clone.clones[0]!.state, CloneResult_State.STATE_DONE, JSON.stringify(clone.clones));
    const base = join(agent.imageDirectory, 'images', imageId, diskFile());
    await agent.process.daemon.stop(10_000);
    await damage(base, 3 * MiB + 5, Buffer.from('twenty-three bytes here'));
    const damagedDigest = await sha256(base);
    const damagedStat = await stat(base, { bigint: true });
    const availableBefore = available.filter((entry) => entry.host === HOST_NAME.format({ host })).length;
    const restarted = await agent.restart();
    agents.set(host, { ...agent, process: restarted });
    await waitFor(
      'the record FAILED after the restart',
      async () => ((await replicaRecord(host)).state === ImageReplica_State.STATE_FAILED ? true : undefined),
      60_000,
    );

    const operation = await call<Operation>((cb) =>
      stack.distribution.distributeImage({ image: IMAGE_NAME.format({ image: imageId }), hosts: [HOST_NAME.format({ host })], requestId: '' }, cb),
    );
    const done = await stack.wait(operation.name, 90_000, stack.distributionOperations);
    assert.equal(done.done, true, 'the DistributeImage ended');
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    assert.deepEqual(unpack(DistributeImageResponse, done.result.value).failures, []);
    // The base the clone uses is exactly as the damage left it; the repair went beside it.
    const after = await stat(base, { bigint: true });
    assert.equal(after.ino, damagedStat.ino);
    assert.equal(after.mtimeNs, damagedStat.mtimeNs);
    assert.equal(await sha256(base), damagedDigest);
    const newDirectory = join(agent.imageDirectory, 'images', `${imageId}.generation-2`);
    for (const file of image.files) assert.equal(await sha256(join(newDirectory, file.path)), file.sha256, `${file.path} of the new generation verifies`);
    const repaired = restarted.logs.filter((line) => line['msg'] === 'replica available').at(-1)!;
    assert.ok(Number(repaired['written']) <= 2 * pieceLength(), `the repair wrote ${String(repaired['written'])} bytes, not the whole file`);
    await waitFor(
      'a new image.available',
      async () => (available.filter((entry) => entry.host === HOST_NAME.format({ host })).length === availableBefore + 1 ? true : undefined),
      30_000,
    );
  });

  it('the scrub finds damage no check saw; without dependents the replica is repaired in place, fetching only the bad piece', async () => {
    const agent = agents.get(scrubbed)!;
    const directory = join(agent.imageDirectory, 'images', imageId);
    const file = join(directory, diskFile());
    const before = await stat(file, { bigint: true });
    // Written through a hard link in another directory: no inotify event in the replica's directory, and
    // no clone or fetch asks; only the scrub can notice.
    const aside = join(agent.imageDirectory, `aside-${suffix}`);
    await link(file, aside);
    const availableBefore = available.filter((entry) => entry.host === HOST_NAME.format({ host: scrubbed })).length;
    await damage(aside, 12 * MiB + 7, Buffer.from('twenty-three bytes here'));
    await unlink(aside);

    const event = await waitFor(
      'image.replica_damaged from the scrub',
      async () => damaged.find((entry) => entry.host === HOST_NAME.format({ host: scrubbed })),
      60_000,
    );
    assert.deepEqual(event.damagedFiles, [diskFile()]);
    assert.equal(event.badPieces, 1);
    assert.deepEqual(event.dependentVirtualMachines, []);
    const found = agentLogs(scrubbed).find((line) => line['msg'] === 'replica damaged');
    assert.equal(found?.['by'], 'scrub');

    // Repaired in place at once (no domain uses it): a new image.available, one piece written.
    await waitFor(
      "the repaired replica's image.available",
      async () => (available.filter((entry) => entry.host === HOST_NAME.format({ host: scrubbed })).length === availableBefore + 1 ? true : undefined),
      60_000,
    );
    const repaired = agentLogs(scrubbed)
      .filter((line) => line['msg'] === 'replica available')
      .at(-1)!;
    assert.equal(repaired['generation'], 1);
    assert.equal(repaired['path'], directory);
    assert.ok(Number(repaired['written']) <= pieceLength(), `the repair wrote ${String(repaired['written'])} bytes (piece ${pieceLength()})`);
    for (const entry of image.files) assert.equal(await sha256(join(directory, entry.path)), entry.sha256, `${entry.path} verifies after the repair`);
    assert.notEqual((await stat(file, { bigint: true })).ino, 0n);
    assert.ok(before.size > 0n);
    await waitFor(
      'the record AVAILABLE again',
      async () => ((await replicaRecord(scrubbed)).state === ImageReplica_State.STATE_AVAILABLE ? true : undefined),
      30_000,
    );
    // The scrub's work shows in the agent's metrics.
    const metrics = agent.process.metricsAddress ? await fetch(`http://${agent.process.metricsAddress}/metrics`).then((reply) => reply.text()) : '';
    if (metrics !== '') {
      assert.match(metrics, /cowherd_replica_damaged_total\{found_by="scrub"\} 1/);
      assert.match(metrics, /cowherd_replica_scrub_bytes_total [1-9]/);
    }
  });

  it('a replica whose files cannot all be removed says so, stays FAILED (not DELETING) and can be deleted again', async () => {
    const agent = agents.get(scrubbed)!;
    const directory = join(agent.imageDirectory, 'images', imageId);
    const stuck = join(directory, 'stuck');
    // A mount point inside the replica: removing the directory fails (EBUSY), as a busy or immutable file would.
    await mkdir(stuck);
    await run('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', stuck]);
    const asDistribution = createClient(
      AgentServiceClient,
      agent.process.address,
      mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials('service', 'distribution')), caPem: stack.pki.ca.certificatePem }),
      { serverName: scrubbed },
    );
    resources.defer(() => asDistribution.close());
    const name = HOST_IMAGE_NAME.format({ host: scrubbed, image: imageId });
    try {
      const refused = await failure((cb) => asDistribution.deleteImageReplica({ name }, cb));
      assert.equal(refused.code, GrpcStatus.INTERNAL);
      assert.match(refused.message, /removing its files failed .* stays on disk/);
      assert.equal(refused.metadata['removed'], 'false');
      await stat(stuck);
      const after = await call<ImageReplica>((cb) => asDistribution.getImageReplica({ name }, cb));
      assert.equal(after.state, ImageReplica_State.STATE_FAILED, 'FAILED with the reason, not DELETING for ever');
    } finally {
      await run('umount', [stuck]).catch(() => undefined);
    }
    await call((cb) => asDistribution.deleteImageReplica({ name }, cb));
    await assert.rejects(stat(directory), /ENOENT/);
  });

  it("the origin's web seed checks the files before it serves them: damaged bytes are refused (503), never sent", async () => {
    const origin = `ri-origin-${suffix}`;
    const record = await replicaRecord(origin);
    assert.match(record.webSeedUrl, /^http:\/\//);
    const file = join(stack.imageDirectory, 'images', imageId, diskFile());
    const url = `${record.webSeedUrl}${imageId}/${diskFile()}`;
    const intact = await fetch(url, { headers: { Range: 'bytes=0-15' } });
    assert.equal(intact.status, 206);
    await intact.arrayBuffer();
    // Through a hard link elsewhere: no inotify event; the request's own check has to catch it.
    const aside = join(stack.imageDirectory, `aside-${suffix}`);
    await link(file, aside);
    await damage(aside, 2 * MiB + 3, Buffer.from('twenty-three bytes here'));
    await unlink(aside);
    const refused = await fetch(url, { headers: { Range: `bytes=${2 * MiB}-${2 * MiB + 63}` } });
    assert.equal(refused.status, 503);
    await refused.arrayBuffer();
    const event = await waitFor(
      'image.replica_damaged from the origin',
      async () => damaged.find((entry) => entry.host === HOST_NAME.format({ host: origin })),
      30_000,
    );
    assert.deepEqual(event.damagedFiles, [diskFile()]);
    assert.equal(agentLogs(origin).find((line) => line['msg'] === 'replica damaged')?.['by'], 'serve');
  });
});
