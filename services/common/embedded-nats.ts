/**
 * Runs nats-server as a child process with JetStream and mutual TLS: the embedded default of the local
 * fleet, and the real server every integration test starts. Data lives under `directory`.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { startDaemon, type Daemon } from './child-process.js';
import type { TlsFiles } from './tls.js';

/** Options of {@link startEmbeddedNats}. */
export interface EmbeddedNatsOptions {
  /** JetStream store and config file go here. */
  readonly directory: string;
  /** Server certificate (DNS SAN localhost), key and the CA that client certificates must chain to. */
  readonly tls: TlsFiles;
  /** Client port; 0 picks a free one. */
  readonly port?: number;
  /** Extra lines for the config file (authorization, accounts...). */
  readonly extraConfig?: string;
  readonly onLine?: (line: string) => void;
}

/** A running embedded NATS. */
export interface EmbeddedNats {
  /** tls://localhost:<port> */
  readonly url: string;
  readonly port: number;
  readonly daemon: Daemon;
  stop(): Promise<void>;
}

/** Starts nats-server and waits until it accepts connections. */
export async function startEmbeddedNats(options: EmbeddedNatsOptions): Promise<EmbeddedNats> {
  await mkdir(join(options.directory, 'jetstream'), { recursive: true });
  const port = options.port && options.port > 0 ? options.port : await freePort();
  const configFile = join(options.directory, 'nats-server.conf');
  await writeFile(
    configFile,
    [
      `listen: "127.0.0.1:${port}"`,
      `server_name: "cowherd-embedded"`,
      `jetstream { store_dir: ${JSON.stringify(join(options.directory, 'jetstream'))} }`,
      'tls {',
      `  cert_file: ${JSON.stringify(options.tls.certificateFile)}`,
      `  key_file: ${JSON.stringify(options.tls.privateKeyFile)}`,
      `  ca_file: ${JSON.stringify(options.tls.caFile)}`,
      '  verify: true',
      '  timeout: 5',
      '}',
      options.extraConfig ?? '',
    ].join('\n'),
    { mode: 0o600 },
  );
  const daemon = await startDaemon('nats-server', ['-c', configFile], {
    readyPattern: /Server is ready/,
    readyTimeoutMs: 30_000,
    ...(options.onLine === undefined ? {} : { onLine: options.onLine }),
  });
  return { url: `tls://localhost:${port}`, port, daemon, stop: () => daemon.stop(10_000) };
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
