/**
 * Whether a CloneVirtualMachines request_id already has an operation. A retry must get the first
 * operation back even when re-checking the request would now fail (its clones have taken their names),
 * so the handler asks this before planning and then lets OperationManager.start return the operation.
 *
 * It reads the OperationManager's request_id index directly and mirrors its key scheme
 * (`<kind>.<sha256(request_id)>` in `operations-request-ids`); replace it with an OperationManager method
 * once services/common has one.
 */
import { createHash } from 'node:crypto';
import type { JetStreamClient } from '@nats-io/jetstream';
import { OPERATIONS_BUCKET } from '../common/operations.js';
import { jsonCodec, KvStore } from '../common/kv.js';

/** Answers whether an operation of `kind` was created for a request_id. */
export type RequestIdLookup = (requestId: string) => Promise<boolean>;

/** Opens the lookup for one operation kind. */
export async function openRequestIdLookup(js: JetStreamClient, kind: string): Promise<RequestIdLookup> {
  const index = await KvStore.open(js, `${OPERATIONS_BUCKET}-request-ids`, jsonCodec<{ name: string }>());
  return async (requestId) => (await index.get(`${kind}.${createHash('sha256').update(requestId).digest('hex')}`)) !== undefined;
}
