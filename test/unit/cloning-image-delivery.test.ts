/**
 * Cloning's wait for an image, against a fake distribution server (grpc-js on 127.0.0.1:0, no TLS) whose
 * DistributeImage operation never ends: the wait ends at cloning's own progress deadline with
 * PROGRESS_DEADLINE_EXCEEDED, whether the host's entry stays VERIFYING, stops growing, or distribution stops
 * answering; only growing bytes keep it going. Small deadlines on the real clock.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { credentials, Server, ServerCredentials, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { distributionImageDelivery } from '../../services/cloning/image-delivery.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { pack } from '../../services/common/domain/operations.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { DistributeImageMetadata, DistributionServiceService } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { ImageReplica_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { OperationsService, type Operation } from '../../services/gen/google/longrunning/operations.js';
import type { ImageDeliveryProgress } from '../../services/cloning/image-delivery-port.js';

const MiB = 1024 * 1024;
const HOST = 'hosts/kvm-1';

/** What the fake reports on each WaitOperation: the host's state and bytes, or a status code to fail with. */
type Step = { state: ImageReplica_State; bytes: number } | { code: GrpcStatus };

describe('cloning waits for an image under a progress deadline', () => {
  let server: Server;
  let address = '';
  let script: (call: number) => Step = () => ({ state: ImageReplica_State.STATE_PENDING, bytes: 0 });
  let calls = 0;
  let timeouts: number[] = [];

  const operation = (step: { state: ImageReplica_State; bytes: number }): Operation => ({
    name: 'operations/fake',
    done: false,
    metadata: pack(
      DistributeImageMetadata,
      DistributeImageMetadata.fromPartial({
        image: 'images/x',
        bytesTotal: String(MiB),
        transfers: [{ host: HOST, state: step.state, progress: { bytesDone: String(step.bytes), bytesTotal: String(MiB) } }],
      }),
    ),
    result: undefined,
  });

  before(async () => {
    server = new Server();
    server.addService(DistributionServiceService, {
      distributeImage: (_call: unknown, callback: (error: ServiceError | null, response?: Operation) => void) =>
        callback(null, operation({ state: ImageReplica_State.STATE_PENDING, bytes: 0 })),
    } as never);
    server.addService(OperationsService, {
      waitOperation: (call: { request: { timeout?: { seconds: string } } }, callback: (error: Partial<ServiceError> | null, response?: Operation) => void) => {
        timeouts.push(Number(call.request.timeout?.seconds ?? -1));
        const step = script(calls++);
        // A short wait, as a WaitOperation whose timeout passes with nothing done.
        setTimeout(() => ('code' in step ? callback({ code: step.code, details: 'fake', message: 'fake' }) : callback(null, operation(step))), 100);
      },
    } as never);
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (error, bound) => (error ? reject(error) : resolve(bound))),
    );
    address = `127.0.0.1:${port}`;
  });
  after(() => server.forceShutdown());

  async function wait(
    step: (call: number) => Step,
    options: { waitSliceSeconds?: number; reportEverySeconds?: () => number | undefined } = {},
  ): Promise<{ error: unknown; elapsedMs: number; reports: ImageDeliveryProgress[] }> {
    script = step;
    calls = 0;
    timeouts = [];
    const delivery = distributionImageDelivery(address, credentials.createInsecure(), {
      waitSliceSeconds: options.waitSliceSeconds ?? 1,
      deadlines: { stallMs: 1_000, verifyFloorMs: 500, verifyBytesPerSecond: MiB },
    });
    const reports: ImageDeliveryProgress[] = [];
    const started = Date.now();
    try {
      await delivery.bringImageToHost(
        {
          image: 'images/x',
          host: HOST,
          operation: 'operations/clone',
          onProgress: (report) => void reports.push(report),
          reportEverySeconds: options.reportEverySeconds,
        },
        new AbortController().signal,
      );
      return { error: undefined, elapsedMs: Date.now() - started, reports };
    } catch (error) {
      return { error, elapsedMs: Date.now() - started, reports };
    } finally {
      delivery.close();
    }
  }

  function assertDeadline(error: unknown, state: string): void {
    assert.ok(error instanceof CowherdError, String(error));
    assert.equal(error.code, GrpcStatus.DEADLINE_EXCEEDED);
    assert.equal(error.reason, ErrorReason.ERROR_REASON_PROGRESS_DEADLINE_EXCEEDED);
    assert.equal(error.metadata['host'], HOST);
    assert.equal(error.metadata['state'], state);
    assert.equal(error.metadata['operation'], 'operations/fake');
  }

  it('a host entry that stays VERIFYING ends after floor + bytes / rate (1.5 s), however often it is read', async () => {
    const { error, elapsedMs, reports } = await wait(() => ({ state: ImageReplica_State.STATE_VERIFYING, bytes: MiB }));
    assertDeadline(error, 'VERIFYING');
    assert.ok(elapsedMs >= 1_400 && elapsedMs < 4_000, `${elapsedMs} ms`);
    assert.ok(reports.length >= 5, 'read many times');
    assert.equal(reports.at(-1)!.operation, 'operations/fake');
    assert.equal(reports.at(-1)!.transfer?.state, ImageReplica_State.STATE_VERIFYING);
  });

  it('growing bytes keep the wait going; when they stop, it ends one stall time later', async () => {
    // 12 reads of growing bytes (~1.2 s), then the same bytes for ever.
    const { error, elapsedMs } = await wait((call) => ({ state: ImageReplica_State.STATE_TRANSFERRING, bytes: Math.min(call, 12) * 1000 }));
    assertDeadline(error, 'TRANSFERRING');
    assert.ok(elapsedMs >= 2_100 && elapsedMs < 5_000, `${elapsedMs} ms: longer than one stall time, because bytes grew`);
  });

  it('a distribution that stops answering does not extend the deadline, nor fail the wait at once', async () => {
    const { error, elapsedMs } = await wait((call) =>
      call < 2 ? { state: ImageReplica_State.STATE_TRANSFERRING, bytes: 10 } : { code: GrpcStatus.UNAVAILABLE },
    );
    assertDeadline(error, 'TRANSFERRING');
    assert.ok(elapsedMs >= 900 && elapsedMs < 4_000, `${elapsedMs} ms`);
  });

  it('waits as briefly as the caller asks before each read (a streaming clone until its transfer starts), never longer than the slice', async () => {
    let asked = 0;
    const { error } = await wait(() => ({ state: ImageReplica_State.STATE_TRANSFERRING, bytes: 10 }), {
      waitSliceSeconds: 5,
      reportEverySeconds: () => (asked++ < 3 ? 1 : asked < 5 ? 60 : undefined),
    });
    assertDeadline(error, 'TRANSFERRING');
    assert.deepEqual(timeouts.slice(0, 6), [1, 1, 1, 5, 5, 5], 'each WaitOperation timeout: 1 s while asked, else the 5 s slice (60 is capped)');
  });
});
