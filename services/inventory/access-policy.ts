/** Who may call each InventoryService RPC. Deny by default: every RPC is listed. */
import type { InventoryServiceService } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { hostOf } from '../common/domain/resource-names.js';
import type { AccessPolicy } from '../common/platform/rpc.js';

const READERS = ['admin', 'service'] as const;

export const INVENTORY_POLICY: AccessPolicy<typeof InventoryServiceService> = {
  // Agents report for their own host only.
  registerHost: { allow: ['host'], actsForHost: (request) => hostOf(request.host?.name ?? '') },
  heartbeat: { allow: ['host'], actsForHost: (request) => hostOf(request.host) },
  reportVirtualMachines: { allow: ['host'], actsForHost: (request) => hostOf(request.parent) },
  getHost: { allow: ['admin', 'service', 'host'], actsForHost: (request) => hostOf(request.name) },
  listHosts: { allow: READERS },
  updateHost: { allow: ['admin'] },
  deleteHost: { allow: ['admin'] },
  getImage: { allow: READERS },
  listImages: { allow: READERS },
  listImageVersions: { allow: READERS },
  getImageReplica: { allow: READERS },
  listImageReplicas: { allow: READERS },
  getVirtualMachine: { allow: READERS },
  listVirtualMachines: { allow: READERS },
  watchVirtualMachines: { allow: READERS },
};
