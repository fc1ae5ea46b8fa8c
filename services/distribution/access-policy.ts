/** Who may call each DistributionService RPC. Deny by default: every RPC is listed. */
import type { DistributionServiceService } from '../gen/cowherd/distribution/v1/distribution_service.js';
import type { AccessPolicy } from '../common/rpc.js';

export const DISTRIBUTION_POLICY: AccessPolicy<typeof DistributionServiceService> = {
  publishImage: { allow: ['admin'] },
  distributeImage: { allow: ['admin', 'service'] },
  deleteImage: { allow: ['admin'] },
  deleteImageReplica: { allow: ['admin'] },
  collectImageReplicas: { allow: ['admin'] },
};
