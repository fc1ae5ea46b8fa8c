/**
 * CollectImageGarbage: the retention policy, on request and every COWHERD_GARBAGE_INTERVAL.
 *
 * - Per image: the versions beyond the newest keep_versions (the head's, or COWHERD_KEEP_IMAGE_VERSIONS) are
 *   deleted (record and every replica, through deletion.ts deleteVersion), except the latest, versions an alias
 *   points at, versions PUBLISHING or DELETING, and versions any VM stands on (inventory: the VMs' lineage, and
 *   the replica records' dependents). Versions are ranked by number among the records that exist.
 * - Per host: when (image_directory_total_bytes - image_directory_free_bytes) / total is above the host's
 *   image_directory_high_watermark_percent (> 0), replicas are removed least recently used first (last_use_time,
 *   else update_time, else create_time) until the estimated use (each removed replica's file sizes subtracted) is
 *   at or below the watermark. Only replicas that are not origin, AVAILABLE or FAILED (never one transferring),
 *   without dependents, and not the last AVAILABLE replica of their version.
 *
 * Never a replica with dependents: candidates are chosen without any, and deleteReplica checks the inventory and
 * the record again right before the agent (which checks its own domains as well) removes the files.
 */
import type { CollectImageGarbageRequest, CollectImageGarbageResponse } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { Image_State, ImageReplica_State, type Host, type ImageReplica } from '../gen/cowherd/inventory/v1/resources.js';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { call } from '../common/platform/client.js';
import { CowherdError, relayServiceError, toStatus } from '../common/platform/errors.js';
import type { Logger } from '../common/platform/logger.js';
import { DEFAULT_KEEP_VERSIONS, resolveVersionNumber } from '../common/domain/image-versions.js';
import { HOST_IMAGE_NAME, HOST_NAME, imageVersionNameOfKey, parseImageKey, parseImageReference } from '../common/domain/resource-names.js';
import { deleteReplica, deleteVersion, imageBytes, refuseVersionDependents, versionDependents, type DeletionDeps } from './deletion.js';
import { groupVersions } from './image-heads.js';

/** What garbage collection reads and writes. */
export interface GarbageDeps extends DeletionDeps {
  readonly inventory: DeletionDeps['inventory'] & { listHosts(): Promise<Host[]> };
  /** keep_versions of images whose head says 0 (COWHERD_KEEP_IMAGE_VERSIONS). */
  readonly defaultKeepVersions?: number;
}

type HostFailure = CollectImageGarbageResponse['failures'][number];

/** The time a replica was last used, for least-recently-used order. */
function lastUse(replica: ImageReplica): number {
  return (replica.lastUseTime ?? replica.updateTime ?? replica.createTime)?.getTime() ?? 0;
}

/** The replica's record with the agent's last use and dependents; undefined when the agent no longer has it. */
async function liveReplica(deps: GarbageDeps, host: Host, replica: ImageReplica): Promise<ImageReplica | undefined> {
  try {
    const answer = await call<ImageReplica>((cb) => deps.agents.clientFor(host).getImageReplica({ name: replica.name }, cb));
    return {
      ...replica,
      lastUseTime: answer.lastUseTime ?? replica.lastUseTime,
      dependentVirtualMachines: [...new Set([...replica.dependentVirtualMachines, ...answer.dependentVirtualMachines])],
    };
  } catch (error) {
    if ((error as { code?: number }).code === GrpcStatus.NOT_FOUND) return undefined;
    throw error;
  }
}

/** CollectImageGarbage: see the module comment. */
export async function collectImageGarbage(deps: GarbageDeps, request: CollectImageGarbageRequest): Promise<CollectImageGarbageResponse> {
  const only = new Set<string>();
  for (const [index, name] of request.images.entries()) {
    const reference = name.split('/').length === 2 ? parseImageReference(name) : undefined;
    if (!reference) throw CowherdError.invalidArgument(`images[${index}]`, 'must be images/{image}');
    only.add(reference.id);
  }
  const wanted = (id: string): boolean => only.size === 0 || only.has(id);
  const failures: HostFailure[] = [];
  const versions: string[] = [];
  const removedReplicas: ImageReplica[] = [];
  let freed = 0;

  // 1. Per image: versions beyond keep_versions.
  const records = await deps.images.list();
  const byKey = new Map(records.map((entry) => [entry.key, entry.value]));
  const collectedKeys = new Set<string>();
  for (const [id, list] of groupVersions(records)) {
    if (!wanted(id)) continue;
    const head = (await deps.heads.get(id))?.value;
    const keep = head && head.keepVersions > 0 ? head.keepVersions : (deps.defaultKeepVersions ?? DEFAULT_KEEP_VERSIONS);
    const latest = resolveVersionNumber({ id }, head);
    const aliased = new Set(Object.values(head?.aliases ?? {}).map(Number));
    const newestFirst = [...list].sort((a, b) => b.version - a.version);
    for (const entry of newestFirst.slice(keep)) {
      const state = entry.record.value.state;
      if (entry.version === latest || aliased.has(entry.version)) continue;
      if (state === Image_State.STATE_PUBLISHING || state === Image_State.STATE_DELETING) continue;
      try {
        await refuseVersionDependents(deps, entry.key);
      } catch {
        continue; // in use (IMAGE_IN_USE): kept
      }
      const replicas = (await deps.replicas.list(`*.${entry.key}`)).map((item) => item.value);
      if (!request.validateOnly) {
        try {
          await deleteVersion(deps, entry.key);
        } catch (error) {
          failures.push({ host: replicas[0]?.host ?? '', status: toStatus(error) });
          continue;
        }
      }
      versions.push(imageVersionNameOfKey(entry.key));
      collectedKeys.add(entry.key);
      freed += imageBytes(entry.record.value) * replicas.length;
    }
  }

  // 2. Per host: the high watermark.
  const hosts = await deps.inventory.listHosts();
  const allReplicas = (await deps.replicas.list()).map((entry) => entry.value);
  const keyOf = (replica: ImageReplica): string => HOST_IMAGE_NAME.parse(replica.name)?.image ?? '';
  const availableCount = new Map<string, number>();
  for (const replica of allReplicas)
    if (replica.state === ImageReplica_State.STATE_AVAILABLE) availableCount.set(keyOf(replica), (availableCount.get(keyOf(replica)) ?? 0) + 1);
  for (const host of hosts) {
    const watermark = host.imageDirectoryHighWatermarkPercent;
    const total = Number(host.imageDirectoryTotalBytes);
    if (!(watermark > 0) || !(total > 0)) continue;
    let used = total - Number(host.imageDirectoryFreeBytes);
    const limit = (watermark / 100) * total;
    if (used <= limit) continue;
    const hostId = HOST_NAME.parse(host.name)?.host;
    if (!hostId) continue;
    const recorded = allReplicas
      .filter((replica) => HOST_NAME.parse(replica.host)?.host === hostId)
      .filter((replica) => {
        const key = keyOf(replica);
        const id = parseImageKey(key)?.id;
        return (
          id !== undefined &&
          wanted(id) &&
          !collectedKeys.has(key) &&
          !replica.origin &&
          (replica.state === ImageReplica_State.STATE_AVAILABLE || replica.state === ImageReplica_State.STATE_FAILED)
        );
      });
    // The agent knows when each replica was last used and which of its domains stand on it (the records keep
    // what the agent said when the replica arrived): ask it, and leave the host alone when it does not answer.
    let live: ImageReplica[];
    try {
      live = (await Promise.all(recorded.map((replica) => liveReplica(deps, host, replica)))).filter(
        (replica): replica is ImageReplica => replica !== undefined,
      );
    } catch (error) {
      failures.push({ host: host.name, status: toStatus(relayServiceError(error, host.name)) });
      continue;
    }
    const candidates = live.filter((replica) => replica.dependentVirtualMachines.length === 0).sort((a, b) => lastUse(a) - lastUse(b));
    for (const replica of candidates) {
      if (used <= limit) break;
      const key = keyOf(replica);
      if (replica.state === ImageReplica_State.STATE_AVAILABLE && (availableCount.get(key) ?? 0) <= 1) continue;
      if ((await versionDependents(deps, host.name, key)).length > 0) continue;
      if (!request.validateOnly) {
        try {
          // Checks the dependents (inventory and record) and the last AVAILABLE copy again, then the agent removes it.
          await deleteReplica(deps, replica.name, { allowLast: false });
        } catch (error) {
          failures.push({ host: host.name, status: toStatus(error) });
          continue;
        }
      }
      if (replica.state === ImageReplica_State.STATE_AVAILABLE) availableCount.set(key, (availableCount.get(key) ?? 1) - 1);
      const bytes = imageBytes(byKey.get(key));
      used -= bytes;
      freed += bytes;
      removedReplicas.push(replica);
    }
  }
  return { versions, replicas: removedReplicas, failures, freedBytes: String(freed) };
}

/** Runs garbage collection every `intervalMs` (0: never); a run's failure is logged and the next one comes. */
export function startGarbageTimer(deps: GarbageDeps, intervalMs: number, log: Logger): { stop(): void } {
  if (intervalMs <= 0) return { stop: () => undefined };
  let running = false;
  const timer = setInterval(() => {
    if (running) return;
    running = true;
    collectImageGarbage(deps, { images: [], validateOnly: false })
      .then((result) => {
        if (result.versions.length > 0 || result.replicas.length > 0 || result.failures.length > 0)
          log.info(
            {
              versions: result.versions,
              replicas: result.replicas.map((replica) => replica.name),
              failures: result.failures.length,
              freedBytes: result.freedBytes,
            },
            'garbage collection removed images',
          );
      })
      .catch((error: unknown) => log.warn({ err: error }, 'garbage collection failed; retrying at the next interval'))
      .finally(() => {
        running = false;
      });
  }, intervalMs);
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
