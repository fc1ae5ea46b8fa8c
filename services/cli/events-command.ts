/**
 * `cowherd events`: the fleet's event stream, read with the admin credentials over NATS TLS.
 *
 * NATS gives admins read-only access (nats-authorization.ts permissionsFor): a core subscription to
 * `cowherd.events.>`, stream info and reading stored events by sequence, but no JetStream consumers (nats
 * 2.9 could not keep an admin's consumers apart from the services' durable ones). So the recent past is read
 * backwards by sequence with STREAM.MSG.GET, and --follow is a core subscription: it sees what is published
 * while it runs (at most once; nothing is replayed after a disconnect), which is what following a stream
 * needs. Payloads are decoded with cowherd.events.v1 by their Cowherd-Event-Type header, and an event whose
 * subject does not match its type is dropped, as the services' consumers drop it.
 */
import type { Msg, MsgHdrs } from '@nats-io/transport-node';
import * as eventMessages from '../gen/cowherd/events/v1/events.js';
import { ALL_EVENT_TYPES } from '../common/domain/event-types.js';
import { EVENT_STREAM, EVENT_SUBJECT_PREFIX, EVENT_TYPE_HEADER, eventSubject, FLEET_WIDE } from '../common/platform/events.js';
import { createLogger } from '../common/platform/logger.js';
import { connectNats, type Nats } from '../common/platform/nats.js';
import type { CommandSpec } from './command-line.js';
import type { CliContext } from './cli-context.js';
import { CliError, EXIT } from './exit-codes.js';
import { bareId, shortVirtualMachineName } from './fleet-reads.js';
import { enumWord, formatBytes } from './output.js';
import { describeTransfer } from './progress.js';
import { ArgumentReader } from './resource-arguments.js';

/** How far back `--last` looks, in stored events, before it gives up finding matches. */
const MAX_SCAN = 10_000;
const KINDS = ALL_EVENT_TYPES.map((type) => type.kind);
const AREAS = [...new Set(KINDS.map((kind) => kind.split('.')[0]!))];

/** One event as the CLI prints it. */
interface ShownEvent {
  readonly sequence: number | undefined;
  readonly subject: string;
  readonly kind: string;
  readonly host: string;
  readonly typeName: string;
  readonly time: string;
  /** The event as proto JSON. */
  readonly payload: Record<string, unknown>;
  /** The decoded message. */
  readonly message: unknown;
  readonly id: string | undefined;
}

export const EVENTS_COMMAND: CommandSpec<CliContext> = {
  name: 'events',
  summary: 'show the latest fleet events, or follow them live with --follow',
  options: [
    { name: 'types', value: '<a,b>', description: `event kinds (clone.done, image.available, ...) or areas (${AREAS.join(', ')}); default all` },
    { name: 'host', value: '<host>', description: 'only events about this host' },
    { name: 'last', value: '<n>', description: 'how many stored events to show first (default 20; 0 with --follow)' },
    { name: 'follow', description: 'keep printing events as they happen until Ctrl-C' },
  ],
  details: `Event kinds: ${KINDS.join(', ')}.\nWith --output json, one JSON object per line: sequence, subject, kind, host, type, time and the event as proto JSON.\nNATS is --nats / COWHERD_NATS_URL (default: the local fleet's, else tls://localhost:4222).`,
  run: async (invocation, context) => {
    const args = new ArgumentReader(invocation.command);
    const selectors = invocation
      .list('types')
      .flatMap((value) => value.split(','))
      .map((value) => value.trim())
      .filter((value) => value !== '');
    for (const selector of selectors)
      if (!KINDS.includes(selector) && !AREAS.includes(selector))
        args.fail(`unknown event type ${JSON.stringify(selector)}; kinds: ${KINDS.join(', ')}; areas: ${AREAS.join(', ')}`);
    const hostOption = invocation.string('host');
    const host = hostOption === undefined ? undefined : bareId(args.host(hostOption, '--host'));
    const follow = invocation.flag('follow');
    const last = args.integer(invocation.string('last') ?? (follow ? '0' : '20'), '--last', 0, MAX_SCAN);
    const wanted = (kind: string, eventHost: string): boolean =>
      (selectors.length === 0 || selectors.some((selector) => selector === kind || kind.startsWith(`${selector}.`))) &&
      (host === undefined || eventHost === host);

    const nats = await connect(context);
    try {
      const print = printer(context);
      const seen = new Set<string>();
      let live: AsyncIterable<Msg> | undefined;
      if (follow) {
        const subjects =
          selectors.length === 0
            ? [host === undefined ? `${EVENT_SUBJECT_PREFIX}.>` : `${EVENT_SUBJECT_PREFIX}.*.*.${host}`]
            : selectors.map((selector) =>
                KINDS.includes(selector) ? eventSubject(selector, host ?? '*') : `${EVENT_SUBJECT_PREFIX}.${selector}.*.${host ?? '*'}`,
              );
        const subscriptions = subjects.map((subject) => nats.connection.subscribe(subject));
        await nats.connection.flush();
        live = merge(subscriptions);
      }
      if (last > 0) {
        for (const event of await recentEvents(nats, last, wanted)) {
          if (event.id) seen.add(event.id);
          print(event);
        }
      }
      if (!live) return EXIT.OK;
      context.out.note(
        `following ${selectors.length === 0 ? 'every event' : selectors.join(', ')}${host === undefined ? '' : ` about ${host}`} on ${context.settings.natsUrls.join(',')}; Ctrl-C stops`,
      );
      const stop = (): void => void nats.connection.close();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      try {
        for await (const message of live) {
          const event = decode(message.subject, message.headers, message.data, undefined, new Date());
          if (!event || !wanted(event.kind, event.host)) continue;
          if (event.id && seen.has(event.id)) continue;
          print(event);
        }
      } finally {
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
      }
      return EXIT.OK;
    } finally {
      await nats.close().catch(() => undefined);
    }
  },
};

async function connect(context: CliContext): Promise<Nats> {
  const bundle = context.credentials();
  const urls = context.settings.natsUrls.join(',');
  try {
    return await connectNats({
      servers: context.settings.natsUrls,
      tls: bundle.files,
      name: `cowherd-cli ${bundle.identity}`,
      log: createLogger({ service: 'cli', level: 'silent' }),
      connectTimeoutMs: context.settings.timeoutMs,
    });
  } catch (error) {
    const message = (error as Error).message;
    if (/authorization|permission/i.test(message)) {
      throw new CliError(
        `NATS at ${urls} refused the certificate in ${context.settings.credentialsDirectory} (${message}): NATS admits only certificates the CA issued and recorded (IssueCertificate; the local fleet's admin bundle is one)`,
        EXIT.ACCESS,
      );
    }
    throw new CliError(
      `cannot reach NATS at ${urls} (${message}); is the fleet running? Point --nats or COWHERD_NATS_URL at its NATS (tls://host:4222)`,
      EXIT.UNAVAILABLE,
    );
  }
}

/** The last `count` stored events that match, oldest first, found by reading backwards by sequence. */
async function recentEvents(nats: Nats, count: number, wanted: (kind: string, host: string) => boolean): Promise<ShownEvent[]> {
  let state: { first_seq: number; last_seq: number };
  try {
    state = (await nats.manager.streams.info(EVENT_STREAM)).state;
  } catch (error) {
    if (/not found/i.test((error as Error).message)) return [];
    throw new CliError(
      `cannot read the event stream ${EVENT_STREAM}: ${(error as Error).message}`,
      /permission/i.test((error as Error).message) ? EXIT.ACCESS : EXIT.FAILURE,
    );
  }
  const found: ShownEvent[] = [];
  for (
    let sequence = state.last_seq, scanned = 0;
    sequence >= state.first_seq && sequence > 0 && found.length < count && scanned < MAX_SCAN;
    sequence--, scanned++
  ) {
    const stored = await nats.manager.streams.getMessage(EVENT_STREAM, { seq: sequence }).catch(() => null);
    if (!stored) continue;
    const event = decode(stored.subject, stored.header, stored.data, stored.seq, stored.time);
    if (event && wanted(event.kind, event.host)) found.push(event);
  }
  return found.reverse();
}

/** Decodes one event; undefined for unknown types and subjects that do not match their type. */
function decode(subject: string, headers: MsgHdrs | undefined, data: Uint8Array, sequence: number | undefined, received: Date): ShownEvent | undefined {
  const typeName = headers?.get(EVENT_TYPE_HEADER) ?? '';
  const type = ALL_EVENT_TYPES.find((candidate) => candidate.typeName === typeName);
  const host = subject.slice(subject.lastIndexOf('.') + 1);
  if (!type || subject !== eventSubject(type.kind, host)) return undefined;
  const message = (eventMessages as unknown as Record<string, { decode(bytes: Uint8Array): unknown; toJSON(value: unknown): unknown }>)[
    typeName.slice(typeName.lastIndexOf('.') + 1)
  ];
  if (!message) return undefined;
  let decoded: unknown;
  let payload: Record<string, unknown>;
  try {
    decoded = message.decode(data);
    payload = message.toJSON(decoded) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  const occurred = typeof payload['occurTime'] === 'string' ? payload['occurTime'] : received.toISOString();
  return { sequence, subject, kind: type.kind, host, typeName, time: occurred, payload, message: decoded, id: headers?.get('Nats-Msg-Id') || undefined };
}

function printer(context: CliContext): (event: ShownEvent) => void {
  return (event) => {
    if (context.out.format === 'json') {
      context.out.jsonLine({
        ...(event.sequence === undefined ? {} : { sequence: event.sequence }),
        subject: event.subject,
        kind: event.kind,
        host: event.host === FLEET_WIDE ? '' : event.host,
        type: event.typeName,
        time: event.time,
        event: event.payload,
      });
      return;
    }
    const time = event.time.replace('T', ' ').replace(/\.\d+Z$/, 'Z');
    context.out.line(`${time.padEnd(20)}  ${event.kind.padEnd(23)}  ${(event.host === FLEET_WIDE ? '-' : event.host).padEnd(16)}  ${summary(event)}`);
  };
}

/** One human line per event kind (fields as proto JSON names). */
function summary(event: ShownEvent): string {
  const { kind, payload } = event;
  const text = (key: string): string => (typeof payload[key] === 'string' ? (payload[key] as string) : '');
  const status = (): string => ((payload['status'] ?? payload['error']) as { message?: string } | undefined)?.message ?? '';
  const vm = (name: string): string => shortVirtualMachineName(name);
  switch (kind) {
    case 'host.enrolled':
      return `${text('host')} enrolled (${text('certificate')})`;
    case 'host.ready':
      return `${text('host')} is READY (${enumWord(text('hypervisor'), 'HYPERVISOR_')}, agent ${text('agentVersion') || '-'})`;
    case 'host.unreachable':
      return `${text('host')} is UNREACHABLE (last heartbeat ${text('lastHeartbeatTime') || '-'})`;
    case 'host.drained':
      return `${text('host')} has no managed VMs left`;
    case 'host.deleted':
      return `${text('host')} removed${payload['forced'] ? ' (forced)' : ''}`;
    case 'certificate.revoked':
      return `${text('identity')} serial ${text('serialNumber')} (${enumWord(text('reason'), 'REVOCATION_REASON_') || 'UNSPECIFIED'})`;
    case 'image.published':
      // An ImportImage has no source VM: the image came from a file on its origin host.
      return `${text('image')} ${text('sourceVirtualMachine') ? `from ${vm(text('sourceVirtualMachine'))}` : `imported on ${text('originHost')}`} (${formatBytes(text('totalBytes'))})`;
    case 'image.publish_failed':
      return `${text('image')}: ${status()}`;
    case 'image.transfer_progress': {
      const progress = event.message as eventMessages.ImageTransferProgress;
      return `${progress.replica} ${enumWord(text('state'), 'STATE_')} ${describeTransfer(progress.progress)}`;
    }
    case 'image.available':
      return `${text('replica')} (${formatBytes(text('totalBytes'))}${payload['origin'] ? ', origin' : ''})`;
    case 'image.transfer_failed':
      return `${text('replica')}: ${status()}`;
    case 'image.replica_damaged': {
      const files = Array.isArray(payload['damagedFiles']) ? (payload['damagedFiles'] as string[]).join(', ') : '';
      const dependents = Array.isArray(payload['dependentVirtualMachines']) ? payload['dependentVirtualMachines'].length : 0;
      return `${text('replica')} generation ${text('generation') || '1'}: ${files} damaged (${Number(payload['badPieces'] ?? 0)} bad pieces, ${dependents} dependent VMs)`;
    }
    case 'image.replica_deleted':
      return `${text('replica')} (${formatBytes(text('freedBytes'))} freed)`;
    case 'image.deleted':
      return text('image');
    case 'clone.done':
      return `${vm(text('virtualMachine'))} from ${text('image') || vm(text('sourceVirtualMachine'))}${payload['started'] ? ', started' : ''}`;
    case 'clone.rebased':
      return `${vm(text('virtualMachine'))} ${bareId(text('previousImageVersion')) || '?'} -> ${bareId(text('imageVersion'))}${payload['restarted'] ? ', started' : ''}`;
    case 'clone.failed':
      return `${text('domainName')} on ${bareId(text('host'))}: ${status()}`;
    case 'vm.changed': {
      const changed = (payload['virtualMachine'] ?? {}) as Record<string, unknown>;
      return `${enumWord(text('type'), 'TYPE_')} ${vm(String(changed['name'] ?? ''))} ${enumWord(String(changed['state'] ?? ''), 'STATE_')}`.trimEnd();
    }
    case 'operation.done':
      return `${text('operation')} ${text('method').slice(text('method').lastIndexOf('/') + 1)} ${payload['error'] ? `failed: ${status()}` : 'succeeded'}`;
    default:
      return JSON.stringify(payload);
  }
}

/** One iterator over several subscriptions; ends when the connection closes. */
async function* merge(subscriptions: readonly AsyncIterable<Msg>[]): AsyncIterable<Msg> {
  const queue: Msg[] = [];
  let wake: (() => void) | undefined;
  let open = subscriptions.length;
  for (const subscription of subscriptions) {
    void (async () => {
      try {
        for await (const message of subscription) {
          queue.push(message);
          wake?.();
        }
      } catch {
        // A closed connection ends the subscription: following stops.
      } finally {
        open--;
        wake?.();
      }
    })();
  }
  while (open > 0 || queue.length > 0) {
    if (queue.length === 0) await new Promise<void>((resolve) => (wake = resolve));
    while (queue.length > 0) yield queue.shift()!;
  }
}
