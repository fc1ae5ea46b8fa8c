/**
 * NATS authorization on a real nats-server 2.9 with real certificates: every certificate is a user (its
 * subject DN, serial included) with least-privilege permissions by identity kind; a certificate that is
 * not listed, or comes from another CA, is refused at connect; removing one certificate's user and
 * reloading refuses it (new and existing connections) while the same identity's other certificate works.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { CLONE_DONE, IMAGE_AVAILABLE } from '../../services/common/domain/event-types.js';
import { EVENT_STREAM, ensureEventStream, JetStreamEventPublisher, eventSubject } from '../../services/common/platform/events.js';
import { jsonCodec, KvStore } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import {
  certificatePrincipal,
  identityPrincipal,
  inboxPrefixFor,
  renderNatsAuthorization,
  type NatsPrincipal,
} from '../../services/common/platform/nats-authorization.js';
import { parseIdentity } from '../../services/common/platform/identity.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { inspectCertificate, natsUserOf } from '../../services/common/platform/pki.js';
import type { TlsFiles } from '../../services/common/platform/tls.js';
import { startEmbeddedNats, type EmbeddedNats } from '../../services/launcher/embedded-nats.js';
import type { ImageAvailable } from '../../services/gen/cowherd/events/v1/events.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { HOST_IMAGE_NAME, HOST_NAME } from '../../services/common/domain/resource-names.js';

const log = createLogger({ service: 'test', level: 'silent' });

function available(host: string): ImageAvailable {
  return {
    image: 'images/debian-12',
    host: HOST_NAME.format({ host }),
    replica: HOST_IMAGE_NAME.format({ host, image: 'debian-12' }),
    totalBytes: '1',
    files: [],
    origin: false,
    transferDuration: undefined,
    operation: 'operations/x',
    occurTime: new Date('2026-11-26T10:00:00Z'),
    generation: '1',
  };
}

/** A plain connection that does not retry: refusals surface as a rejected promise. */
function connectOnce(url: string, tls: TlsFiles): Promise<NatsConnection> {
  const identity = inspectCertificate(readFileSync(tls.certificateFile, 'utf8')).identity;
  return connect({
    servers: [url],
    tls: { certFile: tls.certificateFile, keyFile: tls.privateKeyFile, caFile: tls.caFile },
    timeout: 5_000,
    reconnect: false,
    ...(identity === undefined ? {} : { inboxPrefix: inboxPrefixFor(identity) }),
  });
}

/** `promise`'s value, or undefined after `ms`. */
async function within<T>(promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

async function principalOf(tls: TlsFiles): Promise<NatsPrincipal> {
  return certificatePrincipal(await readFile(tls.certificateFile, 'utf8'));
}

describe('NATS authorization', () => {
  const resources = new Resources();
  let pki: TestPki;
  let nats: EmbeddedNats;
  let service: Nats;
  const files: Record<'service' | 'host' | 'hostSecond' | 'otherHost' | 'admin' | 'unlisted', TlsFiles> = {} as never;
  const users: NatsPrincipal[] = [];

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    files.service = await pki.files('service', 'inventory');
    files.host = await pki.files('host', 'kvm-01');
    files.hostSecond = await pki.files('host', 'kvm-01', { subdirectory: 'host-kvm-01-second' });
    files.otherHost = await pki.files('host', 'kvm-02');
    files.admin = await pki.files('admin', 'alice');
    files.unlisted = await pki.files('host', 'kvm-09');
    for (const name of ['service', 'host', 'hostSecond', 'otherHost', 'admin'] as const) users.push(await principalOf(files[name]));
    // The test keeps the list itself, as the certificate authority would.
    nats = await startTestNats(resources, pki, { issued: 'none', users });
    service = await connectNats({ servers: [nats.url], tls: files.service, name: 'inventory', log });
    resources.defer(() => service.close());
    await ensureEventStream(service.manager);
  });
  after(() => resources.release());

  it('names a certificate by its subject DN as nats-server prints it, serial included', async () => {
    const pem = await readFile(files.host.certificateFile, 'utf8');
    assert.match(natsUserOf(pem), /^CN=host\/kvm-01,OU=[0-9a-f]+,O=cowherd$/);
    assert.notEqual(natsUserOf(pem), natsUserOf(await readFile(files.hostSecond.certificateFile, 'utf8')));
    // Quoting: the rendered file is what nats-server parsed (it started), and escapes quotes and backslashes.
    const text = renderNatsAuthorization([], [{ user: 'CN=a\\,"b"', identity: { kind: 'host', name: 'a', uri: 'spiffe://cowherd/host/a' } }]);
    assert.match(text, /user: "CN=a\\\\,\\"b\\""/);
  });

  it('lets a host publish its own events through JetStream, and nothing else', async () => {
    const host = await connectNats({ servers: [nats.url], tls: files.host, name: 'agent', log });
    try {
      const publisher = new JetStreamEventPublisher(host.jetstream, log);
      const sequence = await publisher.publish(IMAGE_AVAILABLE, available('kvm-01'), { host: 'kvm-01', id: 'image.available/kvm-01' });
      assert.ok(sequence > 0);
      // A retried publish is deduplicated (Nats-Msg-Id works under these permissions).
      assert.equal(await publisher.publish(IMAGE_AVAILABLE, available('kvm-01'), { host: 'kvm-01', id: 'image.available/kvm-01' }), sequence);

      // Another host's subject: the server answers with a permission violation, which fails the publish.
      const started = Date.now();
      await assert.rejects(publisher.publish(IMAGE_AVAILABLE, available('kvm-02'), { host: 'kvm-02', id: 'image.available/kvm-02-forged' }), /permission/i);
      assert.ok(Date.now() - started < 5_000, 'the refusal is immediate, not a timeout');
      await assert.rejects(
        publisher.publish(
          CLONE_DONE,
          {
            imageVersion: '',
            virtualMachine: 'x',
            host: '',
            domainName: '',
            uuid: '',
            image: '',
            sourceVirtualMachine: '',
            overlays: [],
            started: false,
            operation: '',
            occurTime: undefined,
            diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
          },
          { id: 'clone.done/fleet' },
        ),
        /permission/i,
      );
      const stream = await service.manager.streams.info(EVENT_STREAM, { subjects_filter: '>' });
      assert.deepEqual(stream.state.subjects, { [eventSubject(IMAGE_AVAILABLE.kind, 'kvm-01')]: 1 });

      // No KV, no stream management.
      await assert.rejects(KvStore.open(host.jetstream, 'hosts', jsonCodec<{ x: number }>()), /permission/i);
      await assert.rejects(ensureEventStream(host.manager), /permission/i);
      await assert.rejects(host.jetstream.consumers.get(EVENT_STREAM), /permission/i);

      // It may follow certificate revocations, not other events.
      const revoked = host.connection.subscribe(eventSubject('certificate.revoked', 'kvm-01'), { max: 1 });
      await host.connection.flush();
      service.connection.publish(eventSubject('certificate.revoked', 'kvm-01'), 'x');
      for await (const message of revoked) assert.equal(message.subject, 'cowherd.events.certificate.revoked.kvm-01');
      const forbidden = host.connection.subscribe('cowherd.events.>');
      await host.connection.flush();
      assert.match(String(await within(forbidden.closed, 2_000)), /permission/i);
    } finally {
      await host.close();
    }
  });

  it('gives services full access', async () => {
    const kv = await KvStore.open(service.jetstream, 'authorization-test', jsonCodec<{ x: number }>());
    await kv.put('k', { x: 1 });
    assert.deepEqual((await kv.get('k'))?.value, { x: 1 });
    const publisher = new JetStreamEventPublisher(service.jetstream, log);
    assert.ok((await publisher.publish(IMAGE_AVAILABLE, available('kvm-07'), { host: 'kvm-07', id: 'image.available/kvm-07' })) > 0);
  });

  it('lets an admin follow events read-only', async () => {
    const admin = await connectNats({ servers: [nats.url], tls: files.admin, name: 'alice', log });
    try {
      const live = admin.connection.subscribe('cowherd.events.>', { max: 1 });
      await admin.connection.flush();
      const sequence = await new JetStreamEventPublisher(service.jetstream, log).publish(IMAGE_AVAILABLE, available('kvm-05'), {
        host: 'kvm-05',
        id: 'image.available/kvm-05',
      });
      for await (const message of live) assert.equal(message.subject, 'cowherd.events.image.available.kvm-05');
      // Stored events by sequence.
      const stored = await admin.manager.streams.getMessage(EVENT_STREAM, { seq: sequence });
      assert.equal(stored?.subject, 'cowherd.events.image.available.kvm-05');
      // No publishing, no consumers, no KV.
      await assert.rejects(
        new JetStreamEventPublisher(admin.jetstream, log).publish(IMAGE_AVAILABLE, available('kvm-05'), { host: 'kvm-05', id: 'forged' }),
        /permission/i,
      );
      await assert.rejects(admin.jetstream.consumers.get(EVENT_STREAM), /permission/i);
      await assert.rejects(admin.manager.consumers.delete(EVENT_STREAM, 'anything'), /permission/i);
      await assert.rejects(KvStore.open(admin.jetstream, 'authorization-test', jsonCodec<{ x: number }>()), /permission/i);
    } finally {
      await admin.close();
    }
  });

  it('refuses a certificate from the CA that is not in the users list', async () => {
    await assert.rejects(connectOnce(nats.url, files.unlisted), /authorization violation/i);
  });

  it('refuses a certificate from another CA', async () => {
    const other = await TestPki.create(await resources.tempDir(), 'another CA');
    const stranger = await other.files('service', 'inventory');
    // The client trusts our CA (so it reaches the server); the server does not trust the stranger's.
    await assert.rejects(connectOnce(nats.url, { ...stranger, caFile: files.service.caFile }));
  });

  it("refuses a revoked certificate after a reload, closing its connections, while the same host's other certificate works", async (t) => {
    const existing = await connectOnce(nats.url, files.host);
    // A process's connection (connectNats) reconnects after being closed: it is refused and gives up.
    const agent = await connectNats({ servers: [nats.url], tls: files.host, name: 'agent', log });
    const other = await connectOnce(nats.url, files.hostSecond);
    try {
      const statuses: Array<{ type: string; at: number }> = [];
      void (async () => {
        for await (const status of agent.connection.status())
          statuses.push({ type: `${status.type}${'error' in status ? `(${String(status.error)})` : ''}`, at: Date.now() });
      })();
      const existingClosed = existing.closed().then(() => Date.now());
      const agentClosed = agent.connection.closed().then((error) => ({ error, at: Date.now() }));

      const revokedUser = natsUserOf(await readFile(files.host.certificateFile, 'utf8'));
      const start = Date.now();
      await nats.updateUsers(users.filter((user) => user.user !== revokedUser));
      const applied = Date.now();
      await assert.rejects(connectOnce(nats.url, files.host), /authorization violation/i);
      const newRefusedAt = Date.now();
      const existingGoneAt = await within(existingClosed, 5_000);
      assert.ok(existingGoneAt, 'the server closed the existing connection of the revoked certificate');
      const agentGone = await within(agentClosed, 10_000);
      assert.ok(agentGone, 'the reconnecting client gave up');
      assert.match(String(agentGone.error), /authorization violation/i);
      t.diagnostic(
        `reload applied +${applied - start} ms; new connection refused +${newRefusedAt - start} ms; existing connection closed by the server +${existingGoneAt - start} ms; connectNats client: ${statuses.map((status) => `${status.type} +${status.at - start}`).join(', ')}, closed +${agentGone.at - start} ms`,
      );

      // The other certificate of kvm-01 (another serial) keeps its connection and its permissions.
      assert.equal(other.isClosed(), false);
      const publisher = new JetStreamEventPublisher(jetstream(other), log);
      assert.ok((await publisher.publish(IMAGE_AVAILABLE, available('kvm-01'), { host: 'kvm-01', id: 'image.available/kvm-01/after-revocation' })) > 0);
      const fresh = await connectOnce(nats.url, files.hostSecond);
      await fresh.close();
    } finally {
      if (!existing.isClosed()) await existing.close();
      if (!agent.connection.isClosed()) await agent.connection.close();
      await other.close();
    }
  });

  it('admits bootstrap users by URI SAN (every certificate of the identity) and starts open without users', async () => {
    const ca = await pki.files('service', 'certificate-authority');
    const caAgain = await pki.files('service', 'certificate-authority', { subdirectory: 'ca-second' });
    const serverTls = await pki.files('service', 'nats', { subdirectory: 'nats-second' });
    const bootstrap = await startEmbeddedNats({
      directory: await resources.tempDir(),
      tls: serverTls,
      bootstrapUsers: [identityPrincipal(parseIdentity('spiffe://cowherd/service/certificate-authority')!)],
    });
    resources.defer(() => bootstrap.stop());
    for (const tls of [ca, caAgain]) await (await connectOnce(bootstrap.url, tls)).close();
    await assert.rejects(connectOnce(bootstrap.url, files.service), /authorization violation/i);

    // No users at all: every certificate from the CA, until the first update turns the allow-list on.
    const open = await startEmbeddedNats({ directory: await resources.tempDir(), tls: serverTls });
    resources.defer(() => open.stop());
    await (await connectOnce(open.url, files.unlisted)).close();
    await open.updateUsers([]);
    await assert.rejects(connectOnce(open.url, files.unlisted), /authorization violation/i);
    await open.updateUsers([await principalOf(files.unlisted)]);
    await (await connectOnce(open.url, files.unlisted)).close();
  });

  it('refuses users it cannot render, keeping the previous ones', async () => {
    await assert.rejects(nats.updateUsers([{ user: 'bad\nuser', identity: { kind: 'host', name: 'x', uri: 'spiffe://cowherd/host/x' } }]), /control character/);
    const connection = await connectOnce(nats.url, files.service);
    await connection.close();
    // The service's JetStream API still works after all these reloads.
    const manager = await jetstreamManager(service.connection);
    assert.equal((await manager.streams.info(EVENT_STREAM)).config.name, EVENT_STREAM);
  });
});
