/**
 * An in-memory view of one KV bucket, kept current by a KV watch: every inventory replica answers Get,
 * List and Watch from memory (a page of 10,000 VMs in well under a millisecond) while all writes go to
 * KV with compare-and-set. Entries carry their KV revision, and older news never overwrites newer: the
 * initial listing and the watch may interleave, and a replica's own writes are applied at once so that a
 * caller reads what it just wrote.
 *
 * Several replicas write the same buckets. A replica's index may lag another replica's write by the
 * watch's delivery time, so a write that depends on what is stored first calls {@link ResourceIndex.sync}
 * (the index then holds every write KV had accepted when sync was called) and every write and delete is
 * a compare-and-set on the revision the decision was made on: a conflict means the decision is made again
 * on the newer value, never that the older decision overwrites it.
 */
import { EventEmitter } from 'node:events';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../common/platform/errors.js';
import { KvConflictError, type KvStore } from '../common/platform/kv.js';
import type { Logger } from '../common/platform/logger.js';

/** One change to the index. */
export interface IndexChange<T> {
  readonly key: string;
  /** The new value; undefined when the key was deleted. */
  readonly value: T | undefined;
  /** The value before; undefined when the key is new. */
  readonly previous: T | undefined;
  readonly revision: number;
}

/** What {@link ResourceIndex.replace} did. */
export interface ReplaceResult<T> {
  /** False when `change` returned undefined (nothing to write). */
  readonly written: boolean;
  /** The value the decision was made on (undefined: the key did not exist). */
  readonly previous: T | undefined;
  /** The value now stored (the previous one when nothing was written). */
  readonly value: T | undefined;
  /** Its KV revision (0 when the key does not exist). */
  readonly revision: number;
}

/** Options of {@link ResourceIndex.open}. */
export interface ResourceIndexOptions {
  /**
   * The string entries are ordered (and prefix-searched) by, from the key. Default: the key itself.
   * The VM index orders by resource name, which its KV keys do not follow (dots in ids are stored as '=').
   */
  readonly orderOf?: (key: string) => string;
  /** How long {@link ResourceIndex.sync} waits for the watch before UNAVAILABLE. Default 5 s. */
  readonly syncTimeoutMs?: number;
  /** Told about syncs that waited over a second (a watch falling behind). */
  readonly log?: Logger;
}

/** Compare-and-set attempts before a write gives up (each after a short random pause). */
const ATTEMPTS = 20;

/** A bucket mirrored in memory. */
export class ResourceIndex<T> {
  private readonly entries = new Map<string, { value: T; revision: number }>();
  /** Revisions of deleted keys, so that a late listing does not bring them back. */
  private readonly tombstones = new Map<string, number>();
  /** Keys and their order strings, sorted by order string; undefined until first needed after a bulk load. */
  private sorted: { orders: string[]; keys: string[] } | undefined;
  private readonly changes = new EventEmitter();
  private stopWatching: (() => void) | undefined;
  /** Every revision up to this one has been seen (by the initial listing or the watch). */
  private watchedRevision = 0;
  private readonly syncWaiters = new Set<{ revision: number; resolve: () => void }>();
  private readonly orderOf: (key: string) => string;
  private readonly syncTimeoutMs: number;
  private readonly log: Logger | undefined;

  private constructor(
    readonly store: KvStore<T>,
    options: ResourceIndexOptions,
  ) {
    this.changes.setMaxListeners(0);
    this.orderOf = options.orderOf ?? ((key) => key);
    this.syncTimeoutMs = options.syncTimeoutMs ?? 5_000;
    this.log = options.log;
  }

  /** Loads every entry, then follows changes. */
  static async open<T>(store: KvStore<T>, options: ResourceIndexOptions = {}): Promise<ResourceIndex<T>> {
    const index = new ResourceIndex(store, options);
    // The watch starts right after the last revision before the listing, so that together they cover every
    // revision exactly: what sync() relies on.
    const start = await store.lastRevision();
    index.watchedRevision = start;
    index.stopWatching = await store.watch(
      '>',
      (change) => {
        index.apply(change.key, change.value, change.revision);
        index.watched(change.revision);
      },
      false,
      start + 1,
    );
    for (const entry of await store.list()) index.apply(entry.key, entry.value, entry.revision);
    return index;
  }

  /** Applies a value (or deletion) at a revision, unless the index already knows a newer one. */
  apply(key: string, value: T | undefined, revision: number): void {
    const current = this.entries.get(key);
    if ((current && current.revision >= revision) || (this.tombstones.get(key) ?? 0) >= revision) return;
    if (value === undefined) {
      if (!current) {
        this.tombstones.set(key, revision);
        return;
      }
      this.entries.delete(key);
      this.tombstones.set(key, revision);
      this.unsort(key);
    } else {
      this.tombstones.delete(key);
      this.entries.set(key, { value, revision });
      if (!current) this.insertSorted(key);
    }
    this.changes.emit('change', { key, value, previous: current?.value, revision } satisfies IndexChange<T>);
  }

  /**
   * Waits until the index holds every write KV had accepted when called (another replica's included). One
   * stream-info round trip, then usually no wait at all. UNAVAILABLE when the watch does not catch up.
   */
  async sync(): Promise<void> {
    const target = await this.store.lastRevision();
    if (this.watchedRevision >= target) return;
    let waiter: { revision: number; resolve: () => void } | undefined;
    let timer: NodeJS.Timeout | undefined;
    const started = Date.now();
    try {
      await new Promise<void>((resolve, reject) => {
        waiter = { revision: target, resolve };
        this.syncWaiters.add(waiter);
        timer = setTimeout(
          () =>
            reject(
              new CowherdError(GrpcStatus.UNAVAILABLE, 'the inventory is catching up with its store; retry', {
                reason: ErrorReason.ERROR_REASON_INTERNAL,
                cause: new Error(`the ${this.store.name} index did not reach revision ${target} within ${this.syncTimeoutMs} ms`),
              }),
            ),
          this.syncTimeoutMs,
        );
      });
    } finally {
      clearTimeout(timer);
      if (waiter) this.syncWaiters.delete(waiter);
      const waitedMs = Date.now() - started;
      if (waitedMs > 1_000)
        this.log?.warn({ bucket: this.store.name, waitedMs, target, watchedRevision: this.watchedRevision }, 'index sync waited for its KV watch');
    }
  }

  /** The value and revision of a key. */
  get(key: string): { value: T; revision: number } | undefined {
    return this.entries.get(key);
  }

  /** Keys in order (see {@link ResourceIndexOptions.orderOf}). */
  keys(): readonly string[] {
    return this.sortedEntries().keys;
  }

  /** Values whose order string starts with `prefix`, in order; `order` is the string entries are sorted by. */
  valuesWithPrefix(prefix: string): Array<{ key: string; value: T; order: string }> {
    const { orders, keys } = this.sortedEntries();
    const result: Array<{ key: string; value: T; order: string }> = [];
    for (let i = lowerBound(orders, prefix); i < orders.length && orders[i]!.startsWith(prefix); i++) {
      result.push({ key: keys[i]!, value: this.entries.get(keys[i]!)!.value, order: orders[i]! });
    }
    return result;
  }

  /**
   * One page: up to `size` entries whose order string starts with `prefix` and comes after `after`, that
   * `matches`; `more` when another follows. Walks only the page (and what the filter skips), not the whole
   * index: a list call costs the same at 10,000 entries as at 100.
   */
  page(
    prefix: string,
    after: string,
    size: number,
    matches: (value: T) => boolean,
  ): { entries: Array<{ key: string; value: T; order: string }>; more: boolean } {
    const { orders, keys } = this.sortedEntries();
    let i = lowerBound(orders, prefix);
    if (after !== '') {
      i = Math.max(i, lowerBound(orders, after));
      if (orders[i] === after) i++;
    }
    const entries: Array<{ key: string; value: T; order: string }> = [];
    for (; i < orders.length && orders[i]!.startsWith(prefix); i++) {
      const value = this.entries.get(keys[i]!)!.value;
      if (!matches(value)) continue;
      if (entries.length === size) return { entries, more: true };
      entries.push({ key: keys[i]!, value, order: orders[i]! });
    }
    return { entries, more: false };
  }

  get size(): number {
    return this.entries.size;
  }

  /** Calls `listener` on every change until the returned function is called. */
  subscribe(listener: (change: IndexChange<T>) => void): () => void {
    this.changes.on('change', listener);
    return () => this.changes.off('change', listener);
  }

  /** Read-modify-write through KV (a fresh read each attempt) with compare-and-set; applies the result at once. */
  async write(key: string, change: (current: T | undefined) => T | undefined): Promise<T | undefined> {
    const result = await this.store.mutate(key, change);
    if (result) this.apply(key, result.value, result.revision);
    return result?.value;
  }

  /**
   * Like {@link write}, but the first attempt decides on the value the index holds (no read first: call
   * {@link sync} before a batch of these). When another writer got there first, `change` decides again on
   * the value KV now holds, so it must be free of side effects and may run more than once.
   */
  async replace(key: string, change: (current: T | undefined) => T | undefined): Promise<ReplaceResult<T>> {
    let current: { value: T; revision: number } | undefined = this.entries.get(key);
    for (let attempt = 0; ; attempt++) {
      const next = change(current?.value);
      if (next === undefined) return { written: false, previous: current?.value, value: current?.value, revision: current?.revision ?? 0 };
      try {
        const revision = current ? await this.store.update(key, next, current.revision) : await this.store.create(key, next);
        this.apply(key, next, revision);
        return { written: true, previous: current?.value, value: next, revision };
      } catch (error) {
        if (!(error instanceof KvConflictError) || attempt + 1 >= ATTEMPTS) throw error;
      }
      await pause(attempt);
      current = await this.store.get(key);
      if (current) this.apply(key, current.value, current.revision);
    }
  }

  /**
   * Deletes a key if it is still at `revision` (default: the revision the index holds) and applies that at
   * once. False when the key is absent, or was written since: the caller decides again on the newer value.
   */
  async remove(key: string, revision = this.entries.get(key)?.revision): Promise<boolean> {
    if (revision === undefined) return false;
    try {
      await this.store.delete(key, revision);
    } catch (error) {
      if (error instanceof KvConflictError) return false;
      throw error;
    }
    // The deletion's own revision is not returned by KV; the watch will confirm it. Until then, hide it.
    this.apply(key, undefined, revision + 1);
    return true;
  }

  /**
   * Deletes a key while `shouldRemove` says so of its value, deciding first on the value the index holds
   * (call {@link sync} first) and again on every newer value a compare-and-set conflict reveals. True when
   * this call deleted it.
   */
  async removeWhile(key: string, shouldRemove: (current: T) => boolean): Promise<boolean> {
    let current: { value: T; revision: number } | undefined = this.entries.get(key);
    for (let attempt = 0; ; attempt++) {
      if (!current || !shouldRemove(current.value)) return false;
      if (await this.remove(key, current.revision)) return true;
      if (attempt + 1 >= ATTEMPTS) throw new Error(`KV ${this.store.name}: ${key} kept changing under ${ATTEMPTS} attempts`);
      await pause(attempt);
      current = await this.store.get(key);
      if (current) this.apply(key, current.value, current.revision);
    }
  }

  stop(): void {
    this.stopWatching?.();
    for (const waiter of this.syncWaiters) waiter.resolve();
  }

  private watched(revision: number): void {
    if (revision <= this.watchedRevision) return;
    this.watchedRevision = revision;
    for (const waiter of this.syncWaiters) {
      if (waiter.revision <= revision) {
        this.syncWaiters.delete(waiter);
        waiter.resolve();
      }
    }
  }

  private sortedEntries(): { orders: string[]; keys: string[] } {
    if (!this.sorted) {
      const pairs = [...this.entries.keys()].map((key) => ({ key, order: this.orderOf(key) })).sort((a, b) => compare(a.order, b.order));
      this.sorted = { orders: pairs.map((pair) => pair.order), keys: pairs.map((pair) => pair.key) };
    }
    return this.sorted;
  }

  /** Inserts a new key in place (a splice, not a re-sort: the VM index changes while it is being paged). */
  private insertSorted(key: string): void {
    if (!this.sorted) return;
    const order = this.orderOf(key);
    const at = lowerBound(this.sorted.orders, order);
    this.sorted.orders.splice(at, 0, order);
    this.sorted.keys.splice(at, 0, key);
  }

  private unsort(key: string): void {
    if (!this.sorted) return;
    const order = this.orderOf(key);
    const at = lowerBound(this.sorted.orders, order);
    if (this.sorted.keys[at] === key) {
      this.sorted.orders.splice(at, 1);
      this.sorted.keys.splice(at, 1);
    } else {
      this.sorted = undefined;
    }
  }
}

/** The first index whose value is not below `value`. */
function lowerBound(sorted: readonly string[], value: string): number {
  let low = 0;
  let high = sorted.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (sorted[middle]! < value) low = middle + 1;
    else high = middle;
  }
  return low;
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function pause(attempt: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.random() * 5 * (attempt + 1)));
}
