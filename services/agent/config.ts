/** The agent's own variables (besides the common server ones, whose TLS files it fills in after enrolling). */
import { addressVariable, optionalStringVariable, pathVariable, readConfig, stringVariable, type ConfigOf } from '../common/config.js';
import { defaultHostId, HOST_ID } from '../common/resource-names.js';

export const AGENT_VARIABLES = {
  host: { ...stringVariable('COWHERD_HOST_ID', 'this host id (hosts/{host}); must match the join token', defaultHostId()), parse: (raw: string | undefined) => {
    const value = raw ?? defaultHostId();
    if (!HOST_ID.test(value)) throw new Error(`must be an RFC 1123 label, got ${JSON.stringify(value)}`);
    return value;
  } },
  credentialsDirectory: pathVariable('COWHERD_CREDENTIALS_DIR', 'where the host key (0600), certificate and CA certificate are kept', '/var/lib/cowherd/credentials'),
  joinToken: optionalStringVariable('COWHERD_JOIN_TOKEN', 'single-use join token from an admin; needed only for the first start'),
  enrollAddress: addressVariable('COWHERD_ENROLL_ADDRESS', 'host:port of the certificate authority enrollment port', 'localhost:7441'),
};

/** The agent's enrollment configuration. */
export type AgentConfig = ConfigOf<typeof AGENT_VARIABLES>;

/** Reads the agent's variables; throws ConfigError listing every bad one. */
export function loadAgentConfig(env: Readonly<Record<string, string | undefined>>): AgentConfig {
  return readConfig(AGENT_VARIABLES, env);
}
