/**
 * Who may call each AgentService RPC: only cowherd's services, each only for its own job (least privilege
 * between services: a compromised cloning service cannot make an agent fetch or delete images, nor can
 * distribution define domains). Deny by default: every RPC is listed.
 */
import type { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import type { AccessPolicy } from '../common/platform/rpc.js';

const DISTRIBUTION = { allow: ['service'], services: ['distribution'] } as const;
const CLONING = { allow: ['service'], services: ['cloning'] } as const;

export const AGENT_POLICY: AccessPolicy<typeof AgentServiceService> = {
  getHostInfo: { allow: ['service'], services: ['inventory', 'distribution', 'cloning'] },
  exportImage: DISTRIBUTION,
  importImage: DISTRIBUTION,
  fetchImage: DISTRIBUTION,
  getImageReplica: DISTRIBUTION,
  listImageReplicas: DISTRIBUTION,
  deleteImageReplica: DISTRIBUTION,
  setTransferLimits: DISTRIBUTION,
  createClones: CLONING,
  startVirtualMachine: CLONING,
  stopVirtualMachine: CLONING,
  deleteVirtualMachine: CLONING,
  rebaseClones: CLONING,
};
