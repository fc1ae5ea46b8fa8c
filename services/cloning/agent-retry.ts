/**
 * Calling an agent again while it does not answer. CreateClones (same request_id) and RebaseClones are
 * idempotent on the agent: a retry finds the clones the first attempt made or moved and reports them. So an
 * agent that died in the middle of a call (a restart, a short network cut) finishes the work on the retry and
 * every clone is reported as it stands, instead of the operation calling clones failed that exist. Deleting a
 * streaming clone whose image stream failed is retried the same way (a delete that finds nothing has done its job).
 */
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { ErrorReason, errorReasonFromJSON } from '../gen/cowherd/common/v1/error_reason.js';
import type { Status } from '../gen/google/rpc/status.js';
import { CowherdError, readServiceError, toStatus } from '../common/platform/errors.js';

/** How long a host's call is tried again while its agent does not answer. */
export const AGENT_RETRY_MS = 90_000;

/** Options of {@link callAgentWithRetries}. */
export interface AgentRetryOptions {
  readonly signal: AbortSignal;
  /** Default {@link AGENT_RETRY_MS}; 0 tries once. */
  readonly retryMs?: number;
  /**
   * Asked before every retry: an error when the host can no longer take the call (the inventory calls it
   * UNREACHABLE, it left, it drains), which is then thrown instead of trying again.
   */
  readonly stillUsable?: () => Promise<CowherdError | undefined>;
  /** Which errors mean "no answer this time" and are tried again; default {@link agentDidNotAnswer}. */
  readonly retryWhen?: (error: unknown) => boolean;
}

/** True for the codes that mean "the agent did not answer this time", not an answer. */
export function agentDidNotAnswer(error: unknown): boolean {
  if (error instanceof CowherdError) return false;
  const code = (error as Partial<ServiceError>).code;
  return code === GrpcStatus.UNAVAILABLE || code === GrpcStatus.DEADLINE_EXCEEDED;
}

/**
 * True for an agent call that AgentPort already relayed (relayServiceError) and that did not get an answer:
 * UNAVAILABLE with HOST_UNREACHABLE. Start, Stop and Delete reach callers in that form.
 */
export function relayedNoAnswer(error: unknown): boolean {
  return error instanceof CowherdError && error.code === GrpcStatus.UNAVAILABLE && error.reason === ErrorReason.ERROR_REASON_HOST_UNREACHABLE;
}

/** Calls `call`, again with growing pauses (1 s doubling to 10 s) while the agent does not answer, up to `retryMs`. */
export async function callAgentWithRetries<T>(call: () => Promise<T>, options: AgentRetryOptions): Promise<T> {
  const { signal, retryMs = AGENT_RETRY_MS, retryWhen = agentDidNotAnswer } = options;
  const started = Date.now();
  for (let pause = 1_000; ; pause = Math.min(pause * 2, 10_000)) {
    try {
      return await call();
    } catch (error) {
      if (!retryWhen(error) || signal.aborted || Date.now() - started + pause > retryMs) throw error;
      await abortableSleep(pause, signal);
      if (signal.aborted) throw error;
      const problem = await options.stillUsable?.();
      if (problem) throw problem;
    }
  }
}

function abortableSleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
  });
}

/**
 * The status every clone of a host gets when the whole agent call failed: the agent's own error relayed, or
 * UNAVAILABLE (HOST_UNREACHABLE) naming the host when it did not answer; `afterwards` tells what a retry finds.
 */
export function agentCallStatus(host: string, error: unknown, afterwards: string): Status {
  const code = (error as Partial<ServiceError>).code;
  if (error instanceof CowherdError || typeof code !== 'number') return toStatus(error);
  const received = readServiceError(error as Partial<ServiceError>);
  if (code === GrpcStatus.UNAVAILABLE || code === GrpcStatus.DEADLINE_EXCEEDED || code === GrpcStatus.CANCELLED) {
    return toStatus(
      new CowherdError(GrpcStatus.UNAVAILABLE, `the agent of ${host} did not answer (${GrpcStatus[code]}: ${received.message}); ${afterwards}`, {
        reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
        metadata: { host },
      }),
    );
  }
  const reason = received.reason === '' ? ErrorReason.ERROR_REASON_INTERNAL : errorReasonFromJSON(received.reason);
  return toStatus(new CowherdError(code, received.message, { reason, metadata: { ...received.metadata, host } }));
}
