/**
 * cowherd's event stream: protobuf payloads from cowherd.events.v1 on subjects
 * `cowherd.events.<kind>.<host>`, the message type in the `Cowherd-Event-Type` header and a
 * `Nats-Msg-Id` (the event id, naming the logical occurrence) so that a re-sent event is stored once.
 * Processes publish through the outbox (event-outbox.ts), which records each event durably and sends it
 * until JetStream acknowledges it. Consumers are durable: an event published while a consumer was down
 * is delivered when it comes back, and is redelivered until acknowledged. The whole promise is in
 * services/common/README.md, "Events: the delivery promise".
 */
import { headers as natsHeaders, nanos } from '@nats-io/transport-node';
import { AckPolicy, DeliverPolicy, RetentionPolicy, StorageType, type ConsumerMessages, type JetStreamClient, type JetStreamManager } from '@nats-io/jetstream';

import { DNS_LABEL } from './identity.js';
import type { Logger } from './logger.js';
import { eventPublishAttempts, eventPublishFailures, eventsPublished } from './metrics.js';

/** The JetStream stream that holds every event. */
export const EVENT_STREAM = 'COWHERD_EVENTS';
/** Every event subject starts with this. */
export const EVENT_SUBJECT_PREFIX = 'cowherd.events';
/** Header naming the payload's full protobuf type. */
export const EVENT_TYPE_HEADER = 'Cowherd-Event-Type';
/** Host token for events that concern no single host. */
export const FLEET_WIDE = '_';
/** A host id as it stands in a subject (an RFC 1123 label). */
/** A host's subject token: a host id (one DNS label, common/domain/resource-names.ts HOST_ID). */
const HOST_TOKEN = DNS_LABEL;

/** A ts-proto message type as the event layer needs it. */
export interface EventType<T> {
  /** Full protobuf name, e.g. cowherd.events.v1.ImageAvailable. */
  readonly typeName: string;
  /** Subject token(s) after `cowherd.events.`, e.g. "image.available". */
  readonly kind: string;
  encode(value: T): { finish(): Uint8Array };
  decode(bytes: Uint8Array): T;
}

/** Declares how one event message (a generated codec, which names its type in `$type`) travels. */
export function eventType<T>(
  kind: string,
  message: { readonly $type: string; encode(value: T): { finish(): Uint8Array }; decode(bytes: Uint8Array): T },
): EventType<T> {
  return { typeName: message.$type, kind, encode: (value) => message.encode(value), decode: (bytes) => message.decode(bytes) };
}

/** The subject of an event kind about a host ("_" for fleet-wide). */
export function eventSubject(kind: string, host: string = FLEET_WIDE): string {
  return `${EVENT_SUBJECT_PREFIX}.${kind}.${host}`;
}

/** Creates or updates the event stream (idempotent; every service calls it at start). */
export async function ensureEventStream(manager: JetStreamManager, options: { replicas?: number; maxAgeDays?: number } = {}): Promise<void> {
  const config = {
    name: EVENT_STREAM,
    subjects: [`${EVENT_SUBJECT_PREFIX}.>`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    num_replicas: options.replicas ?? 1,
    max_age: nanos((options.maxAgeDays ?? 7) * 86_400_000),
    duplicate_window: nanos(10 * 60_000),
  };
  try {
    const current = await manager.streams.info(EVENT_STREAM);
    // Never lower the replica count an operator (or the NATS sidecar) raised.
    await manager.streams.update(EVENT_STREAM, { ...config, num_replicas: Math.max(config.num_replicas, current.config.num_replicas ?? 1) });
  } catch (error) {
    if (!/stream not found/i.test(String((error as Error).message))) throw error;
    await manager.streams.add(config);
  }
}

/** Where an event goes: its subject, type header and de-duplication id (what the outbox records). */
export interface EventEnvelope {
  /** `cowherd.events.<kind>.<host>`. */
  readonly subject: string;
  /** The event kind as in the subject (`clone.done`): the metrics label. */
  readonly kind: string;
  /** Full protobuf type name, sent in {@link EVENT_TYPE_HEADER}. */
  readonly typeName: string;
  /** `Nats-Msg-Id`: names the logical occurrence (see {@link EventPublisher.publish}). */
  readonly id: string;
  /** The encoded payload. */
  readonly data: Uint8Array;
}

/**
 * What services and the agent publish through (`events` in their build context). The process hands out
 * the outbox-backed publisher (event-outbox.ts): publish resolves once the event is recorded durably,
 * and a relay publishes it until JetStream acknowledges it, across NATS outages and restarts.
 */
export interface EventPublisher {
  /**
   * Records `payload` about `host` ("_" when left out). `id` names the logical occurrence: the same on
   * every re-publish of the same fact (e.g. "clone.done/<operation>/<host>/<vm>"), so the stream stores
   * it once; a new occurrence (a retry that succeeded after a failure) needs a new id. Resolves when the
   * event is durable, not when JetStream stored it; rejects only for an invalid host or id.
   */
  publish<T>(type: EventType<T>, payload: T, options: { host?: string; id: string }): Promise<void>;
}

/** The envelope of an event, checked: a bad host token or an empty id is the caller's bug. */
export function eventEnvelope<T>(type: EventType<T>, payload: T, options: { host?: string; id: string }): EventEnvelope {
  const host = options.host ?? FLEET_WIDE;
  if (host !== FLEET_WIDE && !HOST_TOKEN.test(host)) throw new Error(`event host ${JSON.stringify(host)} is not a host id`);
  if (options.id === '') throw new Error(`${type.kind} event without an id`);
  return { subject: eventSubject(type.kind, host), kind: type.kind, typeName: type.typeName, id: options.id, data: type.encode(payload).finish() };
}

/** How long one JetStream publish waits for its acknowledgement. */
export const EVENT_PUBLISH_TIMEOUT_MS = 5_000;

/**
 * One publish attempt straight to JetStream: resolves with the stream sequence (a duplicate within the
 * window returns the original's), rejects when no acknowledgement came. Counts the attempt in
 * cowherd_event_publish_attempts_total and its outcome in cowherd_events_published_total or
 * cowherd_event_publish_failures_total. The outbox relay sends through this; nothing else should, since
 * an event sent once and lost is exactly what the outbox exists to prevent.
 */
export async function sendEvent(js: JetStreamClient, envelope: EventEnvelope, timeoutMs = EVENT_PUBLISH_TIMEOUT_MS): Promise<number> {
  const headers = natsHeaders();
  headers.set(EVENT_TYPE_HEADER, envelope.typeName);
  eventPublishAttempts.inc({ type: envelope.kind });
  try {
    const ack = await js.publish(envelope.subject, envelope.data, { msgID: envelope.id, headers, timeout: timeoutMs });
    eventsPublished.inc({ type: envelope.kind });
    return ack.seq;
  } catch (error) {
    eventPublishFailures.inc({ type: envelope.kind });
    throw error;
  }
}

/**
 * Publishes once, straight to JetStream, and returns the stream sequence: for tests of the stream and its
 * permissions. Services never use it (they get the outbox-backed {@link EventPublisher}).
 */
export class JetStreamEventPublisher {
  constructor(
    private readonly js: JetStreamClient,
    private readonly log: Logger,
  ) {}

  /** One attempt; rejects when JetStream did not acknowledge within {@link EVENT_PUBLISH_TIMEOUT_MS}. */
  async publish<T>(type: EventType<T>, payload: T, options: { host?: string; id: string }): Promise<number> {
    const envelope = eventEnvelope(type, payload, options);
    try {
      return await sendEvent(this.js, envelope);
    } catch (error) {
      this.log.error({ err: error, subject: envelope.subject, eventId: envelope.id }, 'event publish failed');
      throw error;
    }
  }
}

/** One delivered event. */
export interface ReceivedEvent<T> {
  readonly subject: string;
  /** The host token of the subject ("_" for fleet-wide): the publisher proved it by NATS permissions. */
  readonly host: string;
  readonly typeName: string;
  readonly payload: T;
  /** The event id (`Nats-Msg-Id`): names the logical occurrence; consumers de-duplicate by it. */
  readonly id: string;
  readonly sequence: number;
  /** How many times this event has been delivered (1 on first delivery). */
  readonly deliveries: number;
}

/** Options of {@link consumeEvents}. */
export interface ConsumeOptions<T> {
  /** Durable name: the consumer's position survives restarts and is shared by replicas with this name. */
  readonly durable: string;
  /** The types this consumer wants; the filter subject is built from a single type, or `cowherd.events.>`. */
  readonly types: readonly EventType<T>[];
  /** Restrict to one host (default: all). */
  readonly host?: string;
  /** Handles one event; throwing redelivers it after `retryDelayMs`. */
  readonly handle: (event: ReceivedEvent<T>) => Promise<void>;
  readonly log: Logger;
  /** Ack wait before an unacknowledged event is redelivered. Default 30 s. */
  readonly ackWaitMs?: number;
  readonly retryDelayMs?: number;
  /** Where a new durable starts: 'all' (default) or 'new'. */
  readonly startAt?: 'all' | 'new';
  /** How many recently handled event ids this consumer remembers to drop repeats. Default {@link DEDUPLICATION_MEMORY}. */
  readonly deduplicationMemory?: number;
}

/**
 * Event ids a consumer remembers. The stream drops a repeated id only within its 10-minute duplicate
 * window; an outbox record re-sent after a longer outage, whose first send had reached the stream, is
 * stored twice. 10 000 ids (~1 MB) cover far more events than one consumer handles in such an outage's
 * aftermath; see services/common/README.md "Events: the delivery promise".
 */
export const DEDUPLICATION_MEMORY = 10_000;

/** A running consumer. */
export interface EventConsumer {
  stop(): Promise<void>;
}

/**
 * Consumes events on a durable pull consumer with explicit acks. Events of other types that match the
 * filter are acknowledged and skipped. An event whose id this consumer handled already (the same
 * occurrence stored twice, which the stream's duplicate window cannot prevent after an outage longer
 * than the window) is acknowledged without calling `handle`.
 */
export async function consumeEvents<T>(js: JetStreamClient, manager: JetStreamManager, options: ConsumeOptions<T>): Promise<EventConsumer> {
  const byName = new Map(options.types.map((type) => [type.typeName, type]));
  const only = options.types.length === 1 ? options.types[0] : undefined;
  const filter = only ? eventSubject(only.kind, options.host ?? '*') : `${EVENT_SUBJECT_PREFIX}.>`;
  try {
    await manager.consumers.info(EVENT_STREAM, options.durable);
  } catch {
    await manager.consumers.add(EVENT_STREAM, {
      durable_name: options.durable,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: options.startAt === 'new' ? DeliverPolicy.New : DeliverPolicy.All,
      filter_subject: filter,
      ack_wait: nanos(options.ackWaitMs ?? 30_000),
      max_ack_pending: 1000,
    });
  }
  const consumer = await js.consumers.get(EVENT_STREAM, options.durable);
  const messages: ConsumerMessages = await consumer.consume({ max_messages: 256 });
  const log = options.log.child({ component: 'events', durable: options.durable });
  // Ids handled by this process, oldest first (a Map keeps insertion order): a repeat is acknowledged unhandled.
  const handled = new Map<string, true>();
  const memory = options.deduplicationMemory ?? DEDUPLICATION_MEMORY;
  const done = (async () => {
    for await (const message of messages) {
      const typeName = message.headers?.get(EVENT_TYPE_HEADER) ?? '';
      const type = byName.get(typeName);
      // The subject must be exactly the type's kind and one host token: NATS lets a host publish only
      // subjects ending in its own id, so this is what makes the host of an event trustworthy.
      const host = message.subject.slice(message.subject.lastIndexOf('.') + 1);
      const genuine = type !== undefined && message.subject === eventSubject(type.kind, host) && (host === FLEET_WIDE || HOST_TOKEN.test(host));
      if (!type || !genuine || (options.host !== undefined && host !== options.host)) {
        if (type && !genuine) log.warn({ subject: message.subject, typeName }, 'event on a subject that does not match its type: dropped');
        message.ack();
        continue;
      }
      const id = message.headers?.get('Nats-Msg-Id') ?? '';
      if (id !== '' && handled.has(id)) {
        log.debug({ subject: message.subject, sequence: message.seq, eventId: id }, 'event id handled before: repeat dropped');
        message.ack();
        continue;
      }
      try {
        const payload = type.decode(message.data);
        await options.handle({ subject: message.subject, host, typeName, payload, id, sequence: message.seq, deliveries: message.info.deliveryCount });
        message.ack();
        if (id !== '') {
          handled.set(id, true);
          if (handled.size > memory) handled.delete(handled.keys().next().value!);
        }
      } catch (error) {
        log.warn({ err: error, subject: message.subject, sequence: message.seq }, 'event handler failed; will be redelivered');
        message.nak(options.retryDelayMs ?? 1_000);
      }
    }
  })();
  return {
    stop: async () => {
      await messages.close();
      await done;
    },
  };
}
