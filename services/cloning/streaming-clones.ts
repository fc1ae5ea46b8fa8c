/**
 * Streaming clones (CloneVirtualMachinesRequest.delivery = DELIVERY_STREAM): the parts clone-operation.ts uses
 * to make a host's clones while its replica still arrives instead of after it is AVAILABLE.
 *
 * - The image is brought to the host exactly as for DELIVERY_DISTRIBUTE (ImageDelivery: DistributeImage with
 *   the same request_id, followed under the same progress deadline); {@link followImageArrival} only adds a
 *   second, earlier signal: the moment the host's transfer is TRANSFERRING or VERIFYING (or AVAILABLE), read
 *   from the same DistributeImage metadata the wait already reads, so no new source of truth is introduced.
 * - A host's replica that fails for good after its clones were made (the delivery rejects, as it does for
 *   DELIVERY_DISTRIBUTE) leaves nothing half-made: every streaming clone is deleted on the agent (forced,
 *   retried while the agent does not answer) and fails with a status saying the image stream failed.
 */
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import type { AgentPort } from './agents.js';
import type { ImageDelivery, ImageDeliveryProgress } from './image-delivery-port.js';
import { agentDidNotAnswer, callAgentWithRetries, relayedNoAnswer } from './agent-retry.js';
import { CloneVirtualMachinesRequest_Delivery, type CloneVirtualMachinesRequest } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { ErrorReason, errorReasonToJSON } from '../gen/cowherd/common/v1/error_reason.js';
import { TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { ImageReplica_State, type Host } from '../gen/cowherd/inventory/v1/resources.js';
import type { Status } from '../gen/google/rpc/status.js';
import { CowherdError, errorFromStatus, readServiceError, relayServiceError, toStatus } from '../common/platform/errors.js';

/** True when the request asks for streaming clones. */
export function streamRequested(request: Pick<CloneVirtualMachinesRequest, 'delivery'>): boolean {
  return request.delivery === CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM;
}

/** Replica states in which the agent can make streaming clones: the replica exists and its bytes arrive (or are all in). */
export function isStreamable(state: ImageReplica_State): boolean {
  return state === ImageReplica_State.STATE_TRANSFERRING || state === ImageReplica_State.STATE_VERIFYING || state === ImageReplica_State.STATE_AVAILABLE;
}

/**
 * How often the delivery's progress is read while a streaming host's transfer has not started: the clones are made
 * the moment it does (the delivery's usual 5 s cadence put up to 5 s before every streamed boot in bench:boot).
 */
export const STREAMABLE_POLL_SECONDS = 1;

/** How a delivery ended. */
export type ArrivalOutcome = { readonly arrived: true } | { readonly arrived: false; readonly error: unknown };

/** A delivery being followed, with the moment its replica became streamable. */
export interface ImageArrival {
  /** Resolves once the host's transfer is TRANSFERRING, VERIFYING or AVAILABLE; stays pending if the delivery ends first. */
  readonly streamable: Promise<void>;
  /** How the delivery ended; never rejects (a stop or an abort is a failure with the abort's reason). */
  readonly outcome: Promise<ArrivalOutcome>;
  /** Stops following (the DistributeImage operation itself goes on); no progress is reported after it. */
  stop(): void;
}

/**
 * Starts `delivery.bringImageToHost` and follows it: `onProgress` gets every report until {@link ImageArrival.stop}
 * or the end, `streamable` resolves at the first streamable state. `signal` (the operation's) stops it too.
 */
export function followImageArrival(
  delivery: ImageDelivery,
  request: { readonly image: string; readonly host: string; readonly operation: string; readonly onProgress: (progress: ImageDeliveryProgress) => void },
  signal: AbortSignal,
): ImageArrival {
  const stopper = new AbortController();
  const linked = AbortSignal.any([signal, stopper.signal]);
  let isStreamableNow = false;
  let markStreamable: () => void = () => undefined;
  const streamable = new Promise<void>((resolve) => {
    markStreamable = () => {
      isStreamableNow = true;
      resolve();
    };
  });
  const onProgress = (progress: ImageDeliveryProgress): void => {
    if (linked.aborted) return;
    request.onProgress(progress);
    if (progress.transfer && isStreamable(progress.transfer.state)) markStreamable();
  };
  // Every second until the transfer starts (the clones are made at that moment: each second of polling is a
  // second later boot), the delivery's own cadence after it.
  const reportEverySeconds = (): number | undefined => (isStreamableNow ? undefined : STREAMABLE_POLL_SECONDS);
  const outcome = delivery
    .bringImageToHost({ image: request.image, host: request.host, operation: request.operation, onProgress, reportEverySeconds }, linked)
    .then(
      (): ArrivalOutcome => ({ arrived: true }),
      (error: unknown): ArrivalOutcome => ({ arrived: false, error }),
    );
  return { streamable, outcome, stop: () => stopper.abort(new Error('stopped following the image delivery')) };
}

/** Waits for whichever comes first: the replica turning streamable (undefined) or the delivery's end. */
export function firstOf(arrival: ImageArrival): Promise<ArrivalOutcome | undefined> {
  return Promise.race([arrival.streamable.then(() => undefined), arrival.outcome]);
}

/**
 * True for the agent's FAILED_PRECONDITION (IMAGE_NOT_ON_HOST): its replica is not streamable yet (distribution
 * reported the transfer before the agent's own record showed it) or the agent does not stream. The clones are
 * then made the DELIVERY_DISTRIBUTE way, once the replica is AVAILABLE.
 */
export function isImageNotOnHost(error: unknown): boolean {
  if (error instanceof CowherdError) return error.reason === ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST;
  const code = (error as Partial<ServiceError>).code;
  if (code !== GrpcStatus.FAILED_PRECONDITION) return false;
  return readServiceError(error as Partial<ServiceError>).reason === errorReasonToJSON(ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST);
}

/** A copy of the host's transfer progress for a streaming clone's `base_progress`; undefined before the first report. */
export function baseProgressOf(progress: TransferProgress | undefined): TransferProgress | undefined {
  return progress ? TransferProgress.fromPartial(progress) : undefined;
}

/** A streamed clone's `base_progress` once its replica is AVAILABLE: every byte in, no rate or ETA left to show. */
export function completedBaseProgress(progress: TransferProgress | undefined): TransferProgress | undefined {
  const total = progress?.bytesTotal ?? '0';
  if (Number(total) <= 0) return progress;
  return TransferProgress.fromPartial({ bytesDone: total, bytesTotal: total });
}

/** What {@link deleteStreamingClone} needs. */
export interface StreamingCloneRemoval {
  readonly agents: Partial<Pick<AgentPort, 'deleteVirtualMachine'>>;
  readonly signal: AbortSignal;
  /** How long the delete is tried again while the agent does not answer (agent-retry.ts). */
  readonly retryMs?: number;
  /** Why the host can no longer take the call (UNREACHABLE, left); asked before each retry. */
  readonly stillUsable: () => Promise<CowherdError | undefined>;
}

/**
 * Deletes a streaming clone on its agent (forced: it may be running), retried while the agent does not answer.
 * Resolves with undefined once it is gone (NOT_FOUND counts: a retry or a resumed operation deleted it before),
 * or with why it could not be deleted. Rejects only when the operation's signal aborts.
 */
export async function deleteStreamingClone(host: Host | undefined, virtualMachine: string, removal: StreamingCloneRemoval): Promise<string | undefined> {
  const { agents } = removal;
  // Nothing was defined for it (the agent answered without a virtual machine).
  if (virtualMachine === '') return undefined;
  if (!host) return 'its host is no longer in the inventory';
  if (!agents.deleteVirtualMachine) return 'this cloning service was built without agent deletes';
  try {
    await callAgentWithRetries(() => agents.deleteVirtualMachine!(host, virtualMachine, true), {
      signal: removal.signal,
      retryMs: removal.retryMs,
      stillUsable: removal.stillUsable,
      // The AgentPort relays an agent that did not answer as UNAVAILABLE (HOST_UNREACHABLE): that is no answer too.
      retryWhen: (error) => agentDidNotAnswer(error) || relayedNoAnswer(error),
    });
    return undefined;
  } catch (error) {
    if (removal.signal.aborted) throw removal.signal.reason;
    const relayed = relayServiceError(error, host.name);
    // Gone already: a retry or a resumed operation deleted it before.
    if (relayed.code === GrpcStatus.NOT_FOUND) return undefined;
    return relayed.message;
  }
}

/**
 * The status of a streaming clone whose image stream failed: the delivery's code and reason (so that
 * DEADLINE_EXCEEDED, HOST_UNREACHABLE or INSUFFICIENT_SPACE still read as what they are), a message that says
 * the stream failed and whether the clone was deleted, and metadata `delivery: STREAM`, `clone_deleted`.
 */
export function streamFailedStatus(
  clone: { readonly host: string; readonly domainName: string; readonly virtualMachine: string },
  image: string,
  cause: Status,
  notDeleted: string | undefined,
): Status {
  const original = errorFromStatus(cause, '');
  const what =
    notDeleted === undefined
      ? 'the streaming clone was deleted'
      : `the streaming clone could not be deleted (${notDeleted}): delete ${clone.virtualMachine} with force once its host answers`;
  return toStatus(
    new CowherdError(original.code, `image stream of ${image} to ${clone.host} failed: ${cause.message}; ${what}`, {
      reason: original.reason,
      metadata: { ...original.metadata, host: clone.host, image, delivery: 'STREAM', clone_deleted: notDeleted === undefined ? 'true' : 'false' },
    }),
  );
}
