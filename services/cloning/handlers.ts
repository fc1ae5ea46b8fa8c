/**
 * The CloningService handlers: thin. CloneVirtualMachines checks and plans the request (nothing changes
 * when that fails) and starts the operation; Start, Stop and Delete go to the VM's agent (power.ts).
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { CreateClonesRequest } from '../gen/cowherd/agent/v1/agent_service.js';
import type { CloneVirtualMachinesRequest, CloningServiceService } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import type { Host } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError, relayServiceError } from '../common/platform/errors.js';
import type { OperationManager } from '../common/domain/operations.js';
import type { Handlers } from '../common/platform/rpc.js';
import { versionPinKey, type CloneOperationKind, type ImageVersionPins } from './clone-operation.js';
import { checkRequestShape, planClonesWithGuest } from './clone-plan.js';
import type { FleetView, RebaseFleetView } from './fleet-view.js';
import { REBASE_OPERATION_KIND, type RebaseOperationKind } from './rebase-operation.js';
import { checkRebaseShape, planRebase } from './rebase-plan.js';
import type { AgentPort } from './agents.js';
import type { GuestSecrets } from './guest-secrets.js';
import { locate, stopOperationKind, stopTimeoutSeconds } from './power.js';
/** Answers whether an operation of a kind (default CloneVirtualMachines') was created for a request_id. */
export type RequestIdLookup = (requestId: string, kind?: string) => Promise<boolean>;

/** What the handlers need. */
export interface CloningHandlersDeps {
  readonly fleet: FleetView;
  readonly operations: Pick<OperationManager, 'start'>;
  readonly kind: CloneOperationKind;
  /** Power and delete; left out in tests of cloning alone. */
  readonly agents?: Pick<AgentPort, 'startVirtualMachine' | 'deleteVirtualMachine' | 'createClones'>;
  readonly stopKind?: ReturnType<typeof stopOperationKind>;
  /** Lets a retried request_id return its operation without re-planning; without it every request is planned. */
  readonly requestIdUsed?: RequestIdLookup;
  /** Where the guest configurations of accepted requests wait for their operation (never in the operation record). */
  readonly guestSecrets?: Pick<GuestSecrets, 'hold'>;
  /** Where the exact image version a request resolved to waits for its operation's first run. */
  readonly versionPins?: Pick<ImageVersionPins, 'pin'>;
  /** RebaseVirtualMachines: its operation kind and the fleet it selects clones from; left out, the RPC is UNIMPLEMENTED. */
  readonly rebase?: { readonly kind: RebaseOperationKind; readonly fleet: Pick<RebaseFleetView, 'getImage' | 'listVirtualMachines'> };
  /** Draws `{random}` (tests). */
  readonly random?: () => string;
  readonly now?: () => Date;
}

/** How long the agent's validate_only check may take before the request is refused as UNAVAILABLE. */
const CHECK_DEADLINE_MS = 20_000;

/** CreateClones with validate_only on the host's agent; its refusal relayed as the agent sent it. */
async function checkOnAgent(agents: Pick<AgentPort, 'createClones'>, host: Host, request: CreateClonesRequest): Promise<void> {
  const signal = AbortSignal.timeout(CHECK_DEADLINE_MS);
  try {
    await agents.createClones(host, request, signal);
  } catch (error) {
    if (signal.aborted)
      throw new CowherdError(GrpcStatus.UNAVAILABLE, `${host.name} did not answer the check of the clone request within ${CHECK_DEADLINE_MS / 1000} s`, {
        reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
        metadata: { host: host.name },
        cause: error,
      });
    throw relayServiceError(error, host.name);
  }
}

/** The implemented CloningService handlers. */
export function cloningHandlers(deps: CloningHandlersDeps): Partial<Handlers<typeof CloningServiceService>> {
  return {
    cloneVirtualMachines: async (request) => {
      // The operation record keeps the request without the guest configuration's secrets: the hostname
      // template stays (it is no secret), the metadata has the digest, this replica's memory the rest.
      const stored = withoutGuestSecrets(request);
      if (request.requestId !== '' && deps.requestIdUsed && (await deps.requestIdUsed(request.requestId))) {
        // start() returns the existing operation, or INVALID_ARGUMENT when the request differs.
        checkRequestShape(request);
        return deps.operations.start(deps.kind, stored, deps.kind.metadataType.decode(new Uint8Array()), request.requestId);
      }
      const { metadata, guestConfiguration, imageVersion } = await planClonesWithGuest(request, {
        fleet: deps.fleet,
        ...(deps.agents === undefined ? {} : { checkOnHost: (host, check) => checkOnAgent(deps.agents!, host, check) }),
        ...(deps.random === undefined ? {} : { random: deps.random }),
        ...(deps.now === undefined ? {} : { now: deps.now }),
      });
      const digest = metadata.guestConfigurationDigest ?? '';
      const release = digest !== '' && guestConfiguration && deps.guestSecrets ? deps.guestSecrets.hold(digest, guestConfiguration) : undefined;
      // The run reads its pin as it starts (inside start()), and checkpoints it before making any clone.
      const unpin = imageVersion !== undefined && deps.versionPins ? deps.versionPins.pin(versionPinKey(metadata), imageVersion) : undefined;
      try {
        return await deps.operations.start(deps.kind, stored, metadata, request.requestId);
      } catch (error) {
        release?.();
        throw error;
      } finally {
        unpin?.();
      }
    },
    ...(deps.rebase === undefined
      ? {}
      : {
          rebaseVirtualMachines: async (request) => {
            const rebase = deps.rebase!;
            if (request.requestId !== '' && deps.requestIdUsed && (await deps.requestIdUsed(request.requestId, REBASE_OPERATION_KIND))) {
              // A retry gets its operation back (or ALREADY_EXISTS for another request) without selecting again.
              checkRebaseShape(request);
              return deps.operations.start(rebase.kind, request, rebase.kind.metadataType.decode(new Uint8Array()), request.requestId);
            }
            const metadata = await planRebase(request, rebase.fleet, deps.now);
            return deps.operations.start(rebase.kind, request, metadata, request.requestId);
          },
        }),
    ...(deps.agents === undefined || deps.stopKind === undefined
      ? {}
      : {
          startVirtualMachine: async (request) => {
            const { host } = await locate(deps.fleet, request.name);
            return deps.agents!.startVirtualMachine(host, request.name);
          },
          stopVirtualMachine: async (request) => {
            const { vm } = await locate(deps.fleet, request.name);
            const timeout = stopTimeoutSeconds(request);
            const start = new Date();
            return deps.operations.start(
              deps.stopKind!,
              request,
              { virtualMachine: vm.name, force: request.force, startTime: start, deadlineTime: new Date(start.getTime() + timeout * 1000) },
              request.requestId,
            );
          },
          deleteVirtualMachine: async (request) => {
            const { host } = await locate(deps.fleet, request.name);
            await deps.agents!.deleteVirtualMachine(host, request.name, request.force);
            return {};
          },
        }),
  };
}

/** The request as the operation record keeps it: the guest configuration's hostname template only. */
function withoutGuestSecrets(request: CloneVirtualMachinesRequest): CloneVirtualMachinesRequest {
  if (request.guestConfiguration === undefined) return request;
  return {
    ...request,
    guestConfiguration: { hostnameTemplate: request.guestConfiguration.hostnameTemplate, sshAuthorizedKeys: [], userData: '', networkConfig: '' },
  };
}
