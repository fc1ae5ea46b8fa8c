/**
 * Events on a real nats-server: a durable consumer receives what was published while it was offline,
 * exactly once per Nats-Msg-Id, decoded from protobuf; a failing handler gets the event again.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { IMAGE_AVAILABLE, CLONE_DONE } from '../../services/common/domain/event-types.js';
import { consumeEvents, ensureEventStream, JetStreamEventPublisher, type ReceivedEvent } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { ImageAvailable } from '../../services/gen/cowherd/events/v1/events.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { HOST_IMAGE_NAME, HOST_NAME } from '../../services/common/domain/resource-names.js';

const log = createLogger({ service: 'test', level: 'silent' });

function available(host: string): ImageAvailable {
  return {
    image: 'images/debian-12',
    host: HOST_NAME.format({ host }),
    replica: HOST_IMAGE_NAME.format({ host, image: 'debian-12' }),
    totalBytes: '268435456',
    files: [],
    origin: false,
    transferDuration: { seconds: '12', nanos: 0 },
    operation: 'operations/x',
    occurTime: new Date('2026-11-26T10:00:00Z'),
    generation: '1',
  };
}

async function waitFor(predicate: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('events', () => {
  const resources = new Resources();
  let publisherConnection: Nats;
  let consumerConnection: Nats;

  before(async () => {
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    publisherConnection = await connectNats({ servers: [nats.url], tls: await pki.files('host', 'kvm-01'), name: 'agent', log });
    consumerConnection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'cloning'), name: 'cloning', log });
    resources.defer(() => publisherConnection.close());
    resources.defer(() => consumerConnection.close());
    await ensureEventStream(publisherConnection.manager);
  });
  after(() => resources.release());

  it('reach a durable consumer that was offline when they were published, once per Nats-Msg-Id', async () => {
    const received: Array<ReceivedEvent<ImageAvailable>> = [];
    // The consumer exists (durable), then goes away.
    const first = await consumeEvents(consumerConnection.jetstream, consumerConnection.manager, {
      durable: 'cloning-image-available',
      types: [IMAGE_AVAILABLE],
      log,
      handle: async (event) => void received.push(event),
    });
    await first.stop();

    const publisher = new JetStreamEventPublisher(publisherConnection.jetstream, log);
    await publisher.publish(IMAGE_AVAILABLE, available('kvm-01'), { host: 'kvm-01', id: 'image.available/debian-12/kvm-01' });
    // A retried publish of the same fact is stored once.
    await publisher.publish(IMAGE_AVAILABLE, available('kvm-01'), { host: 'kvm-01', id: 'image.available/debian-12/kvm-01' });
    await publisher.publish(IMAGE_AVAILABLE, available('kvm-02'), { host: 'kvm-02', id: 'image.available/debian-12/kvm-02' });
    // Another kind on the same stream is not delivered to this consumer.
    await publisher.publish(
      CLONE_DONE,
      {
        imageVersion: '',
        virtualMachine: 'hosts/kvm-01/virtualMachines/a',
        host: 'hosts/kvm-01',
        domainName: 'a',
        uuid: '',
        image: '',
        sourceVirtualMachine: '',
        overlays: [],
        started: false,
        operation: '',
        occurTime: undefined,
        diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
      },
      { host: 'kvm-01', id: 'clone.done/a' },
    );

    const second = await consumeEvents(consumerConnection.jetstream, consumerConnection.manager, {
      durable: 'cloning-image-available',
      types: [IMAGE_AVAILABLE],
      log,
      handle: async (event) => void received.push(event),
    });
    await waitFor(() => received.length >= 2);
    await new Promise((resolve) => setTimeout(resolve, 300));
    await second.stop();
    assert.deepEqual(
      received.map((event) => event.subject),
      ['cowherd.events.image.available.kvm-01', 'cowherd.events.image.available.kvm-02'],
    );
    assert.equal(received[0]!.typeName, ImageAvailable.$type);
    assert.deepEqual(received[0]!.payload, available('kvm-01'));
  });

  it('drop an event whose subject does not match its type (a host cannot pass off one kind as another)', async () => {
    const { headers } = await import('@nats-io/transport-node');
    const { EVENT_TYPE_HEADER } = await import('../../services/common/platform/events.js');
    const received: string[] = [];
    const consumer = await consumeEvents(consumerConnection.jetstream, consumerConnection.manager, {
      durable: 'strict-subjects',
      types: [IMAGE_AVAILABLE, CLONE_DONE] as never[],
      log,
      startAt: 'new',
      handle: async (event) => void received.push(event.subject),
    });
    const forged = headers();
    forged.set(EVENT_TYPE_HEADER, ImageAvailable.$type);
    await publisherConnection.jetstream.publish('cowherd.events.available.kvm-09.kvm-01', ImageAvailable.encode(available('kvm-09')).finish(), {
      headers: forged,
      msgID: 'forged',
    });
    await new JetStreamEventPublisher(publisherConnection.jetstream, log).publish(IMAGE_AVAILABLE, available('kvm-01'), {
      host: 'kvm-01',
      id: 'genuine-after-forged',
    });
    await waitFor(() => received.length >= 1);
    await new Promise((resolve) => setTimeout(resolve, 200));
    await consumer.stop();
    assert.deepEqual(received, ['cowherd.events.image.available.kvm-01']);
  });

  it('redeliver an event whose handler failed', async () => {
    const publisher = new JetStreamEventPublisher(publisherConnection.jetstream, log);
    let attempts = 0;
    const consumer = await consumeEvents(consumerConnection.jetstream, consumerConnection.manager, {
      durable: 'flaky-handler',
      types: [IMAGE_AVAILABLE],
      host: 'kvm-03',
      log,
      retryDelayMs: 50,
      startAt: 'new',
      handle: async () => {
        attempts++;
        if (attempts === 1) throw new Error('transient');
      },
    });
    await publisher.publish(IMAGE_AVAILABLE, available('kvm-03'), { host: 'kvm-03', id: 'image.available/debian-12/kvm-03' });
    await waitFor(() => attempts >= 2);
    await consumer.stop();
    assert.equal(attempts, 2);
  });
});
