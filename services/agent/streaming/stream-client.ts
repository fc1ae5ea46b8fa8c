/**
 * The agent's side of the streaming server (stream-server.ts): starts the server when none answers (detached,
 * so that it outlives the agent), registers exports, and hands the server's wants and read profiles to the agent.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createConnection, type Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import type { NbdStatistics } from './nbd-server.js';
import { serverAnswers, streamServerPaths, type ExportSpec } from './stream-server.js';

/** How long a started server may take to answer. */
const START_TIMEOUT_MS = 15_000;

/** What the server said about itself (`status`). */
export interface StreamServerStatus {
  readonly pid: number;
  readonly statistics: NbdStatistics;
  readonly exports: ReadonlyArray<{ name: string; complete: boolean; path: string }>;
}

/** Options of {@link StreamServerClient}. */
export interface StreamServerClientOptions {
  /** `<image dir>/.streaming`. */
  readonly directory: string;
  /** A guest waits for bytes [offset, offset + length) of export `name`. */
  readonly onWant: (name: string, offset: number, length: number) => void;
  /**
   * Reads of a connection's first minute of progress on an export, in the order served (a read profile), in
   * batches; `final` on the last batch (its window is over, or the connection closed).
   */
  readonly onReads?: (name: string, connection: number, reads: ReadonlyArray<readonly [number, number]>, final: boolean) => void;
  readonly log?: (message: string, error?: unknown) => void;
  /** The server's environment beyond PATH (idle exit, stall limit); secrets of the agent are never passed on. */
  readonly serverEnvironment?: Readonly<Record<string, string>>;
}

/** The control connection to the host's streaming server. */
export class StreamServerClient {
  private socket: Socket | undefined;
  private connecting: Promise<Socket> | undefined;
  private readonly pending = new Map<string, Array<{ resolve: (value: unknown) => void; reject: (error: Error) => void }>>();
  private closed = false;

  constructor(private readonly options: StreamServerClientOptions) {}

  /** The NBD socket the server listens on. */
  get nbdSocket(): string {
    return streamServerPaths(this.options.directory).nbdSocket;
  }

  /** Connects to a server that runs already (after an agent restart: its guests' wants come to this agent). */
  async attach(): Promise<boolean> {
    if (!(await serverAnswers(streamServerPaths(this.options.directory).controlSocket))) return false;
    await this.connection(false).catch(() => undefined);
    return this.socket !== undefined;
  }

  /** Serves a file (starting the server when none runs); resolves once the server serves it. */
  async export(spec: ExportSpec): Promise<void> {
    const socket = await this.connection(true);
    await this.request(socket, `exported:${spec.name}`, { type: 'export', ...spec });
  }

  /** Tells the server that pieces arrived: its waiting reads look again now. */
  ready(): void {
    if (this.socket && !this.socket.destroyed) this.socket.write(`${JSON.stringify({ type: 'ready' })}\n`);
  }

  /** The server's statistics and exports; undefined when no server runs. */
  async status(): Promise<StreamServerStatus | undefined> {
    if (!this.socket && !(await this.attach())) return undefined;
    return (await this.request(this.socket!, 'status', { type: 'status' })) as StreamServerStatus;
  }

  /** Closes the connection; the server keeps serving its guests. */
  close(): void {
    this.closed = true;
    this.socket?.destroy();
    this.socket = undefined;
  }

  private request(socket: Socket, key: string, message: object): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const list = this.pending.get(key) ?? [];
      list.push({ resolve, reject });
      this.pending.set(key, list);
      socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  private connection(start: boolean): Promise<Socket> {
    if (this.socket && !this.socket.destroyed) return Promise.resolve(this.socket);
    this.connecting ??= this.connect(start).finally(() => {
      this.connecting = undefined;
    });
    return this.connecting;
  }

  private async connect(start: boolean): Promise<Socket> {
    if (this.closed) throw new Error('the streaming client is closed');
    const paths = streamServerPaths(this.options.directory);
    if (start && !(await serverAnswers(paths.controlSocket))) await this.startServer();
    const socket = await new Promise<Socket>((resolve, reject) => {
      const candidate = createConnection(paths.controlSocket);
      candidate.once('connect', () => resolve(candidate));
      candidate.once('error', reject);
    });
    socket.setEncoding('utf8');
    let buffered = '';
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      let newline = buffered.indexOf('\n');
      while (newline >= 0) {
        this.handle(buffered.slice(0, newline));
        buffered = buffered.slice(newline + 1);
        newline = buffered.indexOf('\n');
      }
    });
    socket.on('error', () => undefined);
    socket.once('close', () => {
      if (this.socket === socket) this.socket = undefined;
      for (const [key, waiters] of this.pending) {
        this.pending.delete(key);
        for (const waiter of waiters) waiter.reject(new Error('the streaming server closed the connection'));
      }
    });
    this.socket = socket;
    return socket;
  }

  private handle(line: string): void {
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    const settle = (key: string, value: unknown, error?: Error): void => {
      const waiters = this.pending.get(key);
      if (!waiters) return;
      this.pending.delete(key);
      for (const waiter of waiters) error ? waiter.reject(error) : waiter.resolve(value);
    };
    switch (message['type']) {
      case 'want':
        this.options.onWant(String(message['name']), Number(message['offset']), Number(message['length']));
        break;
      case 'reads':
        this.options.onReads?.(String(message['name']), Number(message['connection']), message['reads'] as Array<[number, number]>, message['final'] === true);
        break;
      case 'exported':
        settle(`exported:${String(message['name'])}`, undefined);
        break;
      case 'status':
        settle('status', message);
        break;
      case 'error':
        settle(`exported:${String(message['name'])}`, undefined, new Error(`streaming server: ${String(message['message'])}`));
        break;
    }
  }

  /** Starts the server detached, its output appended to its log, and waits until it answers. */
  private async startServer(): Promise<void> {
    const paths = streamServerPaths(this.options.directory);
    await mkdir(this.options.directory, { recursive: true, mode: 0o711 });
    const here = fileURLToPath(import.meta.url);
    const main = here.replace(/stream-client\.(ts|js)$/, 'serve-main.$1');
    const log = openSync(paths.logFile, 'a', 0o600);
    try {
      const child = spawn(process.execPath, [...process.execArgv, main, this.options.directory], {
        detached: true,
        stdio: ['ignore', log, log],
        env: { PATH: process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin', ...this.options.serverEnvironment },
      });
      child.unref();
      this.options.log?.(`started the streaming server (pid ${child.pid})`);
    } finally {
      closeSync(log);
    }
    const deadline = performance.now() + START_TIMEOUT_MS;
    while (!(await serverAnswers(paths.controlSocket))) {
      if (performance.now() > deadline) throw new Error(`the streaming server did not answer within ${START_TIMEOUT_MS} ms (see ${paths.logFile})`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}
