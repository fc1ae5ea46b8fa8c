/**
 * Clients for the agents of the fleet, for the services that call them (cloning, distribution): one
 * AgentService client per agent endpoint, made on first use with the service's own mTLS credentials and
 * kept. An agent's certificate names its host id (and localhost), whatever address it is reached at, so
 * the TLS server name is the host id, and the connection is accepted only when the agent proves
 * `spiffe://cowherd/host/<host id>`: a service or another host answering at that endpoint is refused.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { AgentServiceClient } from '../../gen/cowherd/agent/v1/agent_service.js';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import type { Host } from '../../gen/cowherd/inventory/v1/resources.js';
import { createClient } from '../platform/client.js';
import { CowherdError } from '../platform/errors.js';
import { identityUri } from '../platform/identity.js';
import type { CredentialsFor } from '../platform/tls.js';
import { HOST_NAME } from './resource-names.js';

/** A cache of agent clients. */
export class AgentClients {
  private readonly clients = new Map<string, AgentServiceClient>();

  constructor(private readonly credentials: CredentialsFor) {}

  /** The client for a host's agent; UNAVAILABLE (HOST_UNREACHABLE) when inventory knows no endpoint. */
  clientFor(host: Pick<Host, 'name' | 'agentEndpoint'>): AgentServiceClient {
    if (host.agentEndpoint === '') {
      throw new CowherdError(GrpcStatus.UNAVAILABLE, `${host.name} has no agent endpoint in the inventory`, {
        reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
        metadata: { host: host.name },
      });
    }
    const serverName = HOST_NAME.parse(host.name)?.host;
    if (serverName === undefined) throw new CowherdError(GrpcStatus.INTERNAL, `${host.name} is no hosts/{host}`, { reason: ErrorReason.ERROR_REASON_INTERNAL });
    const key = `${host.agentEndpoint}|${serverName}`;
    let client = this.clients.get(key);
    if (!client) {
      client = createClient(AgentServiceClient, host.agentEndpoint, this.credentials(identityUri('host', serverName)), { serverName });
      this.clients.set(key, client);
    }
    return client;
  }

  close(): void {
    for (const client of this.clients.values()) client.close();
    this.clients.clear();
  }
}
