/**
 * Typed JetStream KV buckets. Values are protobuf (or JSON for internal records); updates are
 * compare-and-set on the entry's revision so that several replicas can write the same bucket safely.
 */
import { Kvm, type KV, type KvEntry, type KvOptions } from '@nats-io/kv';
import { DeliverPolicy, type JetStreamClient } from '@nats-io/jetstream';

/** Encodes and decodes the values of one bucket. */
export interface Codec<T> {
  encode(value: T): Uint8Array;
  decode(bytes: Uint8Array): T;
}

/** A codec for a ts-proto message type. */
export function protoCodec<T>(message: { encode(value: T): { finish(): Uint8Array }; decode(bytes: Uint8Array): T }): Codec<T> {
  return { encode: (value) => message.encode(value).finish(), decode: (bytes) => message.decode(bytes) };
}

/** A JSON codec for internal records that have no proto message. */
export function jsonCodec<T>(): Codec<T> {
  const encoder = new TextEncoder();
  const decoder = new TextDecoder();
  return { encode: (value) => encoder.encode(JSON.stringify(value)), decode: (bytes) => JSON.parse(decoder.decode(bytes)) as T };
}

/** A value with the revision to pass to update. */
export interface Versioned<T> {
  readonly key: string;
  readonly value: T;
  readonly revision: number;
}

/** One change seen by watch: a value, or undefined when the key was deleted. */
export interface Change<T> {
  readonly key: string;
  readonly value: T | undefined;
  readonly revision: number;
}

/** Thrown by create when the key exists and by update when the revision is stale. */
export class KvConflictError extends Error {
  override readonly name = 'KvConflictError';
  constructor(readonly key: string, cause: unknown) {
    super(`KV write conflict on ${key}`, { cause });
  }
}

/** KV keys: tokens of [A-Za-z0-9_=-] separated by dots. */
const KEY = /^[-A-Za-z0-9_=]+(\.[-A-Za-z0-9_=]+)*$/;

/** True when `key` is a legal KV key. */
export function isValidKey(key: string): boolean {
  return KEY.test(key);
}

/** A bucket of values of one type. */
export class KvStore<T> {
  private constructor(
    readonly bucket: KV,
    private readonly js: JetStreamClient,
    private readonly name: string,
    private readonly codec: Codec<T>,
  ) {}

  /** Creates the bucket if needed (idempotent across replicas) and opens it. */
  static async open<T>(js: JetStreamClient, name: string, codec: Codec<T>, options: Partial<KvOptions> = {}): Promise<KvStore<T>> {
    const bucket = await new Kvm(js).create(name, { history: 1, ...options });
    return new KvStore(bucket, js, name, codec);
  }

  /** The value and revision, or undefined. */
  async get(key: string): Promise<Versioned<T> | undefined> {
    const entry = await this.bucket.get(key);
    return entry && entry.operation === 'PUT' ? this.versioned(entry) : undefined;
  }

  /** Writes only if the key does not exist; throws KvConflictError otherwise. */
  async create(key: string, value: T): Promise<number> {
    try {
      return await this.bucket.create(key, this.codec.encode(value));
    } catch (error) {
      throw isConflict(error) ? new KvConflictError(key, error) : error;
    }
  }

  /** Writes only if the key is still at `revision`; throws KvConflictError otherwise. */
  async update(key: string, value: T, revision: number): Promise<number> {
    try {
      return await this.bucket.update(key, this.codec.encode(value), revision);
    } catch (error) {
      throw isConflict(error) ? new KvConflictError(key, error) : error;
    }
  }

  /** Writes unconditionally (last writer wins): only for values a single writer owns. */
  put(key: string, value: T): Promise<number> {
    return this.bucket.put(key, this.codec.encode(value));
  }

  /** Deletes; with `revision`, only if unchanged since then. */
  async delete(key: string, revision?: number): Promise<void> {
    try {
      await this.bucket.delete(key, revision === undefined ? undefined : { previousSeq: revision });
    } catch (error) {
      throw isConflict(error) ? new KvConflictError(key, error) : error;
    }
  }

  /**
   * Read-modify-write with compare-and-set, retried on conflict. `change` gets the current value
   * (undefined if absent) and returns the new value, or undefined to leave the key as it is.
   */
  async mutate(key: string, change: (current: T | undefined) => T | undefined, attempts = 20): Promise<Versioned<T> | undefined> {
    for (let attempt = 0; attempt < attempts; attempt++) {
      const current = await this.get(key);
      const next = change(current?.value);
      if (next === undefined) return current;
      try {
        const revision = current ? await this.update(key, next, current.revision) : await this.create(key, next);
        return { key, value: next, revision };
      } catch (error) {
        if (!(error instanceof KvConflictError)) throw error;
        await new Promise((resolve) => setTimeout(resolve, Math.random() * 10 * (attempt + 1)));
      }
    }
    throw new Error(`KV ${this.name}: ${key} kept changing under ${attempts} attempts`);
  }

  /**
   * Every current value whose key matches `filter` (NATS subject wildcards: `hosts.*`, `vms.kvm-01.>`),
   * read in one ordered pass over the bucket's stream (not one request per key).
   */
  async list(filter = '>'): Promise<Versioned<T>[]> {
    const consumer = await this.js.consumers.getPushConsumer(`KV_${this.name}`, {
      deliver_policy: DeliverPolicy.LastPerSubject,
      // A single string, not an array: nats-server 2.9 knows only filter_subject.
      filter_subjects: `$KV.${this.name}.${filter}`,
    });
    const info = await consumer.info();
    if (info.num_pending === 0) {
      await consumer.delete().catch(() => undefined);
      return [];
    }
    const prefix = `$KV.${this.name}.`.length;
    const values: Versioned<T>[] = [];
    const messages = await consumer.consume();
    for await (const message of messages) {
      const operation = message.headers?.get('KV-Operation');
      if (operation !== 'DEL' && operation !== 'PURGE') {
        values.push({ key: message.subject.substring(prefix), value: this.codec.decode(message.data), revision: message.seq });
      }
      if (message.info.pending === 0) break;
    }
    await messages.close().catch(() => undefined);
    return values;
  }

  /**
   * Calls `onChange` for every change after the call (and first for every current value when
   * `includeCurrent`); returns a function that stops watching.
   */
  async watch(filter: string, onChange: (change: Change<T>) => void, includeCurrent = false): Promise<() => void> {
    const iterator = await this.bucket.watch({ key: filter, ...(includeCurrent ? {} : { include: 'updates' as const }) });
    void (async () => {
      for await (const entry of iterator) {
        onChange({ key: entry.key, value: entry.operation === 'PUT' ? this.codec.decode(entry.value) : undefined, revision: entry.revision });
      }
    })();
    return () => iterator.stop();
  }

  private versioned(entry: KvEntry): Versioned<T> {
    return { key: entry.key, value: this.codec.decode(entry.value), revision: entry.revision };
  }
}

function isConflict(error: unknown): boolean {
  const message = error instanceof Error ? error.message : String(error);
  return /wrong last sequence|key exists|10071/i.test(message);
}
