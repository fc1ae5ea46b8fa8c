/** Who may call each CloningService RPC. Deny by default: every RPC is listed. */
import type { CloningServiceService } from '../gen/cowherd/cloning/v1/cloning_service.js';
import type { AccessPolicy } from '../common/platform/rpc.js';

export const CLONING_POLICY: AccessPolicy<typeof CloningServiceService> = {
  cloneVirtualMachines: { allow: ['admin'] },
  startVirtualMachine: { allow: ['admin'] },
  stopVirtualMachine: { allow: ['admin'] },
  deleteVirtualMachine: { allow: ['admin'] },
  rebaseVirtualMachines: { allow: ['admin'] },
};
