/**
 * The operations store on a real nats-server: operations persist in KV, a request_id makes creates
 * idempotent, and when the replica running an operation dies another replica resumes it from its
 * last checkpoint.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createHash } from 'node:crypto';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { asCowherdError, CowherdError } from '../../services/common/platform/errors.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { KvStore, jsonCodec } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { OperationManager, type OperationKind, unpack } from '../../services/common/domain/operations.js';
import { readAllPages } from '../../services/common/platform/list-pages.js';
import { PageTokens } from '../../services/common/platform/pagination.js';
import { Duration } from '../../services/gen/google/protobuf/duration.js';
import { natsRestarts, Resources, TestPki, startTestNats } from '../harness/index.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** Counts to `request.seconds`, one checkpoint per step, pausing `stepMs` between steps. */
function countingKind(stepMs: number, stepsRun: string[]): OperationKind<Duration, Duration, Duration, { next: number }> {
  return {
    kind: 'test.count',
    requestType: Duration,
    metadataType: Duration,
    responseType: Duration,
    async run(context) {
      for (let step = context.state?.next ?? 0; step < Number(context.request.seconds); step++) {
        await new Promise((resolve) => setTimeout(resolve, stepMs));
        if (context.signal.aborted) throw context.signal.reason;
        stepsRun.push(`${context.name}#${step}`);
        await context.checkpoint({ state: { next: step + 1 }, metadata: { seconds: String(step + 1), nanos: 0 } });
      }
      return { seconds: context.request.seconds, nanos: 0 };
    },
  };
}

describe('operations store', () => {
  const resources = new Resources();
  let connections: Nats[] = [];
  let tokens: PageTokens;

  before(async () => {
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    const tls = await pki.files('service', 'distribution');
    for (let i = 0; i < 2; i++) connections.push(await connectNats({ servers: [nats.url], tls, name: `replica-${i}`, log }));
    resources.defer(async () => {
      for (const connection of connections) await connection.close();
    });
    tokens = await PageTokens.open(connections[0]!.jetstream);
  });
  after(() => resources.release());

  it('runs an operation to completion and reports its response and progress', async () => {
    const steps: string[] = [];
    const manager = await OperationManager.open({ js: connections[0]!.jetstream, log, pageTokens: tokens });
    manager.register(countingKind(5, steps));
    const started = await manager.start(countingKind(5, steps), { seconds: '3', nanos: 0 }, { seconds: '0', nanos: 0 }, '');
    assert.equal(started.done, false);
    const finished = await manager.wait(started.name, 10_000);
    assert.equal(finished.done, true);
    assert.equal(finished.result?.$case, 'response');
    assert.equal(unpack(Duration, finished.result.value).seconds, '3');
    assert.equal(unpack(Duration, finished.metadata).seconds, '3');
    assert.deepEqual(
      steps,
      [0, 1, 2].map((step) => `${started.name}#${step}`),
    );
    await manager.stop();
  });

  it('returns the same operation for a retried request_id and refuses it for a different request', async () => {
    const manager = await OperationManager.open({ js: connections[0]!.jetstream, log, pageTokens: tokens });
    const kind = countingKind(1, []);
    manager.register(kind);
    const first = await manager.start(kind, { seconds: '1', nanos: 0 }, { seconds: '0', nanos: 0 }, 'request-a');
    const again = await manager.start(kind, { seconds: '1', nanos: 0 }, { seconds: '0', nanos: 0 }, 'request-a');
    assert.equal(again.name, first.name);
    await assert.rejects(manager.start(kind, { seconds: '2', nanos: 0 }, { seconds: '0', nanos: 0 }, 'request-a'), /request_id was already used/);
    await manager.wait(first.name, 5_000);
    await manager.stop();
  });

  it('takes over a request_id whose replica died before writing the operation, but not one being created', async () => {
    const manager = await OperationManager.open({ js: connections[0]!.jetstream, log, pageTokens: tokens });
    const kind = countingKind(1, []);
    manager.register(kind);
    // What a replica that died between the request_id entry and the record leaves behind.
    const index = await KvStore.open(connections[0]!.jetstream, 'operations-request-ids', jsonCodec<{ name: string; createdAt?: number }>());
    const key = (requestId: string): string => `${kind.kind}.${createHash('sha256').update(requestId).digest('hex')}`;
    await index.create(key('request-orphaned'), { name: 'operations/00000000-0000-4000-8000-000000000000', createdAt: Date.now() - 60_000 });
    const taken = await manager.start(kind, { seconds: '1', nanos: 0 }, { seconds: '0', nanos: 0 }, 'request-orphaned');
    assert.notEqual(taken.name, 'operations/00000000-0000-4000-8000-000000000000');
    assert.equal(
      (await manager.start(kind, { seconds: '1', nanos: 0 }, { seconds: '0', nanos: 0 }, 'request-orphaned')).name,
      taken.name,
      'a retry gets the new operation',
    );
    assert.equal((await manager.wait(taken.name, 5_000)).done, true);
    // An entry written moments ago may be an operation another replica is creating right now: retry later.
    await index.create(key('request-in-flight'), { name: 'operations/00000000-0000-4000-8000-000000000001', createdAt: Date.now() });
    await assert.rejects(
      manager.start(kind, { seconds: '1', nanos: 0 }, { seconds: '0', nanos: 0 }, 'request-in-flight'),
      (error: unknown) => error instanceof CowherdError && error.code === GrpcStatus.ABORTED,
    );
    await manager.stop();
  });

  it('is resumed by another replica from its last checkpoint when the first one dies', async () => {
    const stepsA: string[] = [];
    const stepsB: string[] = [];
    const replicaA = await OperationManager.open({ js: connections[0]!.jetstream, log, pageTokens: tokens, leaseMs: 600, replicaId: 'a' });
    replicaA.register(countingKind(40, stepsA));
    const operation = await replicaA.start(countingKind(40, stepsA), { seconds: '10', nanos: 0 }, { seconds: '0', nanos: 0 }, '');
    while (stepsA.length < 3) await new Promise((resolve) => setTimeout(resolve, 10));
    // Simulate a crash: the replica stops running without releasing its lease.
    (replicaA as unknown as { stopped: boolean }).stopped = false;
    for (const entry of (replicaA as unknown as { running: Map<string, { controller: AbortController }> }).running.values())
      entry.controller.abort(new Error('crash'));
    const doneA = stepsA.length;

    const replicaB = await OperationManager.open({ js: connections[1]!.jetstream, log, pageTokens: tokens, leaseMs: 600, scanIntervalMs: 100, replicaId: 'b' });
    replicaB.register(countingKind(5, stepsB));
    replicaB.resumeOrphans();
    const finished = await replicaB.wait(operation.name, 15_000);
    assert.equal(finished.done, true, 'replica b finished the operation');
    assert.equal(finished.result?.$case, 'response');
    // Every step ran exactly once across the two replicas, in order.
    const all = [...stepsA.slice(0, doneA), ...stepsB];
    assert.deepEqual(
      all,
      Array.from({ length: 10 }, (_, step) => `${operation.name}#${step}`),
    );
    await replicaB.stop();
    await replicaA.stop();
  });

  it('cancels a running operation with CANCELLED and lists operations in pages', async () => {
    const manager = await OperationManager.open({ js: connections[0]!.jetstream, log, pageTokens: tokens });
    const kind = countingKind(50, []);
    manager.register(kind);
    const operation = await manager.start(kind, { seconds: '100', nanos: 0 }, { seconds: '0', nanos: 0 }, '');
    await manager.cancel(operation.name);
    const finished = await manager.wait(operation.name, 5_000);
    assert.equal(finished.done, true);
    assert.equal(finished.result?.$case, 'error');
    assert.equal(finished.result.value.code, 1);

    const seen = new Set<string>();
    const operations = await readAllPages(async (pageToken) => {
      const page = await manager.list({ filter: 'done=true', pageSize: 2, pageToken });
      return { items: page.operations, nextPageToken: page.nextPageToken };
    });
    for (const item of operations) {
      assert.ok(!seen.has(item.name), 'no operation twice');
      seen.add(item.name);
    }
    assert.ok(seen.has(operation.name));
    assert.ok(seen.size >= 4);
    await assert.rejects(manager.list({ filter: 'done=true', pageSize: 2, pageToken: 'forged.token' }), /page_token/);
    await manager.stop();
  });
});

describe('operations store through a nats-server restart', () => {
  const resources = new Resources();
  after(() => resources.release());

  it('an operation whose checkpoints, lease renewals and last write meet a stopped store waits for it and SUCCEEDS; reads meanwhile are UNAVAILABLE, not INTERNAL', async () => {
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    const restart = natsRestarts(resources, nats);
    const connection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'distribution'), name: 'replica', log });
    resources.defer(() => connection.close());
    const manager = await OperationManager.open({ js: connection.jetstream, log, pageTokens: await PageTokens.open(connection.jetstream), leaseMs: 3_000 });
    resources.defer(() => manager.stop());
    const steps: string[] = [];
    const kind = countingKind(150, steps);
    manager.register(kind);
    const operation = await manager.start(kind, { seconds: '40', nanos: 0 }, { seconds: '0', nanos: 0 }, '');
    while (steps.length < 3) await new Promise((resolve) => setTimeout(resolve, 10));
    let readDuringOutage: unknown;
    await restart(8_000, async () => {
      await new Promise((resolve) => setTimeout(resolve, 1_000));
      readDuringOutage = await manager.get(operation.name).then(
        () => 'answered',
        (error: unknown) => error,
      );
    });
    // As a client does with UNAVAILABLE: ask again while the restarted store is not answering yet.
    let finished: Awaited<ReturnType<OperationManager['wait']>> | undefined;
    for (const giveUp = Date.now() + 60_000; !finished?.done && Date.now() < giveUp; ) {
      finished = await manager.wait(operation.name, 10_000).catch((error: unknown) => {
        if (asCowherdError(error).code !== GrpcStatus.UNAVAILABLE) throw error;
        return undefined;
      });
    }
    assert.equal(finished?.done, true);
    assert.equal(finished.result?.$case, 'response', JSON.stringify(finished.result));
    assert.equal(unpack(Duration, finished.result.value).seconds, '40');
    assert.equal(new Set(steps).size, 40, 'every step ran');
    const mapped = asCowherdError(readDuringOutage);
    assert.equal(mapped.code, GrpcStatus.UNAVAILABLE, `a read while the store is down: ${String(readDuringOutage)}`);
    assert.equal(mapped.reason, ErrorReason.ERROR_REASON_STORE_UNAVAILABLE);
  });
});
