/**
 * Which errors mean "the control-plane store is not there right now" (a NATS server or the cluster restarting,
 * a stream electing its leader) rather than a fault in the request or the code. Those are retried by the
 * operations that hit them and answered UNAVAILABLE at the RPC boundary; measured in the fault suite, a
 * three-node cluster answers "no responders" or times out for 5-40 s after a node or the cluster restarts.
 */
import { ClosedConnectionError, ConnectionError, DrainingConnectionError, NoRespondersError, RequestError, TimeoutError } from '@nats-io/transport-node';
import { JetStreamApiError } from '@nats-io/jetstream';

const TRANSIENT_MESSAGE =
  /no responders|timeout|connection (closed|draining)|disconnect|temporarily unavailable|cluster (not available|no leader)|no suitable peers|jetstream not enabled/i;

/** True when `error` (or a cause of it) says NATS did not answer, and a retry later may succeed. */
export function isStoreUnavailable(error: unknown): boolean {
  for (let current: unknown = error, depth = 0; current instanceof Error && depth < 5; current = current.cause, depth++) {
    // A typed domain error is never a store outage, whatever its message says.
    if (current.name === 'CowherdError' || current.name === 'KvConflictError') return false;
    if (
      current instanceof TimeoutError ||
      current instanceof NoRespondersError ||
      current instanceof ConnectionError ||
      current instanceof ClosedConnectionError ||
      current instanceof DrainingConnectionError ||
      current instanceof RequestError
    )
      return true;
    if (current instanceof JetStreamApiError && (current.code === 503 || current.status === 503)) return true;
    if (TRANSIENT_MESSAGE.test(current.message)) return true;
  }
  return false;
}
