/**
 * The event outbox: every event a process publishes is first recorded durably, then a relay publishes it
 * until JetStream acknowledges it and removes the record. `publish` resolves once the record is durable, so
 * an event that a state change implies survives a NATS outage of any length and a restart of the process;
 * the stream's duplicate window (`Nats-Msg-Id` = the event id) drops the repeats that a retry after a lost
 * acknowledgement makes. The delivery promise and its limits are in services/common/README.md ("Events: the
 * delivery promise").
 *
 * Two stores behind {@link OutboxStore}:
 * - {@link DirectoryOutboxStore} (the agent): one file per event in a directory beside the agent's images,
 *   written to a temporary name, fsynced, renamed, then the directory fsynced (concurrent records share one
 *   directory fsync). The agent's state is its files, so the event is kept with them and not in NATS, which
 *   is exactly what may be unreachable.
 * - {@link KvOutboxStore} (the cluster services): the `outbox` KV bucket, the same JetStream that holds the
 *   state the event goes with. A record that cannot be written is retried until it is (the caller's step
 *   waits, as its KV writes would). A replica drains its own records at once and, every
 *   {@link KV_RESCAN_MS}, the records that another process left for longer than {@link KV_ADOPT_AFTER_MS}
 *   (it died or stopped): two replicas that both adopt a record publish it with the same id, and the stream
 *   keeps one. A published record is removed by deleting its message by sequence, which leaves no
 *   tombstone behind (a KV delete would leave one per event for ever).
 *
 * The relay sends records in record order, {@link RelayOptions.window} at a time (JetStream stores what one
 * connection sends in the order sent). When a whole window fails, JetStream is taken to be unreachable: the
 * relay waits a jittered, doubling delay (at most {@link RelayOptions.maxDelayMs}) and starts again from the
 * oldest record, so the order survives an outage. When some records of a window fail and others succeed,
 * the failures are the records' own (a subject the process may not publish on): each such record waits its
 * own backoff (at most {@link RelayOptions.maxParkedDelayMs}) while the others go on. Nobody gives up.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { JetStreamClient, JetStreamManager } from '@nats-io/jetstream';
import { eventEnvelope, sendEvent, type EventEnvelope, type EventPublisher, type EventType } from './events.js';
import { backoffDelay, sleep } from './concurrency.js';
import { jsonCodec, KvStore } from './kv.js';
import type { Logger } from './logger.js';
import { eventOutboxPending } from './metrics.js';

/** An event as the outbox keeps it. */
export interface OutboxRecord extends EventEnvelope {
  /** When it was recorded (ms since the epoch). */
  readonly recordedAt: number;
}

/** A record in a store: `key` names it there, `order` sorts records in the order they were recorded. */
export interface StoredRecord extends OutboxRecord {
  readonly key: string;
  readonly order: number;
}

/** Where the outbox keeps records until JetStream has them. */
export interface OutboxStore {
  /** Keeps `record` durably; resolves once it is (a crash after this does not lose it). */
  add(record: OutboxRecord): Promise<StoredRecord>;
  /** Records that this store instance did not add (an earlier process left them), oldest first. */
  leftovers(): Promise<StoredRecord[]>;
  /** Forgets a record JetStream acknowledged. Removing one that is gone already is not an error. */
  remove(record: StoredRecord): Promise<void>;
  /** How often the relay asks for leftovers again after its start (undefined: only at start). */
  readonly rescanMs?: number;
  /** Ends waits inside `add` (the process is stopping). */
  close?(): void;
}

// ---------------------------------------------------------------------------------------------------------
// The agent's directory store

/** A record file: `<16-digit sequence>.event`. */
const RECORD_FILE = /^(\d{16})\.event$/;

/** A record as both stores serialize it: the event and its payload in base64. */
interface SerializedRecord {
  readonly subject: string;
  readonly kind: string;
  readonly typeName: string;
  readonly id: string;
  readonly recordedAt: number;
  /** The payload, base64. */
  readonly data: string;
}

/** A record file's content: a versioned {@link SerializedRecord}. */
interface RecordFile extends SerializedRecord {
  readonly v: 1;
}

/**
 * One file per event. Sequence numbers continue after the highest one found at open, so an earlier
 * process's records sort before this one's.
 */
export class DirectoryOutboxStore implements OutboxStore {
  private lastSequence: number;
  private found: StoredRecord[] | undefined;
  /** The directory fsync that has not started yet: renames before it starts are covered by it. */
  private queuedSync: Promise<void> | undefined;
  private runningSync: Promise<void> = Promise.resolve();

  private constructor(
    readonly directory: string,
    found: StoredRecord[],
    lastSequence: number,
  ) {
    this.found = found;
    this.lastSequence = lastSequence;
  }

  /** Opens (and creates, 0700) the directory; reads what an earlier process left and clears its temporary files. */
  static async open(directory: string, log: Logger): Promise<DirectoryOutboxStore> {
    // Parents (the agent's image directory) with the usual mode: a recursive mkdir would give them 0700
    // too, and qemu, which may run as another user, must traverse the image directory.
    await mkdir(dirname(directory), { recursive: true, mode: 0o755 });
    await mkdir(directory, { recursive: true, mode: 0o700 });
    let lastSequence = 0;
    const found: StoredRecord[] = [];
    for (const name of (await readdir(directory)).sort()) {
      const path = join(directory, name);
      if (name.endsWith('.tmp')) {
        // Written but never renamed: its publish call never resolved, so nobody was promised this event.
        await unlink(path).catch(() => undefined);
        continue;
      }
      const match = RECORD_FILE.exec(name);
      if (!match) continue;
      const sequence = Number(match[1]);
      lastSequence = Math.max(lastSequence, sequence);
      try {
        const file = JSON.parse(await readFile(path, 'utf8')) as RecordFile;
        if (file.v !== 1 || typeof file.subject !== 'string' || typeof file.id !== 'string' || typeof file.data !== 'string')
          throw new Error('not an outbox record');
        found.push({
          subject: file.subject,
          kind: file.kind,
          typeName: file.typeName,
          id: file.id,
          recordedAt: file.recordedAt,
          data: new Uint8Array(Buffer.from(file.data, 'base64')),
          key: name,
          order: sequence,
        });
      } catch (error) {
        // Never published and never deleted: set aside for an operator instead of blocking or vanishing.
        log.error({ err: error, file: path }, 'unreadable event outbox record set aside as .bad');
        await rename(path, `${path}.bad`).catch(() => undefined);
      }
    }
    return new DirectoryOutboxStore(directory, found, lastSequence);
  }

  async add(record: OutboxRecord): Promise<StoredRecord> {
    const sequence = ++this.lastSequence;
    const name = `${String(sequence).padStart(16, '0')}.event`;
    const temporary = join(this.directory, `.${name}.${randomBytes(4).toString('hex')}.tmp`);
    const file: RecordFile = {
      v: 1,
      subject: record.subject,
      kind: record.kind,
      typeName: record.typeName,
      id: record.id,
      recordedAt: record.recordedAt,
      data: Buffer.from(record.data).toString('base64'),
    };
    const handle = await open(temporary, 'wx', 0o600);
    try {
      await handle.writeFile(JSON.stringify(file));
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, join(this.directory, name));
    await this.syncDirectory();
    return { ...record, key: name, order: sequence };
  }

  async leftovers(): Promise<StoredRecord[]> {
    const found = this.found ?? [];
    this.found = undefined;
    return found;
  }

  async remove(record: StoredRecord): Promise<void> {
    // No directory fsync: a removal lost in a crash brings the record back, and its second publish carries
    // the same id.
    await unlink(join(this.directory, record.key)).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== 'ENOENT') throw error;
    });
  }

  /**
   * Makes the renames so far durable. Concurrent records share a sync (20 clones: one or two directory
   * fsyncs instead of 20): a call joins the sync that has not started yet, else queues one after the
   * running one.
   */
  private syncDirectory(): Promise<void> {
    if (this.queuedSync) return this.queuedSync;
    const sync: Promise<void> = this.runningSync
      .catch(() => undefined)
      .then(async () => {
        this.queuedSync = undefined;
        const handle = await open(this.directory, 'r');
        try {
          await handle.sync();
        } finally {
          await handle.close();
        }
      });
    this.queuedSync = sync;
    this.runningSync = sync;
    return sync;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The services' KV store

/** The KV bucket of the cluster services' outboxes. */
export const OUTBOX_BUCKET = 'outbox';
/** How often a service looks for records that another process left. */
export const KV_RESCAN_MS = 15_000;
/** How old another process's record must be before this one publishes it (the owner had time to). */
export const KV_ADOPT_AFTER_MS = 30_000;

type KvRecord = SerializedRecord;

/**
 * Records in the `outbox` bucket as `<process name>.<instance>.<sequence>`; the instance is random per
 * process start, so replicas never write each other's keys.
 */
export class KvOutboxStore implements OutboxStore {
  readonly rescanMs = KV_RESCAN_MS;
  private readonly instance = randomBytes(8).toString('hex');
  private sequence = 0;
  private readonly closing = new AbortController();

  private constructor(
    private readonly store: KvStore<KvRecord>,
    private readonly manager: JetStreamManager,
    private readonly owner: string,
    private readonly log: Logger,
    private readonly retry: { baseDelayMs: number; maxDelayMs: number },
    private readonly now: () => number,
  ) {}

  /** Creates the bucket if needed (like every bucket, see kv.ts) and opens it. */
  static async open(
    js: JetStreamClient,
    manager: JetStreamManager,
    owner: string,
    log: Logger,
    options: { baseDelayMs?: number; maxDelayMs?: number; now?: () => number } = {},
  ): Promise<KvOutboxStore> {
    const store = await KvStore.open(js, OUTBOX_BUCKET, jsonCodec<KvRecord>());
    return new KvOutboxStore(
      store,
      manager,
      owner,
      log,
      { baseDelayMs: options.baseDelayMs ?? 100, maxDelayMs: options.maxDelayMs ?? 5_000 },
      options.now ?? Date.now,
    );
  }

  async add(record: OutboxRecord): Promise<StoredRecord> {
    const key = `${this.owner}.${this.instance}.${++this.sequence}`;
    const value: KvRecord = {
      subject: record.subject,
      kind: record.kind,
      typeName: record.typeName,
      id: record.id,
      recordedAt: record.recordedAt,
      data: Buffer.from(record.data).toString('base64'),
    };
    for (let attempt = 1; ; attempt++) {
      try {
        const revision = await this.store.put(key, value);
        return { ...record, key, order: revision };
      } catch (error) {
        if (this.closing.signal.aborted) throw new Error(`event ${record.id} not recorded: the process is stopping`, { cause: error });
        if (attempt === 1) this.log.warn({ err: error, eventId: record.id }, 'event outbox: KV unreachable; retrying until the event is recorded');
        await sleep(backoffDelay(attempt, this.retry.baseDelayMs, this.retry.maxDelayMs, Math.random), this.closing.signal);
      }
    }
  }

  async leftovers(): Promise<StoredRecord[]> {
    const mine = `${this.owner}.${this.instance}.`;
    const cutoff = this.now() - KV_ADOPT_AFTER_MS;
    return (await this.store.list())
      .filter((entry) => !entry.key.startsWith(mine) && entry.value.recordedAt <= cutoff)
      .map((entry) => ({ ...entry.value, data: new Uint8Array(Buffer.from(entry.value.data, 'base64')), key: entry.key, order: entry.revision }));
  }

  async remove(record: StoredRecord): Promise<void> {
    try {
      await this.manager.streams.deleteMessage(`KV_${OUTBOX_BUCKET}`, record.order, false);
    } catch (error) {
      // Another replica that adopted the record removed it first.
      if (!/no message found|not found|10037/i.test(String((error as Error).message))) throw error;
    }
  }

  close(): void {
    this.closing.abort();
  }
}

// ---------------------------------------------------------------------------------------------------------
// The relay

/** Options of {@link OutboxRelay}; the defaults suit production. */
export interface RelayOptions {
  /** Records sent at once. Default 32. */
  readonly window?: number;
  /** First retry delay after a window failed as a whole; it doubles per failed window. Default 100 ms. */
  readonly baseDelayMs?: number;
  /** Longest wait between tries while JetStream is unreachable. Default 5 s: recovery is seen within 5 s. */
  readonly maxDelayMs?: number;
  /** Longest wait of a record that fails on its own while others go through. Default 60 s. */
  readonly maxParkedDelayMs?: number;
  /** For tests: the jitter source (0..1), the clock and the wait. */
  readonly random?: () => number;
  readonly now?: () => number;
  readonly sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
}

interface Entry {
  readonly record: StoredRecord;
  /** Failures of this record alone (a window in which others succeeded). */
  failures: number;
  /** Not tried again before (ms since the epoch). */
  dueAt: number;
  /** JetStream has it; only the removal from the store is left. */
  published: boolean;
}

/** Publishes a store's records until JetStream acknowledges each, then removes them from the store. */
export class OutboxRelay {
  private queue: Entry[] = [];
  private readonly keys = new Set<string>();
  private readonly stopping = new AbortController();
  private wakeUp: AbortController = new AbortController();
  private loop: Promise<void> | undefined;
  private readonly window: number;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  private readonly maxParkedDelayMs: number;
  private readonly random: () => number;
  private readonly now: () => number;
  private readonly sleep: (ms: number, signal: AbortSignal) => Promise<void>;

  constructor(
    private readonly store: OutboxStore,
    private readonly send: (record: OutboxRecord) => Promise<unknown>,
    private readonly log: Logger,
    options: RelayOptions = {},
  ) {
    this.window = options.window ?? 32;
    this.baseDelayMs = options.baseDelayMs ?? 100;
    this.maxDelayMs = options.maxDelayMs ?? 5_000;
    this.maxParkedDelayMs = options.maxParkedDelayMs ?? 60_000;
    this.random = options.random ?? Math.random;
    this.now = options.now ?? Date.now;
    this.sleep = options.sleep ?? sleep;
  }

  /** Takes over what an earlier process left, then relays in the background. */
  async start(): Promise<void> {
    await this.adopt();
    this.loop = this.run().catch((error: unknown) => this.log.error({ err: error }, 'event outbox relay stopped on an unexpected error'));
  }

  /** Records not yet acknowledged by JetStream (or acknowledged and not yet removed). */
  get pending(): number {
    return this.queue.length;
  }

  /** Hands a freshly recorded event to the relay. */
  enqueue(record: StoredRecord): void {
    if (this.keys.has(record.key) || this.stopping.signal.aborted) return;
    this.keys.add(record.key);
    // In record order: concurrent adds may finish out of order.
    let index = this.queue.length;
    while (index > 0 && this.queue[index - 1]!.record.order > record.order) index--;
    this.queue.splice(index, 0, { record, failures: 0, dueAt: 0, published: false });
    eventOutboxPending.inc();
    this.wakeUp.abort();
  }

  /** Stops relaying (records not yet published stay in the store for the next start) and waits for the loop. */
  async stop(): Promise<void> {
    this.stopping.abort();
    this.wakeUp.abort();
    this.store.close?.();
    await this.loop;
    eventOutboxPending.dec(this.queue.length);
    this.queue = [];
    this.keys.clear();
  }

  private async adopt(): Promise<void> {
    try {
      const found = await this.store.leftovers();
      const fresh = found.filter((record) => !this.keys.has(record.key));
      if (fresh.length > 0) this.log.info({ events: fresh.length }, 'event outbox: publishing events an earlier process recorded');
      for (const record of fresh) this.enqueue(record);
    } catch (error) {
      this.log.warn({ err: error }, 'event outbox: could not read left-over records; will try again');
    }
  }

  private async run(): Promise<void> {
    let windowFailures = 0;
    let nextScan = this.store.rescanMs === undefined ? Infinity : this.now() + this.store.rescanMs;
    while (!this.stopping.signal.aborted) {
      if (this.now() >= nextScan) {
        await this.adopt();
        nextScan = this.now() + this.store.rescanMs!;
      }
      const now = this.now();
      // The oldest due records; a backlog after a long outage can be 100,000s, so stop at a window.
      const due: Entry[] = [];
      for (const entry of this.queue) {
        if (entry.dueAt <= now) due.push(entry);
        if (due.length === this.window) break;
      }
      if (due.length === 0) {
        let next = nextScan;
        for (const entry of this.queue) next = Math.min(next, entry.dueAt);
        // enqueue() and stop() abort it (not AbortSignal.any: on Node 20 each call leaves a listener behind
        // on the long-lived stopping signal).
        this.wakeUp = new AbortController();
        if (this.stopping.signal.aborted) break;
        await this.sleep(Number.isFinite(next) ? Math.max(0, next - now) : 2 ** 31 - 1, this.wakeUp.signal);
        continue;
      }
      const outcomes = await Promise.allSettled(due.map((entry) => (entry.published ? Promise.resolve() : this.send(entry.record))));
      let sent = 0;
      const failed: Array<{ entry: Entry; error: unknown }> = [];
      outcomes.forEach((outcome, index) => {
        const entry = due[index]!;
        if (outcome.status === 'fulfilled') {
          if (!entry.published) sent++;
          entry.published = true;
        } else {
          failed.push({ entry, error: outcome.reason });
        }
      });
      const removed = new Set<Entry>();
      for (const entry of due.filter((item) => item.published)) if (await this.removeFromStore(entry)) removed.add(entry);
      if (removed.size > 0) {
        // One pass per window, not one splice per record.
        this.queue = this.queue.filter((entry) => !removed.has(entry));
      }
      if (failed.length === 0 || sent > 0) {
        if (windowFailures > 0) this.log.info({ failedWindows: windowFailures, pending: this.queue.length }, 'event outbox: JetStream acknowledges again');
        windowFailures = 0;
        for (const { entry, error } of failed) {
          // Others went through: this record's own problem (permissions, a subject nobody stores).
          entry.failures++;
          entry.dueAt = this.now() + backoffDelay(entry.failures, this.baseDelayMs, this.maxParkedDelayMs, this.random);
          this.log.warn(
            { err: error, eventId: entry.record.id, subject: entry.record.subject, failures: entry.failures },
            'event outbox: JetStream refused this event; will retry it',
          );
        }
        continue;
      }
      // Nothing went through: JetStream is unreachable. Wait, then start again from the oldest record.
      windowFailures++;
      if (windowFailures === 1 || windowFailures % 20 === 0) {
        this.log.warn(
          { err: failed[0]!.error, pending: this.queue.length, failedWindows: windowFailures },
          'event outbox: events not published yet (JetStream unreachable); retrying until acknowledged',
        );
      }
      await this.sleep(backoffDelay(windowFailures, this.baseDelayMs, this.maxDelayMs, this.random), this.stopping.signal);
    }
  }

  /** True when the record is gone from the store (the caller drops it from the queue). */
  private async removeFromStore(entry: Entry): Promise<boolean> {
    try {
      await this.store.remove(entry.record);
      this.keys.delete(entry.record.key);
      eventOutboxPending.dec();
      return true;
    } catch (error) {
      entry.failures++;
      entry.dueAt = this.now() + backoffDelay(entry.failures, this.baseDelayMs, this.maxDelayMs, this.random);
      this.log.warn({ err: error, eventId: entry.record.id }, 'event outbox: published, but the record could not be removed yet; will retry');
      return false;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The publisher every process hands out

/** The outbox-backed {@link EventPublisher}: publish resolves once the event is recorded. */
export class OutboxEventPublisher implements EventPublisher {
  constructor(
    private readonly store: OutboxStore,
    private readonly relay: OutboxRelay,
    private readonly now: () => number = Date.now,
  ) {}

  async publish<T>(type: EventType<T>, payload: T, options: { host?: string; id: string }): Promise<void> {
    const envelope = eventEnvelope(type, payload, options);
    this.relay.enqueue(await this.store.add({ ...envelope, recordedAt: this.now() }));
  }
}

/** A process's outbox: its publisher and the relay's life. */
export interface EventOutbox {
  readonly events: EventPublisher;
  /** Records not yet acknowledged by JetStream. */
  pending(): number;
  /** Stops the relay; unpublished records stay in the store for the next start (or another replica). */
  stop(): Promise<void>;
}

/** Options of {@link startEventOutbox}. */
export interface EventOutboxOptions {
  readonly js: JetStreamClient;
  readonly manager: JetStreamManager;
  readonly log: Logger;
  /** Keep records in this directory (the agent); without it, in the `outbox` KV bucket under `owner`. */
  readonly directory?: string;
  /** The process name (KV key prefix). */
  readonly owner: string;
  readonly relay?: RelayOptions;
}

/** Opens the store, starts the relay (which first takes over what an earlier process left). */
export async function startEventOutbox(options: EventOutboxOptions): Promise<EventOutbox> {
  const log = options.log.child({ component: 'event-outbox' });
  const store: OutboxStore =
    options.directory !== undefined
      ? await DirectoryOutboxStore.open(options.directory, log)
      : await KvOutboxStore.open(options.js, options.manager, options.owner, log);
  const relay = new OutboxRelay(store, (record) => sendEvent(options.js, record), log, options.relay);
  await relay.start();
  return { events: new OutboxEventPublisher(store, relay), pending: () => relay.pending, stop: () => relay.stop() };
}
