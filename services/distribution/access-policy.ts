/** Who may call each DistributionService RPC. Deny by default: every RPC is listed. */
import type { DistributionServiceService } from '../gen/cowherd/distribution/v1/distribution_service.js';
import type { AccessPolicy } from '../common/platform/rpc.js';

export const DISTRIBUTION_POLICY: AccessPolicy<typeof DistributionServiceService> = {
  publishImage: { allow: ['admin'] },
  importImage: { allow: ['admin'] },
  // Of the services, only cloning (it distributes images that a chosen host lacks).
  distributeImage: { allow: ['admin', 'service'], services: ['cloning'] },
  deleteImage: { allow: ['admin'] },
  deleteImageReplica: { allow: ['admin'] },
  collectImageReplicas: { allow: ['admin'] },
  updateImage: { allow: ['admin'] },
  collectImageGarbage: { allow: ['admin'] },
};
