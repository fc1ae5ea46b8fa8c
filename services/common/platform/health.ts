/**
 * grpc.health.v1.Health for a process: one status per served service plus "" for the whole process.
 * The same HealthState backs the mTLS port and the plaintext probe port, so kubelet and clients agree.
 */
import { EventEmitter } from 'node:events';
import { HealthCheckResponse_ServingStatus as ServingStatus, HealthService, type HealthCheckResponse } from '../../gen/grpc/health/v1/health.js';
import { CowherdError } from './errors.js';
import type { AccessPolicy, Handlers } from './rpc.js';

export { HealthCheckResponse_ServingStatus as ServingStatus } from '../../gen/grpc/health/v1/health.js';

/** Serving status per service name; "" is the process as a whole. */
export class HealthState {
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly changes = new EventEmitter();

  constructor(serviceNames: readonly string[]) {
    this.changes.setMaxListeners(0);
    for (const name of ['', ...serviceNames]) this.statuses.set(name, ServingStatus.NOT_SERVING);
  }

  /** Sets one service's status ("" for the process). */
  set(service: string, status: ServingStatus): void {
    if (this.statuses.get(service) === status) return;
    this.statuses.set(service, status);
    this.changes.emit('change', service, status);
  }

  /** Sets every service and the process at once (start-up done, shutdown begun). */
  setAll(status: ServingStatus): void {
    for (const name of [...this.statuses.keys()]) this.set(name, status);
  }

  /** Status of a service; undefined when the service is not served here. */
  get(service: string): ServingStatus | undefined {
    return this.statuses.get(service);
  }

  /** Calls `listener` on every change until the returned function is called. */
  subscribe(listener: (service: string, status: ServingStatus) => void): () => void {
    this.changes.on('change', listener);
    return () => this.changes.off('change', listener);
  }
}

/** Health handlers over a HealthState (Check and Watch as the gRPC health protocol defines them). */
export function healthHandlers(state: HealthState): Handlers<HealthService> {
  return {
    check: async (request) => {
      const status = state.get(request.service);
      if (status === undefined) throw CowherdError.notFound(`service ${JSON.stringify(request.service)}`);
      return { status };
    },
    watch: async (request, context, send) => {
      const current = (): HealthCheckResponse => ({ status: state.get(request.service) ?? ServingStatus.SERVICE_UNKNOWN });
      let last = current().status;
      await send({ status: last });
      await new Promise<void>((resolve) => {
        const unsubscribe = state.subscribe((service) => {
          if (service !== request.service) return;
          const next = current();
          if (next.status === last) return;
          last = next.status;
          send(next).catch(() => undefined);
        });
        context.signal.addEventListener(
          'abort',
          () => {
            unsubscribe();
            resolve();
          },
          { once: true },
        );
      });
    },
  };
}

/** Health may be asked by anyone who got through TLS (and by kubelet on the plaintext probe port). */
export const HEALTH_POLICY: AccessPolicy<HealthService> = {
  check: { allow: 'anyone' },
  watch: { allow: 'anyone' },
};
