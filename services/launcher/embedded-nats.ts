/**
 * Runs nats-server as a child process with JetStream and mutual TLS: the embedded default of the local
 * fleet, and the real server every integration test starts. Data lives under `directory`.
 *
 * Client certificates are verified against the CA and mapped to NATS users (`verify_and_map`); the users
 * live in an included authorization file (see nats-authorization.ts) that {@link EmbeddedNats.updateUsers}
 * rewrites and applies with a config reload.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { startDaemon, type Daemon } from '../common/platform/child-process.js';
import { writeAtomically } from '../common/platform/credential-files.js';
import {
  reloadNats,
  renderNatsAuthorization,
  renderNatsServerConfig,
  quote,
  renderOpenNatsAuthorization,
  type NatsPrincipal,
} from '../common/platform/nats-authorization.js';
import type { TlsFiles } from '../common/platform/tls.js';

/** Options of {@link startEmbeddedNats}. */
export interface EmbeddedNatsOptions {
  /** JetStream store and config file go here. */
  readonly directory: string;
  /** Server certificate (DNS SAN localhost), key and the CA that client certificates must chain to. */
  readonly tls: TlsFiles;
  /** Client port; 0 picks a free one. */
  readonly port?: number;
  /** Listen address; default 127.0.0.1. */
  readonly host?: string;
  /** Extra lines for the config file (accounts...; not `authorization`, which lives in the authorization file). */
  readonly extraConfig?: string;
  readonly onLine?: (line: string) => void;
  /** Run nats-server in a process group of its own (see DaemonOptions.ownProcessGroup): the local fleet stops it last. */
  readonly ownProcessGroup?: boolean;
  /**
   * Static users, always in the allow-list (e.g. a service identity mapped by its URI SAN). Given (even
   * empty), the server starts with an allow-list: only these users and `users` may connect. Left out,
   * the server admits every certificate from the CA until the first {@link EmbeddedNats.updateUsers}
   * (the local fleet's behaviour before per-certificate users existed).
   */
  readonly bootstrapUsers?: readonly NatsPrincipal[];
  /** Per-certificate users to start with (the dynamic part, replaced by updateUsers). */
  readonly users?: readonly NatsPrincipal[];
  /** The authorization file; default `<directory>/authorization.conf`. Must be reachable by a relative path from `directory`. */
  readonly authorizationFile?: string;
  /** How long updateUsers waits for the server to apply a reload. Default 10 s. */
  readonly reloadTimeoutMs?: number;
}

/** A running embedded NATS. */
export interface EmbeddedNats {
  /** tls://localhost:<port> */
  readonly url: string;
  readonly port: number;
  readonly daemon: Daemon;
  /** The included authorization file. */
  readonly authorizationFile: string;
  /** Where nats-server writes its pid (for reloads by another process). */
  readonly pidFile: string;
  /**
   * Replaces the per-certificate users (the bootstrap users stay), reloads the server and resolves once
   * it logged "Reloaded server configuration"; rejects when it logged a reload failure, exited, or did
   * not answer in time. Calls are applied one at a time, in order.
   */
  updateUsers(principals: readonly NatsPrincipal[]): Promise<void>;
  stop(): Promise<void>;
}

const RELOADED = /\[INF\] Reloaded server configuration/;
const RELOAD_FAILED = /\[ERR\] Failed to reload server configuration: (.*)$/;

/** Starts nats-server and waits until it accepts connections. */
export async function startEmbeddedNats(options: EmbeddedNatsOptions): Promise<EmbeddedNats> {
  const directory = resolve(options.directory);
  await mkdir(join(directory, 'jetstream'), { recursive: true });
  const port = options.port && options.port > 0 ? options.port : await freePort();
  const configFile = join(directory, 'nats-server.conf');
  const authorizationFile = resolve(options.authorizationFile ?? join(directory, 'authorization.conf'));
  const include = relative(dirname(configFile), authorizationFile);
  if (isAbsolute(include)) throw new Error(`authorization file ${authorizationFile} cannot be included from ${configFile}`);
  const bootstrapUsers = options.bootstrapUsers;
  await writeAuthorization(
    authorizationFile,
    bootstrapUsers === undefined && options.users === undefined ? undefined : renderNatsAuthorization(bootstrapUsers ?? [], options.users ?? []),
  );
  await writeFile(
    configFile,
    renderNatsServerConfig({
      port,
      ...(options.host ? { host: options.host } : {}),
      serverName: 'cowherd-embedded',
      storeDir: join(directory, 'jetstream'),
      tls: options.tls,
      authorizationInclude: include,
      // The pid file lets the certificate authority reload this server after it changed the users.
      extraConfig: [`pid_file: ${quote(join(directory, 'nats-server.pid'))}`, options.extraConfig ?? ''].join('\n'),
    }),
    { mode: 0o600 },
  );

  const lineListeners = new Set<(line: string) => void>();
  const daemon = await startDaemon('nats-server', ['-c', configFile], {
    readyPattern: /Server is ready/,
    readyTimeoutMs: 30_000,
    ownProcessGroup: options.ownProcessGroup ?? false,
    // Both shut the server down the same way, but nats-server exits 1 after SIGTERM and 0 after SIGINT.
    stopSignal: 'SIGINT',
    onLine: (line) => {
      options.onLine?.(line);
      for (const listener of lineListeners) listener(line);
    },
  });

  const reloadTimeoutMs = options.reloadTimeoutMs ?? 10_000;
  const reload = (): Promise<void> =>
    new Promise<void>((resolvePromise, reject) => {
      const finish = (error?: Error): void => {
        clearTimeout(timer);
        lineListeners.delete(listener);
        if (error) reject(error);
        else resolvePromise();
      };
      const listener = (line: string): void => {
        if (RELOADED.test(line)) finish();
        else {
          const failed = RELOAD_FAILED.exec(line);
          if (failed) finish(new Error(`nats-server refused the new configuration: ${failed[1]}`));
        }
      };
      const timer = setTimeout(() => finish(new Error(`nats-server did not confirm the reload within ${reloadTimeoutMs} ms`)), reloadTimeoutMs);
      lineListeners.add(listener);
      void daemon.exited.then(() => finish(new Error('nats-server exited')));
      try {
        reloadNats(daemon.pid);
      } catch (error) {
        finish(error as Error);
      }
    });

  // One reload at a time, so that each waits for its own "Reloaded" line.
  let queue: Promise<void> = Promise.resolve();
  const updateUsers = (principals: readonly NatsPrincipal[]): Promise<void> => {
    const list = [...principals];
    const next = queue.then(async () => {
      await writeAuthorization(authorizationFile, renderNatsAuthorization(bootstrapUsers ?? [], list));
      await reload();
    });
    queue = next.catch(() => undefined);
    return next;
  };

  return {
    url: `tls://localhost:${port}`,
    port,
    daemon,
    authorizationFile,
    pidFile: join(directory, 'nats-server.pid'),
    updateUsers,
    stop: () => daemon.stop(10_000),
  };
}

/** Atomic write (a reload never reads half a file); `undefined` writes the open (no users) file. */
async function writeAuthorization(file: string, contents: string | undefined): Promise<void> {
  await mkdir(dirname(file), { recursive: true });
  await writeAtomically(file, contents ?? renderOpenNatsAuthorization(), 0o600);
}

/** Asks the kernel for a free TCP port on loopback. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}
