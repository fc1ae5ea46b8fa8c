/** Who may call each AgentService RPC: only cowherd's services. Deny by default: every RPC is listed. */
import type { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import type { AccessPolicy } from '../common/rpc.js';

const SERVICES = { allow: ['service'] } as const;

export const AGENT_POLICY: AccessPolicy<typeof AgentServiceService> = {
  getHostInfo: SERVICES,
  exportImage: SERVICES,
  fetchImage: SERVICES,
  getImageReplica: SERVICES,
  listImageReplicas: SERVICES,
  deleteImageReplica: SERVICES,
  setTransferLimits: SERVICES,
  createClones: SERVICES,
  startVirtualMachine: SERVICES,
  stopVirtualMachine: SERVICES,
  deleteVirtualMachine: SERVICES,
};
