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
 */
import { createHash } from 'node:crypto';
import { status as GrpcStatus, type ChannelCredentials } from '@grpc/grpc-js';
import { call, createClient } from '../common/client.js';
import { CowherdError, errorFromStatus, relayServiceError } from '../common/errors.js';
import { unpack } from '../common/operations.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { DistributeImageResponse, DistributionServiceClient } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { OperationsClient, type Operation } from '../gen/google/longrunning/operations.js';
import type { ImageDelivery } from './clone-operation.js';

const responseType = { typeName: 'cowherd.distribution.v1.DistributeImageResponse', encode: DistributeImageResponse.encode, decode: DistributeImageResponse.decode };

/** A UUID-shaped request_id that is the same for the same clone operation and host. */
export function deliveryRequestId(operation: string, host: string): string {
  const hex = createHash('sha256').update(`${operation}\n${host}`).digest('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-5${hex.slice(13, 16)}-${((parseInt(hex.slice(16, 18), 16) & 0x3f) | 0x80).toString(16)}${hex.slice(18, 20)}-${hex.slice(20, 32)}`;
}

/** ImageDelivery through the distribution service, with `close` for shutdown. */
export function distributionImageDelivery(address: string, credentials: ChannelCredentials, options: { waitSliceSeconds?: number } = {}): ImageDelivery & { close(): void } {
  const distribution = createClient(DistributionServiceClient, address, credentials, { defaultDeadlineMs: 30_000 });
  const operations = createClient(OperationsClient, address, credentials, { defaultDeadlineMs: 60_000 });
  const slice = options.waitSliceSeconds ?? 20;
  return {
    bringImageToHost: async ({ image, host, operation }, signal) => {
      let current: Operation;
      try {
        current = await call<Operation>((cb) => distribution.distributeImage({ image, hosts: [host], requestId: deliveryRequestId(operation, host) }, cb));
        while (!current.done) {
          if (signal.aborted) throw signal.reason;
          current = await call<Operation>((cb) => operations.waitOperation({ name: current.name, timeout: { seconds: String(slice), nanos: 0 } }, cb));
        }
      } catch (error) {
        if (signal.aborted) throw signal.reason;
        throw relayServiceError(error, 'distribution');
      }
      if (current.result?.$case === 'error') throw errorFromStatus(current.result.value, `distributing ${image} to ${host} failed: `);
      if (current.result?.$case !== 'response') throw new CowherdError(GrpcStatus.INTERNAL, `${current.name} ended without a result`, { reason: ErrorReason.ERROR_REASON_INTERNAL });
      const response = unpack(responseType, current.result.value);
      const failed = response.failures.find((entry) => entry.host === host);
      if (failed?.status) throw errorFromStatus(failed.status, `${image} could not be brought to ${host}: `);
      if (!response.replicas.some((replica) => replica.host === host)) {
        throw CowherdError.failedPrecondition(`${host} has no AVAILABLE replica of ${image} after ${current.name}`, ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST, { host, image });
      }
    },
    close: () => {
      distribution.close();
      operations.close();
    },
  };
}
