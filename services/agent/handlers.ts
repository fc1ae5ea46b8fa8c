/** AgentService handlers: thin wrappers over the agent's modules. RPCs not built yet answer UNIMPLEMENTED. */
import type { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import type { Handlers } from '../common/rpc.js';
import type { CloneEngine } from './clone-engine.js';
import type { VmLifecycle } from './vm-lifecycle.js';

/** How long a graceful stop waits when the caller names no timeout. */
const DEFAULT_STOP_TIMEOUT_MS = 120_000;

/** The handlers this agent serves. */
export function agentHandlers(clones: CloneEngine, vms: VmLifecycle, replicas: { delete(name: string): Promise<void> }): Partial<Handlers<typeof AgentServiceService>> {
  return {
    deleteImageReplica: async (request) => {
      await replicas.delete(request.name);
      return {};
    },
    createClones: async (request) => ({ results: await clones.createClones(request) }),
    startVirtualMachine: (request) => vms.start(request.name),
    stopVirtualMachine: (request) => vms.stop(request.name, request.force, request.timeout ? (Number(request.timeout.seconds) + request.timeout.nanos / 1e9) * 1000 : DEFAULT_STOP_TIMEOUT_MS),
    deleteVirtualMachine: async (request) => {
      await vms.delete(request.name, request.force);
      return {};
    },
  };
}
