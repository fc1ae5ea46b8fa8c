/**
 * Calling the agents: one AgentService client per agent endpoint, made on first use with the cloning
 * service's own mTLS credentials and kept, and a deadline that grows with the batch.
 */
import { Metadata, type ServiceError } from '@grpc/grpc-js';
import {
  AgentServiceClient,
  type CreateClonesRequest,
  type CreateClonesResponse,
  type RebaseClonesRequest,
  type RebaseClonesResponse,
} from '../gen/cowherd/agent/v1/agent_service.js';
import type { Host, VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import { AgentClients } from '../common/domain/agent-clients.js';
import { relayServiceError } from '../common/platform/errors.js';
import type { CredentialsFor } from '../common/platform/tls.js';

/** What cloning asks of a host's agent. */
export interface AgentPort {
  /**
   * AgentService.CreateClones on the host's agent. Rejects with the agent's gRPC error (or CANCELLED when
   * `signal` aborts); resolves with every clone's result.
   */
  createClones(host: Host, request: CreateClonesRequest, signal?: AbortSignal): Promise<CreateClonesResponse>;
  /** AgentService.StartVirtualMachine; rejects with the agent's error relayed (relayServiceError). */
  startVirtualMachine(host: Host, name: string): Promise<VirtualMachine>;
  /** AgentService.StopVirtualMachine, waiting up to `timeoutMs` for a graceful stop. */
  stopVirtualMachine(host: Host, name: string, force: boolean, timeoutMs: number): Promise<VirtualMachine>;
  /** AgentService.DeleteVirtualMachine. */
  deleteVirtualMachine(host: Host, name: string, force: boolean): Promise<void>;
  /**
   * AgentService.RebaseClones on the host's agent. Rejects with the agent's gRPC error (or CANCELLED when
   * `signal` aborts); resolves with every clone's result.
   */
  rebaseClones(host: Host, request: RebaseClonesRequest, signal?: AbortSignal): Promise<RebaseClonesResponse>;
}

/**
 * The deadline of one RebaseClones call: a minute, plus per clone its shutdown timeout (the agent may wait for
 * each guest in turn) and 10 seconds (the overlay, the swap, the redefinition, a start).
 */
export function rebaseClonesDeadlineMs(cloneCount: number, shutdownTimeoutMs: number): number {
  return 60_000 + cloneCount * (shutdownTimeoutMs + 10_000);
}

/** The deadline of one CreateClones call: a minute, plus 3 seconds per clone (copy-on-write children, define, start). */
export function createClonesDeadlineMs(cloneCount: number): number {
  return 60_000 + 3_000 * cloneCount;
}

/** Options of {@link createAgentPort}. */
export interface AgentPortOptions {
  /** The cloning service's own mTLS client credentials, by the identity of the agent dialled. */
  readonly credentials: CredentialsFor;
}

/** The real AgentPort over gRPC, with `close` for shutdown. */
export function createAgentPort(options: AgentPortOptions): AgentPort & { close(): void } {
  const agents = new AgentClients(options.credentials);
  const clientFor = (host: Host): AgentServiceClient => agents.clientFor(host);
  const unaryToAgent = <Res>(
    host: Host,
    invoke: (client: AgentServiceClient, deadline: number, callback: (error: ServiceError | null, response: Res) => void) => unknown,
    deadlineMs: number,
  ): Promise<Res> =>
    new Promise((resolve, reject) => {
      try {
        invoke(clientFor(host), Date.now() + deadlineMs, (error, response) => (error ? reject(relayServiceError(error, host.name)) : resolve(response)));
      } catch (error) {
        reject(error);
      }
    });
  return {
    createClones: (host, request, signal) =>
      new Promise((resolve, reject) => {
        if (signal?.aborted) return reject(signal.reason);
        const call = clientFor(host).createClones(
          request,
          new Metadata(),
          { deadline: Date.now() + createClonesDeadlineMs(request.clones.length) },
          (error, response) => {
            signal?.removeEventListener('abort', cancel);
            if (error) reject(error);
            else resolve(response);
          },
        );
        const cancel = (): void => call.cancel();
        signal?.addEventListener('abort', cancel, { once: true });
      }),
    rebaseClones: (host, request, signal) =>
      new Promise((resolve, reject) => {
        if (signal?.aborted) return reject(signal.reason);
        const shutdownMs = request.shutdownTimeout ? Number(request.shutdownTimeout.seconds) * 1000 + request.shutdownTimeout.nanos / 1e6 : 120_000;
        const call = clientFor(host).rebaseClones(
          request,
          new Metadata(),
          { deadline: Date.now() + rebaseClonesDeadlineMs(request.virtualMachines.length, shutdownMs) },
          (error, response) => {
            signal?.removeEventListener('abort', cancel);
            if (error) reject(error);
            else resolve(response);
          },
        );
        const cancel = (): void => call.cancel();
        signal?.addEventListener('abort', cancel, { once: true });
      }),
    startVirtualMachine: (host, name) =>
      unaryToAgent(host, (client, deadline, callback) => client.startVirtualMachine({ name }, new Metadata(), { deadline }, callback), 60_000),
    stopVirtualMachine: (host, name, force, timeoutMs) =>
      unaryToAgent(
        host,
        (client, deadline, callback) =>
          client.stopVirtualMachine(
            { name, force, timeout: { seconds: String(Math.ceil(timeoutMs / 1000)), nanos: 0 } },
            new Metadata(),
            { deadline },
            callback,
          ),
        timeoutMs + 30_000,
      ),
    deleteVirtualMachine: async (host, name, force) => {
      await unaryToAgent(host, (client, deadline, callback) => client.deleteVirtualMachine({ name, force }, new Metadata(), { deadline }, callback), 60_000);
    },
    close: () => agents.close(),
  };
}
