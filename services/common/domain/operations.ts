/**
 * Long-running operations persisted in JetStream KV, resumable by any replica.
 *
 * Each operation is one KV record holding the google.longrunning.Operation that callers see, the
 * request, a checkpoint of the work done so far, and a lease (owner replica + expiry). The replica that
 * starts an operation runs it and renews the lease; when a replica dies, its leases expire and another
 * replica claims the operation with compare-and-set and resumes from the last checkpoint. Handlers must
 * therefore be written as idempotent steps that read the checkpoint first. A request_id maps to one
 * operation: a retried create returns the same operation.
 *
 * Metrics: every scan sets `cowherd_operations{kind,state}` from KV for the kinds this replica runs
 * (the same numbers on every replica), and each operation that ends here counts once in
 * `cowherd_operations_finished_total{kind,result}`. Logs of a running operation carry its name and kind.
 */
import { createHash, randomUUID } from 'node:crypto';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { JetStreamClient } from '@nats-io/jetstream';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { OperationsService, Operation } from '../../gen/google/longrunning/operations.js';
import type { Any } from '../../gen/google/protobuf/any.js';
import { CowherdError, toStatus } from '../platform/errors.js';
import { jsonCodec, KvConflictError, KvStore } from '../platform/kv.js';
import type { Logger } from '../platform/logger.js';
import { OPERATION_KIND_NAMES } from './operation-kinds.js';
import { OPERATION_NAME } from './resource-names.js';
import { OPERATION_METRIC_STATES, operationsByState, operationsFinished, type OperationMetricState } from '../platform/metrics.js';
import { paginate, PageTokens } from '../platform/pagination.js';
import { backoffDelay, sleep } from '../platform/concurrency.js';
import { isStoreUnavailable } from '../platform/store-errors.js';
import { typeUrlOf } from '../platform/type-urls.js';
import { adaptService, type AccessPolicy, type BoundaryOptions, type Handlers, type ServiceRegistration } from '../platform/rpc.js';

/** The KV bucket of operations. */
export const OPERATIONS_BUCKET = 'operations';

/** A protobuf message type that can be packed into google.protobuf.Any: a generated message codec (`Image`, ...). */
export interface MessageType<T> {
  /** Full name, e.g. cowherd.distribution.v1.DistributeImageMetadata (the codec's static `$type`). */
  readonly $type: string;
  encode(value: T): { finish(): Uint8Array };
  decode(bytes: Uint8Array): T;
}

/** Packs a message into Any. */
export function pack<T>(type: MessageType<T>, value: T): Any {
  return { typeUrl: typeUrlOf(type), value: Buffer.from(type.encode(value).finish()) };
}

/** Unpacks Any; throws when it holds another type. */
export function unpack<T>(type: MessageType<T>, any: Any | undefined): T {
  if (!any || any.typeUrl !== typeUrlOf(type)) throw new Error(`expected ${type.$type}, got ${any?.typeUrl ?? 'nothing'}`);
  return type.decode(any.value);
}

/** How one kind of operation runs. */
export interface OperationKind<Req, Meta, Res, State> {
  /** Unique name, e.g. "distribution.distribute-image". */
  readonly kind: string;
  readonly requestType: MessageType<Req>;
  readonly metadataType: MessageType<Meta>;
  readonly responseType: MessageType<Res>;
  /** Runs (or resumes) the work. Throwing fails the operation with the error's status. */
  run(context: OperationContext<Req, Meta, State>): Promise<Res>;
}

/** What a running operation can do. */
export interface OperationContext<Req, Meta, State> {
  /** operations/{id} */
  readonly name: string;
  readonly request: Req;
  /** The last checkpoint, undefined on the first run. */
  readonly state: State | undefined;
  /** Current metadata (progress). */
  readonly metadata: Meta;
  /** Aborted when this replica loses the lease, stops, or the operation is cancelled. */
  readonly signal: AbortSignal;
  readonly log: Logger;
  /** Persists progress and/or a checkpoint; throws if this replica no longer owns the operation. */
  checkpoint(update: { metadata?: Meta; state?: State }): Promise<void>;
  /** True once a caller asked to cancel. */
  cancelRequested(): boolean;
}

/** The stored record. JSON with protobuf parts base64-encoded. */
interface OperationRecord {
  readonly name: string;
  readonly kind: string;
  readonly requestId: string;
  readonly requestFingerprint: string;
  readonly request: string;
  readonly operation: string;
  readonly state: unknown;
  readonly owner: string;
  readonly leaseExpiresAt: number;
  readonly cancelRequested: boolean;
  readonly createTime: string;
  readonly updateTime: string;
}

/** Options of {@link OperationManager}. */
export interface OperationManagerOptions {
  readonly js: JetStreamClient;
  readonly log: Logger;
  readonly pageTokens: PageTokens;
  /** Identifies this replica in leases; default a random UUID. */
  readonly replicaId?: string;
  /** Lease length; renewed at a third of it. Default 15 s. */
  readonly leaseMs?: number;
  /** How often to look for orphaned operations. Default 5 s. */
  readonly scanIntervalMs?: number;
  /** Finished operations are kept this long in KV. Default 7 days. */
  readonly retentionMs?: number;
}

/** Creates, runs, resumes, lists, cancels and deletes the operations of one service. */
export class OperationManager {
  readonly replicaId: string;
  private readonly kinds = new Map<string, OperationKind<unknown, unknown, unknown, unknown>>();
  private readonly running = new Map<string, { controller: AbortController; done: Promise<void> }>();
  private scanTimer: NodeJS.Timeout | undefined;
  private stopped = false;

  private constructor(
    private readonly store: KvStore<OperationRecord>,
    private readonly index: KvStore<RequestIdEntry>,
    private readonly options: OperationManagerOptions,
  ) {
    this.replicaId = options.replicaId ?? randomUUID();
  }

  /** Opens the buckets; call `register` for every kind, then `resumeOrphans` to start scanning. */
  static async open(options: OperationManagerOptions): Promise<OperationManager> {
    const store = await KvStore.open(options.js, OPERATIONS_BUCKET, jsonCodec<OperationRecord>());
    const index = await KvStore.open(options.js, `${OPERATIONS_BUCKET}-request-ids`, jsonCodec<RequestIdEntry>());
    return new OperationManager(store, index, options);
  }

  private get leaseMs(): number {
    return this.options.leaseMs ?? 15_000;
  }

  /** Makes a kind runnable (and resumable) on this replica. */
  register<Req, Meta, Res, State>(kind: OperationKind<Req, Meta, Res, State>): void {
    this.kinds.set(kind.kind, kind as OperationKind<unknown, unknown, unknown, unknown>);
  }

  /** Starts the periodic scan that claims operations whose owner's lease ran out. */
  resumeOrphans(): void {
    const scan = (): void => {
      if (this.stopped) return;
      this.claimOrphans()
        .catch((error: unknown) => this.options.log.warn({ err: error }, 'operation scan failed'))
        .finally(() => {
          if (!this.stopped) this.scanTimer = setTimeout(scan, this.options.scanIntervalMs ?? 5_000);
        });
    };
    scan();
  }

  /**
   * Creates an operation and starts running it here. With a request_id, a retry of the same request
   * returns the existing operation; the same request_id with a different request is INVALID_ARGUMENT.
   */
  async start<Req, Meta>(kind: OperationKind<Req, Meta, unknown, unknown>, request: Req, initialMetadata: Meta, requestId: string): Promise<Operation> {
    const requestBytes = Buffer.from(kind.requestType.encode(request).finish());
    const requestFingerprint = createHash('sha256').update(kind.kind).update(requestBytes).digest('hex');
    const name = OPERATION_NAME.format({ operation: randomUUID() });
    if (requestId !== '') {
      const indexKey = requestIndexKey(kind.kind, requestId);
      const beingCreated = (): CowherdError =>
        new CowherdError(GrpcStatus.ABORTED, 'an operation with this request_id is being created; retry', {
          reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT,
        });
      try {
        await this.index.create(indexKey, { name, createdAt: Date.now() });
      } catch (error) {
        if (!(error instanceof KvConflictError)) throw error;
        const existing = await this.index.get(indexKey);
        const record = existing ? await this.store.get(keyOf(existing.value.name)) : undefined;
        if (!record) {
          // The entry is written just before the record. An entry without a record that is older than any
          // creation takes means its replica died in between: this request takes the request_id over
          // (compare-and-set, so two retries cannot both do it). Entries from before `createdAt` count as old.
          if (!existing || Date.now() - (existing.value.createdAt ?? 0) < ORPHANED_REQUEST_ID_MS) throw beingCreated();
          try {
            await this.index.update(indexKey, { name, createdAt: Date.now() }, existing.revision);
          } catch (conflict) {
            if (conflict instanceof KvConflictError) throw beingCreated();
            throw conflict;
          }
          this.options.log.warn(
            { operation: name, kind: kind.kind, orphanedOperation: existing.value.name },
            'took over a request_id whose operation was never created',
          );
          return this.create(kind, name, requestBytes, requestFingerprint, initialMetadata, requestId);
        }
        if (record.value.requestFingerprint !== requestFingerprint) {
          throw new CowherdError(GrpcStatus.ALREADY_EXISTS, 'request_id was already used for a different request', {
            reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT,
            field: 'request_id',
          });
        }
        return Operation.decode(Buffer.from(record.value.operation, 'base64'));
      }
    }
    return this.create(kind, name, requestBytes, requestFingerprint, initialMetadata, requestId);
  }

  /** Writes the operation's record and launches it here. */
  private async create<Req, Meta>(
    kind: OperationKind<Req, Meta, unknown, unknown>,
    name: string,
    requestBytes: Buffer,
    requestFingerprint: string,
    initialMetadata: Meta,
    requestId: string,
  ): Promise<Operation> {
    const now = new Date().toISOString();
    const operation: Operation = { name, metadata: pack(kind.metadataType, initialMetadata), done: false, result: undefined };
    const record: OperationRecord = {
      name,
      kind: kind.kind,
      requestId,
      requestFingerprint,
      request: requestBytes.toString('base64'),
      operation: encodeOperation(operation),
      state: null,
      owner: this.replicaId,
      leaseExpiresAt: Date.now() + this.leaseMs,
      cancelRequested: false,
      createTime: now,
      updateTime: now,
    };
    const revision = await this.store.create(keyOf(name), record);
    this.options.log.info({ operation: name, kind: kind.kind }, 'operation started');
    // The next scan sets the exact numbers; until then count this one in.
    if (this.kinds.has(kind.kind)) operationsByState.inc({ kind: kind.kind, state: 'running' });
    this.launch(record, revision);
    return operation;
  }

  /** The operation a request_id of `kind` created, if any (a retry must get it back before re-validating). */
  async findByRequestId(kind: string, requestId: string): Promise<Operation | undefined> {
    if (requestId === '') return undefined;
    const existing = await this.index.get(requestIndexKey(kind, requestId));
    const record = existing ? await this.store.get(keyOf(existing.value.name)) : undefined;
    return record ? Operation.decode(Buffer.from(record.value.operation, 'base64')) : undefined;
  }

  /** The operation as callers see it. */
  async get(name: string): Promise<Operation> {
    const record = await this.store.get(keyOf(validName(name)));
    if (!record) throw CowherdError.notFound(name);
    return Operation.decode(Buffer.from(record.value.operation, 'base64'));
  }

  /** Lists operations, newest names first is not promised: ordered by name for stable paging. */
  async list(request: { filter: string; pageSize: number; pageToken: string }): Promise<{ operations: Operation[]; nextPageToken: string }> {
    // Kinds registered here count too: tests run kinds of their own.
    const filter = parseFilter(request.filter, new Set([...OPERATION_KIND_NAMES, ...this.kinds.keys()]));
    const records = (await this.store.list('*')).map((entry) => entry.value).filter((record) => filter(record));
    const { page, nextPageToken } = paginate(records, (record) => record.name, {
      pageSize: request.pageSize,
      pageToken: request.pageToken,
      query: `operations|${request.filter}`,
      tokens: this.options.pageTokens,
    });
    return { operations: page.map((record) => Operation.decode(Buffer.from(record.operation, 'base64'))), nextPageToken };
  }

  /** Asks the operation to stop; it ends with CANCELLED at its next checkpoint. */
  async cancel(name: string): Promise<void> {
    const result = await this.store.mutate(keyOf(validName(name)), (current) =>
      current && !current.cancelRequested && !decodeDone(current) ? { ...current, cancelRequested: true } : undefined,
    );
    if (!result) throw CowherdError.notFound(name);
    this.running.get(name)?.controller.abort(cancelledError());
  }

  /** Forgets a finished operation; a running one is FAILED_PRECONDITION. */
  async delete(name: string): Promise<void> {
    const record = await this.store.get(keyOf(validName(name)));
    if (!record) throw CowherdError.notFound(name);
    if (!decodeDone(record.value))
      throw CowherdError.failedPrecondition(`${name} is still running; cancel it first`, ErrorReason.ERROR_REASON_OPERATION_CONFLICT);
    await this.store.delete(keyOf(name), record.revision);
  }

  /** Waits until the operation is done or `timeoutMs` passes, then returns its latest state. */
  async wait(name: string, timeoutMs: number): Promise<Operation> {
    const first = await this.get(name);
    if (first.done) return first;
    return new Promise((resolve, reject) => {
      let stopWatching: (() => void) | undefined;
      const finish = (): void => {
        clearTimeout(timer);
        stopWatching?.();
        this.get(name).then(resolve, reject);
      };
      const timer = setTimeout(finish, timeoutMs);
      this.store
        .watch(keyOf(name), (change) => {
          if (!change.value || decodeDone(change.value)) finish();
        })
        .then((stop) => {
          stopWatching = stop;
        }, reject);
    });
  }

  /** Stops claiming and running; running operations keep their checkpoint and are released to other replicas. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.scanTimer);
    const running = [...this.running.values()];
    for (const { controller } of running) controller.abort(new Error('replica stopping'));
    await Promise.all(running.map((entry) => entry.done));
  }

  private async claimOrphans(): Promise<void> {
    const now = Date.now();
    const entries = await this.store.list('*');
    const counts = new Map<string, Map<OperationMetricState, number>>(
      [...this.kinds.keys()].map((kind) => [kind, new Map(OPERATION_METRIC_STATES.map((state) => [state, 0]))]),
    );
    const orphans: typeof entries = [];
    for (const entry of entries) {
      const record = entry.value;
      const perState = counts.get(record.kind);
      if (!perState) continue;
      const state = metricStateOf(record, now);
      perState.set(state, (perState.get(state) ?? 0) + 1);
      if (state === 'orphaned' && !this.running.has(record.name)) orphans.push(entry);
    }
    for (const [kind, perState] of counts) for (const [state, count] of perState) operationsByState.set({ kind, state }, count);
    for (const entry of orphans) {
      const record = entry.value;
      const claimed: OperationRecord = { ...record, owner: this.replicaId, leaseExpiresAt: Date.now() + this.leaseMs, updateTime: new Date().toISOString() };
      try {
        const revision = await this.store.update(entry.key, claimed, entry.revision);
        this.options.log.info({ operation: record.name, kind: record.kind, previousOwner: record.owner }, 'resuming operation');
        operationsByState.dec({ kind: record.kind, state: 'orphaned' });
        operationsByState.inc({ kind: record.kind, state: 'running' });
        this.launch(claimed, revision);
      } catch (error) {
        if (!(error instanceof KvConflictError)) throw error;
      }
    }
  }

  private launch(record: OperationRecord, revision: number): void {
    const kind = this.kinds.get(record.kind);
    if (!kind) throw new Error(`operation kind ${record.kind} is not registered`);
    const controller = new AbortController();
    const log = this.options.log.child({ operation: record.name, kind: record.kind });
    let current = { record, revision };

    // Every write goes through compare-and-set on our last revision: if another replica took the
    // operation over (our lease expired), the write fails and this run stops.
    // A store that does not answer (a NATS node or the cluster restarting, a leader election) is waited out with
    // jittered backoff, never turned into the operation's end: the fault suite saw 5-40 s of "no responders" and
    // timeouts after a restart. A write whose answer was lost may have landed: a conflict with exactly the record
    // we wrote is our own write.
    // Writes go one at a time: a lease renewal and a checkpoint sent together would both compare-and-set against
    // the same revision, and the loser would take its own replica's write for another replica's takeover (seen
    // after a store outage, when both had been waiting for it).
    let writes: Promise<void> = Promise.resolve();
    const write = (change: (record: OperationRecord) => OperationRecord): Promise<void> => {
      const run = writes.then(() => writeNow(change));
      writes = run.catch(() => undefined);
      return run;
    };
    const writeNow = async (change: (record: OperationRecord) => OperationRecord): Promise<void> => {
      const next = change(current.record);
      try {
        const nextRevision = await retryWhileStoreUnavailable(
          () => this.store.update(keyOf(record.name), next, current.revision),
          () => this.stopped,
          log,
        );
        current = { record: next, revision: nextRevision };
      } catch (error) {
        if (error instanceof KvConflictError) {
          const landed = await retryWhileStoreUnavailable(
            () => this.store.get(keyOf(record.name)),
            () => this.stopped,
            log,
          ).catch(() => undefined);
          if (landed && JSON.stringify(landed.value) === JSON.stringify(next)) {
            current = { record: landed.value, revision: landed.revision };
            return;
          }
          // A cancel request is the one change others make to a record we own: take it and retry once.
          const fresh = await this.store.get(keyOf(record.name));
          if (fresh && fresh.value.owner === this.replicaId && fresh.value.cancelRequested) {
            current = { record: fresh.value, revision: fresh.revision };
            controller.abort(cancelledError());
            return writeNow(change);
          }
          controller.abort(new Error('lease lost'));
          throw new CowherdError(GrpcStatus.ABORTED, `${record.name} is now run by another replica`, { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT });
        }
        throw error;
      }
    };
    // One renewal at a time: while the store is away a renewal waits, and the next tick must not queue behind it.
    let renewing = false;
    const renew = setInterval(
      () => {
        if (renewing) return;
        renewing = true;
        write((r) => ({ ...r, leaseExpiresAt: Date.now() + this.leaseMs }))
          .catch((error: unknown) => log.warn({ err: error }, 'lease renewal failed'))
          .finally(() => (renewing = false));
      },
      Math.max(100, Math.floor(this.leaseMs / 3)),
    );

    const operationNow = (): Operation => Operation.decode(Buffer.from(current.record.operation, 'base64'));
    const context: OperationContext<unknown, unknown, unknown> = {
      name: record.name,
      request: kind.requestType.decode(Buffer.from(record.request, 'base64')),
      // The latest checkpoint: a run that starts again after a store outage resumes from where it got to.
      get state() {
        return current.record.state ?? undefined;
      },
      get metadata() {
        return unpack(kind.metadataType, operationNow().metadata);
      },
      signal: controller.signal,
      log,
      checkpoint: async (update) => {
        if (controller.signal.aborted) throw controller.signal.reason;
        await write((r) => {
          const operation = Operation.decode(Buffer.from(r.operation, 'base64'));
          if (update.metadata !== undefined) operation.metadata = pack(kind.metadataType, update.metadata);
          return {
            ...r,
            operation: encodeOperation(operation),
            state: update.state === undefined ? r.state : update.state,
            updateTime: new Date().toISOString(),
          };
        });
      },
      cancelRequested: () => current.record.cancelRequested,
    };
    if (record.cancelRequested) controller.abort(cancelledError());

    const done = (async () => {
      let result: Operation['result'];
      const wasCancelled = (): boolean => current.record.cancelRequested || (controller.signal.aborted && isCancellation(controller.signal.reason));
      try {
        // Steps are idempotent and read their checkpoint (as a takeover needs): a run that failed only because the
        // store did not answer runs again from its checkpoint once it does, instead of ending FAILED.
        let response: unknown;
        for (let attempt = 0; ; attempt++) {
          try {
            response = await kind.run(context);
            break;
          } catch (error) {
            if (controller.signal.aborted || this.stopped || !isStoreUnavailable(error)) throw error;
            log.warn({ err: error, attempt }, 'the store did not answer during the operation; running it again from its checkpoint');
            await sleep(storeBackoffMs(attempt), controller.signal);
          }
        }
        result = { $case: 'response', value: pack(kind.responseType, response) };
      } catch (error) {
        if (controller.signal.aborted && !wasCancelled()) {
          // Stopping or lease lost: leave the operation to whoever runs it next.
          log.info({ reason: String(controller.signal.reason) }, 'operation paused on this replica');
          clearInterval(renew);
          if (!this.stopped) return;
          await write((r) => ({ ...r, leaseExpiresAt: 0 })).catch(() => undefined);
          return;
        }
        result = { $case: 'error', value: wasCancelled() ? toStatus(cancelledError()) : toStatus(error) };
        if (!wasCancelled()) log.warn({ err: error }, 'operation failed');
      }
      clearInterval(renew);
      await write((r) => {
        const operation = Operation.decode(Buffer.from(r.operation, 'base64'));
        operation.done = true;
        operation.result = result;
        return { ...r, operation: encodeOperation(operation), leaseExpiresAt: 0, updateTime: new Date().toISOString() };
      }).catch((error: unknown) => log.warn({ err: error }, 'could not record the end of the operation'));
      const outcome = result?.$case === 'response' ? 'succeeded' : wasCancelled() ? 'cancelled' : 'failed';
      operationsFinished.inc({ kind: record.kind, result: outcome });
      operationsByState.dec({ kind: record.kind, state: 'running' });
      operationsByState.inc({ kind: record.kind, state: outcome });
      log.info({ ok: result?.$case === 'response', result: outcome }, 'operation done');
    })().finally(() => {
      clearInterval(renew);
      this.running.delete(record.name);
    });
    this.running.set(record.name, { controller, done });
  }
}

/** google.longrunning.Operations handlers over a manager. */
export function operationsHandlers(manager: OperationManager): Handlers<typeof OperationsService> {
  return {
    listOperations: async (request) => {
      if (request.name !== '' && request.name !== 'operations') throw CowherdError.invalidArgument('name', 'must be "operations" or empty');
      return { ...(await manager.list(request)), unreachable: [] };
    },
    getOperation: (request) => manager.get(request.name),
    deleteOperation: async (request) => {
      await manager.delete(request.name);
      return {};
    },
    cancelOperation: async (request) => {
      await manager.cancel(request.name);
      return {};
    },
    waitOperation: (request) => {
      const seconds = request.timeout ? Number(request.timeout.seconds) + request.timeout.nanos / 1e9 : 60;
      if (!(seconds >= 0)) throw CowherdError.invalidArgument('timeout', 'must not be negative');
      return manager.wait(request.name, Math.min(seconds, 600) * 1000);
    },
  };
}

/** Operations are visible to admins and to services (which follow each other's operations). */
export const OPERATIONS_POLICY: AccessPolicy<typeof OperationsService> = {
  listOperations: { allow: ['admin', 'service'] },
  getOperation: { allow: ['admin', 'service'] },
  deleteOperation: { allow: ['admin'] },
  cancelOperation: { allow: ['admin'] },
  waitOperation: { allow: ['admin', 'service'] },
};

function validName(name: string): string {
  if (!OPERATION_NAME.matches(name)) throw CowherdError.invalidArgument('name', 'must look like operations/{uuid}');
  return name;
}

/** An entry of the request_id index: the operation a request_id created, and when (ms since the epoch). */
interface RequestIdEntry {
  readonly name: string;
  readonly createdAt?: number;
}

/** A request_id entry without its operation record for this long was left by a replica that died. */
const ORPHANED_REQUEST_ID_MS = 30_000;

function requestIndexKey(kind: string, requestId: string): string {
  return `${kind}.${createHash('sha256').update(requestId).digest('hex')}`;
}

/** The KV key of an operation: its id. */
function keyOf(name: string): string {
  const parsed = OPERATION_NAME.parse(name);
  if (!parsed) throw CowherdError.invalidArgument('name', 'must look like operations/{uuid}');
  return parsed.operation;
}

function encodeOperation(operation: Operation): string {
  return Buffer.from(Operation.encode(operation).finish()).toString('base64');
}

function decodeDone(record: OperationRecord): boolean {
  return Operation.decode(Buffer.from(record.operation, 'base64')).done;
}

/** The state `cowherd_operations` counts a record in; `orphaned` is unfinished with no live lease. */
function metricStateOf(record: OperationRecord, now: number): OperationMetricState {
  const operation = Operation.decode(Buffer.from(record.operation, 'base64'));
  if (!operation.done) return record.leaseExpiresAt > now ? 'running' : 'orphaned';
  if (operation.result?.$case === 'response') return 'succeeded';
  return operation.result?.$case === 'error' && operation.result.value.code === GrpcStatus.CANCELLED ? 'cancelled' : 'failed';
}

function cancelledError(): CowherdError {
  return new CowherdError(GrpcStatus.CANCELLED, 'operation cancelled by request', { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT });
}

function isCancellation(reason: unknown): boolean {
  return reason instanceof CowherdError && reason.code === GrpcStatus.CANCELLED;
}

/** Filters: "" (all), "done=true", "done=false", "kind=<kind>" (one of `kinds`), joined by " AND ". */
function parseFilter(filter: string, kinds: ReadonlySet<string>): (record: OperationRecord) => boolean {
  if (filter.trim() === '') return () => true;
  const tests = filter.split(/\s+AND\s+/).map((term) => {
    const match = /^\s*(done|kind)\s*=\s*"?([A-Za-z0-9._-]+)"?\s*$/.exec(term);
    if (!match) throw CowherdError.invalidArgument('filter', `cannot parse ${JSON.stringify(term)}; use done=true|false and kind=<kind> joined by AND`);
    const [, field, value] = match;
    if (field === 'done') {
      if (value !== 'true' && value !== 'false') throw CowherdError.invalidArgument('filter', 'done must be true or false');
      return (record: OperationRecord) => decodeDone(record) === (value === 'true');
    }
    if (!kinds.has(value!)) throw CowherdError.invalidArgument('filter', `${JSON.stringify(value)} is not a value of kind; allowed: ${[...kinds].join(', ')}`);
    return (record: OperationRecord) => record.kind === value;
  });
  return (record) => tests.every((test) => test(record));
}

/**
 * The operations of a service that runs long work: opens the manager, starts resuming orphans, and
 * returns it with the google.longrunning.Operations registration to serve next to the service.
 */
export async function openOperations(
  js: JetStreamClient,
  log: Logger,
  boundary: BoundaryOptions,
  kinds: ReadonlyArray<OperationKind<never, never, never, never>> = [],
): Promise<{ manager: OperationManager; service: ServiceRegistration }> {
  const manager = await OperationManager.open({ js, log, pageTokens: await PageTokens.open(js) });
  // Kinds first: the first scan may find orphans of them.
  for (const kind of kinds) manager.register(kind as OperationKind<unknown, unknown, unknown, unknown>);
  manager.resumeOrphans();
  return { manager, service: adaptService(OperationsService, operationsHandlers(manager), OPERATIONS_POLICY, boundary) };
}

/** Jittered exponential backoff for a store that does not answer: 200 ms doubling to 5 s. */
function storeBackoffMs(attempt: number): number {
  return backoffDelay(attempt + 1, 200, 5_000);
}

/** Runs `attempt` until it succeeds or fails with anything but an unanswering store (or `stopped()` turns true). */
async function retryWhileStoreUnavailable<T>(attempt: () => Promise<T>, stopped: () => boolean, log: Logger): Promise<T> {
  for (let count = 0; ; count++) {
    try {
      return await attempt();
    } catch (error) {
      if (stopped() || !isStoreUnavailable(error)) throw error;
      if (count === 0 || count % 10 === 0) log.warn({ err: error, attempt: count }, 'the store did not answer; retrying');
      await sleep(storeBackoffMs(count));
    }
  }
}
