/**
 * The CloneVirtualMachines operation: the clones planned at creation (the initial metadata) are made host
 * by host through the agents, at most 8 hosts at a time. After each host's batch, its clones' results and
 * the host's completion are checkpointed together, so a replica that resumes the operation skips finished
 * hosts; an unfinished host is asked again with the same request_id (`<operation>/<host>`), and the agent
 * returns the clones it already made. One clone failing never stops the others; the operation fails as a
 * whole only when no host's agent could be asked at all.
 *
 * With DELIVERY_STREAM, a host that lacks the image gets its clones as soon as its replica is arriving
 * (streaming-clones.ts); they are STREAMING until the replica is AVAILABLE (then DONE) or its delivery fails
 * (then deleted and FAILED). Such a host is checkpointed as streaming, not finished, until then.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { CreateClonesRequest, CreateClonesResponse } from '../gen/cowherd/agent/v1/agent_service.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest,
  CloneVirtualMachinesResponse,
  type CloneResult,
  type ImageTransfer,
} from '../gen/cowherd/cloning/v1/cloning_service.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { ImageReplica_State } from '../gen/cowherd/inventory/v1/resources.js';
import { Host_State, type Host } from '../gen/cowherd/inventory/v1/resources.js';
import type { Status } from '../gen/google/rpc/status.js';
import { mapLimited } from '../common/platform/concurrency.js';
import { CowherdError, errorFromStatus, toStatus } from '../common/platform/errors.js';
import { CLONE_FAILED } from '../common/domain/event-types.js';
import type { EventPublisher } from '../common/platform/events.js';
import type { OperationContext, OperationKind } from '../common/domain/operations.js';
import type { AgentPort } from './agents.js';
import type { ImageDelivery, ImageDeliveryProgress } from './image-delivery-port.js';
import { agentCallStatus, callAgentWithRetries } from './agent-retry.js';
import type { FleetView } from './fleet-view.js';
import type { GuestSecrets } from './guest-secrets.js';
import { HOST_NAME, IMAGE_NAME, imageNameOfKey, parseImageReference } from '../common/domain/resource-names.js';
import { dataDiskBytesOf, exactImageVersion } from './clone-plan.js';
import {
  baseProgressOf,
  completedBaseProgress,
  deleteStreamingClone,
  firstOf,
  followImageArrival,
  isImageNotOnHost,
  streamFailedStatus,
  streamRequested,
  type ArrivalOutcome,
  type ImageArrival,
} from './streaming-clones.js';

/** The operation kind's name in the operations bucket. */
export const CLONE_OPERATION_KIND = 'cloning.clone-virtual-machines';
/** Hosts whose agents are asked at the same time. */
export const HOST_CONCURRENCY = 8;
/** Progress-only metadata writes (clones turning CREATING) happen at most this often; results are written at once. */
const PROGRESS_INTERVAL_MS = 5_000;
/** Streaming clones deleted at once on one host after its image stream failed. */
const DELETE_CONCURRENCY = 8;
/** The outcome of a delivery whose replica the inventory already holds AVAILABLE. */
const ARRIVED: Promise<ArrivalOutcome> = Promise.resolve({ arrived: true });

/** The checkpoint: which hosts are finished, and whether their agent answered. */
export interface CloneCheckpoint {
  /** `hosts/{host}` -> true when the agent returned results, false when the host's clones failed before that. */
  readonly finishedHosts: Readonly<Record<string, boolean>>;
  /**
   * For an image source: the exact version every clone of the operation comes from,
   * `images/{image}/versions/{version}`; checkpointed before the first clone is made, so that a version published
   * meanwhile (or a replica taking the operation over) does not change it.
   */
  readonly imageVersion?: string;
  /**
   * DELIVERY_STREAM: hosts (`hosts/{host}`) whose agent answered with streaming clones that wait for the
   * host's replica to be AVAILABLE. Not finished yet: a replica that resumes the operation does not ask the
   * agent again but follows the same DistributeImage operation to its end (DONE, or the clones deleted and FAILED).
   */
  readonly streamingHosts?: readonly string[];
}

/**
 * The exact versions the handler resolved, handed to the operation's first run on the same replica (the
 * operation record keeps the caller's request, so that a retried request_id matches it). Keyed by
 * {@link versionPinKey}. A run that finds no pin (a replica that took a new operation over before its first
 * checkpoint) resolves the caller's name again; no clone exists yet then, so every clone still comes from one
 * version.
 */
export class ImageVersionPins {
  private readonly pins = new Map<string, string>();

  /** Pins `version` for the operation whose initial metadata gives `key`; returns the release. */
  pin(key: string, version: string): () => void {
    this.pins.set(key, version);
    return () => {
      if (this.pins.get(key) === version) this.pins.delete(key);
    };
  }

  get(key: string): string | undefined {
    return this.pins.get(key);
  }
}

/** The pin key of a planned operation: its source and first clone (names are unique in the fleet at planning). */
export function versionPinKey(metadata: Pick<CloneVirtualMachinesMetadata, 'source' | 'clones' | 'startTime'>): string {
  const first = metadata.clones[0];
  return `${metadata.source}|${first?.host ?? ''}|${first?.domainName ?? ''}|${metadata.startTime?.getTime() ?? 0}`;
}

/**
 * No delivery: clones placed on a host without an AVAILABLE replica fail with FAILED_PRECONDITION
 * (IMAGE_NOT_ON_HOST). The service uses image-delivery.ts (DistributeImage, then the clones); this is the
 * default for unit tests that do not care.
 */
export const IMAGE_DELIVERY_NOT_WIRED: ImageDelivery = {
  bringImageToHost: async ({ image, host }) => {
    throw CowherdError.failedPrecondition(
      `${host} has no AVAILABLE replica of ${image}, and cloning cannot have it distributed yet (distribution is not wired into cloning); distribute the image to the host first`,
      ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST,
      { host, image },
    );
  },
};

/** What the operation needs. */
export interface CloneOperationDeps {
  readonly fleet: FleetView;
  /** deleteVirtualMachine removes streaming clones whose image stream failed; without it they are left, and their FAILED status says so. */
  readonly agents: Pick<AgentPort, 'createClones'> & Partial<Pick<AgentPort, 'deleteVirtualMachine'>>;
  /** Publishes clone.failed for clones that fail before reaching an agent (agents publish their own). */
  readonly events?: Pick<EventPublisher, 'publish'>;
  /** Default {@link IMAGE_DELIVERY_NOT_WIRED}. */
  readonly imageDelivery?: ImageDelivery;
  readonly now?: () => Date;
  /** Default {@link HOST_CONCURRENCY}. */
  readonly hostConcurrency?: number;
  /** The guest configurations this replica accepted (never in the operation record); without it, clones with one fail as after a takeover. */
  readonly guestSecrets?: Pick<GuestSecrets, 'get' | 'release'>;
  /** The exact versions the handler resolved; without it (or without a pin) the first run resolves the name itself. */
  readonly versionPins?: Pick<ImageVersionPins, 'get'>;
  /** How long CreateClones is tried again while the agent does not answer; default AGENT_RETRY_MS (agent-retry.ts). */
  readonly agentRetryMs?: number;
}

/** The kind to register on the OperationManager. */
export type CloneOperationKind = OperationKind<CloneVirtualMachinesRequest, CloneVirtualMachinesMetadata, CloneVirtualMachinesResponse, CloneCheckpoint>;

/** Makes the CloneVirtualMachines operation kind. */
export function cloneOperationKind(deps: CloneOperationDeps): CloneOperationKind {
  return {
    kind: CLONE_OPERATION_KIND,
    requestType: CloneVirtualMachinesRequest,
    metadataType: CloneVirtualMachinesMetadata,
    responseType: CloneVirtualMachinesResponse,
    run: async (context) => {
      try {
        return await runCloneOperation(deps, context);
      } finally {
        // The secrets go once the run ends here (done, failed, cancelled, or handed to another replica).
        const digest = context.metadata.guestConfigurationDigest ?? '';
        if (digest !== '') deps.guestSecrets?.release(digest);
      }
    },
  };
}

async function runCloneOperation(
  deps: CloneOperationDeps,
  context: OperationContext<CloneVirtualMachinesRequest, CloneVirtualMachinesMetadata, CloneCheckpoint>,
): Promise<CloneVirtualMachinesResponse> {
  const { request, signal, log } = context;
  const now = deps.now ?? (() => new Date());
  const delivery = deps.imageDelivery ?? IMAGE_DELIVERY_NOT_WIRED;
  throwIfAborted(signal);

  // The working copy: the metadata as last persisted (the plan, on the first run) and the checkpoint.
  const metadata = CloneVirtualMachinesMetadata.fromPartial(context.metadata);
  const finishedHosts: Record<string, boolean> = { ...(context.state?.finishedHosts ?? {}) };
  const streamingHosts = new Set(context.state?.streamingHosts ?? []);
  const source = request.source;
  let imageVersion = context.state?.imageVersion;
  const pinned = source?.$case === 'image' && imageVersion === undefined ? deps.versionPins?.get(versionPinKey(metadata)) : undefined;
  const byHost = new Map<string, CloneResult[]>();
  for (const clone of metadata.clones) {
    if (clone.host in finishedHosts) continue;
    const list = byHost.get(clone.host) ?? [];
    list.push(clone);
    byHost.set(clone.host, list);
  }

  // Checkpoints go one at a time: the manager writes with compare-and-set on its last revision, so two
  // concurrent writes from this run would look like a lost lease.
  let writes: Promise<void> = Promise.resolve();
  let lastWrite = 0;
  const persist = (): Promise<void> => {
    lastWrite = Date.now();
    const next = writes.then(() => {
      metadata.doneCount = metadata.clones.filter((clone) => clone.state === CloneResult_State.STATE_DONE).length;
      metadata.failedCount = metadata.clones.filter((clone) => clone.state === CloneResult_State.STATE_FAILED).length;
      metadata.updateTime = now();
      return context.checkpoint({
        metadata: CloneVirtualMachinesMetadata.fromPartial(metadata),
        state: {
          finishedHosts: { ...finishedHosts },
          ...(imageVersion === undefined ? {} : { imageVersion }),
          ...(streamingHosts.size === 0 ? {} : { streamingHosts: [...streamingHosts].sort() }),
        },
      });
    });
    writes = next.catch(() => undefined);
    return next;
  };

  if (source?.$case === 'image' && imageVersion === undefined) {
    // Fixed once, before any clone exists: from here on only the exact numbered name is used.
    imageVersion = pinned ?? (await resolveImageVersion(deps.fleet, source.value));
    await persist();
  }

  if (byHost.size > 0) {
    const hosts = new Map((await deps.fleet.listHosts()).map((host) => [host.name, host]));
    const image = imageVersion;
    const holding = image === undefined ? new Set<string>() : new Set((await deps.fleet.listReplicas(image)).map((replica) => replica.host));
    const stream = image !== undefined && streamRequested(request);
    // Streaming clones wait for their replica outside the host slots: HOST_CONCURRENCY bounds agent calls, and
    // a host whose clones are made should not keep the next host's distribution from starting.
    const settling: Promise<void>[] = [];

    const fail = async (hostName: string, clones: readonly CloneResult[], status: Status): Promise<void> => {
      for (const clone of clones) Object.assign(clone, { state: CloneResult_State.STATE_FAILED, error: status });
      await Promise.all(clones.map((clone) => publishCloneFailed(deps, context.name, request, clone, now(), log, image)));
      finishedHosts[hostName] = false;
      await persist();
    };

    /**
     * The delivery's onProgress for a host: the transfer shows in this operation's metadata (image_transfers)
     * while the host's clones wait for it, and its progress in the host's streaming clones' base_progress.
     */
    const trackTransfer =
      (hostName: string, clones: readonly CloneResult[]) =>
      ({ operation, transfer, deadline }: ImageDeliveryProgress): void => {
        if (!metadata.distributeOperations.includes(operation)) metadata.distributeOperations.push(operation);
        let entry = metadata.imageTransfers.find((candidate) => candidate.host === hostName);
        const before = entry ? `${entry.state}/${entry.hostUnreachable}` : '';
        if (!entry) {
          entry = {
            host: hostName,
            state: ImageReplica_State.STATE_PENDING,
            progress: undefined,
            waitingCloneCount: clones.length,
            hostUnreachable: false,
            deadlineTime: undefined,
          };
          metadata.imageTransfers.push(entry);
        }
        if (transfer) {
          entry.state = transfer.state;
          entry.progress = transfer.progress ? TransferProgress.fromPartial(transfer.progress) : undefined;
          entry.hostUnreachable = transfer.hostUnreachable;
        }
        entry.deadlineTime = deadline;
        // Waiting: every clone of the host not settled yet (all of them while they wait for the image to make them).
        entry.waitingCloneCount = clones.filter((clone) => !isSettled(clone)).length;
        for (const clone of clones) if (clone.state === CloneResult_State.STATE_STREAMING) clone.baseProgress = baseProgressOf(entry.progress);
        // States and reachability at once, bytes at most every PROGRESS_INTERVAL_MS.
        if (before !== `${entry.state}/${entry.hostUnreachable}` || Date.now() - lastWrite >= PROGRESS_INTERVAL_MS) void persist().catch(() => undefined);
      };
    const dropTransfer = (hostName: string): void => {
      metadata.imageTransfers = metadata.imageTransfers.filter((entry) => entry.host !== hostName);
    };
    const followArrival = (hostName: string, clones: readonly CloneResult[]): ImageArrival =>
      followImageArrival(delivery, { image: image!, host: hostName, operation: context.name, onProgress: trackTransfer(hostName, clones) }, signal);

    /** CreateClones for the host's clones, again while the agent does not answer; rejects with the whole call's error. */
    const askAgent = (hostName: string, host: Host, clones: readonly CloneResult[], streamCall: boolean): Promise<CreateClonesResponse> => {
      const guestDigest = metadata.guestConfigurationDigest ?? '';
      const guest = guestDigest === '' ? undefined : deps.guestSecrets?.get(guestDigest);
      const agentRequest: CreateClonesRequest = {
        dataDiskBytes: String(dataDiskBytesOf(request)),
        // The agents get the exact version, never a name that could mean another version by now.
        source: image === undefined ? request.source : { $case: 'image', value: image },
        // The index only matters to the guest configuration's `{index}`.
        clones: clones.map((clone) => ({ domainName: clone.domainName, start: request.start, index: guestDigest === '' ? 0 : clone.index })),
        guestConfigurationDigest: guestDigest,
        guestConfiguration: guest,
        operation: context.name,
        requestId: agentRequestId(context.name, hostName),
        stream: streamCall,
        validateOnly: false,
        // Fixed at planning (the request's, else the image's default then); UNSPECIFIED: the host's standard.
        diskBackend: metadata.diskBackend ?? 0,
      };
      // Again while the agent does not answer (restarting, cut off for a moment): the same request_id finds
      // what the first attempt made, so no clone that exists is called failed.
      return callAgentWithRetries(() => deps.agents.createClones(host, agentRequest, signal), {
        signal,
        retryMs: deps.agentRetryMs,
        stillUsable: () => hostProblemNow(deps.fleet, hostName),
      });
    };

    /** {@link askAgent}; a whole-call failure fails the host's clones (undefined then). */
    const askAgentOrFail = async (hostName: string, host: Host, clones: CloneResult[], streamCall: boolean): Promise<CreateClonesResponse | undefined> => {
      for (const clone of clones) clone.state = CloneResult_State.STATE_CREATING;
      if (Date.now() - lastWrite >= PROGRESS_INTERVAL_MS) await persist();
      try {
        return await askAgent(hostName, host, clones, streamCall);
      } catch (error) {
        // Stopping or losing the lease: leave the host unfinished, so that whoever resumes asks again.
        throwIfAborted(signal);
        log.warn({ err: error, host: hostName }, 'CreateClones failed for the whole host');
        await fail(hostName, clones, agentCallStatus(hostName, error, 'clones it made anyway are returned by a retry with the same request_id'));
        return undefined;
      }
    };

    /**
     * One host's batch: a host that holds the image clones at once; one that lacks it gets the image first
     * (DELIVERY_DISTRIBUTE) or streams it (streamHost); a resumed host whose clones stream waits for its replica.
     */
    const runHost = async (hostName: string, clones: CloneResult[]): Promise<void> => {
      throwIfAborted(signal);
      const host = hosts.get(hostName);
      if (image !== undefined && streamingHosts.has(hostName)) {
        // Resumed: the agent answered before with streaming clones, which wait for the replica as on the first run.
        return void settling.push(
          awaitedLater(settleStreaming(hostName, host, clones, holding.has(hostName) ? ARRIVED : followArrival(hostName, clones).outcome)),
        );
      }
      const unusable = hostProblem(hostName, host);
      if (unusable) return fail(hostName, clones, toStatus(unusable));
      if (image !== undefined && !holding.has(hostName)) {
        if (stream) return streamHost(hostName, host!, clones);
        for (const clone of clones) clone.state = CloneResult_State.STATE_WAITING_FOR_IMAGE;
        await persist();
        try {
          await delivery.bringImageToHost({ image, host: hostName, operation: context.name, onProgress: trackTransfer(hostName, clones) }, signal);
        } catch (error) {
          throwIfAborted(signal);
          dropTransfer(hostName);
          return fail(hostName, clones, toStatus(error));
        }
        dropTransfer(hostName);
      }
      const response = await askAgentOrFail(hostName, host!, clones, false);
      if (!response) return;
      applyResults(clones, response, null);
      finishedHosts[hostName] = true;
      await persist();
    };

    /**
     * DELIVERY_STREAM for a host without the image: the distribution starts as for DISTRIBUTE; once the host's
     * transfer is streamable the clones are made with `stream`, and those the agent made streaming wait for
     * the replica (settleStreaming). A delivery that ends before that is handled as DISTRIBUTE handles it.
     */
    const streamHost = async (hostName: string, host: Host, clones: CloneResult[]): Promise<void> => {
      for (const clone of clones) clone.state = CloneResult_State.STATE_WAITING_FOR_IMAGE;
      await persist();
      const arrival = followArrival(hostName, clones);
      const early = await firstOf(arrival);
      throwIfAborted(signal);
      if (early && !early.arrived) {
        dropTransfer(hostName);
        return fail(hostName, clones, toStatus(early.error));
      }
      const response = await createStreamingClones(hostName, host, clones, arrival);
      if (!response) return;
      applyResults(clones, response, transferOf(metadata, hostName)?.progress);
      if (!clones.some((clone) => clone.state === CloneResult_State.STATE_STREAMING)) {
        // Made on an AVAILABLE replica (or failed at the agent): nothing waits for the image any more.
        arrival.stop();
        dropTransfer(hostName);
        finishedHosts[hostName] = true;
        return persist();
      }
      streamingHosts.add(hostName);
      const entry = transferOf(metadata, hostName);
      if (entry) entry.waitingCloneCount = clones.filter((clone) => !isSettled(clone)).length;
      await persist();
      settling.push(awaitedLater(settleStreaming(hostName, host, clones, arrival.outcome)));
    };

    /**
     * CreateClones with `stream` once the replica is streamable. An agent that refuses with IMAGE_NOT_ON_HOST
     * (its replica is not streamable yet, or it does not stream) gets the same request again once the replica
     * is AVAILABLE: the DISTRIBUTE way, rather than failing clones that a short wait can make.
     */
    const createStreamingClones = async (
      hostName: string,
      host: Host,
      clones: CloneResult[],
      arrival: ImageArrival,
    ): Promise<CreateClonesResponse | undefined> => {
      for (const clone of clones) clone.state = CloneResult_State.STATE_CREATING;
      if (Date.now() - lastWrite >= PROGRESS_INTERVAL_MS) await persist();
      try {
        return await askAgent(hostName, host, clones, true);
      } catch (error) {
        throwIfAborted(signal);
        if (!isImageNotOnHost(error)) {
          arrival.stop();
          dropTransfer(hostName);
          log.warn({ err: error, host: hostName }, 'CreateClones failed for the whole host');
          await fail(hostName, clones, agentCallStatus(hostName, error, 'clones it made anyway are returned by a retry with the same request_id'));
          return undefined;
        }
        log.info({ host: hostName }, 'the agent cannot stream from its replica yet: its clones are made once the replica is AVAILABLE');
      }
      for (const clone of clones) clone.state = CloneResult_State.STATE_WAITING_FOR_IMAGE;
      await persist();
      const outcome = await arrival.outcome;
      throwIfAborted(signal);
      dropTransfer(hostName);
      if (!outcome.arrived) {
        await fail(hostName, clones, toStatus(outcome.error));
        return undefined;
      }
      return askAgentOrFail(hostName, host, clones, true);
    };

    /**
     * Waits for the replica under the host's streaming clones: DONE once it is AVAILABLE; when its delivery
     * fails for good, each is deleted on the agent and FAILED (the image stream failed). The host is finished then.
     */
    const settleStreaming = async (
      hostName: string,
      host: Host | undefined,
      clones: readonly CloneResult[],
      outcome: Promise<ArrivalOutcome>,
    ): Promise<void> => {
      const result = await outcome;
      throwIfAborted(signal);
      const streaming = clones.filter((clone) => clone.state === CloneResult_State.STATE_STREAMING);
      dropTransfer(hostName);
      if (result.arrived) {
        for (const clone of streaming) Object.assign(clone, { state: CloneResult_State.STATE_DONE, baseProgress: completedBaseProgress(clone.baseProgress) });
      } else {
        await removeStreamingClones(hostName, host, streaming, toStatus(result.error));
      }
      streamingHosts.delete(hostName);
      finishedHosts[hostName] = true;
      await persist();
    };

    /** Deletes streaming clones whose image stream failed (nothing half-made stays) and fails them, with clone.failed. */
    const removeStreamingClones = async (hostName: string, host: Host | undefined, clones: readonly CloneResult[], cause: Status): Promise<void> => {
      // Retried until the host is gone or UNREACHABLE; a DRAINING host's agent still deletes.
      const stillUsable = async (): Promise<CowherdError | undefined> => {
        const problem = await hostProblemNow(deps.fleet, hostName);
        return problem?.code === GrpcStatus.UNAVAILABLE ? problem : undefined;
      };
      const removal = { agents: deps.agents, signal, retryMs: deps.agentRetryMs, stillUsable };
      log.warn({ host: hostName, clones: clones.length, cause: cause.message }, 'the image stream failed: deleting its streaming clones');
      await mapLimited(clones, DELETE_CONCURRENCY, async (clone) => {
        const notDeleted = await deleteStreamingClone(host, clone.virtualMachine, removal);
        if (notDeleted !== undefined)
          log.warn({ host: hostName, virtualMachine: clone.virtualMachine, problem: notDeleted }, 'could not delete a streaming clone');
        Object.assign(clone, {
          state: CloneResult_State.STATE_FAILED,
          error: streamFailedStatus(clone, image!, cause, notDeleted),
          // What was made for it is gone: a FAILED clone names a virtual machine only when one is left.
          ...(notDeleted === undefined ? { virtualMachine: '', overlays: [], started: false } : {}),
        });
        await publishCloneFailed(deps, context.name, request, clone, now(), log, image);
      });
    };

    await mapLimited([...byHost.entries()], deps.hostConcurrency ?? HOST_CONCURRENCY, ([hostName, clones]) => runHost(hostName, clones));
    await Promise.all(settling);
    await writes;
  }
  throwIfAborted(signal);

  const clones = [...metadata.clones].sort((a, b) => a.index - b.index);
  const attempted = Object.values(finishedHosts).some((answered) => answered);
  if (!attempted && clones.length > 0) {
    const first = clones.find((clone) => clone.error)?.error;
    throw first
      ? errorFromStatus(first, 'no clone could be attempted: ')
      : new CowherdError(GrpcStatus.INTERNAL, 'no clone could be attempted', { reason: ErrorReason.ERROR_REASON_INTERNAL });
  }
  return { clones };
}

/** The exact version a caller's image name stands for now; NOT_FOUND when the image or alias is gone. */
export async function resolveImageVersion(fleet: Pick<FleetView, 'getImage'>, name: string): Promise<string> {
  const reference = parseImageReference(name);
  const image = reference && (await fleet.getImage(name));
  if (!reference || !image) throw CowherdError.notFound(name);
  return exactImageVersion(reference.id, image);
}

/** `images/{image}` of an exact version name. */
function imageNameOfVersion(imageVersion: string): string {
  const key = IMAGE_NAME.parse(imageVersion)?.image;
  return key === undefined ? imageVersion : imageNameOfKey(key);
}

/** The request_id the agent gets for one host's batch: stable across retries and resumptions. */
export function agentRequestId(operation: string, host: string): string {
  return `${operation}/${host}`;
}

/** {@link hostProblem} of the host as the inventory has it now (asked again between retries of an agent call). */
export async function hostProblemNow(fleet: Pick<FleetView, 'listHosts'>, name: string): Promise<CowherdError | undefined> {
  return hostProblem(
    name,
    (await fleet.listHosts()).find((candidate) => candidate.name === name),
  );
}

/** Why clones cannot go to a host now (it left the inventory, is UNREACHABLE or DRAINING); undefined when it can take them. */
export function hostProblem(name: string, host: Host | undefined): CowherdError | undefined {
  if (!host)
    return new CowherdError(GrpcStatus.UNAVAILABLE, `${name} is no longer in the inventory`, {
      reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
      metadata: { host: name },
    });
  if (host.state === Host_State.STATE_UNREACHABLE) {
    return new CowherdError(GrpcStatus.UNAVAILABLE, `${name} is UNREACHABLE`, { reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE, metadata: { host: name } });
  }
  if (host.draining || host.state === Host_State.STATE_DRAINING) {
    return CowherdError.failedPrecondition(`${name} started draining after the clones were placed`, ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT, {
      resource: name,
      state: 'STATE_DRAINING',
    });
  }
  return undefined;
}

/**
 * Copies the agent's per-clone results into the clones; a clone the agent did not answer for fails. With
 * `streamProgress` (a CreateClones call with `stream`), a clone the agent made streaming is STREAMING with
 * that progress as its base_progress; otherwise `streaming` is not looked at.
 */
function applyResults(clones: readonly CloneResult[], response: CreateClonesResponse, streamProgress: TransferProgress | null | undefined): void {
  const results = new Map(response.results.map((result) => [result.domainName, result]));
  for (const clone of clones) {
    const result = results.get(clone.domainName);
    if (!result) {
      Object.assign(clone, {
        state: CloneResult_State.STATE_FAILED,
        error: toStatus(
          new CowherdError(GrpcStatus.INTERNAL, `the agent returned no result for ${clone.domainName}`, { reason: ErrorReason.ERROR_REASON_INTERNAL }),
        ),
      });
      continue;
    }
    const machine = result.virtualMachine;
    const ok = (result.status?.code ?? GrpcStatus.OK) === GrpcStatus.OK;
    const streaming = ok && result.streaming && streamProgress !== null;
    Object.assign(clone, {
      state: streaming ? CloneResult_State.STATE_STREAMING : ok ? CloneResult_State.STATE_DONE : CloneResult_State.STATE_FAILED,
      error: ok ? undefined : result.status,
      virtualMachine: machine?.name ?? '',
      uuid: machine?.uuid ?? '',
      overlays: machine?.lineage?.overlays ?? [],
      started: result.started,
      ...(streaming ? { baseProgress: baseProgressOf(streamProgress) } : {}),
    });
  }
}

/** True for a clone with its final state (DONE or FAILED). */
function isSettled(clone: CloneResult): boolean {
  return clone.state === CloneResult_State.STATE_DONE || clone.state === CloneResult_State.STATE_FAILED;
}

/** The host's entry in image_transfers, if it has one. */
function transferOf(metadata: CloneVirtualMachinesMetadata, host: string): ImageTransfer | undefined {
  return metadata.imageTransfers.find((entry) => entry.host === host);
}

/** The promise itself, its rejection marked as handled: it is awaited later, perhaps after another failure ended the run. */
function awaitedLater<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => undefined);
  return promise;
}

async function publishCloneFailed(
  deps: CloneOperationDeps,
  operation: string,
  request: CloneVirtualMachinesRequest,
  clone: CloneResult,
  at: Date,
  log: OperationContext<unknown, unknown, unknown>['log'],
  imageVersion: string | undefined,
): Promise<void> {
  const hostId = HOST_NAME.parse(clone.host)?.host;
  // The plan names every clone's host as hosts/{host}.
  if (!deps.events || hostId === undefined) return;
  try {
    await deps.events.publish(
      CLONE_FAILED,
      {
        virtualMachine: clone.virtualMachine,
        host: clone.host,
        domainName: clone.domainName,
        uuid: clone.uuid,
        image: imageVersion === undefined ? '' : imageNameOfVersion(imageVersion),
        sourceVirtualMachine: request.source?.$case === 'virtualMachine' ? request.source.value : '',
        overlays: clone.overlays,
        status: clone.error,
        operation,
        occurTime: at,
      },
      // The same id scheme as the agent's, so that a resumed operation's second publish is dropped.
      { host: hostId, id: `clone.failed/${operation}/${hostId}/${clone.domainName}` },
    );
  } catch (error) {
    log.warn({ err: error, domainName: clone.domainName }, 'could not publish clone.failed');
  }
}

function throwIfAborted(signal: AbortSignal): void {
  if (signal.aborted) throw signal.reason;
}
