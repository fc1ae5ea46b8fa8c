/** AgentService handlers: thin wrappers over the agent's modules. RPCs not built yet answer UNIMPLEMENTED. */
import type { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import type { Handlers } from '../common/rpc.js';
import type { CloneEngine } from './clone-engine.js';

/** The handlers this agent serves. */
export function agentHandlers(clones: CloneEngine): Partial<Handlers<typeof AgentServiceService>> {
  return {
    createClones: async (request) => ({ results: await clones.createClones(request) }),
  };
}
