/**
 * The image-delivery port of the cloning service: how an operation brings an image to a host that lacks an
 * AVAILABLE replica. Its own module so that the clone and rebase operations (clone-operation.ts,
 * rebase-operation.ts), the streaming clones (streaming-clones.ts) and the implementation (image-delivery.ts)
 * share one definition without importing each other.
 */
import type { HostTransfer } from '../gen/cowherd/distribution/v1/distribution_service.js';

/** What a delivery reports while it waits: the DistributeImage operation and the host's entry in its metadata. */
export interface ImageDeliveryProgress {
  /** The DistributeImage operation, `operations/{operation}` on the distribution service. */
  readonly operation: string;
  /** The host's transfer as the operation reports it; undefined before the first report. */
  readonly transfer: HostTransfer | undefined;
  /** When the clones fail unless the transfer makes progress. */
  readonly deadline: Date;
}

/**
 * Brings an image to a host that lacks an AVAILABLE replica, resolving once the replica is AVAILABLE;
 * rejects with the error the host's clones fail with. It must end: a transfer that stops making progress
 * rejects (PROGRESS_DEADLINE_EXCEEDED) instead of waiting for ever.
 */
export interface ImageDelivery {
  bringImageToHost(
    request: {
      readonly image: string;
      readonly host: string;
      readonly operation: string;
      readonly onProgress?: (progress: ImageDeliveryProgress) => void;
      /**
       * How often, in seconds, the caller wants the next report while nothing ends (asked before each wait);
       * undefined: the delivery's own cadence. Streaming clones ask for 1 s until the transfer starts.
       */
      readonly reportEverySeconds?: () => number | undefined;
    },
    signal: AbortSignal,
  ): Promise<void>;
}
