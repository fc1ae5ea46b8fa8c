/**
 * StartVirtualMachine, StopVirtualMachine and DeleteVirtualMachine: find the VM and its host in inventory,
 * ask the host's agent, relay its answer (the lineage rules live on the agent, where the domains are).
 * Stop is a long-running operation (a graceful shutdown may take minutes).
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { StopVirtualMachineMetadata, StopVirtualMachineRequest } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { Host_State, VirtualMachine, type Host } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import type { OperationKind } from '../common/domain/operations.js';
import type { AgentPort } from './agents.js';
import type { FleetView } from './fleet-view.js';
import { HOST_NAME, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';

/** A graceful stop waits this long unless the caller says otherwise (the proto's default). */
export const DEFAULT_STOP_TIMEOUT_SECONDS = 120;

/** The VM and the host its agent runs on; NOT_FOUND / UNAVAILABLE as the proto says. */
export async function locate(fleet: FleetView, name: string): Promise<{ vm: VirtualMachine; host: Host }> {
  const parsed = VIRTUAL_MACHINE_NAME.parse(name);
  if (!parsed) throw CowherdError.invalidArgument('name', 'must be hosts/{host}/virtualMachines/{vm}');
  const hostName = HOST_NAME.format({ host: parsed.host });
  const vm = await fleet.getVirtualMachine(name);
  if (!vm) throw CowherdError.notFound(name);
  const host = (await fleet.listHosts()).find((candidate) => candidate.name === hostName);
  if (!host) throw CowherdError.notFound(hostName);
  if (host.state === Host_State.STATE_UNREACHABLE)
    throw new CowherdError(GrpcStatus.UNAVAILABLE, `${host.name} is unreachable`, {
      reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
      metadata: { host: host.name },
    });
  return { vm, host };
}

/** The Stop operation: one agent call, waiting for the guest. */
export function stopOperationKind(deps: {
  fleet: FleetView;
  agents: Pick<AgentPort, 'stopVirtualMachine'>;
}): OperationKind<StopVirtualMachineRequest, StopVirtualMachineMetadata, VirtualMachine, undefined> {
  return {
    kind: 'cloning.stop-virtual-machine',
    requestType: StopVirtualMachineRequest,
    metadataType: StopVirtualMachineMetadata,
    responseType: VirtualMachine,
    run: async (context) => {
      const { host } = await locate(deps.fleet, context.request.name);
      // Stopping twice is harmless, so a resumed operation simply asks again.
      return deps.agents.stopVirtualMachine(host, context.request.name, context.request.force, stopTimeoutSeconds(context.request) * 1000);
    },
  };
}

/** The timeout of a stop request, validated (INVALID_ARGUMENT naming `timeout`). */
export function stopTimeoutSeconds(request: StopVirtualMachineRequest): number {
  if (!request.timeout) return DEFAULT_STOP_TIMEOUT_SECONDS;
  const seconds = Number(request.timeout.seconds) + request.timeout.nanos / 1e9;
  if (!(seconds > 0 && seconds <= 3600)) throw CowherdError.invalidArgument('timeout', 'must be between 0 and 1 hour');
  return seconds;
}
