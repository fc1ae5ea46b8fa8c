/**
 * The life of a cowherd server process, shared by every service and the agent: read config, make the
 * logger, connect NATS over TLS, ensure the event stream, build the service, serve on the mTLS and
 * probe ports, and on SIGTERM/SIGINT drain within the grace time. `main.ts` files only wire.
 */
import {
  ConfigError,
  addressVariable,
  enumVariable,
  integerVariable,
  pathVariable,
  readConfig,
  urlListVariable,
  type ConfigOf,
  type Variable,
} from './config.js';
import { ensureEventStream, type EventPublisher } from './events.js';
import { startEventOutbox, type EventOutbox } from './event-outbox.js';
import { createLogger, LOG_LEVELS, type Logger } from './logger.js';
import { connectNats, type Nats } from './nats.js';
import { DEFAULT_DESCRIPTOR_SET_PATH, readDescriptorSet } from './reflection.js';
import { NO_REVOCATIONS, type BoundaryOptions, type IssuedCheck, type RevocationCheck, type ServiceRegistration } from './rpc.js';
import { startServer, type RunningServer } from './server.js';
import { mutualTlsServerCredentials, mutualTlsClientCredentials, type CredentialsFor, type TlsFiles } from './tls.js';
import { identityUri } from './identity.js';
import { CertificateAuthorityServiceClient } from '../../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { keepCertificateFresh, type RenewFunction } from './certificate-renewal.js';
import { createClient } from './client.js';
import { followIssuedSerials, followRevocations, IssuedSerials, RevocationSet } from './revocation.js';
import type { LevelWithSilent } from 'pino';

/**
 * Default ports: mTLS gRPC, plaintext health and plaintext Prometheus metrics, per process. Distinct per
 * process because the local fleet runs them all on one machine; Kubernetes sets 9464 for metrics.
 */
export const DEFAULT_PORTS = {
  'certificate-authority': { grpc: 7440, health: 7450, metrics: 7470 },
  inventory: { grpc: 7442, health: 7452, metrics: 7472 },
  distribution: { grpc: 7443, health: 7453, metrics: 7473 },
  cloning: { grpc: 7444, health: 7454, metrics: 7474 },
  agent: { grpc: 7445, health: 7455, metrics: 7475 },
} as const;

/** The value of COWHERD_METRICS_ADDRESS that serves no metrics. */
export const METRICS_OFF = 'off';

/** host:port of the metrics endpoint, or `off` (undefined): serve none. */
function metricsAddressVariable(defaultAddress: string): Variable<string | undefined> {
  const name = 'COWHERD_METRICS_ADDRESS';
  const description = `host:port of the plaintext HTTP port serving Prometheus metrics at /metrics (port 0: any free port; "${METRICS_OFF}": none)`;
  const address = addressVariable(name, description, defaultAddress);
  return { name, description, defaultText: defaultAddress, parse: (raw) => (raw?.trim().toLowerCase() === METRICS_OFF ? undefined : address.parse(raw)) };
}

/** Names of the processes that serve gRPC. */
export type ProcessName = keyof typeof DEFAULT_PORTS;

/** The variables every server process reads. */
export function serverVariables(name: ProcessName) {
  const ports = DEFAULT_PORTS[name];
  return {
    listenAddress: addressVariable('COWHERD_LISTEN_ADDRESS', 'host:port of the mTLS gRPC port (port 0: any free port)', `0.0.0.0:${ports.grpc}`),
    healthAddress: addressVariable('COWHERD_HEALTH_ADDRESS', 'host:port of the plaintext health-only port for probes', `0.0.0.0:${ports.health}`),
    metricsAddress: metricsAddressVariable(`0.0.0.0:${ports.metrics}`),
    certificateFile: pathVariable('COWHERD_TLS_CERT', 'PEM certificate of this process (reloaded when the file changes)'),
    privateKeyFile: pathVariable('COWHERD_TLS_KEY', 'PEM private key of this process (0600)'),
    caFile: pathVariable('COWHERD_TLS_CA', 'PEM certificate of the cowherd CA, the only trusted root'),
    natsUrls: urlListVariable('COWHERD_NATS_URL', 'comma-separated NATS URLs (TLS with this process certificate)', ['tls://localhost:4222']),
    eventStreamReplicas: integerVariable(
      'COWHERD_EVENT_STREAM_REPLICAS',
      'replicas of the JetStream event stream (3 on a 3-node NATS cluster); never lowers an existing stream',
      1,
      1,
      5,
    ),
    logLevel: enumVariable<LevelWithSilent>('COWHERD_LOG_LEVEL', 'pino log level', 'info', LOG_LEVELS),
    shutdownGraceSeconds: integerVariable('COWHERD_SHUTDOWN_GRACE_SECONDS', 'how long SIGTERM waits for running calls before cancelling them', 20, 0, 600),
    tlsRefreshSeconds: integerVariable('COWHERD_TLS_REFRESH_SECONDS', 'how often certificate files are checked for changes', 5, 1, 3600),
    descriptorSetFile: pathVariable('COWHERD_DESCRIPTOR_SET', 'buf descriptor set served by reflection', DEFAULT_DESCRIPTOR_SET_PATH),
    caAddress: addressVariable('COWHERD_CA_ADDRESS', 'host:port of the certificate-authority mTLS port (renewal, revocation list)', 'localhost:7440'),
  };
}

/** Configuration every server process has. */
export type ServerConfig = ConfigOf<ReturnType<typeof serverVariables>>;

/** What a service's build function receives. */
export interface ServiceContext<C extends ServerConfig> {
  readonly config: C;
  readonly log: Logger;
  readonly nats: Nats;
  /**
   * The outbox-backed publisher (event-outbox.ts): publish resolves once the event is recorded durably
   * (the agent: a file in its outbox directory; services: the `outbox` KV bucket); a relay publishes it
   * until JetStream acknowledges it.
   */
  readonly events: EventPublisher;
  readonly tls: TlsFiles;
  /**
   * Client credentials of this process by the identity of the server dialled (`identityUri('service',
   * 'inventory')`, `identityUri('host', id)`): a server that proves another identity is refused.
   */
  readonly clientCredentials: CredentialsFor;
  /** Pass to adaptService. */
  readonly boundary: BoundaryOptions;
}

/** What a service's build function returns. */
export interface BuiltService {
  readonly services: readonly ServiceRegistration[];
  /**
   * The CA's own view of revoked serials and its own way to renew (the CA process only). Other processes
   * leave both out and follow the CA over gRPC.
   */
  readonly revocations?: RevocationCheck;
  /** The CA's own view of issued serials (the CA process only); other processes follow GetIssuedSerialList. */
  readonly issued?: IssuedCheck;
  readonly renew?: RenewFunction;
  /** Called after the server stops accepting calls: checkpoint operations, close watchers. */
  stop?(): Promise<void>;
}

/** A started process, for tests that run services in-process. */
export interface RunningService {
  readonly server: RunningServer;
  readonly log: Logger;
  stop(): Promise<void>;
}

/** Options of {@link startService}. */
export interface StartServiceOptions<S extends Record<string, Variable<unknown>>> {
  readonly name: ProcessName;
  /** Extra variables of this service, merged with serverVariables(name). */
  readonly variables: S;
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly build: (context: ServiceContext<ServerConfig & ConfigOf<S>>) => Promise<BuiltService>;
  readonly logDestination?: NodeJS.WritableStream;
  /**
   * Keep the event outbox in this directory (the agent, whose state is its files); left out, in the
   * `outbox` KV bucket (the cluster services, whose state is in KV).
   */
  readonly eventOutboxDirectory?: string;
}

/** Starts a service (without signal handling): config, logger, NATS, server. */
export async function startService<S extends Record<string, Variable<unknown>>>(options: StartServiceOptions<S>): Promise<RunningService> {
  const config = readConfig({ ...serverVariables(options.name), ...options.variables }, options.env) as ServerConfig & ConfigOf<S>;
  const log = createLogger({
    service: options.name,
    level: config.logLevel,
    ...(options.logDestination === undefined ? {} : { destination: options.logDestination }),
  });
  const tls: TlsFiles = { certificateFile: config.certificateFile, privateKeyFile: config.privateKeyFile, caFile: config.caFile };
  const clientCredentials = mutualTlsClientCredentials(tls, config.tlsRefreshSeconds * 1000);
  const nats = await connectNats({ servers: config.natsUrls, tls, name: options.name, log });
  let outbox: EventOutbox | undefined;
  try {
    // Agents (host identities) may only publish their own events; the services own the stream's shape.
    if (options.name !== 'agent') await ensureEventStream(nats.manager, { replicas: config.eventStreamReplicas });
    // Before the service is built, so that what an earlier process recorded and did not publish goes first.
    outbox = await startEventOutbox({
      js: nats.jetstream,
      manager: nats.manager,
      log,
      owner: options.name,
      ...(options.eventOutboxDirectory === undefined ? {} : { directory: options.eventOutboxDirectory }),
    });
    const events = outbox.events;
    const revocationsRef: { current: RevocationCheck } = { current: NO_REVOCATIONS };
    // Until the list is connected (below) nothing is known to be issued: a call made then is refused, not admitted.
    const issuedRef: { current: IssuedCheck } = { current: new IssuedSerials() };
    const boundary: BoundaryOptions = {
      log,
      revocations: { isRevoked: (serial) => revocationsRef.current.isRevoked(serial) },
      issued: { isIssued: (serial) => issuedRef.current.isIssued(serial) },
    };
    const built = await options.build({ config, log, nats, events, tls, clientCredentials, boundary });
    const stoppers: Array<() => void> = [];
    let caClient: CertificateAuthorityServiceClient | undefined;
    if (built.revocations) {
      revocationsRef.current = built.revocations;
      if (built.issued) issuedRef.current = built.issued;
    } else {
      caClient = createClient(CertificateAuthorityServiceClient, config.caAddress, clientCredentials(identityUri('service', 'certificate-authority')), {
        defaultDeadlineMs: 10_000,
      });
      const client = caClient;
      const set = new RevocationSet();
      revocationsRef.current = set;
      const issued = new IssuedSerials();
      issuedRef.current = issued;
      // Side by side: each waits a few seconds at most for its first list when the CA is down.
      stoppers.push(
        ...(await Promise.all([
          followRevocations({
            set,
            log,
            nats: nats.connection,
            fetch: () =>
              new Promise((resolve, reject) => client.getRevocationList({}, (error, response) => (error ? reject(error) : resolve(response.serialNumbers)))),
          }),
          followIssuedSerials({
            set: issued,
            log,
            fetch: () =>
              new Promise((resolve, reject) => client.getIssuedSerialList({}, (error, response) => (error ? reject(error) : resolve(response.serialNumbers)))),
          }),
        ])),
      );
    }
    const renew: RenewFunction =
      built.renew ??
      ((csrPem) =>
        new Promise((resolve, reject) =>
          caClient!.renewCertificate({ csrPem }, (error, response) =>
            error ? reject(error) : resolve({ certificatePem: response.certificate?.certificatePem ?? '', caPem: response.caCertificatePem }),
          ),
        ));
    stoppers.push(await keepCertificateFresh({ files: tls, renew, log }));
    const server = await startServer({
      log,
      address: config.listenAddress,
      healthAddress: config.healthAddress,
      metricsAddress: config.metricsAddress,
      // Read just before binding, so that the first caller after "serving" is not dropped (see tls.ts).
      credentials: await mutualTlsServerCredentials(tls, config.tlsRefreshSeconds * 1000),
      services: built.services,
      descriptorSet: readDescriptorSet(config.descriptorSetFile),
      revocations: boundary.revocations,
      ...(boundary.issued === undefined ? {} : { issued: boundary.issued }),
    });
    return {
      server,
      log,
      stop: async () => {
        log.info({ graceSeconds: config.shutdownGraceSeconds }, 'stopping');
        await server.stop(config.shutdownGraceSeconds * 1000);
        for (const stop of stoppers) stop();
        caClient?.close();
        await built.stop?.();
        // Unpublished events stay recorded: the next start (or, for a service, another replica) sends them.
        await outbox?.stop();
        await nats.close();
        log.info('stopped');
      },
    };
  } catch (error) {
    await outbox?.stop().catch(() => undefined);
    await nats.close().catch(() => undefined);
    throw error;
  }
}

/**
 * Runs a service as the process's main: exits 2 with every configuration problem listed, 1 on a
 * start-up failure, 0 after a clean SIGTERM/SIGINT drain. A second signal exits at once.
 */
export async function runServiceMain<S extends Record<string, Variable<unknown>>>(options: StartServiceOptions<S>): Promise<void> {
  let running: RunningService;
  try {
    running = await startService(options);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`cowherd ${options.name}: ${error.message}\n`);
      process.exit(2);
    }
    process.stderr.write(`cowherd ${options.name}: failed to start: ${(error as Error).message}\n`);
    process.exit(1);
  }
  let stopping = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      running.log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    running.log.info({ signal }, 'signal received: draining');
    running.stop().then(
      () => process.exit(0),
      (error: unknown) => {
        running.log.error({ err: error }, 'unclean stop');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
}
