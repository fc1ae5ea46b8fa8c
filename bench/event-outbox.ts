/**
 * What the event outbox costs and what the stream's duplicate window costs, on a real nats-server (started
 * here, mutual TLS): publish latency through the agent's directory store and the services' KV store next to
 * a plain JetStream publish, how fast the relay drains a backlog (the aftermath of an outage), and the
 * nats-server memory one remembered Nats-Msg-Id takes (what raising the 10-minute window would cost).
 * Prints one JSON line. No root needed: `node --import tsx bench/event-outbox.ts`.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { headers as natsHeaders } from '@nats-io/transport-node';
import { startEventOutbox, type EventOutbox } from '../services/common/platform/event-outbox.js';
import { CLONE_DONE } from '../services/common/domain/event-types.js';
import { ensureEventStream, EVENT_STREAM, JetStreamEventPublisher } from '../services/common/platform/events.js';
import { createLogger } from '../services/common/platform/logger.js';
import { connectNats, type Nats } from '../services/common/platform/nats.js';
import type { CloneDone } from '../services/gen/cowherd/events/v1/events.js';
import { DiskBackend } from '../services/gen/cowherd/common/v1/types.js';
import { Resources, TestPki, startTestNats } from '../test/harness/index.js';

const log = createLogger({ service: 'bench', level: 'silent' });
const SEQUENTIAL = Number(process.env['BENCH_EVENTS'] ?? 300);
const BACKLOG = Number(process.env['BENCH_BACKLOG'] ?? 2_000);
const IDS = Number(process.env['BENCH_IDS'] ?? 50_000);

const payload = (index: number): CloneDone => ({
  imageVersion: '',
  virtualMachine: `hosts/kvm-01/virtualMachines/vm-${index}`,
  host: 'hosts/kvm-01',
  domainName: `vm-${index}`,
  uuid: '6c0e7d0c-3f7e-4c84-a1f4-3b0f6f7f2a11',
  image: 'images/debian-12',
  sourceVirtualMachine: '',
  overlays: [`/var/lib/cowherd/images/clones/vm-${index}/vda.qcow2`],
  started: true,
  operation: 'operations/6c0e7d0c-3f7e-4c84-a1f4-3b0f6f7f2a11',
  occurTime: new Date(),
  diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
});

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]! * 100) / 100;
}

async function latencies(publish: (index: number) => Promise<unknown>): Promise<{ p50Ms: number; p99Ms: number }> {
  const samples: number[] = [];
  for (let index = 0; index < SEQUENTIAL; index++) {
    const started = performance.now();
    await publish(index);
    samples.push(performance.now() - started);
  }
  return { p50Ms: percentile(samples, 50), p99Ms: percentile(samples, 99) };
}

async function drained(outbox: EventOutbox): Promise<void> {
  while (outbox.pending() > 0) await new Promise((resolve) => setTimeout(resolve, 10));
}

/** A backlog recorded with the relay unable to send (as during an outage), then the time to send it all. */
async function drainRate(make: () => Promise<EventOutbox>, tag: string): Promise<{ recordMs: number; eventsPerSecond: number }> {
  const outbox = await make();
  const started = performance.now();
  await Promise.all(
    Array.from({ length: BACKLOG }, (_, index) => outbox.events.publish(CLONE_DONE, payload(index), { host: 'kvm-01', id: `${tag}/${index}` })),
  );
  const recorded = performance.now();
  await drained(outbox);
  const done = performance.now();
  await outbox.stop();
  return { recordMs: Math.round(recorded - started), eventsPerSecond: Math.round(BACKLOG / ((done - started) / 1000)) };
}

function rssBytes(pid: number): number {
  const line = readFileSync(`/proc/${pid}/status`, 'utf8')
    .split('\n')
    .find((entry) => entry.startsWith('VmRSS:'))!;
  return Number(/(\d+)/.exec(line)![1]) * 1024;
}

/** nats-server RSS growth for IDS messages without and with a Nats-Msg-Id; the difference is the window's memory. */
async function windowMemory(nats: Nats, pid: number): Promise<{ bytesPerRememberedId: number; ids: number }> {
  const data = new Uint8Array(200);
  const send = async (withId: boolean, tag: string): Promise<number> => {
    const before = rssBytes(pid);
    for (let start = 0; start < IDS; start += 500) {
      await Promise.all(
        Array.from({ length: Math.min(500, IDS - start) }, (_, offset) => {
          const headers = natsHeaders();
          headers.set('Cowherd-Event-Type', CLONE_DONE.typeName);
          return nats.jetstream.publish('cowherd.events.clone.done.kvm-01', data, {
            headers,
            ...(withId ? { msgID: `clone.done/operations/6c0e7d0c-3f7e-4c84-a1f4-3b0f6f7f2a11/kvm-01/${tag}-${start + offset}` } : {}),
          });
        }),
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    return rssBytes(pid) - before;
  };
  const without = await send(false, 'plain');
  const withIds = await send(true, 'id');
  return { bytesPerRememberedId: Math.round((withIds - without) / IDS), ids: IDS };
}

const resources = new Resources();
try {
  const pki = await TestPki.create(await resources.tempDir());
  const server = await startTestNats(resources, pki);
  const service = await connectNats({ servers: [server.url], tls: await pki.files('service', 'distribution'), name: 'bench-service', log });
  const host = await connectNats({ servers: [server.url], tls: await pki.files('host', 'kvm-01'), name: 'bench-agent', log });
  resources.defer(() => service.close());
  resources.defer(() => host.close());
  await ensureEventStream(service.manager);
  const directory = join(await resources.tempDir('cowherd-bench-outbox-'), 'event-outbox');
  const agentOutbox = () => startEventOutbox({ js: host.jetstream, manager: host.manager, log, owner: 'agent', directory });
  const serviceOutbox = () => startEventOutbox({ js: service.jetstream, manager: service.manager, log, owner: 'distribution' });

  const direct = new JetStreamEventPublisher(host.jetstream, log);
  const plain = await latencies((index) => direct.publish(CLONE_DONE, payload(index), { host: 'kvm-01', id: `direct/${index}` }));
  const agent = await agentOutbox();
  const directoryLatency = await latencies((index) => agent.events.publish(CLONE_DONE, payload(index), { host: 'kvm-01', id: `directory/${index}` }));
  await drained(agent);
  await agent.stop();
  const kv = await serviceOutbox();
  const kvLatency = await latencies((index) => kv.events.publish(CLONE_DONE, payload(index), { host: 'kvm-01', id: `kv/${index}` }));
  await drained(kv);
  await kv.stop();
  const directoryDrain = await drainRate(agentOutbox, 'directory-backlog');
  const kvDrain = await drainRate(serviceOutbox, 'kv-backlog');
  const memory = await windowMemory(service, server.daemon.pid);
  const stream = (await service.manager.streams.info(EVENT_STREAM)).state;
  process.stdout.write(
    `${JSON.stringify({
      bench: 'event-outbox',
      publishLatency: { jetstreamDirect: plain, directoryOutbox: directoryLatency, kvOutbox: kvLatency },
      backlog: { events: BACKLOG, directoryOutbox: directoryDrain, kvOutbox: kvDrain },
      duplicateWindow: memory,
      streamMessages: stream.messages,
    })}\n`,
  );
} finally {
  await resources.release();
}
