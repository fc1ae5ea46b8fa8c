/** Small helpers for calling generated clients in tests. */
import type { ServiceError } from '@grpc/grpc-js';
import { readServiceError, type ReceivedError } from '../../services/common/errors.js';

/** Promise form of a callback-style unary call: `await call((cb) => client.getHost(request, cb))`. */
export function call<Res>(invoke: (callback: (error: ServiceError | null, response: Res) => void) => void): Promise<Res> {
  return new Promise((resolve, reject) => invoke((error, response) => (error ? reject(error) : resolve(response))));
}

/** The decoded error of a call that must fail; throws if it succeeds. */
export async function failure<Res>(invoke: (callback: (error: ServiceError | null, response: Res) => void) => void): Promise<ReceivedError> {
  try {
    await call(invoke);
  } catch (error) {
    return readServiceError(error as ServiceError);
  }
  throw new Error('the call succeeded but should have failed');
}
