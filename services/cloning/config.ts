/** The cloning service's own variables (besides the common server ones). */
import { addressVariable, integerVariable, type ConfigOf } from '../common/platform/config.js';
import type { ProgressDeadlineOptions } from '../common/platform/progress-deadline.js';
import { DEFAULT_PORTS } from '../common/platform/service-process.js';
import { DEFAULT_IMAGE_WAIT_DEADLINES } from './image-delivery.js';

const MiB = 1024 * 1024;

export const CLONING_VARIABLES = {
  inventoryAddress: addressVariable('COWHERD_INVENTORY_ADDRESS', 'host:port of the inventory mTLS port', `localhost:${DEFAULT_PORTS.inventory.grpc}`),
  distributionAddress: addressVariable(
    'COWHERD_DISTRIBUTION_ADDRESS',
    'host:port of the distribution mTLS port (images a chosen host lacks are distributed to it first)',
    `localhost:${DEFAULT_PORTS.distribution.grpc}`,
  ),
  imageWaitStallSeconds: integerVariable(
    'COWHERD_IMAGE_WAIT_STALL_SECONDS',
    "clones waiting for an image fail when its transfer to their host makes no progress (bytes, state) for this long; keep it above distribution's COWHERD_DISTRIBUTE_STALL_SECONDS",
    DEFAULT_IMAGE_WAIT_DEADLINES.stallMs / 1000,
    1,
    86_400,
  ),
  imageWaitVerifyFloorSeconds: integerVariable(
    'COWHERD_IMAGE_WAIT_VERIFY_FLOOR_SECONDS',
    'the fixed part of the budget of a transfer that is VERIFYING (floor + image bytes / verify rate)',
    DEFAULT_IMAGE_WAIT_DEADLINES.verifyFloorMs / 1000,
    0,
    86_400,
  ),
  imageWaitVerifyMibPerSecond: integerVariable(
    'COWHERD_IMAGE_WAIT_VERIFY_MIB_PER_SECOND',
    "the hashing rate a VERIFYING transfer's budget assumes, MiB/s",
    DEFAULT_IMAGE_WAIT_DEADLINES.verifyBytesPerSecond / MiB,
    1,
    100_000,
  ),
};

/** The image wait's progress deadlines from the configuration. */
export function imageWaitDeadlines(
  config: Pick<ConfigOf<typeof CLONING_VARIABLES>, 'imageWaitStallSeconds' | 'imageWaitVerifyFloorSeconds' | 'imageWaitVerifyMibPerSecond'>,
): ProgressDeadlineOptions {
  return {
    stallMs: config.imageWaitStallSeconds * 1000,
    verifyFloorMs: config.imageWaitVerifyFloorSeconds * 1000,
    verifyBytesPerSecond: config.imageWaitVerifyMibPerSecond * MiB,
  };
}
