/**
 * DistributeImage (job 2): every named host gets a verified replica of an image through the swarm.
 *
 * How it runs:
 * - Checks first, before an operation exists: the image is AVAILABLE with a torrent; every host is known
 *   and runs the image's hypervisor (the 2011 tool's "same type" rule; otherwise nothing starts);
 *   `hosts/-` means every READY host of the image's hypervisor.
 * - Then, at most {@link FETCH_CONCURRENCY} agents at a time are asked to FetchImage (idempotent, so a
 *   replica taking the operation over from a killed one simply asks again). The request carries the full
 *   image record, the tracker's announce URL and the web seed URLs of the image's origin replicas.
 * - Agents report through events (image.transfer_progress, image.available, image.transfer_failed), which
 *   {@link followReplicaEvents} turns into the replica records of KV `replicas`. The operation reads those
 *   records every second and keeps its metadata (per-host bytes, rate, peers, ETA) current, checkpointing
 *   at most every {@link METADATA_INTERVAL_MS} and at every state change.
 * - A host fails on its own (response.failures), not the operation: unreachable or draining when asked, an
 *   agent error, a FAILED replica, or a missed progress deadline. The operation fails only if the image is
 *   deleted meanwhile, or is cancelled (then the partial replicas are removed).
 * - Every operation ends: each host's step has a progress deadline (common/platform/progress-deadline.ts) that only
 *   real progress moves (bytes beyond the most it held, its replica state advancing PENDING -> TRANSFERRING
 *   -> VERIFYING); VERIFYING gets floor + bytes / rate. Reading a record that did not change is not
 *   progress, so a replica left VERIFYING (an image.available lost on the way) fails instead of holding the
 *   operation RUNNING for ever. The deadlines live in memory: a replica that takes the operation over gives
 *   each step a fresh one.
 * - The hosts' states are read from inventory every {@link DistributeDeps.hostCheckIntervalMs}: a host that
 *   turns UNREACHABLE is marked in its metadata entry at once (host_unreachable; rate, peers and ETA
 *   cleared, since nobody measures them), keeps its deadline (silence is not progress), resumes if its agent
 *   comes back in time, and fails with HOST_UNREACHABLE otherwise.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { AgentClients } from '../common/domain/agent-clients.js';
import { call } from '../common/platform/client.js';
import { mapLimited } from '../common/platform/concurrency.js';
import { CowherdError, relayServiceError, toStatus } from '../common/platform/errors.js';
import { IMAGE_AVAILABLE, IMAGE_READ_PROFILE, IMAGE_REPLICA_DAMAGED, IMAGE_TRANSFER_FAILED, IMAGE_TRANSFER_PROGRESS } from '../common/domain/event-types.js';
import { consumeEvents, type EventConsumer, type ReceivedEvent } from '../common/platform/events.js';
import type { KvStore } from '../common/platform/kv.js';
import type { Logger } from '../common/platform/logger.js';
import type { OperationKind } from '../common/domain/operations.js';
import { EVERY_HOST, HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, imageNameOfKey, imageVersionNameOfKey } from '../common/domain/resource-names.js';
import { resolveImage } from './image-heads.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { TransferProgress } from '../gen/cowherd/common/v1/types.js';
import {
  DistributeImageMetadata,
  DistributeImageRequest,
  DistributeImageResponse,
  type HostTransfer,
} from '../gen/cowherd/distribution/v1/distribution_service.js';
import {
  DEFAULT_PROGRESS_DEADLINES,
  ProgressDeadlines,
  type ProgressDeadlineOptions,
  type StepStage,
  type StepVerdict,
} from '../common/platform/progress-deadline.js';
import type { ImageAvailable, ImageReadProfile, ImageReplicaDamaged, ImageTransferFailed, ImageTransferProgress } from '../gen/cowherd/events/v1/events.js';
import {
  Host_State,
  Image_State,
  ImageReplica,
  ImageReplica_State,
  ReadProfile,
  type Host,
  type Image,
  type ImageHead,
} from '../gen/cowherd/inventory/v1/resources.js';
import type { Status } from '../gen/google/rpc/status.js';
import type { JetStreamClient, JetStreamManager } from '@nats-io/jetstream';

/** Agents asked to FetchImage at once. */
export const FETCH_CONCURRENCY = 16;
/** Progress reaches the operation's metadata at most this often (state changes at once). */
export const METADATA_INTERVAL_MS = 2_000;
/** At most this many hosts per request. */
export const MAX_HOSTS = 1000;

/** What distributing reads and writes. */
export interface DistributeDeps {
  readonly images: KvStore<Image>;
  /** The image heads: a caller's `images/{image}` is its latest version, `.../versions/{alias}` an alias's. */
  readonly heads: KvStore<ImageHead>;
  readonly replicas: KvStore<ImageReplica>;
  readonly inventory: {
    getHost(name: string): Promise<Host | undefined>;
    listHosts(): Promise<Host[]>;
  };
  readonly agents: AgentClients;
  /** The tracker's announce URL, as agents reach it. */
  readonly trackerAnnounceUrl: string;
  /** Test seam: how long to wait between reads of the replica records. Default 1000 ms. */
  readonly pollIntervalMs?: number;
  /** Each host's progress deadline (COWHERD_DISTRIBUTE_* variables). Default {@link DEFAULT_PROGRESS_DEADLINES}. */
  readonly deadlines?: ProgressDeadlineOptions;
  /** How often the hosts' states are read from inventory (COWHERD_DISTRIBUTE_HOST_CHECK_SECONDS). Default 2000 ms. */
  readonly hostCheckIntervalMs?: number;
  /** Test seam: the clock of the deadlines. Default Date.now. */
  readonly now?: () => number;
}

/**
 * The storage key of the version an operation distributes: the metadata names the version resolved when the
 * operation started (an alias or `latest` that moves later does not change it); the request's name otherwise.
 */
function versionKeyOf(metadataImage: string, requestImage: string): string {
  const parsed = IMAGE_NAME.parse(metadataImage) ?? IMAGE_NAME.parse(requestImage);
  if (!parsed) throw CowherdError.invalidArgument('image', 'must be images/{image} or images/{image}/versions/{version}');
  return parsed.image;
}

/** The `{host}` of a transfer's host, checked when the operation started. */
function hostIdOf(transfer: HostTransfer): string {
  const parsed = HOST_NAME.parse(transfer.host);
  if (!parsed) throw new Error(`transfer to ${JSON.stringify(transfer.host)}, which is no hosts/{host}`);
  return parsed.host;
}

/**
 * Checks a DistributeImage request; nothing changes when it fails. Returns the image and the target hosts
 * (`hosts/-` resolved), in request order.
 */
export async function checkDistribute(request: DistributeImageRequest, deps: DistributeDeps): Promise<{ image: Image; hosts: string[] }> {
  if (request.hosts.length === 0)
    throw CowherdError.invalidArgument('hosts', "must name at least one host, or hosts/- for every READY host of the image's hypervisor");
  if (request.hosts.length > MAX_HOSTS) throw CowherdError.invalidArgument('hosts', `must name at most ${MAX_HOSTS} hosts`);
  const all = request.hosts.length === 1 && request.hosts[0] === EVERY_HOST;
  if (!all) {
    const seen = new Set<string>();
    for (const [index, host] of request.hosts.entries()) {
      if (!HOST_NAME.matches(host)) throw CowherdError.invalidArgument(`hosts[${index}]`, 'must be hosts/{host} (or the single entry hosts/-)');
      if (seen.has(host)) throw CowherdError.invalidArgument(`hosts[${index}]`, `names ${host} twice`);
      seen.add(host);
    }
  }
  const image = (await resolveImage(deps, request.image, 'image')).record;
  if (image.state !== Image_State.STATE_AVAILABLE || !image.torrent?.infoHash) {
    throw CowherdError.failedPrecondition(
      `${request.image} is ${Image_State[image.state].replace('STATE_', '')}, not AVAILABLE`,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
      { image: request.image },
    );
  }
  if (all) {
    const hosts = (await deps.inventory.listHosts())
      .filter((host) => host.state === Host_State.STATE_READY && host.hypervisor === image.hypervisor)
      .map((host) => host.name);
    if (hosts.length === 0)
      throw CowherdError.failedPrecondition(`no READY host runs the hypervisor of ${request.image}`, ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT);
    return { image, hosts: hosts.slice(0, MAX_HOSTS) };
  }
  for (const name of request.hosts) {
    const host = await deps.inventory.getHost(name);
    if (!host) throw CowherdError.notFound(name);
    if (host.hypervisor !== image.hypervisor) {
      throw CowherdError.failedPrecondition(
        `${name} runs another hypervisor than ${request.image} was made for; a host only receives images of its own disk format`,
        ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
        { host: name, image: request.image },
      );
    }
  }
  return { image, hosts: [...request.hosts] };
}

/** The first metadata of an operation for these hosts. */
export function initialDistributeMetadata(image: Image, hosts: readonly string[]): DistributeImageMetadata {
  const now = new Date();
  const total = image.torrent?.totalBytes ?? '0';
  return DistributeImageMetadata.fromPartial({
    image: image.name,
    transfers: hosts.map((host) => ({
      host,
      state: ImageReplica_State.STATE_PENDING,
      progress: TransferProgress.fromPartial({ bytesDone: '0', bytesTotal: total }),
    })),
    bytesTotal: total,
    hostsTotal: hosts.length,
    hostsDone: 0,
    hostsFailed: 0,
    startTime: now,
    updateTime: now,
  });
}

function isFinal(transfer: HostTransfer): boolean {
  return transfer.state === ImageReplica_State.STATE_AVAILABLE || transfer.state === ImageReplica_State.STATE_FAILED;
}

function failure(code: GrpcStatus, message: string, reason: ErrorReason, metadata: Record<string, string> = {}): Status {
  return toStatus(new CowherdError(code, message, { reason, metadata }));
}

/** The deadline stage of a replica state that is not final. */
function stageOf(state: ImageReplica_State): StepStage {
  if (state === ImageReplica_State.STATE_VERIFYING) return 'verifying';
  if (state === ImageReplica_State.STATE_TRANSFERRING) return 'transferring';
  return 'pending';
}

/** Why a host's step ended at its progress deadline: HOST_UNREACHABLE while inventory says so, else PROGRESS_DEADLINE_EXCEEDED. */
function missedDeadline(transfer: HostTransfer, verdict: StepVerdict, unreachable: boolean): Status {
  const seconds = Math.round(verdict.budgetMs / 1000);
  const state = ImageReplica_State[transfer.state]?.replace('STATE_', '') ?? 'PENDING';
  const bytes = transfer.progress?.bytesDone ?? '0';
  const metadata = { host: transfer.host, state, bytes_done: bytes, deadline_seconds: String(seconds) };
  if (unreachable) {
    return failure(
      GrpcStatus.UNAVAILABLE,
      `${transfer.host} is UNREACHABLE and its transfer made no progress for ${seconds} s (${state}, ${bytes} bytes); its partial replica is kept and resumes on the next DistributeImage`,
      ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
      metadata,
    );
  }
  const what =
    verdict.stage === 'verifying'
      ? `stayed ${state} longer than verifying the image can take (${seconds} s)`
      : `made no progress for ${seconds} s (${state}, ${bytes} bytes)`;
  return failure(
    GrpcStatus.DEADLINE_EXCEEDED,
    `${transfer.host} ${what}; its partial replica is kept and resumes on the next DistributeImage`,
    ErrorReason.ERROR_REASON_PROGRESS_DEADLINE_EXCEEDED,
    metadata,
  );
}

/** The DistributeImage operation. */
export function distributeOperationKind(
  deps: DistributeDeps,
): OperationKind<DistributeImageRequest, DistributeImageMetadata, DistributeImageResponse, undefined> {
  return {
    kind: 'distribution.distribute-image',
    requestType: DistributeImageRequest,
    metadataType: DistributeImageMetadata,
    responseType: DistributeImageResponse,
    run: async (context) => {
      // `id` is the version's storage key: its record, replicas (`<host>.<key>`) and torrent.
      const id = versionKeyOf(context.metadata.image, context.request.image);
      const readImage = async (): Promise<Image> => {
        const image = (await deps.images.get(id))?.value;
        if (!image || image.state !== Image_State.STATE_AVAILABLE || !image.torrent) {
          throw CowherdError.failedPrecondition(
            `${context.request.image} was deleted or is no longer AVAILABLE`,
            ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
            { image: context.request.image },
          );
        }
        return image;
      };
      const image = await readImage();
      const metadata: DistributeImageMetadata = DistributeImageMetadata.fromPartial(context.metadata);
      const transfers = metadata.transfers;
      const now = deps.now ?? Date.now;
      const deadlines = new ProgressDeadlines(deps.deadlines ?? DEFAULT_PROGRESS_DEADLINES, now);
      const hostStates = new Map<string, Host_State>();
      let lastHostCheck = Number.NEGATIVE_INFINITY;
      let lastCheckpoint = 0;
      const save = async (force: boolean): Promise<void> => {
        if (!force && performance.now() - lastCheckpoint < METADATA_INTERVAL_MS) return;
        lastCheckpoint = performance.now();
        metadata.hostsDone = transfers.filter((transfer) => transfer.state === ImageReplica_State.STATE_AVAILABLE).length;
        metadata.hostsFailed = transfers.filter((transfer) => transfer.state === ImageReplica_State.STATE_FAILED).length;
        metadata.updateTime = new Date();
        await context.checkpoint({ metadata: DistributeImageMetadata.fromPartial(metadata) });
      };
      const fail = (transfer: HostTransfer, error: Status): void => {
        transfer.state = ImageReplica_State.STATE_FAILED;
        transfer.error = error;
        transfer.deadlineTime = undefined;
        deadlines.forget(transfer.host);
      };
      /** Reads the hosts' states from inventory, at most every hostCheckIntervalMs; keeps the last on errors. */
      const checkHosts = async (): Promise<void> => {
        if (now() - lastHostCheck < (deps.hostCheckIntervalMs ?? 2_000)) return;
        lastHostCheck = now();
        try {
          const pending = new Set(transfers.filter((transfer) => !isFinal(transfer)).map((transfer) => transfer.host));
          const hosts = pending.size <= 20 ? await Promise.all([...pending].map((name) => deps.inventory.getHost(name))) : await deps.inventory.listHosts();
          for (const host of hosts) if (host && pending.has(host.name)) hostStates.set(host.name, host.state);
        } catch (error) {
          context.log.debug({ err: error }, 'could not read the hosts from inventory; keeping their last states');
        }
      };
      const webSeedUrls = await currentWebSeeds(deps, id, context.log);

      try {
        // 1. Ask every agent that is not done yet.
        await mapLimited(
          transfers.filter((transfer) => !isFinal(transfer)),
          FETCH_CONCURRENCY,
          async (transfer) => {
            if (context.cancelRequested()) return;
            const hostId = hostIdOf(transfer);
            const existing = (await deps.replicas.get(`${hostId}.${id}`))?.value;
            const markAvailable = () => {
              transfer.state = ImageReplica_State.STATE_AVAILABLE;
              transfer.progress = TransferProgress.fromPartial({ bytesDone: metadata.bytesTotal, bytesTotal: metadata.bytesTotal });
            };
            const host = await deps.inventory.getHost(transfer.host);
            if (!host)
              return fail(
                transfer,
                failure(GrpcStatus.NOT_FOUND, `${transfer.host} was removed from the inventory`, ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND, {
                  host: transfer.host,
                }),
              );
            // A record that says AVAILABLE is not enough while the agent can be asked: only the agent checks that
            // the files are still the ones it verified (a damaged copy must not be answered AVAILABLE).
            if (host.state === Host_State.STATE_UNREACHABLE && existing?.state === ImageReplica_State.STATE_AVAILABLE) return markAvailable();
            if (host.state === Host_State.STATE_UNREACHABLE)
              return fail(
                transfer,
                failure(GrpcStatus.UNAVAILABLE, `${transfer.host} is UNREACHABLE`, ErrorReason.ERROR_REASON_HOST_UNREACHABLE, { host: transfer.host }),
              );
            if (host.state === Host_State.STATE_DRAINING || host.draining)
              return fail(
                transfer,
                failure(GrpcStatus.FAILED_PRECONDITION, `${transfer.host} is DRAINING`, ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT, {
                  host: transfer.host,
                }),
              );
            try {
              const replica = await call<ImageReplica>((cb) =>
                deps.agents.clientFor(host).fetchImage({ image, trackerAnnounceUrl: deps.trackerAnnounceUrl, webSeedUrls, operation: context.name }, cb),
              );
              await deps.replicas.mutate(`${hostId}.${id}`, (current) => {
                // A newer generation already recorded (the agent's events overtook this answer) stays; so does an
                // AVAILABLE record the agent confirms. An agent that found damage behind an AVAILABLE record wins.
                if (current && Number(current.generation) > Number(replica.generation)) return undefined;
                if (current?.state === ImageReplica_State.STATE_AVAILABLE && replica.state === ImageReplica_State.STATE_AVAILABLE) return undefined;
                return ImageReplica.fromPartial({
                  ...replica,
                  image: imageNameOfKey(id),
                  imageVersion: imageVersionNameOfKey(id),
                  error: undefined,
                  createTime: current?.createTime ?? replica.createTime,
                  updateTime: new Date(),
                });
              });
              if (replica.state === ImageReplica_State.STATE_AVAILABLE) return markAvailable();
              transfer.state = replica.state;
              if (replica.progress) transfer.progress = replica.progress;
            } catch (error) {
              fail(transfer, toStatus(relayServiceError(error, transfer.host)));
            }
          },
        );
        await save(true);

        // 2. Follow the replica records until every host is done or failed: a KV watch (every change, in
        // order; a list under concurrent writes can miss keys), read every second.
        const records = new Map<string, ImageReplica | null>();
        const stopWatching = await deps.replicas.watch(
          `*.${id}`,
          (change) => records.set(HOST_NAME.format({ host: change.key.slice(0, change.key.lastIndexOf('.')) }), change.value ?? null),
          true,
        );
        try {
          while (!transfers.every(isFinal)) {
            if (context.cancelRequested())
              throw new CowherdError(GrpcStatus.CANCELLED, 'operation cancelled by request', { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT });
            await new Promise((resolve) => setTimeout(resolve, deps.pollIntervalMs ?? 1000));
            await readImage();
            await checkHosts();
            let changed = false;
            for (const transfer of transfers) {
              if (isFinal(transfer)) continue;
              const record = records.get(transfer.host);
              const before = transfer.state;
              const wasUnreachable = transfer.hostUnreachable;
              let verdict: StepVerdict | undefined;
              if (record === undefined) {
                // Not seen yet (the watch is catching up): the deadline covers a record that never comes.
                verdict = deadlines.silent(transfer.host);
              } else if (record === null) {
                fail(
                  transfer,
                  failure(GrpcStatus.ABORTED, `the replica on ${transfer.host} was deleted during the distribution`, ErrorReason.ERROR_REASON_TRANSFER_FAILED, {
                    host: transfer.host,
                  }),
                );
              } else if (record.state === ImageReplica_State.STATE_AVAILABLE) {
                transfer.state = ImageReplica_State.STATE_AVAILABLE;
                transfer.progress = TransferProgress.fromPartial({
                  ...record.progress,
                  bytesDone: metadata.bytesTotal,
                  bytesTotal: metadata.bytesTotal,
                  rateBytesPerSecond: '0',
                  eta: { seconds: '0', nanos: 0 },
                });
                transfer.hostUnreachable = false;
                transfer.deadlineTime = undefined;
                deadlines.forget(transfer.host);
              } else if (record.state === ImageReplica_State.STATE_FAILED) {
                fail(transfer, record.error ?? failure(GrpcStatus.UNKNOWN, `the replica on ${transfer.host} failed`, ErrorReason.ERROR_REASON_TRANSFER_FAILED));
              } else {
                transfer.state = record.state;
                if (record.progress) transfer.progress = record.progress;
                verdict = deadlines.observe(transfer.host, {
                  stage: stageOf(record.state),
                  bytesDone: Number(record.progress?.bytesDone ?? 0),
                  bytesTotal: Number(metadata.bytesTotal),
                });
              }
              if (verdict) {
                const unreachable = hostStates.get(transfer.host) === Host_State.STATE_UNREACHABLE;
                transfer.hostUnreachable = unreachable;
                // Nobody measures an unreachable host's rate, peers or ETA: show only what it held.
                if (unreachable)
                  transfer.progress = TransferProgress.fromPartial({
                    bytesDone: transfer.progress?.bytesDone ?? '0',
                    bytesTotal: transfer.progress?.bytesTotal ?? metadata.bytesTotal,
                  });
                transfer.deadlineTime = new Date(Date.now() + (verdict.deadline - now()));
                if (verdict.expired) fail(transfer, missedDeadline(transfer, verdict, unreachable));
              }
              if (transfer.hostUnreachable !== wasUnreachable) changed = true;
              if (transfer.state !== before) changed = true;
            }
            await save(changed);
          }
        } finally {
          stopWatching();
        }
        await save(true);
      } catch (error) {
        if (context.cancelRequested())
          await abandon(
            deps,
            transfers.filter((transfer) => !isFinal(transfer)),
            id,
            context.log,
          );
        throw error;
      }

      const available: ImageReplica[] = [];
      for (const transfer of transfers) {
        if (transfer.state !== ImageReplica_State.STATE_AVAILABLE) continue;
        const replica = (await deps.replicas.get(`${hostIdOf(transfer)}.${id}`))?.value;
        if (replica) available.push(replica);
      }
      return DistributeImageResponse.fromPartial({
        replicas: available,
        failures: transfers
          .filter((transfer) => transfer.state === ImageReplica_State.STATE_FAILED)
          .map((transfer) => ({ host: transfer.host, status: transfer.error })),
      });
    },
  };
}

/**
 * The web seed URLs of the image's origin replicas, asked of their agents (a restarted agent may serve on
 * another port than its record says); the record's URL when the agent does not answer.
 */
async function currentWebSeeds(deps: DistributeDeps, id: string, log: Logger): Promise<string[]> {
  const origins = (await deps.replicas.list(`*.${id}`))
    .map((entry) => entry.value)
    .filter((replica) => replica.origin && replica.state === ImageReplica_State.STATE_AVAILABLE);
  const urls: string[] = [];
  for (const replica of origins) {
    try {
      const host = await deps.inventory.getHost(replica.host);
      const live = host ? await call<ImageReplica>((cb) => deps.agents.clientFor(host).getImageReplica({ name: replica.name }, cb)) : undefined;
      if (live?.webSeedUrl) urls.push(live.webSeedUrl);
      else if (replica.webSeedUrl) urls.push(replica.webSeedUrl);
    } catch (error) {
      log.debug({ err: error, replica: replica.name }, 'could not ask the origin for its web seed; using the record');
      if (replica.webSeedUrl) urls.push(replica.webSeedUrl);
    }
  }
  return urls;
}

/** After a cancel: the agents stop and remove the replicas that were not done. */
async function abandon(deps: DistributeDeps, transfers: readonly HostTransfer[], id: string, log: Logger): Promise<void> {
  await mapLimited(transfers, FETCH_CONCURRENCY, async (transfer) => {
    const hostId = hostIdOf(transfer);
    try {
      const host = await deps.inventory.getHost(transfer.host);
      if (host) await call((cb) => deps.agents.clientFor(host).deleteImageReplica({ name: HOST_IMAGE_NAME.format({ host: hostId, image: id }) }, cb));
      const current = await deps.replicas.get(`${hostId}.${id}`);
      if (current && current.value.state !== ImageReplica_State.STATE_AVAILABLE) await deps.replicas.delete(`${hostId}.${id}`, current.revision);
    } catch (error) {
      log.warn({ err: error, host: transfer.host }, 'could not remove a partial replica after the cancel');
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Replica records from the agents' events

type TransferEvent = ImageTransferProgress | ImageAvailable | ImageTransferFailed | ImageReplicaDamaged | ImageReadProfile;

/**
 * Keeps KV `replicas` in step with what agents report, on a durable consumer shared by the service's
 * replicas (each event is applied once, in stream order). Progress is written at most every
 * {@link METADATA_INTERVAL_MS} per replica; states at once. Events about a replica that no longer has a
 * record (deleted) or about an image that is gone are dropped, except image.available for a catalog image,
 * which (re)creates the record: the agent holds a verified copy.
 */
export async function followReplicaEvents(
  js: JetStreamClient,
  manager: JetStreamManager,
  deps: Pick<DistributeDeps, 'images' | 'replicas'>,
  log: Logger,
): Promise<EventConsumer> {
  return consumeEvents<TransferEvent>(js, manager, {
    durable: 'distribution-replica-events',
    types: [IMAGE_TRANSFER_PROGRESS, IMAGE_AVAILABLE, IMAGE_TRANSFER_FAILED, IMAGE_REPLICA_DAMAGED, IMAGE_READ_PROFILE] as never,
    log,
    handle: async (event: ReceivedEvent<TransferEvent>) => applyReplicaEvent(deps, event, log),
  });
}

/** Applies one agent event to the replica record (exported for tests). */
export async function applyReplicaEvent(deps: Pick<DistributeDeps, 'images' | 'replicas'>, event: ReceivedEvent<TransferEvent>, log: Logger): Promise<void> {
  const payload = event.payload;
  const id = IMAGE_NAME.parse(payload.image)?.image;
  // The subject's host token is what NATS vouched for; the payload must agree with it.
  if (!id || HOST_NAME.parse(payload.host)?.host !== event.host) {
    log.warn({ subject: event.subject, image: payload.image, host: payload.host }, 'transfer event names another host or no image: dropped');
    return;
  }
  const key = `${event.host}.${id}`;
  const now = new Date();
  if (event.typeName === IMAGE_READ_PROFILE.typeName) {
    // The first profile of a version is kept: it is what a clone of it reads while it boots, the same on every host.
    const profile = (payload as ImageReadProfile).profile;
    if (!profile || profile.pieces.length === 0) return;
    // Only an ordering hint (every piece is verified whatever the order), but bounded: indices of this torrent, once each.
    await deps.images.mutate(id, (current) => {
      if (!current || current.readProfile || current.state === Image_State.STATE_DELETING) return undefined;
      const count = current.torrent?.pieceCount ?? 0;
      const pieces = [...new Set(profile.pieces)].filter((piece) => piece < count);
      if (pieces.length === 0) return undefined;
      return { ...current, readProfile: ReadProfile.fromPartial({ ...profile, pieces, host: payload.host }) };
    });
    log.info({ image: payload.image, host: payload.host, pieces: profile.pieces.length }, 'read profile recorded');
    return;
  }
  if (event.typeName === IMAGE_AVAILABLE.typeName) {
    const available = payload as ImageAvailable;
    const image = (await deps.images.get(id))?.value;
    if (!image || image.state === Image_State.STATE_DELETING) return;
    await deps.replicas.mutate(key, (current) => {
      if (current?.state === ImageReplica_State.STATE_DELETING) return undefined;
      // A late copy (redelivered, or stored twice after an outage longer than the duplicate window) of an earlier
      // availability must not undo what came after it: a newer generation, or damage found in this generation.
      const generation = Number(available.generation);
      if (current && generation > 0 && Number(current.generation) > generation) return undefined;
      if (
        current?.state === ImageReplica_State.STATE_FAILED &&
        Number(current.generation) === generation &&
        current.updateTime &&
        available.occurTime &&
        available.occurTime.getTime() <= current.updateTime.getTime()
      )
        return undefined;
      return ImageReplica.fromPartial({
        ...current,
        ...(generation > 0 ? { generation: available.generation } : {}),
        name: HOST_IMAGE_NAME.format({ host: event.host, image: id }),
        image: imageNameOfKey(id),
        imageVersion: imageVersionNameOfKey(id),
        host: payload.host,
        state: ImageReplica_State.STATE_AVAILABLE,
        progress: TransferProgress.fromPartial({ bytesDone: available.totalBytes, bytesTotal: available.totalBytes }),
        error: undefined,
        origin: current?.origin ?? available.origin,
        createTime: current?.createTime ?? now,
        updateTime: now,
      });
    });
    return;
  }
  // A redelivered event (a handler failed, or a killed replica held it) can come after later ones: once a
  // record is AVAILABLE, only events that happened after it became so may move it back (the agent found the
  // files changed and fetches them again).
  const stale = (current: ImageReplica, occurred: Date | undefined): boolean =>
    current.state === ImageReplica_State.STATE_AVAILABLE &&
    (occurred === undefined || current.updateTime === undefined || occurred.getTime() <= current.updateTime.getTime());
  if (event.typeName === IMAGE_REPLICA_DAMAGED.typeName) {
    // A verified replica found damaged (agent scrub or check): FAILED until a DistributeImage repairs it. A
    // damaged generation that domains use stays on the host beside the repaired one: the record lists it.
    const damaged = payload as ImageReplicaDamaged;
    const status = failure(
      GrpcStatus.DATA_LOSS,
      `${damaged.replica}: ${damaged.damagedFiles.join(', ')} damaged after verification (${damaged.badPieces} bad pieces)`,
      ErrorReason.ERROR_REASON_VERIFICATION_FAILED,
      { files: damaged.damagedFiles.join(','), badPieces: String(damaged.badPieces), path: damaged.path },
    );
    await deps.replicas.mutate(key, (current) => {
      if (
        !current ||
        current.state === ImageReplica_State.STATE_DELETING ||
        (current.updateTime &&
          damaged.occurTime &&
          damaged.occurTime.getTime() < current.updateTime.getTime() &&
          Number(current.generation) > Number(damaged.generation))
      )
        return undefined;
      const kept =
        damaged.dependentVirtualMachines.length > 0
          ? [
              ...current.damagedGenerations.filter((entry) => entry.generation !== damaged.generation),
              {
                generation: damaged.generation,
                path: damaged.path,
                damagedFiles: damaged.damagedFiles,
                badPieces: damaged.badPieces,
                dependentVirtualMachines: damaged.dependentVirtualMachines,
                damageTime: damaged.occurTime,
              },
            ]
          : current.damagedGenerations;
      return { ...current, state: ImageReplica_State.STATE_FAILED, error: status, damagedGenerations: kept, updateTime: now };
    });
    return;
  }
  if (event.typeName === IMAGE_TRANSFER_FAILED.typeName) {
    const failed = payload as ImageTransferFailed;
    await deps.replicas.mutate(key, (current) =>
      current && current.state !== ImageReplica_State.STATE_DELETING && !stale(current, failed.occurTime)
        ? { ...current, state: ImageReplica_State.STATE_FAILED, ...(failed.status ? { error: failed.status } : {}), updateTime: now }
        : undefined,
    );
    return;
  }
  const progress = payload as ImageTransferProgress;
  await deps.replicas.mutate(key, (current) => {
    if (!current || current.state === ImageReplica_State.STATE_DELETING || stale(current, progress.occurTime)) return undefined;
    const sameState = current.state === progress.state;
    if (sameState && current.updateTime && now.getTime() - current.updateTime.getTime() < METADATA_INTERVAL_MS) return undefined;
    return { ...current, state: progress.state, ...(progress.progress ? { progress: progress.progress } : {}), error: undefined, updateTime: now };
  });
}
