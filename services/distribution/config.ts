/** The distribution service's own variables (besides the common server ones). */
import { addressVariable, integerVariable, optionalStringVariable, type ConfigOf } from '../common/platform/config.js';
import { DEFAULT_PROGRESS_DEADLINES, type ProgressDeadlineOptions } from '../common/platform/progress-deadline.js';

const MiB = 1024 * 1024;

export const DISTRIBUTION_VARIABLES = {
  inventoryAddress: addressVariable('COWHERD_INVENTORY_ADDRESS', 'host:port of the inventory mTLS port', 'localhost:7442'),
  trackerAddress: addressVariable('COWHERD_TRACKER_ADDRESS', 'host:port of the BitTorrent tracker (HTTP announce; only published info-hashes)', '0.0.0.0:7463'),
  trackerAnnounceUrl: optionalStringVariable(
    'COWHERD_TRACKER_ANNOUNCE_URL',
    'the announce URL agents use to reach the tracker (behind a Service or load balancer, its address); default http://<this host name>:<tracker port>/announce',
  ),
  stallSeconds: integerVariable(
    'COWHERD_DISTRIBUTE_STALL_SECONDS',
    'a host of a DistributeImage fails when its bytes stop growing and its replica state stops advancing for this long',
    DEFAULT_PROGRESS_DEADLINES.stallMs / 1000,
    1,
    86_400,
  ),
  verifyFloorSeconds: integerVariable(
    'COWHERD_DISTRIBUTE_VERIFY_FLOOR_SECONDS',
    "the fixed part of a VERIFYING replica's budget (floor + image bytes / verify rate)",
    DEFAULT_PROGRESS_DEADLINES.verifyFloorMs / 1000,
    0,
    86_400,
  ),
  verifyMibPerSecond: integerVariable(
    'COWHERD_DISTRIBUTE_VERIFY_MIB_PER_SECOND',
    "the hashing rate a VERIFYING replica's budget assumes, MiB/s",
    DEFAULT_PROGRESS_DEADLINES.verifyBytesPerSecond / MiB,
    1,
    100_000,
  ),
  garbageIntervalSeconds: integerVariable(
    'COWHERD_GARBAGE_INTERVAL',
    'seconds between garbage collection runs (versions beyond keep_versions, replicas above a host high watermark); 0 turns the periodic run off',
    600,
    0,
    604_800,
  ),
  keepImageVersions: integerVariable(
    'COWHERD_KEEP_IMAGE_VERSIONS',
    'how many of the newest versions garbage collection keeps of an image whose keep_versions is 0',
    3,
    1,
    1000,
  ),
  hostCheckSeconds: integerVariable(
    'COWHERD_DISTRIBUTE_HOST_CHECK_SECONDS',
    "how often a DistributeImage reads its hosts' states from inventory (an UNREACHABLE host shows in the metadata within this)",
    2,
    1,
    3600,
  ),
};

/** The progress deadlines of DistributeImage from the configuration. */
export function distributeDeadlines(
  config: Pick<ConfigOf<typeof DISTRIBUTION_VARIABLES>, 'stallSeconds' | 'verifyFloorSeconds' | 'verifyMibPerSecond'>,
): ProgressDeadlineOptions {
  return { stallMs: config.stallSeconds * 1000, verifyFloorMs: config.verifyFloorSeconds * 1000, verifyBytesPerSecond: config.verifyMibPerSecond * MiB };
}
