/**
 * Placement: which host each clone of a request goes to. Pure functions over host names; choosing the
 * eligible hosts (READY, right hypervisor, holding a replica) is the caller's job.
 */
import { CowherdError } from '../common/platform/errors.js';

const MAX_FIELD = 'placement.max_clones_per_host';

/**
 * STRATEGY_HOSTS: clone i (1-based) goes to hosts[(i - 1) mod n]; with a per-host limit, hosts that are
 * full are skipped and the rotation goes on. Returns the host of each clone in index order.
 */
export function placeRoundRobin(hosts: readonly string[], count: number, maxClonesPerHost: number): string[] {
  checkRoom(hosts.length, count, maxClonesPerHost);
  const taken = new Map<string, number>();
  const placed: string[] = [];
  let next = 0;
  while (placed.length < count) {
    const host = hosts[next % hosts.length]!;
    next += 1;
    if (maxClonesPerHost > 0 && (taken.get(host) ?? 0) >= maxClonesPerHost) continue;
    taken.set(host, (taken.get(host) ?? 0) + 1);
    placed.push(host);
  }
  return placed;
}

/**
 * STRATEGY_WHERE_IMAGE_IS: every clone goes to the preferred host (one with an AVAILABLE replica) with the
 * fewest clones so far, ties broken by name; once every preferred host is full (or when there is none) the
 * rest go the same way over the overflow hosts (READY hosts of the hypervisor without a replica).
 */
export function placeSpread(preferred: readonly string[], overflow: readonly string[], count: number, maxClonesPerHost: number): string[] {
  const overflowOnly = overflow.filter((host) => !preferred.includes(host));
  // Without a limit, overflow hosts are used only when no host holds the image at all.
  const usable = maxClonesPerHost > 0 || preferred.length === 0 ? preferred.length + overflowOnly.length : preferred.length;
  checkRoom(usable, count, maxClonesPerHost);
  const groups = [[...preferred].sort(), [...overflowOnly].sort()];
  const taken = new Map<string, number>();
  const placed: string[] = [];
  while (placed.length < count) {
    let best: string | undefined;
    for (const group of groups) {
      for (const host of group) {
        const load = taken.get(host) ?? 0;
        if (maxClonesPerHost > 0 && load >= maxClonesPerHost) continue;
        if (best === undefined || load < (taken.get(best) ?? 0)) best = host;
      }
      if (best !== undefined) break;
    }
    taken.set(best!, (taken.get(best!) ?? 0) + 1);
    placed.push(best!);
  }
  return placed;
}

function checkRoom(hostCount: number, count: number, maxClonesPerHost: number): void {
  if (hostCount === 0) throw new Error('placement needs at least one host');
  if (maxClonesPerHost > 0 && hostCount * maxClonesPerHost < count) {
    throw CowherdError.invalidArgument(
      MAX_FIELD,
      `leaves room for ${hostCount * maxClonesPerHost} clones on ${hostCount} eligible host(s), fewer than count ${count}`,
    );
  }
}
