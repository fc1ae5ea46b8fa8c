/**
 * Bringing an image to a host that lacks it, for CloneVirtualMachines: the cloning service asks distribution
 * to DistributeImage the image to that host and waits for the operation, which ends when the host's agent
 * has verified the replica and its image.available has been applied. Then the clones are made.
 *
 * - The request_id is derived from the clone operation and the host, so a cloning replica that takes the
 *   operation over (or retries) joins the same DistributeImage operation instead of starting another.
 * - Clones of several operations that need the same image on the same host each get a DistributeImage
 *   operation; the agent's FetchImage is idempotent, so the image travels once.
 * - A host that failed (its entry in the response's failures) fails its clones with that status.
 * - The wait ends even if the DistributeImage operation never does (a distribution replica that lost the
 *   operation, a bug): the host's entry in the operation's metadata is held to a progress deadline of
 *   cloning's own (common/platform/progress-deadline.ts; COWHERD_IMAGE_WAIT_* variables, by default longer than
 *   distribution's, so that distribution's more precise verdict normally comes first). Only real progress
 *   moves it: bytes received grow or the replica's state advances. While distribution does not answer
 *   (UNAVAILABLE, DEADLINE_EXCEEDED: a replica restarting) the wait goes on, without extending the deadline.
 *   Every call has a deadline: DistributeImage 30 s, each WaitOperation its slice plus 30 s.
 */
import { createHash } from 'node:crypto';
import { status as GrpcStatus, type ChannelCredentials, type ServiceError } from '@grpc/grpc-js';
import { call, createClient } from '../common/platform/client.js';
import { CowherdError, errorFromStatus, relayServiceError } from '../common/platform/errors.js';
import { unpack } from '../common/domain/operations.js';
import { typeUrlOf } from '../common/platform/type-urls.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import {
  DistributeImageMetadata,
  DistributeImageResponse,
  DistributionServiceClient,
  type HostTransfer,
} from '../gen/cowherd/distribution/v1/distribution_service.js';
import { ImageReplica_State } from '../gen/cowherd/inventory/v1/resources.js';
import { OperationsClient, type Operation } from '../gen/google/longrunning/operations.js';
import {
  DEFAULT_PROGRESS_DEADLINES,
  ProgressDeadlines,
  type ProgressDeadlineOptions,
  type StepStage,
  type StepVerdict,
} from '../common/platform/progress-deadline.js';
import type { ImageDelivery } from './image-delivery-port.js';

/**
 * Cloning's own deadline for an image: 15 minutes without progress (distribution's is 10), VERIFYING 3
 * minutes plus 16 MiB/s.
 */
export const DEFAULT_IMAGE_WAIT_DEADLINES: ProgressDeadlineOptions = { ...DEFAULT_PROGRESS_DEADLINES, stallMs: 15 * 60_000, verifyFloorMs: 180_000 };

/** Codes that mean "distribution did not answer this time", not an answer. */
const NO_ANSWER: ReadonlySet<number> = new Set([GrpcStatus.UNAVAILABLE, GrpcStatus.DEADLINE_EXCEEDED]);

function stageOf(state: ImageReplica_State): StepStage {
  if (state === ImageReplica_State.STATE_VERIFYING) return 'verifying';
  if (state === ImageReplica_State.STATE_TRANSFERRING) return 'transferring';
  return 'pending';
}

/** PROGRESS_DEADLINE_EXCEEDED for clones whose image did not arrive in time. */
function imageDeadlineError(image: string, host: string, operation: string, transfer: HostTransfer | undefined, verdict: StepVerdict): CowherdError {
  const seconds = Math.round(verdict.budgetMs / 1000);
  const state = transfer ? (ImageReplica_State[transfer.state]?.replace('STATE_', '') ?? 'PENDING') : 'PENDING';
  const bytes = transfer?.progress?.bytesDone ?? '0';
  return new CowherdError(
    GrpcStatus.DEADLINE_EXCEEDED,
    `${image} did not arrive on ${host}: ${operation} made no progress there for ${seconds} s (${state}, ${bytes} bytes)`,
    {
      reason: ErrorReason.ERROR_REASON_PROGRESS_DEADLINE_EXCEEDED,
      metadata: { host, image, state, bytes_done: bytes, deadline_seconds: String(seconds), operation },
    },
  );
}

/** A UUID-shaped request_id that is the same for the same clone operation and host. */
export function deliveryRequestId(operation: string, host: string): string {
  const hex = createHash('sha256').update(`${operation}\n${host}`).digest('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-5${hex.slice(13, 16)}-${((parseInt(hex.slice(16, 18), 16) & 0x3f) | 0x80).toString(16)}${hex.slice(18, 20)}-${hex.slice(20, 32)}`;
}

/** Options of {@link distributionImageDelivery}. */
export interface ImageDeliveryOptions {
  /** How long one WaitOperation waits before the progress is read again. Default 5 s. */
  readonly waitSliceSeconds?: number;
  /** The image wait's progress deadline. Default {@link DEFAULT_IMAGE_WAIT_DEADLINES}. */
  readonly deadlines?: ProgressDeadlineOptions;
  /** Test seam: the deadlines' clock. Default Date.now. */
  readonly now?: () => number;
}

/** ImageDelivery through the distribution service, with `close` for shutdown. */
export function distributionImageDelivery(
  address: string,
  credentials: ChannelCredentials,
  options: ImageDeliveryOptions = {},
): ImageDelivery & { close(): void } {
  const distribution = createClient(DistributionServiceClient, address, credentials, { defaultDeadlineMs: 30_000 });
  const slice = options.waitSliceSeconds ?? 5;
  const operations = createClient(OperationsClient, address, credentials, { defaultDeadlineMs: slice * 1000 + 30_000 });
  const now = options.now ?? Date.now;
  return {
    bringImageToHost: async ({ image, host, operation, onProgress, reportEverySeconds }, signal) => {
      const deadlines = new ProgressDeadlines(options.deadlines ?? DEFAULT_IMAGE_WAIT_DEADLINES, now);
      let current: Operation;
      try {
        current = await call<Operation>((cb) => distribution.distributeImage({ image, hosts: [host], requestId: deliveryRequestId(operation, host) }, cb));
        while (!current.done) {
          if (signal.aborted) throw signal.reason;
          const metadata =
            current.metadata?.typeUrl === typeUrlOf(DistributeImageMetadata) ? DistributeImageMetadata.decode(current.metadata.value) : undefined;
          const transfer = metadata?.transfers.find((entry) => entry.host === host);
          const verdict =
            transfer && transfer.state !== ImageReplica_State.STATE_AVAILABLE && transfer.state !== ImageReplica_State.STATE_FAILED
              ? deadlines.observe(host, {
                  stage: stageOf(transfer.state),
                  bytesDone: Number(transfer.progress?.bytesDone ?? 0),
                  bytesTotal: Number(metadata?.bytesTotal ?? 0),
                })
              : deadlines.silent(host);
          onProgress?.({ operation: current.name, transfer, deadline: new Date(Date.now() + (verdict.deadline - now())) });
          if (verdict.expired) throw imageDeadlineError(image, host, current.name, transfer, verdict);
          const name = current.name;
          const seconds = Math.max(1, Math.min(slice, reportEverySeconds?.() ?? slice));
          try {
            current = await call<Operation>((cb) => operations.waitOperation({ name, timeout: { seconds: String(seconds), nanos: 0 } }, cb));
          } catch (error) {
            if (!NO_ANSWER.has((error as Partial<ServiceError>).code ?? -1)) throw error;
            // Distribution is restarting or overloaded: no news, so the deadline stays; ask again shortly.
            await new Promise((resolve) => setTimeout(resolve, Math.min(slice * 1000, 1_000)));
          }
        }
      } catch (error) {
        if (signal.aborted) throw signal.reason;
        if (error instanceof CowherdError) throw error;
        throw relayServiceError(error, 'distribution');
      }
      if (current.result?.$case === 'error') throw errorFromStatus(current.result.value, `distributing ${image} to ${host} failed: `);
      if (current.result?.$case !== 'response')
        throw new CowherdError(GrpcStatus.INTERNAL, `${current.name} ended without a result`, { reason: ErrorReason.ERROR_REASON_INTERNAL });
      const response = unpack(DistributeImageResponse, current.result.value);
      const failed = response.failures.find((entry) => entry.host === host);
      if (failed?.status) throw errorFromStatus(failed.status, `${image} could not be brought to ${host}: `);
      if (!response.replicas.some((replica) => replica.host === host)) {
        throw CowherdError.failedPrecondition(
          `${host} has no AVAILABLE replica of ${image} after ${current.name}`,
          ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST,
          { host, image },
        );
      }
    },
    close: () => {
      distribution.close();
      operations.close();
    },
  };
}
