/**
 * A three-node NATS JetStream cluster on this machine, set up as deploy/base/nats.yaml sets up the StatefulSet:
 * three nats-server processes (server names nats-0..2) with cluster routes between them (TLS, verified
 * certificates from cowherd's CA), clients on mutual TLS with `verify_and_map`, and beside each server the
 * Kubernetes sidecar (deploy/nats/nats-sidecar.ts) that keeps that server's allow-list from the CA's records and
 * creates cowherd's KV buckets with 3 replicas. The event stream gets its 3 replicas from the services
 * (COWHERD_EVENT_STREAM_REPLICAS=3, as deploy/base/config.yaml sets it).
 *
 * The faults need the servers one by one: {@link NatsNode.kill} (SIGKILL), {@link NatsNode.start} again on the
 * same ports and data, and {@link NatsCluster.restartAll}.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startDaemon, type Daemon } from '../../services/common/platform/child-process.js';
import { freePort } from '../../services/launcher/embedded-nats.js';
import { identityUri, parseIdentity } from '../../services/common/platform/identity.js';
import { identityPrincipal, quote, renderNatsAuthorization, renderNatsServerConfig } from '../../services/common/platform/nats-authorization.js';
import type { TlsFiles } from '../../services/common/platform/tls.js';
import type { Resources } from '../harness/index.js';
import { REPOSITORY } from '../harness/processes.js';

/** The static identities of deploy/base/nats.yaml's sidecar (COWHERD_NATS_STATIC_IDENTITIES). */
export const STATIC_IDENTITIES = ['nats', 'certificate-authority', 'inventory', 'distribution', 'cloning'].map((name) => identityUri('service', name));

/** One server of the cluster. */
export interface NatsNode {
  readonly name: string;
  /** Client port (listening on every address). */
  readonly port: number;
  /** The running server, undefined while it is down. */
  readonly daemon: Daemon | undefined;
  /** SIGKILL, no lame duck: a node that dies. */
  kill(): Promise<void>;
  /** Graceful stop (SIGINT, as the pod's termination does after lame duck). */
  stop(): Promise<void>;
  /** Starts the server again on its ports and data. */
  start(): Promise<void>;
}

/** The running cluster. */
export interface NatsCluster {
  readonly nodes: readonly NatsNode[];
  /** Client URLs for processes in this namespace: tls://localhost:<port>, all three. */
  readonly urls: readonly string[];
  /** Client URLs under another host name (the one agents in network namespaces resolve to this machine). */
  urlsFor(hostName: string): string[];
  /** Stops every server (SIGINT), waits `downMs`, starts them all again. */
  restartAll(downMs: number): Promise<void>;
  /** Starts the per-node sidecars (they need the CA's address for renewals); resolves once the buckets are replicated. */
  startSidecars(caAddress: string): Promise<void>;
}

/** Options of {@link startNatsCluster}. */
export interface NatsClusterOptions {
  /** The NATS servers' certificate (service/nats; DNS names localhost and the agents' name for this machine). */
  readonly tls: TlsFiles;
  /** Where each node's config, data and authorization file go. */
  readonly directory: string;
  /** Appends every server's and sidecar's output line, labelled. */
  readonly onLine?: (label: string, line: string) => void;
}

/** Starts three servers and waits until each is ready (JetStream's meta leader comes with the sidecars' buckets). */
export async function startNatsCluster(resources: Resources, options: NatsClusterOptions): Promise<NatsCluster> {
  const names = ['nats-0', 'nats-1', 'nats-2'];
  const clientPorts = [await freePort(), await freePort(), await freePort()];
  const routePorts = [await freePort(), await freePort(), await freePort()];
  const staticPrincipals = STATIC_IDENTITIES.map((uri) => identityPrincipal(parseIdentity(uri)!));
  const sidecars: Daemon[] = [];
  const nodes = names.map((name, index) => {
    const directory = join(options.directory, name);
    const configFile = join(directory, 'nats.conf');
    const pidFile = join(directory, 'nats.pid');
    let daemon: Daemon | undefined;
    const node: NatsNode = {
      name,
      port: clientPorts[index]!,
      get daemon() {
        return daemon;
      },
      kill: async () => {
        const current = daemon;
        daemon = undefined;
        if (!current) return;
        process.kill(current.pid, 'SIGKILL');
        await current.exited;
      },
      stop: async () => {
        const current = daemon;
        daemon = undefined;
        await current?.stop(15_000);
      },
      start: async () => {
        daemon = await startDaemon('nats-server', ['-c', configFile], {
          readyPattern: /Server is ready/,
          readyTimeoutMs: 30_000,
          stopSignal: 'SIGINT',
          ...(options.onLine ? { onLine: (line: string) => options.onLine!(name, line) } : {}),
        });
      },
    };
    return { node, directory, configFile, pidFile, index };
  });

  for (const { directory, configFile, pidFile, index, node } of nodes) {
    await mkdir(join(directory, 'jetstream'), { recursive: true });
    // The start-up allow-list of the ConfigMap: the static identities, no per-certificate users yet.
    await writeFile(join(directory, 'authorization.conf'), renderNatsAuthorization(staticPrincipals, []), { mode: 0o600 });
    const routes = routePorts.filter((_, other) => other !== index).map((port) => `    ${quote(`nats-route://localhost:${port}`)}`);
    const cluster = [
      `pid_file: ${quote(pidFile)}`,
      'cluster {',
      '  name: "cowherd"',
      `  listen: ${quote(`127.0.0.1:${routePorts[index]}`)}`,
      // Clients get only the URLs they were given (the agents reach this machine under another name).
      '  no_advertise: true',
      '  routes: [',
      ...routes,
      '  ]',
      '  tls {',
      `    cert_file: ${quote(options.tls.certificateFile)}`,
      `    key_file: ${quote(options.tls.privateKeyFile)}`,
      `    ca_file: ${quote(options.tls.caFile)}`,
      '    verify: true',
      '    timeout: 5',
      '  }',
      '}',
    ].join('\n');
    await writeFile(
      configFile,
      renderNatsServerConfig({
        port: node.port,
        host: '0.0.0.0',
        serverName: node.name,
        storeDir: join(directory, 'jetstream'),
        tls: options.tls,
        authorizationInclude: 'authorization.conf',
        extraConfig: cluster,
      }),
      { mode: 0o600 },
    );
  }
  resources.defer(async () => {
    for (const sidecar of sidecars) await sidecar.stop(5_000);
    for (const { node } of nodes) await node.stop();
  });
  await Promise.all(nodes.map(({ node }) => node.start()));

  const urlsFor = (hostName: string): string[] => clientPorts.map((port) => `tls://${hostName}:${port}`);
  return {
    nodes: nodes.map(({ node }) => node),
    urls: urlsFor('localhost'),
    urlsFor,
    restartAll: async (downMs) => {
      await Promise.all(nodes.map(({ node }) => node.stop()));
      await new Promise((resolve) => setTimeout(resolve, downMs));
      await Promise.all(nodes.map(({ node }) => node.start()));
    },
    startSidecars: async (caAddress) => {
      const replicated: Array<Promise<void>> = [];
      for (const { node, directory, pidFile } of nodes) {
        let markReplicated!: () => void;
        replicated.push(new Promise<void>((resolve) => (markReplicated = resolve)));
        // The sidecar exits when its first JetStream call times out before the new cluster elected a leader (seen on a
        // loaded machine); Kubernetes restarts the container, and so does this.
        const start = () =>
          startDaemon(process.execPath, ['--import', 'tsx', join(REPOSITORY, 'deploy/nats/nats-sidecar.ts')], {
            readyPattern: /NATS users in sync/,
            readyTimeoutMs: 60_000,
            cwd: REPOSITORY,
            env: {
              ...withoutCowherdVariables(process.env),
              COWHERD_TLS_CERT: options.tls.certificateFile,
              COWHERD_TLS_KEY: options.tls.privateKeyFile,
              COWHERD_TLS_CA: options.tls.caFile,
              COWHERD_NATS_URL: `tls://localhost:${node.port}`,
              COWHERD_CA_ADDRESS: caAddress,
              COWHERD_NATS_AUTHORIZATION_FILE: join(directory, 'authorization.conf'),
              COWHERD_NATS_PID_FILE: pidFile,
              COWHERD_NATS_STATIC_IDENTITIES: STATIC_IDENTITIES.join(','),
              COWHERD_NATS_REPLICAS: '3',
            },
            onLine: (line) => {
              if (line.includes('buckets replicated')) markReplicated();
              options.onLine?.(`${node.name}-sidecar`, line);
            },
          });
        let sidecar: Daemon | undefined;
        for (let attempt = 1; sidecar === undefined; attempt++) {
          try {
            sidecar = await start();
          } catch (error) {
            if (attempt >= 3) throw error;
            options.onLine?.(`${node.name}-sidecar`, `(fault suite) the sidecar exited at start (${(error as Error).message.slice(-80)}); starting it again`);
          }
        }
        sidecars.push(sidecar);
      }
      await Promise.race([
        Promise.all(replicated),
        new Promise((_, reject) => setTimeout(() => reject(new Error('the NATS sidecars did not replicate the buckets within 90 s')), 90_000)),
      ]);
    },
  };
}

/** The environment minus COWHERD_* variables (a developer's settings never reach the suite's processes). */
export function withoutCowherdVariables(env: NodeJS.ProcessEnv): Record<string, string> {
  const result: Record<string, string> = {};
  for (const [key, value] of Object.entries(env)) if (value !== undefined && !key.startsWith('COWHERD_')) result[key] = value;
  return result;
}
