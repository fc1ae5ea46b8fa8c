import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { test } from 'node:test';

import { status as GrpcStatus } from '@grpc/grpc-js';
import { ExportImageResponse } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { ImagePublishStage } from '../../services/gen/cowherd/common/v1/types.js';
import { Host } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { exportOnAgent, type PublishDeps } from '../../services/distribution/publish.js';

/** A fake export stream: the test decides what the agent sends and when. */
class FakeStream extends EventEmitter {
  cancelled = false;
  cancel(): void {
    this.cancelled = true;
    this.emit('error', Object.assign(new Error('Cancelled on client'), { code: GrpcStatus.CANCELLED }));
    this.emit('close');
  }
}

function fakeDeps(stream: FakeStream, exportStallMs: number, seen: { options?: { deadline?: number } }): PublishDeps {
  return {
    exportStallMs,
    agents: { clientFor: () => ({ exportImage: (_request: unknown, options: { deadline?: number }) => ((seen.options = options), stream) }) },
  } as unknown as PublishDeps;
}

const host = Host.fromPartial({ name: 'hosts/h1', agentEndpoint: 'localhost:1' });
const request = { virtualMachine: 'hosts/h1/virtualMachines/vm', image: 'images/i', trackerAnnounceUrl: 'http://t/announce', operation: 'operations/x' };
const progress = (bytes: number) =>
  ExportImageResponse.fromPartial({
    response: {
      $case: 'progress',
      value: { stage: ImagePublishStage.IMAGE_PUBLISH_STAGE_EXPORTING, progress: { bytesDone: String(bytes), bytesTotal: '100' } },
    },
  });

test('the export stream gets a long outer deadline, not the client default of 30 s', async () => {
  const stream = new FakeStream();
  const seen: { options?: { deadline?: number } } = {};
  const done = exportOnAgent(fakeDeps(stream, 1000, seen), host, request, async () => undefined);
  assert.ok(seen.options?.deadline !== undefined && seen.options.deadline - Date.now() > 3_600_000, 'deadline at least an hour away');
  stream.emit('data', ExportImageResponse.fromPartial({ response: { $case: 'result', value: { image: { name: 'images/i' } } } }));
  stream.emit('end');
  stream.emit('close');
  assert.equal((await done).image?.name, 'images/i');
});

test('an export that keeps sending progress past the stall time completes', async () => {
  const stream = new FakeStream();
  const done = exportOnAgent(fakeDeps(stream, 300, {}), host, request, async () => undefined);
  for (let bytes = 10; bytes <= 60; bytes += 10) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    stream.emit('data', progress(bytes));
  }
  stream.emit('data', ExportImageResponse.fromPartial({ response: { $case: 'result', value: { image: { name: 'images/i' } } } }));
  stream.emit('end');
  stream.emit('close');
  assert.equal((await done).image?.name, 'images/i');
  assert.equal(stream.cancelled, false);
});

test('an export whose agent falls silent is cancelled with DEADLINE_EXCEEDED after the stall time', async () => {
  const stream = new FakeStream();
  const started = Date.now();
  const done = exportOnAgent(fakeDeps(stream, 300, {}), host, request, async () => undefined);
  stream.emit('data', progress(10));
  await assert.rejects(
    done,
    (error: unknown) => error instanceof CowherdError && error.code === GrpcStatus.DEADLINE_EXCEEDED && /no export progress/.test(error.message),
  );
  assert.ok(Date.now() - started >= 300 && Date.now() - started < 2000);
  assert.equal(stream.cancelled, true);
});
