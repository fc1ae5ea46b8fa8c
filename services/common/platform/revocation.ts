/**
 * Revoked and issued serials as every server sees them. A process follows the CA's revocation list: it
 * fetches it at start, every 30 seconds, and at once when a certificate.revoked event arrives, so a revoked
 * certificate is refused everywhere within 30 seconds at worst and usually within a second.
 *
 * It follows the CA's list of issued serials the same way (at start and every 30 seconds), so that a
 * certificate signed with the CA key but never issued by the CA is refused as NATS refuses it. A serial the
 * list lacks is looked up again before it is refused (a fresh fetch that starts after the call arrived, at
 * most one fetch a second whatever the number of unknown callers), so a certificate issued a moment ago is
 * accepted at once. When that fetch fails the call is refused UNAVAILABLE (retryable), never admitted: the
 * check fails closed.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import type { Logger } from './logger.js';
import type { IssuedCheck, RevocationCheck } from './rpc.js';
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

/** How often the issued list is fetched without a miss. The same bound as revocation. */
export const ISSUED_REFRESH_MS = REVOCATION_REFRESH_MS;
/** Fetches caused by unknown serials start at most this often: a flood of forged certificates costs the CA one list a second. */
export const ISSUED_MISS_REFRESH_MIN_MS = 1_000;
/** How long a call with an unknown serial waits for the fresh list before it is refused UNAVAILABLE. */
export const ISSUED_LOOKUP_TIMEOUT_MS = 5_000;

/**
 * The serials the CA has issued (lowercase hex without leading zeros), with a fresh lookup on a miss once
 * {@link followIssuedSerials} has connected it to a source.
 */
export class IssuedSerials implements IssuedCheck {
  private serials: ReadonlySet<string> = new Set();
  /** Serials added locally (the CA, for what it just issued): a fetch that started earlier must not drop them. */
  private readonly added = new Set<string>();
  /** When the newest successful fetch started (ms since epoch); 0 before the first. */
  private freshSince = 0;
  private refreshAfter: ((time: number) => Promise<void>) | undefined;

  /** True when the serial is in the list held now (no lookup). */
  has(serialNumber: string): boolean {
    return this.serials.has(serialNumber);
  }

  /**
   * True when the CA issued the serial, false when a list fetched after this call arrived lacks it,
   * undefined when no such list could be had within `timeoutMs` (the CA did not answer).
   */
  async isIssued(serialNumber: string, timeoutMs = ISSUED_LOOKUP_TIMEOUT_MS): Promise<boolean | undefined> {
    if (this.serials.has(serialNumber)) return true;
    const asked = Date.now();
    if (this.refreshAfter) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.refreshAfter(asked), new Promise((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
      clearTimeout(timer);
    }
    if (this.serials.has(serialNumber)) return true;
    return this.freshSince >= asked ? false : undefined;
  }

  /** Adds one serial at once (the CA, for a certificate it just issued). */
  add(serialNumber: string): void {
    this.added.add(serialNumber);
    this.serials = new Set([...this.serials, serialNumber]);
  }

  /** Replaces the whole set with a list whose fetch started at `fetchStarted`. */
  replace(serialNumbers: Iterable<string>, fetchStarted = Date.now()): void {
    this.serials = new Set([...serialNumbers, ...this.added]);
    this.freshSince = Math.max(this.freshSince, fetchStarted);
  }

  /** Connects the set to its source: `refresh(time)` settles once a fetch that started at or after `time` ended. */
  connect(refresh: ((time: number) => Promise<void>) | undefined): void {
    this.refreshAfter = refresh;
  }

  get size(): number {
    return this.serials.size;
  }
}

/** Options of {@link followIssuedSerials}. */
export interface FollowIssuedOptions {
  readonly set: IssuedSerials;
  /** Fetches the current list (GetIssuedSerialList, or the CA's own records). */
  readonly fetch: () => Promise<readonly string[]>;
  readonly log: Logger;
  readonly intervalMs?: number;
  /** Smallest gap between the starts of two fetches. Default {@link ISSUED_MISS_REFRESH_MIN_MS}. */
  readonly minIntervalMs?: number;
  /** How long start-up waits for the first list. Default 3 s. */
  readonly firstFetchTimeoutMs?: number;
}

/** Keeps `set` current (and answers its misses) until the returned function is called. */
export async function followIssuedSerials(options: FollowIssuedOptions): Promise<() => void> {
  const minIntervalMs = options.minIntervalMs ?? ISSUED_MISS_REFRESH_MIN_MS;
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  let lastStart = 0;
  let current: { start: number; done: Promise<void> } | undefined;
  let next: Promise<void> | undefined;
  const fetchOnce = async (): Promise<void> => {
    const start = Date.now();
    lastStart = start;
    try {
      options.set.replace(await options.fetch(), start);
    } catch (error) {
      options.log.warn({ err: error }, 'could not refresh the list of issued certificates; keeping the last one');
    }
  };
  // A fetch that started at or after `time` answers for it; otherwise one more is queued after the running
  // one, no sooner than minIntervalMs after the last start, and shared by every caller that waits meanwhile.
  const refreshAfter = (time: number): Promise<void> => {
    if (current && current.start >= time) return current.done;
    if (next) return next;
    const previous = current?.done;
    next = (async () => {
      await previous;
      const wait = lastStart + minIntervalMs - Date.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait).unref());
      const started = { start: Date.now(), done: Promise.resolve() };
      started.done = fetchOnce();
      current = started;
      next = undefined;
      await started.done;
    })();
    return next;
  };
  options.set.connect(refreshAfter);
  const schedule = (): void => {
    if (stopped) return;
    timer = setTimeout(() => void refreshAfter(Date.now()).finally(schedule), options.intervalMs ?? ISSUED_REFRESH_MS);
  };
  const first = refreshAfter(Date.now());
  await Promise.race([first, new Promise((resolve) => setTimeout(resolve, options.firstFetchTimeoutMs ?? 3_000).unref())]);
  schedule();
  return () => {
    stopped = true;
    clearTimeout(timer);
    options.set.connect(undefined);
  };
}
