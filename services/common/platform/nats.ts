/**
 * NATS over TLS with the process's client certificate from the cowherd CA. JetStream is the only
 * database: KV buckets for state, the COWHERD_EVENTS stream for events.
 */
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager } from '@nats-io/jetstream';
import { readFileSync } from 'node:fs';
import { sleep } from './concurrency.js';
import type { Logger } from './logger.js';
import { inboxPrefixFor } from './nats-authorization.js';
import { inspectCertificate } from './pki.js';
import type { TlsFiles } from './tls.js';

export type { NatsConnection } from '@nats-io/transport-node';

/** A connection with its JetStream handles. */
export interface Nats {
  readonly connection: NatsConnection;
  readonly jetstream: JetStreamClient;
  readonly manager: JetStreamManager;
  /** Drains subscriptions and closes; closes also when draining fails (rejecting with its error). */
  close(): Promise<void>;
}

/** Options of {@link connectNats}. */
export interface NatsOptions {
  readonly servers: readonly string[];
  /** Client certificate, key and CA; the files are read again on every reconnect. */
  readonly tls: TlsFiles;
  /** Connection name shown by the server (the process identity). */
  readonly name: string;
  readonly log: Logger;
  /** How long to keep trying the first connection. Default 30 s. */
  readonly connectTimeoutMs?: number;
}

/** Connects (retrying while the server comes up) and opens JetStream. */
export async function connectNats(options: NatsOptions): Promise<Nats> {
  // Replies come to a per-identity inbox: hosts and admins may subscribe only below their own.
  const identity = inspectCertificate(readFileSync(options.tls.certificateFile, 'utf8')).identity;
  const connection = await connect({
    ...(identity === undefined ? {} : { inboxPrefix: inboxPrefixFor(identity) }),
    servers: [...options.servers],
    name: options.name,
    tls: { certFile: options.tls.certificateFile, keyFile: options.tls.privateKeyFile, caFile: options.tls.caFile },
    timeout: options.connectTimeoutMs ?? 30_000,
    waitOnFirstConnect: true,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 500,
    pingInterval: 20_000,
  });
  const log = options.log.child({ component: 'nats' });
  log.info({ server: connection.getServer() }, 'connected to NATS');
  void (async () => {
    for await (const status of connection.status()) {
      if (status.type === 'disconnect' || status.type === 'reconnect' || status.type === 'error') log.warn({ status: status.type }, 'NATS connection status');
    }
  })().catch(() => undefined);
  // A connection whose JetStream never answers is closed, not left reconnecting forever behind the error.
  const manager = await openJetStream(connection, options.connectTimeoutMs ?? 30_000, log).catch(async (error: unknown) => {
    await connection.close().catch(() => undefined);
    throw error;
  });
  let closing: Promise<void> | undefined;
  const close = async (): Promise<void> => {
    const drained = connection.drain();
    try {
      // nats.js never settles a drain whose flush was pending when it closed the connection itself (refused twice
      // on reconnect), so the drain races the close.
      await Promise.race([drained, connection.closed()]);
    } finally {
      drained.catch(() => undefined);
      // A connection that is down fails its drain (the flush is refused at the next reconnect attempt) without closing:
      // close it anyway, or it goes on reconnecting for good, and keeps the process alive, once the server is gone.
      if (!connection.isClosed()) await connection.close();
    }
  };
  return {
    connection,
    jetstream: jetstream(connection, { timeout: 10_000 }),
    manager,
    close: () => {
      if (connection.isClosed()) return Promise.resolve();
      closing ??= close();
      return closing;
    },
  };
}

/**
 * Opens the JetStream manager, trying again for up to `timeoutMs` while JetStream does not answer ("jetstream is
 * not enabled": no responder on the JetStream API yet). A process that connects right after the server started,
 * or right after its own identity was issued, can ask before JetStream or its permissions are in place; it waits
 * that out instead of failing to start.
 */
async function openJetStream(connection: NatsConnection, timeoutMs: number, log: Logger): Promise<JetStreamManager> {
  const deadline = Date.now() + timeoutMs;
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await jetstreamManager(connection, { timeout: 10_000 });
    } catch (error) {
      const unavailable = /jetstream is not enabled|no responders|503/i.test((error as Error).message);
      if (!unavailable || Date.now() + 500 > deadline) throw error;
      if (attempt === 1) log.warn({ err: error }, 'JetStream does not answer yet: trying again');
      await sleep(500);
    }
  }
}
