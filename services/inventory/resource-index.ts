/**
 * An in-memory view of one KV bucket, kept current by a KV watch: every inventory replica answers Get,
 * List and Watch from memory (a page of 10,000 VMs in well under a millisecond) while all writes go to
 * KV with compare-and-set. Entries carry their KV revision, and older news never overwrites newer: the
 * initial listing and the watch may interleave, and a replica's own writes are applied at once so that a
 * caller reads what it just wrote.
 */
import { EventEmitter } from 'node:events';
import { KvConflictError, type KvStore } from '../common/kv.js';

/** One change to the index. */
export interface IndexChange<T> {
  readonly key: string;
  /** The new value; undefined when the key was deleted. */
  readonly value: T | undefined;
  /** The value before; undefined when the key is new. */
  readonly previous: T | undefined;
  readonly revision: number;
}

/** A bucket mirrored in memory. */
export class ResourceIndex<T> {
  private readonly entries = new Map<string, { value: T; revision: number }>();
  /** Revisions of deleted keys, so that a late listing does not bring them back. */
  private readonly tombstones = new Map<string, number>();
  private sortedKeys: string[] | undefined = [];
  private readonly changes = new EventEmitter();
  private stopWatching: (() => void) | undefined;

  private constructor(readonly store: KvStore<T>) {
    this.changes.setMaxListeners(0);
  }

  /** Loads every entry, then follows changes. */
  static async open<T>(store: KvStore<T>): Promise<ResourceIndex<T>> {
    const index = new ResourceIndex(store);
    index.stopWatching = await store.watch('>', (change) => index.apply(change.key, change.value, change.revision));
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
      this.sortedKeys = undefined;
    } else {
      if (!current) this.sortedKeys = undefined;
      this.tombstones.delete(key);
      this.entries.set(key, { value, revision });
    }
    this.changes.emit('change', { key, value, previous: current?.value, revision } satisfies IndexChange<T>);
  }

  /** The value and revision of a key. */
  get(key: string): { value: T; revision: number } | undefined {
    return this.entries.get(key);
  }

  /** Keys in order (sorted lazily after inserts and deletes). */
  keys(): readonly string[] {
    this.sortedKeys ??= [...this.entries.keys()].sort();
    return this.sortedKeys;
  }

  /** Values whose key starts with `prefix`, in key order. */
  valuesWithPrefix(prefix: string): Array<{ key: string; value: T }> {
    const keys = this.keys();
    let low = 0;
    let high = keys.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (keys[middle]! < prefix) low = middle + 1;
      else high = middle;
    }
    const result: Array<{ key: string; value: T }> = [];
    for (let i = low; i < keys.length && keys[i]!.startsWith(prefix); i++) result.push({ key: keys[i]!, value: this.entries.get(keys[i]!)!.value });
    return result;
  }

  get size(): number {
    return this.entries.size;
  }

  /** Calls `listener` on every change until the returned function is called. */
  subscribe(listener: (change: IndexChange<T>) => void): () => void {
    this.changes.on('change', listener);
    return () => this.changes.off('change', listener);
  }

  /** Writes through KV with compare-and-set and applies the result at once. */
  async write(key: string, change: (current: T | undefined) => T | undefined): Promise<T | undefined> {
    const result = await this.store.mutate(key, change);
    if (result) this.apply(key, result.value, result.revision);
    return result?.value;
  }

  /**
   * Replaces a key's value assuming the index is current: one compare-and-set on the revision the index
   * holds (no read first). When another writer got there first, falls back to `write`.
   */
  async replace(key: string, value: T): Promise<T> {
    const current = this.entries.get(key);
    try {
      const revision = current ? await this.store.update(key, value, current.revision) : await this.store.create(key, value);
      this.apply(key, value, revision);
      return value;
    } catch (error) {
      if (!(error instanceof KvConflictError)) throw error;
      return (await this.write(key, () => value))!;
    }
  }

  /** Deletes through KV and applies at once. */
  async remove(key: string): Promise<void> {
    const current = this.entries.get(key);
    await this.store.delete(key);
    // The deletion's own revision is not returned by KV; the watch will confirm it. Until then, hide it.
    if (current) this.apply(key, undefined, current.revision + 1);
  }

  stop(): void {
    this.stopWatching?.();
  }
}
