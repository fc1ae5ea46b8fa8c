/** The host agent process: wiring only. Enrolls with a join token on the first start, then serves. */
import { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import { ConfigError } from '../common/config.js';
import { createLogger } from '../common/logger.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { AGENT_POLICY } from './access-policy.js';
import { loadAgentConfig, type AgentConfig } from './config.js';
import { ensureEnrolled } from './enrollment.js';

let agent: AgentConfig;
try {
  agent = loadAgentConfig(process.env);
} catch (error) {
  process.stderr.write(`cowherd agent: ${(error as Error).message}\n`);
  process.exit(error instanceof ConfigError ? 2 : 1);
}
const env: Record<string, string | undefined> = { ...process.env };
if (env['COWHERD_TLS_CERT'] === undefined) {
  try {
    const files = await ensureEnrolled({ ...agent, dnsNames: [agent.host, 'localhost'], log: createLogger({ service: 'agent', level: 'info' }) });
    Object.assign(env, { COWHERD_TLS_CERT: files.certificateFile, COWHERD_TLS_KEY: files.privateKeyFile, COWHERD_TLS_CA: files.caFile });
  } catch (error) {
    process.stderr.write(`cowherd agent: cannot join the fleet: ${(error as Error).message}\n`);
    process.exit(1);
  }
}
// The join token is single-use and spent: keep it out of everything that follows.
delete env['COWHERD_JOIN_TOKEN'];

await runServiceMain({
  name: 'agent',
  variables: {},
  env,
  build: async ({ boundary }) => ({
    services: [adaptService(AgentServiceService, {}, AGENT_POLICY, boundary)],
  }),
});
