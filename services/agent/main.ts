/** The host agent process: wiring only. */
import { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { AGENT_POLICY } from './access-policy.js';

await runServiceMain({
  name: 'agent',
  variables: {},
  env: process.env,
  build: async ({ boundary }) => ({
    services: [adaptService(AgentServiceService, {}, AGENT_POLICY, boundary)],
  }),
});
