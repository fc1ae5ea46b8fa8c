/**
 * The RebaseVirtualMachines operation (recompose): the clones chosen at creation (the initial metadata, canaries
 * first, every one pending) move onto the target version through their agents' RebaseClones.
 *
 * 1. The target is brought to every host with pending clones that lacks an AVAILABLE replica of it
 *    (image-delivery.ts: DistributeImage with the numbered name, followed under a progress deadline), hosts in
 *    parallel. A host that cannot get it fails its clones with that status.
 * 2. The canaries move, at most max_per_host per host per RebaseClones call, hosts in parallel. If any canary
 *    fails, the operation stops there: every clone still pending fails with ABORTED ("canary failed") and is
 *    not touched.
 * 3. The rest move in waves of at most max_per_host per host per call, hosts in parallel, each host's waves one
 *    after the other.
 *
 * Every clone's result is written as soon as its call returns (the metadata is the checkpoint: a replica that
 * takes the operation over asks again only for clones still pending; RebaseClones is idempotent, a clone
 * already on the version is OK). Cancelling stops before the next wave: clones not started stay pending and
 * unchanged, and the operation ends CANCELLED. Like CloneVirtualMachines, the operation succeeds with
 * per-clone failures in its response.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { RebaseClonesRequest, RebaseClonesResponse } from '../gen/cowherd/agent/v1/agent_service.js';
import {
  RebaseVirtualMachinesMetadata,
  RebaseVirtualMachinesRequest,
  RebaseVirtualMachinesResponse,
  type RebaseResult,
} from '../gen/cowherd/cloning/v1/cloning_service.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import type { Host } from '../gen/cowherd/inventory/v1/resources.js';
import type { Status } from '../gen/google/rpc/status.js';
import { mapLimited } from '../common/platform/concurrency.js';
import { CowherdError, toStatus } from '../common/platform/errors.js';
import type { OperationContext, OperationKind } from '../common/domain/operations.js';
import type { AgentPort } from './agents.js';
import { agentCallStatus, callAgentWithRetries } from './agent-retry.js';
import { HOST_CONCURRENCY, hostProblem, hostProblemNow, IMAGE_DELIVERY_NOT_WIRED } from './clone-operation.js';
import type { ImageDelivery } from './image-delivery-port.js';
import type { FleetView } from './fleet-view.js';
import { checkRebaseShape, hostOfClone, isOk, OK_STATUS } from './rebase-plan.js';

/** The operation kind's name in the operations bucket. */
export const REBASE_OPERATION_KIND = 'cloning.rebase-virtual-machines';

/** The checkpoint besides the metadata: the hosts known to hold the target. */
export interface RebaseCheckpoint {
  readonly deliveredHosts: readonly string[];
}

/** What the operation needs. */
export interface RebaseOperationDeps {
  readonly fleet: Pick<FleetView, 'listHosts' | 'listReplicas'>;
  readonly agents: Pick<AgentPort, 'rebaseClones'>;
  /** Default {@link IMAGE_DELIVERY_NOT_WIRED}. */
  readonly imageDelivery?: ImageDelivery;
  readonly now?: () => Date;
  /** Hosts handled at the same time; default {@link HOST_CONCURRENCY}. */
  readonly hostConcurrency?: number;
  /** How long a call is tried again while the agent does not answer; default AGENT_RETRY_MS (agent-retry.ts). */
  readonly agentRetryMs?: number;
}

/** The kind to register on the OperationManager. */
export type RebaseOperationKind = OperationKind<RebaseVirtualMachinesRequest, RebaseVirtualMachinesMetadata, RebaseVirtualMachinesResponse, RebaseCheckpoint>;

/** Makes the RebaseVirtualMachines operation kind. */
export function rebaseOperationKind(deps: RebaseOperationDeps): RebaseOperationKind {
  return {
    kind: REBASE_OPERATION_KIND,
    requestType: RebaseVirtualMachinesRequest,
    metadataType: RebaseVirtualMachinesMetadata,
    responseType: RebaseVirtualMachinesResponse,
    run: (context) => runRebase(deps, context),
  };
}

async function runRebase(
  deps: RebaseOperationDeps,
  context: OperationContext<RebaseVirtualMachinesRequest, RebaseVirtualMachinesMetadata, RebaseCheckpoint>,
): Promise<RebaseVirtualMachinesResponse> {
  const { request, signal, log } = context;
  const now = deps.now ?? (() => new Date());
  const delivery = deps.imageDelivery ?? IMAGE_DELIVERY_NOT_WIRED;
  const settings = checkRebaseShape(request);
  throwIfAborted(signal);

  const metadata = RebaseVirtualMachinesMetadata.fromPartial(context.metadata);
  const target = metadata.targetImageVersion;
  const delivered = new Set(context.state?.deliveredHosts ?? []);

  let writes: Promise<void> = Promise.resolve();
  const persist = (): Promise<void> => {
    const next = writes.then(() => {
      metadata.doneCount = metadata.results.filter((result) => !result.pending && isOk(result.status)).length;
      metadata.failedCount = metadata.results.filter((result) => !result.pending && !isOk(result.status)).length;
      metadata.updateTime = now();
      return context.checkpoint({ metadata: RebaseVirtualMachinesMetadata.fromPartial(metadata), state: { deliveredHosts: [...delivered] } });
    });
    writes = next.catch(() => undefined);
    return next;
  };
  const finish = (results: readonly RebaseResult[], status: Status): void => {
    for (const result of results) Object.assign(result, { pending: false, status });
  };

  const pendingHosts = (): string[] => [...new Set(metadata.results.filter((result) => result.pending).map((result) => hostOfClone(result.virtualMachine)))];
  const hosts = new Map((await deps.fleet.listHosts()).map((host) => [host.name, host]));

  // 1. The target onto every host that needs it.
  const holding = new Set((await deps.fleet.listReplicas(target)).map((replica) => replica.host));
  for (const host of holding) delivered.add(host);
  await mapLimited(
    pendingHosts().filter((host) => !delivered.has(host)),
    deps.hostConcurrency ?? HOST_CONCURRENCY,
    async (hostName) => {
      throwIfAborted(signal);
      const clones = metadata.results.filter((result) => result.pending && hostOfClone(result.virtualMachine) === hostName);
      const unusable = hostProblem(hostName, hosts.get(hostName));
      if (unusable) {
        finish(clones, toStatus(unusable));
        return persist();
      }
      try {
        await delivery.bringImageToHost(
          {
            image: target,
            host: hostName,
            operation: context.name,
            onProgress: ({ operation }) => {
              if (!metadata.distributeOperations.includes(operation)) {
                metadata.distributeOperations.push(operation);
                void persist().catch(() => undefined);
              }
            },
          },
          signal,
        );
      } catch (error) {
        throwIfAborted(signal);
        finish(clones, toStatus(error));
        return persist();
      }
      delivered.add(hostName);
      await persist();
    },
  );
  await writes;

  // 2. and 3. The canaries, then (when every canary moved) the rest.
  await moveWave(
    deps,
    context,
    metadata.results.filter((result) => result.canary),
    hosts,
    settings,
    persist,
  );
  const canaryFailure = metadata.results.find((result) => result.canary && !result.pending && !isOk(result.status));
  if (canaryFailure) {
    const aborted = toStatus(
      new CowherdError(GrpcStatus.ABORTED, `canary failed: ${canaryFailure.virtualMachine} could not be moved to ${target}; this clone was not touched`, {
        reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        metadata: { canary: canaryFailure.virtualMachine, image_version: target },
      }),
    );
    finish(
      metadata.results.filter((result) => result.pending),
      aborted,
    );
    await persist();
  } else {
    await moveWave(
      deps,
      context,
      metadata.results.filter((result) => !result.canary),
      hosts,
      settings,
      persist,
    );
  }
  await writes;
  throwIfAborted(signal);
  log.info({ done: metadata.doneCount, failed: metadata.failedCount }, 'rebase finished');
  return { results: metadata.results };
}

/** Moves the pending ones of `results`: per host in calls of at most max_per_host, hosts in parallel. */
async function moveWave(
  deps: RebaseOperationDeps,
  context: OperationContext<RebaseVirtualMachinesRequest, RebaseVirtualMachinesMetadata, RebaseCheckpoint>,
  results: readonly RebaseResult[],
  hosts: ReadonlyMap<string, Host>,
  settings: { readonly maxPerHost: number; readonly shutdownTimeoutMs: number },
  persist: () => Promise<void>,
): Promise<void> {
  const { request, signal } = context;
  const target = RebaseVirtualMachinesMetadata.fromPartial(context.metadata).targetImageVersion;
  const byHost = new Map<string, RebaseResult[]>();
  for (const result of results) {
    if (!result.pending) continue;
    const host = hostOfClone(result.virtualMachine);
    byHost.set(host, [...(byHost.get(host) ?? []), result]);
  }
  await mapLimited([...byHost.entries()], deps.hostConcurrency ?? HOST_CONCURRENCY, async ([hostName, clones]) => {
    for (let start = 0; start < clones.length; start += settings.maxPerHost) {
      // Cancelling (or losing the lease) stops before the next call: clones not asked stay pending, unchanged.
      throwIfAborted(signal);
      const batch = clones.slice(start, start + settings.maxPerHost);
      const host = hosts.get(hostName);
      const unusable = hostProblem(hostName, host);
      if (unusable) {
        for (const clone of batch) Object.assign(clone, { pending: false, status: toStatus(unusable) });
        await persist();
        continue;
      }
      const agentRequest: RebaseClonesRequest = {
        imageVersion: target,
        virtualMachines: batch.map((clone) => clone.virtualMachine),
        restart: request.restart,
        newInstanceId: request.newInstanceId,
        shutdownTimeout: { seconds: String(Math.floor(settings.shutdownTimeoutMs / 1000)), nanos: (settings.shutdownTimeoutMs % 1000) * 1e6 },
        operation: context.name,
      };
      let response: RebaseClonesResponse;
      try {
        response = await callAgentWithRetries(() => deps.agents.rebaseClones(host!, agentRequest, signal), {
          signal,
          retryMs: deps.agentRetryMs,
          stillUsable: () => hostProblemNow(deps.fleet, hostName),
        });
      } catch (error) {
        throwIfAborted(signal);
        context.log.warn({ err: error, host: hostName }, 'RebaseClones failed for the whole call');
        const status = agentCallStatus(hostName, error, 'clones it moved anyway stand on the target, and a rebase again counts them done');
        for (const clone of batch) Object.assign(clone, { pending: false, status });
        await persist();
        continue;
      }
      applyResults(batch, response, target);
      await persist();
    }
  });
}

/** Copies the agent's per-clone results; a clone it did not answer for fails INTERNAL. */
function applyResults(batch: readonly RebaseResult[], response: RebaseClonesResponse, target: string): void {
  const results = new Map(response.results.map((result) => [result.virtualMachine, result]));
  for (const clone of batch) {
    const result = results.get(clone.virtualMachine);
    if (!result) {
      Object.assign(clone, {
        pending: false,
        status: toStatus(
          new CowherdError(GrpcStatus.INTERNAL, `the agent returned no result for ${clone.virtualMachine}`, { reason: ErrorReason.ERROR_REASON_INTERNAL }),
        ),
      });
      continue;
    }
    const ok = (result.status?.code ?? GrpcStatus.OK) === GrpcStatus.OK;
    const state = result.virtualMachineState;
    Object.assign(clone, {
      pending: false,
      status: ok ? OK_STATUS : result.status,
      restarted: result.restarted,
      previousImageVersion: result.previousImageVersion || clone.previousImageVersion,
      imageVersion: ok ? target : state?.sourceImageVersion || state?.lineage?.imageVersion || clone.imageVersion,
    });
  }
}

function throwIfAborted(signal: AbortSignal): void {
  if (signal.aborted) throw signal.reason;
}
