/**
 * Prometheus metrics: one registry per process, the metrics every cowherd process shares, and the plaintext
 * HTTP endpoint that serves them (GET /metrics, nothing else). Label values are method names, codes, kinds
 * and image ids: never caller identities, tokens or paths, so the endpoint can stay unauthenticated.
 * The list of metrics with their meaning is in services/common/README.md; keep both in step.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import {
  Counter,
  Gauge,
  Histogram,
  Registry,
  collectDefaultMetrics,
  type CounterConfiguration,
  type GaugeConfiguration,
  type HistogramConfiguration,
} from 'prom-client';
import type { Logger } from './logger.js';

/** The one registry of this process; the metrics endpoint serves exactly what is registered here. */
export const metricsRegistry = new Registry();

/** Every cowherd metric name starts with this (the Node.js process metrics keep their standard names). */
export const METRIC_PREFIX = 'cowherd_';

type Config<C> = Omit<C, 'registers'>;

function checkedName(name: string): void {
  if (!name.startsWith(METRIC_PREFIX)) throw new Error(`metric ${name} must start with ${METRIC_PREFIX}`);
}

/** A counter in the process registry (name must start with `cowherd_` and end with `_total`). */
export function counter<L extends string>(config: Config<CounterConfiguration<L>>): Counter<L> {
  checkedName(config.name);
  if (!config.name.endsWith('_total')) throw new Error(`counter ${config.name} must end with _total`);
  return new Counter({ ...config, registers: [metricsRegistry] });
}

/** A gauge in the process registry (name must start with `cowherd_`). */
export function gauge<L extends string>(config: Config<GaugeConfiguration<L>>): Gauge<L> {
  checkedName(config.name);
  return new Gauge({ ...config, registers: [metricsRegistry] });
}

/** A histogram in the process registry (name must start with `cowherd_`; seconds and bytes as base units). */
export function histogram<L extends string>(config: Config<HistogramConfiguration<L>>): Histogram<L> {
  checkedName(config.name);
  return new Histogram({ ...config, registers: [metricsRegistry] });
}

// ---- RPCs (recorded by rpc.ts adaptService, which every unary and streaming handler goes through) ----

/** Finished RPCs by fully qualified service, method name and canonical status code name (OK, NOT_FOUND, ...). */
export const rpcRequests = counter({
  name: 'cowherd_rpc_requests_total',
  help: 'gRPC calls this process served, by service, method and status code',
  labelNames: ['service', 'method', 'code'] as const,
});

/** Time from receiving a call to its status (a server stream: until it ends). */
export const rpcDuration = histogram({
  name: 'cowherd_rpc_duration_seconds',
  help: 'Time this process took to answer gRPC calls (server streams: until the stream ended), by service and method',
  labelNames: ['service', 'method'] as const,
  buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
});

/** Records one finished call; `path` is the gRPC path /package.Service/Method, `code` the status name. */
export function recordRpc(path: string, code: string, seconds: number): void {
  const [, service = '', method = ''] = path.split('/');
  rpcRequests.inc({ service, method, code });
  rpcDuration.observe({ service, method }, seconds);
}

// ---- Long-running operations (operations.ts OperationManager) ----

/** The states `cowherd_operations` counts. */
export type OperationMetricState = 'running' | 'orphaned' | 'succeeded' | 'failed' | 'cancelled';
/** Every state, so that a state with no operations reads 0 instead of vanishing. */
export const OPERATION_METRIC_STATES: readonly OperationMetricState[] = ['running', 'orphaned', 'succeeded', 'failed', 'cancelled'];

/**
 * Operations kept in the operations KV bucket, by kind and state, for the kinds this process runs. Read
 * from KV by the replica's orphan scan (every 5 s): every replica of a service reports the same
 * fleet-wide numbers, so aggregate with max(), not sum().
 */
export const operationsByState = gauge({
  name: 'cowherd_operations',
  help: 'Operations in the operations KV bucket by kind and state (running, orphaned, succeeded, failed, cancelled), as of the last scan; the same on every replica: use max()',
  labelNames: ['kind', 'state'] as const,
});

/** Operations that ended on this replica; sum() across replicas gives the fleet's rate. */
export const operationsFinished = counter({
  name: 'cowherd_operations_finished_total',
  help: 'Operations this replica ran to the end, by kind and result (succeeded, failed, cancelled)',
  labelNames: ['kind', 'result'] as const,
});

// ---- Events (events.ts EventPublisher) ----

/** Events stored by JetStream, by event kind as in the subject (image.available, clone.done, ...). */
export const eventsPublished = counter({
  name: 'cowherd_events_published_total',
  help: 'Events this process published and JetStream acknowledged, by event type (the subject kind, e.g. clone.done)',
  labelNames: ['type'] as const,
});

/** Publish attempts that failed (no ack within the timeout, no stream, permission denied, ...); the outbox retries them. */
export const eventPublishFailures = counter({
  name: 'cowherd_event_publish_failures_total',
  help: 'Event publishes that failed in this process, by event type (the subject kind, e.g. clone.done)',
  labelNames: ['type'] as const,
});

/** Every try to publish an event to JetStream (the outbox relay retries until one is acknowledged). */
export const eventPublishAttempts = counter({
  name: 'cowherd_event_publish_attempts_total',
  help: 'Attempts to publish an event to JetStream in this process (the outbox relay retries until acknowledged), by event type',
  labelNames: ['type'] as const,
});

/** Events recorded in this process's outbox and not yet acknowledged by JetStream. */
export const eventOutboxPending = gauge({
  name: 'cowherd_event_outbox_pending',
  help: "Events in this process's outbox (agent: its directory; services: the outbox KV bucket) that JetStream has not acknowledged yet",
});

// ---- Clones (agent clone-engine.ts) ----

/** Per clone made on this host: from the start of its batch until it is defined (and started if asked). */
export const cloneDuration = histogram({
  name: 'cowherd_clone_duration_seconds',
  help: 'Time from the start of a clone batch on this agent until each clone was defined in libvirt (and started if asked), by result (done, failed)',
  labelNames: ['result'] as const,
  buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
});

// ---- Distribution (the agent's BitTorrent swarm) ----

/** Which way image bytes moved. */
export type DistributionDirection = 'download' | 'upload';

/** Image bytes moved by this process's swarm (payload bytes, not protocol overhead). */
export const distributionBytes = counter({
  name: 'cowherd_distribution_bytes_total',
  help: "Image payload bytes this agent's swarm downloaded or uploaded, by image id and direction (download, upload)",
  labelNames: ['image', 'direction'] as const,
});

/** The swarm's current transfer rate per image; removed when the image leaves the swarm. */
export const distributionRate = gauge({
  name: 'cowherd_distribution_rate_bytes_per_second',
  help: "Current transfer rate of this agent's swarm, by image id and direction (download, upload)",
  labelNames: ['image', 'direction'] as const,
});

/**
 * What the swarm calls to report transfers. `image` is the image id or its resource name
 * (`images/debian-12` and `debian-12` are the same series).
 *
 * ```ts
 * import { distributionMetrics } from './metrics.js';
 * distributionMetrics.addBytes('debian-12', 'download', chunk.length);   // on every verified piece or data event
 * distributionMetrics.setRate('debian-12', 'download', torrent.downloadSpeed); // e.g. once a second
 * distributionMetrics.forget('debian-12');                                // when the image leaves the swarm
 * ```
 */
export const distributionMetrics = {
  /** Adds `bytes` moved for `image` in `direction`. */
  addBytes(image: string, direction: DistributionDirection, bytes: number): void {
    if (bytes > 0) distributionBytes.inc({ image: imageId(image), direction }, bytes);
  },
  /** Sets the current rate (bytes per second) for `image` in `direction`. */
  setRate(image: string, direction: DistributionDirection, bytesPerSecond: number): void {
    distributionRate.set({ image: imageId(image), direction }, Math.max(0, bytesPerSecond));
  },
  /** Drops the rate series of `image` (its byte counters stay: counters never go back). */
  forget(image: string): void {
    for (const direction of ['download', 'upload'] as const) distributionRate.remove({ image: imageId(image), direction });
  },
};

function imageId(image: string): string {
  return image.startsWith('images/') ? image.slice('images/'.length) : image;
}

// ---- The endpoint ----

let processMetricsOn = false;

/**
 * Adds the standard Node.js process metrics (process_cpu_seconds_total, process_resident_memory_bytes,
 * nodejs_eventloop_lag_seconds, nodejs_heap_size_used_bytes, ...) under their usual names, so that stock
 * Node.js dashboards work. Done once, when a process starts serving metrics (not on import: tests that
 * import this module start no GC observers).
 */
export function enableProcessMetrics(): void {
  if (processMetricsOn) return;
  processMetricsOn = true;
  collectDefaultMetrics({ register: metricsRegistry });
}

/** A running metrics endpoint. */
export interface MetricsServer {
  /** The bound port. */
  readonly port: number;
  /** Stops listening and closes open (keep-alive) connections. */
  stop(): Promise<void>;
}

/**
 * Serves the registry on plaintext HTTP at `address` (host:port; port 0 picks a free one): GET or HEAD
 * /metrics answers the text exposition format, any other path 404, any other method on /metrics 405.
 */
export async function serveMetrics(options: { address: string; log: Logger; registry?: Registry }): Promise<MetricsServer> {
  const registry = options.registry ?? metricsRegistry;
  if (registry === metricsRegistry) enableProcessMetrics();
  const { host, port } = splitAddress(options.address);
  const server: Server = createServer((request: IncomingMessage, response: ServerResponse) => {
    const path = (request.url ?? '/').split('?')[0];
    if (path !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found: metrics are at /metrics\n');
      return;
    }
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      response.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain; charset=utf-8' }).end('method not allowed\n');
      return;
    }
    registry.metrics().then(
      (text) => {
        response.writeHead(200, { 'content-type': registry.contentType });
        response.end(request.method === 'HEAD' ? undefined : text);
      },
      (error: unknown) => {
        options.log.error({ err: error }, 'collecting metrics failed');
        response.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end('collecting metrics failed\n');
      },
    );
  });
  // A scraper that stalls must not hold a socket for ever.
  server.requestTimeout = 30_000;
  server.headersTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    const onError = (error: Error): void => reject(new Error(`cannot serve metrics on ${options.address}: ${error.message}`));
    server.once('error', onError);
    server.listen({ host, port }, () => {
      server.off('error', onError);
      resolve();
    });
  });
  server.on('error', (error) => options.log.error({ err: error }, 'metrics endpoint error'));
  const bound = server.address();
  return {
    port: typeof bound === 'object' && bound !== null ? bound.port : port,
    stop: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function splitAddress(address: string): { host: string; port: number } {
  const match = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(address);
  if (!match) throw new Error(`metrics address must be host:port, got ${JSON.stringify(address)}`);
  return { host: match[1]!.replace(/^\[|\]$/g, ''), port: Number(match[2]) };
}
