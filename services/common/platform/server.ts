/**
 * One gRPC server bootstrap for every cowherd process: the mTLS port with the service's RPCs, health
 * and reflection; a plaintext port with health only (kubelet gRPC probes cannot do TLS); a plaintext
 * HTTP port with Prometheus metrics only; graceful stop.
 */
import { Server, ServerCredentials, type ChannelOptions } from '@grpc/grpc-js';
import { HealthService } from '../../gen/grpc/health/v1/health.js';
import { HEALTH_POLICY, HealthState, healthHandlers, ServingStatus } from './health.js';
import type { Logger } from './logger.js';
import { serveMetrics, type MetricsServer } from './metrics.js';
import { addReflection } from './reflection.js';
import { adaptService, type IssuedCheck, type RevocationCheck, type ServiceRegistration } from './rpc.js';

/** Options of {@link startServer}. */
export interface ServerOptions {
  readonly log: Logger;
  /** host:port of the mTLS port; port 0 picks a free one. */
  readonly address: string;
  readonly credentials: ServerCredentials;
  /** host:port of the plaintext health-only port; omit to serve none. */
  readonly healthAddress?: string;
  /** host:port of the plaintext HTTP port that serves GET /metrics; omit to serve none. */
  readonly metricsAddress?: string | undefined;
  /** The services, each built with adaptService. */
  readonly services: readonly ServiceRegistration[];
  /** Raw `buf build` FileDescriptorSet for reflection. */
  readonly descriptorSet: Buffer;
  readonly revocations: RevocationCheck;
  /** Serials the CA issued, for reflection (health needs no certificate). */
  readonly issued?: IssuedCheck;
  /** Extra grpc-js channel options. */
  readonly channelOptions?: ChannelOptions;
}

/** A started server. */
export interface RunningServer {
  /** The bound mTLS port. */
  readonly port: number;
  /** The bound plaintext health port, if any. */
  readonly healthPort: number | undefined;
  /** The bound metrics port, if any. */
  readonly metricsPort: number | undefined;
  readonly health: HealthState;
  /**
   * Marks every service NOT_SERVING, stops accepting calls, lets running calls finish for up to
   * `graceMs`, then cancels what is left.
   */
  stop(graceMs: number): Promise<void>;
}

const SERVER_DEFAULTS: ChannelOptions = {
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 10_000,
  'grpc.max_receive_message_length': 16 * 1024 * 1024,
};

/** Starts the mTLS server (and the plaintext probe server) and marks everything SERVING. */
export async function startServer(options: ServerOptions): Promise<RunningServer> {
  const serviceNames = options.services.map((service) => service.serviceName);
  const health = new HealthState([...serviceNames, 'grpc.health.v1.Health']);
  const boundary = {
    log: options.log,
    revocations: options.revocations,
    ...(options.issued === undefined ? {} : { issued: options.issued }),
    quietMethods: new Set(['/grpc.health.v1.Health/Check', '/grpc.health.v1.Health/Watch']),
  };
  const healthService = adaptService(HealthService, healthHandlers(health), HEALTH_POLICY, boundary);

  const server = new Server({ ...SERVER_DEFAULTS, ...options.channelOptions });
  for (const service of [...options.services, healthService]) server.addService(service.definition, service.implementation);
  addReflection(server, options.descriptorSet, [...serviceNames, healthService.serviceName], boundary);
  const port = await bind(server, options.address, options.credentials);

  let probe: Server | undefined;
  let healthPort: number | undefined;
  if (options.healthAddress !== undefined) {
    probe = new Server(SERVER_DEFAULTS);
    probe.addService(healthService.definition, healthService.implementation);
    healthPort = await bind(probe, options.healthAddress, ServerCredentials.createInsecure());
  }
  let metrics: MetricsServer | undefined;
  if (options.metricsAddress !== undefined) {
    try {
      metrics = await serveMetrics({ address: options.metricsAddress, log: options.log });
    } catch (error) {
      await Promise.all([shutdown(server, 0), probe ? shutdown(probe, 0) : undefined]);
      throw error;
    }
  }
  health.setAll(ServingStatus.SERVING);
  options.log.info({ port, healthPort, metricsPort: metrics?.port, services: serviceNames }, 'serving');

  return {
    port,
    healthPort,
    metricsPort: metrics?.port,
    health,
    stop: async (graceMs) => {
      health.setAll(ServingStatus.NOT_SERVING);
      await Promise.all([shutdown(server, graceMs), probe ? shutdown(probe, graceMs) : undefined]);
      // Last, so that a scrape during the drain still sees the final counts.
      await metrics?.stop();
    },
  };
}

/** Binds a server and returns the port. */
export function bind(server: Server, address: string, credentials: ServerCredentials): Promise<number> {
  return new Promise((resolve, reject) => {
    server.bindAsync(address, credentials, (error, port) => (error ? reject(new Error(`cannot listen on ${address}: ${error.message}`)) : resolve(port)));
  });
}

/** tryShutdown with a deadline, then forceShutdown. */
export function shutdown(server: Server, graceMs: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, graceMs);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}
