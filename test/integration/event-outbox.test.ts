/**
 * The event outbox on a real nats-server (services/common/platform/event-outbox.ts): events published while
 * nats-server is down reach the stream exactly once when it is back (the agent's directory store and the
 * services' KV store); events a process recorded and never published are published by the next process on
 * the same outbox, once; and a clone batch on a real agent, made while nats-server restarts, ends with
 * every clone.done in the stream exactly once. Before the outbox, each of these lost every event (the
 * publish timed out and the caller logged "clone.done not published"). An event stored twice (re-sent
 * after the stream's duplicate window) is handled once by a consumer.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdir, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { nanos } from '@nats-io/transport-node';
import { AgentServiceClient, CreateClonesRequest, type CreateCloneResult } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import type { CloneDone } from '../../services/gen/cowherd/events/v1/events.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { createClient } from '../../services/common/platform/client.js';
import { type EmbeddedNats } from '../../services/launcher/embedded-nats.js';
import {
  DirectoryOutboxStore,
  KvOutboxStore,
  OutboxEventPublisher,
  OutboxRelay,
  startEventOutbox,
  type EventOutbox,
} from '../../services/common/platform/event-outbox.js';
import { CLONE_DONE } from '../../services/common/domain/event-types.js';
import { consumeEvents, EVENT_STREAM, ensureEventStream, JetStreamEventPublisher } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { natsRestarts, Resources, TestPki, startTestNats } from '../harness/index.js';
import { call } from '../harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess } from '../harness/processes.js';
import { HOST_NAME, OPERATION_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);
const log = createLogger({ service: 'test', level: 'silent' });
const suffix = Math.random().toString(36).slice(2, 7);

const cloneDone = (host: string, name: string): CloneDone => ({
  imageVersion: '',
  virtualMachine: VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: name }),
  host: HOST_NAME.format({ host }),
  domainName: name,
  uuid: '',
  image: '',
  sourceVirtualMachine: '',
  overlays: [],
  started: false,
  operation: '',
  occurTime: new Date(),
  diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
});

/** How often each Nats-Msg-Id is stored in the event stream (reads every stored message by sequence). */
async function storedIds(connection: Nats): Promise<Map<string, number>> {
  const state = (await connection.manager.streams.info(EVENT_STREAM)).state;
  const counts = new Map<string, number>();
  for (let sequence = state.first_seq; sequence <= state.last_seq && state.messages > 0; sequence++) {
    const message = await connection.manager.streams.getMessage(EVENT_STREAM, { seq: sequence }).catch(() => null);
    const id = message?.header.get('Nats-Msg-Id');
    if (id) counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  return counts;
}

/** Waits until every id in `ids` is stored, then gives late duplicates a moment; returns the counts. */
async function untilStored(connection: Nats, ids: readonly string[], timeoutMs = 60_000): Promise<Map<string, number>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const counts = await storedIds(connection).catch(() => new Map<string, number>());
    if (ids.every((id) => counts.has(id))) {
      await new Promise((resolve) => setTimeout(resolve, 1_000));
      return storedIds(connection);
    }
    if (Date.now() > deadline) return counts;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function assertExactlyOnce(counts: Map<string, number>, ids: readonly string[]): void {
  assert.deepEqual(
    ids.filter((id) => !counts.has(id)),
    [],
    'every event reached the stream',
  );
  assert.deepEqual(
    ids.filter((id) => (counts.get(id) ?? 0) > 1),
    [],
    'no event is stored twice',
  );
}

describe('event outbox on a real nats-server', () => {
  const resources = new Resources();
  let nats: EmbeddedNats;
  let service: Nats;
  let host: Nats;
  let pki: TestPki;
  let restartNats: ReturnType<typeof natsRestarts>;

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    nats = await startTestNats(resources, pki);
    restartNats = natsRestarts(resources, nats);
    // Every certificate before any restart: the test server adds users by reloading the first process.
    const serviceFiles = await pki.files('service', 'distribution');
    const hostFiles = await pki.files('host', 'kvm-01');
    service = await connectNats({ servers: [nats.url], tls: serviceFiles, name: 'service', log });
    host = await connectNats({ servers: [nats.url], tls: hostFiles, name: 'agent', log });
    resources.defer(() => service.close());
    resources.defer(() => host.close());
    await ensureEventStream(service.manager);
  });
  after(() => resources.release());

  it('(1) nats-server down for 5 s while events are published: every event in the stream exactly once afterwards (directory and KV stores)', async () => {
    const directory = join(await resources.tempDir('cowherd-outbox-'), 'event-outbox');
    const agentOutbox = await startEventOutbox({ js: host.jetstream, manager: host.manager, log, owner: 'agent', directory });
    const serviceOutbox = await startEventOutbox({ js: service.jetstream, manager: service.manager, log, owner: 'distribution' });
    resources.defer(() => agentOutbox.stop());
    resources.defer(() => serviceOutbox.stop());
    const ids: string[] = [];
    const publish = (outbox: EventOutbox, name: string): Promise<void> => {
      const id = `clone.done/outage-${suffix}/kvm-01/${name}`;
      ids.push(id);
      return outbox.events.publish(CLONE_DONE, cloneDone('kvm-01', name), { host: 'kvm-01', id });
    };
    // Some just before the stop (their acknowledgements may be lost with the server), most while it is down.
    for (let index = 0; index < 5; index++) await publish(agentOutbox, `before-${index}`);
    const servicePublishes: Array<Promise<void>> = [];
    await restartNats(5_000, async () => {
      // The agent's records are on its disk: publish resolves while NATS is down.
      for (let index = 0; index < 20; index++) await publish(agentOutbox, `down-${index}`);
      // The services' records are in KV: publish waits until the record is durable, then resolves.
      for (let index = 0; index < 10; index++) servicePublishes.push(publish(serviceOutbox, `kv-${index}`));
      assert.ok(agentOutbox.pending() > 0, 'the agent outbox holds what NATS could not take');
    });
    await Promise.all(servicePublishes);
    const counts = await untilStored(service, ids);
    assertExactlyOnce(counts, ids);
    const waitDrained = Date.now() + 10_000;
    while ((agentOutbox.pending() > 0 || serviceOutbox.pending() > 0) && Date.now() < waitDrained) await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(agentOutbox.pending(), 0);
    assert.equal(serviceOutbox.pending(), 0);
    assert.deepEqual(
      (await readdir(directory)).filter((name) => name.endsWith('.event')),
      [],
      'published records are removed from the directory',
    );
  });

  it('(2) events recorded by a process that died before publishing are published by the next one, once', async () => {
    const directory = join(await resources.tempDir('cowherd-outbox-'), 'event-outbox');
    const ids = Array.from({ length: 6 }, (_, index) => `clone.done/restart-${suffix}/kvm-01/vm-${index}`);
    // The first process records and dies before its relay ran (its relay is never started).
    const firstStore = await DirectoryOutboxStore.open(directory, log);
    const first = new OutboxEventPublisher(firstStore, new OutboxRelay(firstStore, async () => assert.fail('the dead process sends nothing'), log));
    for (const [index, id] of ids.entries()) await first.publish(CLONE_DONE, cloneDone('kvm-01', `vm-${index}`), { host: 'kvm-01', id });
    assert.equal((await readdir(directory)).filter((name) => name.endsWith('.event')).length, ids.length);
    const snapshot = `${directory}-snapshot`;
    await cp(directory, snapshot, { recursive: true });

    // The next process on the same directory publishes them.
    const second = await startEventOutbox({ js: host.jetstream, manager: host.manager, log, owner: 'agent', directory });
    let counts = await untilStored(service, ids);
    await second.stop();
    assertExactlyOnce(counts, ids);

    // Had it died after publishing and before removing the files, a third publishes them again with the
    // same ids, and the stream keeps one of each.
    await cp(snapshot, directory, { recursive: true });
    const third = await startEventOutbox({ js: host.jetstream, manager: host.manager, log, owner: 'agent', directory });
    const deadline = Date.now() + 10_000;
    while (third.pending() > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
    await third.stop();
    counts = await storedIds(service);
    assertExactlyOnce(counts, ids);

    // The same for a service replica that died with records in the outbox bucket: another process takes
    // them over once they are older than the owner's grace time.
    const kvIds = Array.from({ length: 4 }, (_, index) => `image.published/restart-${suffix}/${index}`);
    const deadStore = await KvOutboxStore.open(service.jetstream, service.manager, 'distribution', log);
    const dead = new OutboxEventPublisher(
      deadStore,
      new OutboxRelay(deadStore, async () => assert.fail('the dead process sends nothing'), log),
      () => Date.now() - 60_000,
    );
    for (const [index, id] of kvIds.entries()) await dead.publish(CLONE_DONE, cloneDone('kvm-01', `kv-${index}`), { host: 'kvm-01', id });
    const next = await startEventOutbox({ js: service.jetstream, manager: service.manager, log, owner: 'distribution' });
    counts = await untilStored(service, kvIds);
    await next.stop();
    assertExactlyOnce(counts, kvIds);
  });

  it('(4) an event stored twice (re-sent after the duplicate window) is handled once by a consumer', async () => {
    // A 1 s window stands in for an outage longer than the real 10 minutes.
    const config = (await service.manager.streams.info(EVENT_STREAM)).config;
    await service.manager.streams.update(EVENT_STREAM, { ...config, duplicate_window: nanos(1_000) });
    const id = `clone.done/late-${suffix}/kvm-01/vm`;
    try {
      const sender = new JetStreamEventPublisher(host.jetstream, log);
      await sender.publish(CLONE_DONE, cloneDone('kvm-01', 'vm'), { host: 'kvm-01', id });
      await new Promise((resolve) => setTimeout(resolve, 1_500));
      await sender.publish(CLONE_DONE, cloneDone('kvm-01', 'vm'), { host: 'kvm-01', id });
    } finally {
      await ensureEventStream(service.manager);
    }
    assert.equal((await storedIds(service)).get(id), 2, 'the stream holds it twice');
    const handled: string[] = [];
    const consumer = await consumeEvents(service.jetstream, service.manager, {
      durable: `late-${suffix}`,
      types: [CLONE_DONE],
      log,
      handle: async (event) => void handled.push(event.id),
    });
    const deadline = Date.now() + 10_000;
    while (handled.length < 1 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    await consumer.stop();
    assert.deepEqual(
      handled.filter((handledId) => handledId === id),
      [id],
      'handled once',
    );
  });
});

describe('clone.done through a nats-server restart on a real agent', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  const virsh = (...args: string[]) => run('virsh', ['-c', 'qemu:///system', ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
  const domains: string[] = [];
  after(() => resources.release());

  it('(3) a 20-clone batch made while nats-server restarts: every clone.done in the stream exactly once', async () => {
    await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    const restartNats = natsRestarts(resources, nats);
    const ca = await startCertificateAuthorityProcess(resources, pki, nats);
    const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    const directory = await resources.tempDir('cowherd-outbox-agent-');
    const imageDirectory = join(directory, 'images-root');
    await mkdir(join(imageDirectory, 'vms'), { recursive: true });
    const source = `cowherd-outbox-src-${suffix}`;
    const baseDisk = join(imageDirectory, 'vms', `${source}.qcow2`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', baseDisk, '16M']);
    await writeFile(
      join(directory, 'source.xml'),
      `<domain type='qemu'><name>${source}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${baseDisk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
    );
    await virsh('define', join(directory, 'source.xml'));
    domains.push(source);
    resources.defer(async () => {
      for (const domain of domains) await virsh('undefine', domain).catch(() => undefined);
    });
    const admin = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem });
    const caAdmin = createClient(CertificateAuthorityServiceClient, ca.address, admin);
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host: 'outbox-host', ttl: undefined, requestId: '' }, cb));
    caAdmin.close();
    const agent = await startServiceProcess(resources, 'agent', undefined, nats.url, {
      COWHERD_HOST_ID: 'outbox-host',
      COWHERD_JOIN_TOKEN: token.token,
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: join(directory, 'credentials'),
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_LIBVIRT_URI: 'qemu:///system',
      COWHERD_IMAGE_DIR: imageDirectory,
      COWHERD_DOMAIN_SCOPE: 'image-directory',
    });
    const agentClient = createClient(
      AgentServiceClient,
      agent.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('service', 'cloning')), caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 120_000 },
    );
    resources.defer(() => agentClient.close());
    const reader = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'cloning'), name: 'test-reader', log });
    resources.defer(() => reader.close());

    const operation = OPERATION_NAME.format({ operation: `00000000-0000-4000-8000-${Buffer.from(suffix).toString('hex').slice(0, 12).padStart(12, '0')}` });
    const names = Array.from({ length: 20 }, (_, index) => `outbox-${suffix}-${index}`);
    domains.push(...names);
    let results: CreateCloneResult[] = [];
    let batchMs = 0;
    // One call before the outage: the agent has seen (and checked) this caller's certificate.
    await call((cb) => agentClient.createClones(CreateClonesRequest.fromPartial({ clones: [] }), cb)).catch(() => undefined);
    await restartNats(5_000, async () => {
      const startedAt = Date.now();
      const response = await call<{ results: CreateCloneResult[] }>((cb) =>
        agentClient.createClones(
          CreateClonesRequest.fromPartial({
            source: { $case: 'virtualMachine', value: VIRTUAL_MACHINE_NAME.format({ host: 'outbox-host', virtualMachine: source }) },
            clones: names.map((domainName) => ({ domainName, start: false })),
            operation,
            requestId: `outbox-${suffix}`,
          }),
          cb,
        ),
      );
      batchMs = Date.now() - startedAt;
      results = response.results;
    });
    assert.deepEqual(
      results.map((result) => [result.domainName, result.status?.code ?? 0]),
      names.map((name) => [name, 0]),
      'every clone made',
    );
    // The batch waits for its events to be recorded on the agent's disk, not for NATS.
    assert.ok(batchMs < 5_000, `the batch took ${batchMs} ms while NATS was down`);
    const ids = names.map((name) => `clone.done/${operation}/outbox-host/${name}`);
    const counts = await untilStored(reader, ids);
    assertExactlyOnce(counts, ids);
    const stored = [...counts.keys()].filter((id) => id.startsWith('clone.done/'));
    assert.equal(stored.length, names.length, 'one clone.done per clone, nothing else of that kind');
    assert.deepEqual(
      (await readdir(join(imageDirectory, 'event-outbox'))).filter((name) => name.endsWith('.event')),
      [],
      'the agent outbox is empty again',
    );
  });
});
