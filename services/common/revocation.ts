/**
 * Revoked serials as every server sees them. A process follows the CA's revocation list: it fetches it at
 * start, every 30 seconds, and at once when a certificate.revoked event arrives, so a revoked certificate
 * is refused everywhere within 30 seconds at worst and usually within a second.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import type { Logger } from './logger.js';
import type { RevocationCheck } from './rpc.js';
import { EVENT_SUBJECT_PREFIX } from './events.js';

/** How often the list is fetched without an event. The docs promise this bound. */
export const REVOCATION_REFRESH_MS = 30_000;

/** A set of revoked serials (lowercase hex without leading zeros). */
export class RevocationSet implements RevocationCheck {
  private serials: ReadonlySet<string> = new Set();
  /** Serials added locally: a fetch that started before their revocation was stored must not drop them. */
  private readonly added = new Set<string>();

  isRevoked(serialNumber: string): boolean {
    return this.serials.has(serialNumber);
  }

  /** Adds one serial at once (the CA, for a revocation it just recorded). */
  add(serialNumber: string): void {
    this.added.add(serialNumber);
    this.serials = new Set([...this.serials, serialNumber]);
  }

  /** Replaces the whole set (a fresh list from the CA). */
  replace(serialNumbers: Iterable<string>): void {
    this.serials = new Set([...serialNumbers, ...this.added]);
  }

  get size(): number {
    return this.serials.size;
  }
}

/** Options of {@link followRevocations}. */
export interface FollowOptions {
  readonly set: RevocationSet;
  /** Fetches the current list (GetRevocationList, or the CA's own store). */
  readonly fetch: () => Promise<readonly string[]>;
  readonly log: Logger;
  /** Core NATS subscription to certificate.revoked events for immediate refreshes. */
  readonly nats?: NatsConnection;
  readonly intervalMs?: number;
  /** How long start-up waits for the first list. Default 3 s. */
  readonly firstFetchTimeoutMs?: number;
}

/** Keeps `set` current until the returned function is called. */
export async function followRevocations(options: FollowOptions): Promise<() => void> {
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const refresh = rerunning(async () => {
    try {
      options.set.replace(await options.fetch());
    } catch (error) {
      options.log.warn({ err: error }, 'could not refresh the revocation list; keeping the last one');
    }
  });
  const schedule = (): void => {
    if (stopped) return;
    timer = setTimeout(() => void refresh().finally(schedule), options.intervalMs ?? REVOCATION_REFRESH_MS);
  };
  // Wait for the first list, but not forever: a process must come up while the CA is down. Until the
  // first answer it knows no revocations (logged); the 30 s refresh keeps trying.
  const first = refresh();
  await Promise.race([first, new Promise((resolve) => setTimeout(resolve, options.firstFetchTimeoutMs ?? 3_000).unref())]);
  schedule();
  const subscription = options.nats?.subscribe(`${EVENT_SUBJECT_PREFIX}.certificate.revoked.>`, { callback: () => void refresh() });
  return () => {
    stopped = true;
    clearTimeout(timer);
    subscription?.unsubscribe();
  };
}

/**
 * Wraps `task` so that calls while it runs do not start a second copy but one more run after it: a
 * refresh asked for during a fetch may be caused by a change that fetch did not see, so sharing its
 * answer would lose the change. The returned promise settles when no run is pending.
 */
export function rerunning(task: () => Promise<void>): () => Promise<void> {
  let running: Promise<void> | undefined;
  let again = false;
  return () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      do {
        again = false;
        await task();
      } while (again);
    })().finally(() => {
      running = undefined;
    });
    return running;
  };
}
