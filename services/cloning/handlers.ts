/**
 * The CloningService handlers: thin. CloneVirtualMachines checks and plans the request (nothing changes
 * when that fails) and starts the operation; the other RPCs answer UNIMPLEMENTED until their issue lands.
 */
import type { CloningServiceService } from '../gen/cowherd/cloning/v1/cloning_service.js';
import type { OperationManager } from '../common/operations.js';
import type { Handlers } from '../common/rpc.js';
import type { CloneOperationKind } from './clone-operation.js';
import { checkRequestShape, planClones } from './clone-plan.js';
import type { FleetView } from './fleet-view.js';
/** Answers whether an operation of this kind was created for a request_id. */
export type RequestIdLookup = (requestId: string) => Promise<boolean>;

/** What the handlers need. */
export interface CloningHandlersDeps {
  readonly fleet: FleetView;
  readonly operations: Pick<OperationManager, 'start'>;
  readonly kind: CloneOperationKind;
  /** Lets a retried request_id return its operation without re-planning; without it every request is planned. */
  readonly requestIdUsed?: RequestIdLookup;
  /** Draws `{random}` (tests). */
  readonly random?: () => string;
  readonly now?: () => Date;
}

/** The implemented CloningService handlers. */
export function cloningHandlers(deps: CloningHandlersDeps): Partial<Handlers<typeof CloningServiceService>> {
  return {
    cloneVirtualMachines: async (request) => {
      if (request.requestId !== '' && deps.requestIdUsed && (await deps.requestIdUsed(request.requestId))) {
        // start() returns the existing operation, or INVALID_ARGUMENT when the request differs.
        checkRequestShape(request);
        return deps.operations.start(deps.kind, request, deps.kind.metadataType.decode(new Uint8Array()), request.requestId);
      }
      const metadata = await planClones(request, {
        fleet: deps.fleet,
        ...(deps.random === undefined ? {} : { random: deps.random }),
        ...(deps.now === undefined ? {} : { now: deps.now }),
      });
      return deps.operations.start(deps.kind, request, metadata, request.requestId);
    },
  };
}
