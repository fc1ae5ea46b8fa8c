/**
 * Typed JetStream KV buckets. Values are protobuf (or JSON for internal records); updates are
 * compare-and-set on the entry's revision so that several replicas can write the same bucket safely.
 */
import { Kvm, type KV, type KvEntry, type KvOptions } from '@nats-io/kv';
import { DeliverPolicy, type JetStreamClient, type JetStreamManager } from '@nats-io/jetstream';

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
  constructor(
    readonly key: string,
    cause: unknown,
  ) {
    super(`KV write conflict on ${key}`, { cause });
  }
}

/** How long {@link KvStore.list} waits for its pass to deliver the next key before reading the rest one by one. */
const LIST_IDLE_MS = 2_000;

/** KV keys: tokens of [A-Za-z0-9_=-] separated by dots. */
const KEY = /^[-A-Za-z0-9_=]+(\.[-A-Za-z0-9_=]+)*$/;

/** True when `key` is a legal KV key. */
export function isValidKey(key: string): boolean {
  return KEY.test(key);
}

/** A bucket of values of one type. */
export class KvStore<T> {
  private manager: Promise<JetStreamManager> | undefined;

  private constructor(
    readonly bucket: KV,
    private readonly js: JetStreamClient,
    /** The bucket's name. */
    readonly name: string,
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
   * read in one ordered pass over the bucket's stream (not one request per key), ordered by revision.
   *
   * The pass ends once it has seen every key the stream's subject index held when the call began (a value
   * or a delete marker each; keys written meanwhile may be seen too). It does not end on the consumer's
   * pending count: while keys are being written that count runs out early or never (nats-server 2.9 with
   * last-per-subject delivery), which listed some keys twice, left out keys written during the pass (a
   * replica being updated looked deleted to distribution), or hung. A key the pass has not delivered after
   * {@link LIST_IDLE_MS} of silence is read on its own.
   */
  async list(filter = '>'): Promise<Versioned<T>[]> {
    const stream = `KV_${this.name}`;
    const subjects = `$KV.${this.name}.${filter}`;
    this.manager ??= this.js.jetstreamManager();
    const info = await (await this.manager).streams.info(stream, { subjects_filter: subjects });
    const unseen = new Set(Object.keys(info.state.subjects ?? {}));
    if (unseen.size === 0) return [];
    const prefix = `$KV.${this.name}.`.length;
    const latest = new Map<string, { value: T | undefined; revision: number }>();
    const consumer = await this.js.consumers.getPushConsumer(stream, {
      deliver_policy: DeliverPolicy.LastPerSubject,
      // A single string, not an array: nats-server 2.9 knows only filter_subject.
      filter_subjects: subjects,
    });
    const messages = await consumer.consume();
    let idle: NodeJS.Timeout | undefined;
    const armIdle = (): void => {
      clearTimeout(idle);
      idle = setTimeout(() => void messages.close().catch(() => undefined), LIST_IDLE_MS);
    };
    armIdle();
    try {
      for await (const message of messages) {
        const key = message.subject.substring(prefix);
        // An ordered consumer that resets may deliver a key again: the highest revision wins.
        if ((latest.get(key)?.revision ?? 0) < message.seq) {
          const operation = message.headers?.get('KV-Operation');
          latest.set(key, { value: operation === 'DEL' || operation === 'PURGE' ? undefined : this.codec.decode(message.data), revision: message.seq });
        }
        unseen.delete(message.subject);
        if (unseen.size === 0) break;
        armIdle();
      }
    } finally {
      clearTimeout(idle);
      await messages.close().catch(() => undefined);
    }
    for (const subject of unseen) {
      const entry = await this.get(subject.substring(prefix));
      if (entry) latest.set(entry.key, { value: entry.value, revision: entry.revision });
    }
    const values: Versioned<T>[] = [];
    for (const [key, { value, revision }] of latest) if (value !== undefined) values.push({ key, value, revision });
    return values.sort((a, b) => a.revision - b.revision);
  }

  /**
   * The bucket's last revision: every write and delete so far has a revision up to this one (one
   * stream-info request).
   */
  async lastRevision(): Promise<number> {
    this.manager ??= this.js.jetstreamManager();
    return (await (await this.manager).streams.info(`KV_${this.name}`)).state.last_seq;
  }

  /**
   * Calls `onChange` for every change after the call (and first for every current value when
   * `includeCurrent`), or for every change from revision `fromRevision` on when given; returns a function
   * that stops watching.
   */
  async watch(filter: string, onChange: (change: Change<T>) => void, includeCurrent = false, fromRevision?: number): Promise<() => void> {
    const iterator = await this.bucket.watch({
      key: filter,
      ...(includeCurrent ? {} : { include: 'updates' as const }),
      ...(fromRevision === undefined ? {} : { resumeFromRevision: fromRevision }),
    });
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
