/** Small helpers for calling generated clients in tests. */
import type { ServiceError } from '@grpc/grpc-js';
import { readServiceError, type ReceivedError } from '../../services/common/platform/errors.js';
import { call } from '../../services/common/platform/client.js';

export { call } from '../../services/common/platform/client.js';

/** The decoded error of a call that must fail; throws if it succeeds. */
export async function failure<Res>(invoke: (callback: (error: ServiceError | null, response: Res) => void) => void): Promise<ReceivedError> {
  try {
    await call(invoke);
  } catch (error) {
    return readServiceError(error as ServiceError);
  }
  throw new Error('the call succeeded but should have failed');
}

/** Polls `read` every 200 ms until it returns a value (errors count as not yet); throws after `timeoutMs`. */
export async function waitFor<T>(what: string, read: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await read().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}
