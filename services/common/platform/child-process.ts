/**
 * The one way cowherd runs other programs (qemu-img, virsh, nats-server...): arguments as an array,
 * never a shell string; a timeout on every command; failures as CommandError with the program's
 * stderr (secrets scrubbed) so callers can map them to typed errors.
 */
import { execa, ExecaError, type ResultPromise } from 'execa';
import { redactSecrets } from './logger.js';

/** Thrown when a command exits non-zero, times out or cannot start. */
export class CommandError extends Error {
  override readonly name = 'CommandError';
  constructor(
    readonly command: string,
    readonly exitCode: number | undefined,
    readonly stderr: string,
    readonly timedOut: boolean,
    cause?: unknown,
  ) {
    super(`${command} ${timedOut ? 'timed out' : `failed (exit ${exitCode ?? 'none'})`}: ${stderr.trim().split('\n').slice(-3).join(' | ')}`, { cause });
  }
}

/** Options of {@link runCommand}. */
export interface RunOptions {
  /** Kill after this long. Default 60 s. */
  readonly timeoutMs?: number;
  /** Text for standard input. */
  readonly input?: string;
  readonly env?: Readonly<Record<string, string>>;
  readonly cwd?: string;
  readonly signal?: AbortSignal;
}

/** Runs `file args...` to completion and returns stdout; throws CommandError. */
export async function runCommand(file: string, args: readonly string[], options: RunOptions = {}): Promise<string> {
  try {
    const result = await execa(file, args, {
      timeout: options.timeoutMs ?? 60_000,
      ...(options.input === undefined ? { stdin: 'ignore' as const } : { input: options.input }),
      ...(options.env === undefined ? {} : { env: options.env }),
      ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
      ...(options.signal === undefined ? {} : { cancelSignal: options.signal }),
      stripFinalNewline: false,
    });
    return result.stdout;
  } catch (error) {
    if (error instanceof ExecaError) {
      throw new CommandError(describe(file, args), error.exitCode, redactSecrets(String(error.stderr ?? error.shortMessage)), error.timedOut, error);
    }
    throw error;
  }
}

/** A long-running child started with {@link startDaemon}. */
export interface Daemon {
  readonly pid: number;
  /** Output seen so far (stdout and stderr interleaved), for error reports. */
  output(): string;
  /** The stop signal (DaemonOptions.stopSignal), then SIGKILL after `graceMs`; resolves when the process is gone. */
  stop(graceMs?: number): Promise<void>;
  /** Resolves with the exit code when the process exits by itself or is stopped. */
  readonly exited: Promise<number | undefined>;
}

/** Options of {@link startDaemon}. */
export interface DaemonOptions {
  /** Resolve once the output matches this; without it, as soon as the program is started. */
  readonly readyPattern?: RegExp;
  /** Give up (and kill it) after this long. Default 20 s. */
  readonly readyTimeoutMs?: number;
  readonly env?: Readonly<Record<string, string>>;
  readonly cwd?: string;
  /** Each output line, e.g. to a logger. */
  readonly onLine?: (line: string) => void;
  /**
   * The kernel kills the program when this process dies, however it dies (SIGKILL and crashes included,
   * where no exit handler runs): for watchers like `virsh event --loop`, which would otherwise live on
   * as orphans. Through util-linux's `setpriv --pdeathsig`, which sets it and then becomes the program (same
   * pid). Linux only; elsewhere the option does nothing.
   */
  readonly dieWithParent?: boolean;
  /**
   * Run it in a process group (and session) of its own, so that signals meant for the caller's group (a
   * terminal's Ctrl-C reaches every process of the foreground group at once) do not reach it: the caller
   * stops it, in its own order, with {@link Daemon.stop}. Should the caller exit without stopping it, its
   * group gets the stop signal on the way out (execa's own clean-up skips detached children). Default false.
   */
  readonly ownProcessGroup?: boolean;
  /** The signal that asks this program to stop cleanly. Default SIGTERM. */
  readonly stopSignal?: NodeJS.Signals;
}

/** Starts a long-running program and waits until it says it is ready. */
export async function startDaemon(file: string, args: readonly string[], options: DaemonOptions): Promise<Daemon> {
  const [program, programArgs] =
    options.dieWithParent && process.platform === 'linux' ? ['setpriv', ['--pdeathsig', 'KILL', '--', file, ...args]] : [file, args];
  const child: ResultPromise = execa(program, programArgs, {
    stdin: 'ignore',
    all: true,
    buffer: false,
    reject: false,
    cleanup: true,
    detached: options.ownProcessGroup ?? false,
    ...(options.env === undefined ? {} : { env: options.env }),
    ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
  });
  let output = '';
  const exited = child.then(
    (result) => result.exitCode,
    () => undefined,
  );
  if (options.ownProcessGroup && child.pid !== undefined) {
    const group = child.pid;
    const killOnExit = (): void => {
      try {
        process.kill(-group, options.stopSignal ?? 'SIGTERM');
      } catch {
        // Gone already.
      }
    };
    process.once('exit', killOnExit);
    void exited.then(() => process.off('exit', killOnExit));
  }
  const ready = new Promise<void>((resolve, reject) => {
    let pending = '';
    child.all?.on('data', (chunk: Buffer) => {
      const text = chunk.toString();
      output = (output + text).slice(-64 * 1024);
      pending += text;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) options.onLine?.(line);
      if (options.readyPattern?.test(output)) resolve();
    });
    if (!options.readyPattern) resolve();
    void exited.then((code) => reject(new CommandError(describe(file, args), code, redactSecrets(output), false)));
  });
  const daemon: Daemon = {
    pid: child.pid ?? -1,
    output: () => output,
    exited,
    stop: async (graceMs = 5_000) => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(options.stopSignal ?? 'SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    },
  };
  const timeoutMs = options.readyTimeoutMs ?? 20_000;
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      ready,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new CommandError(describe(file, args), undefined, redactSecrets(output), true)), timeoutMs);
      }),
    ]);
  } catch (error) {
    await daemon.stop(1_000);
    throw error;
  } finally {
    clearTimeout(timer);
  }
  return daemon;
}

function describe(file: string, args: readonly string[]): string {
  return [file, ...args.slice(0, 3)].join(' ') + (args.length > 3 ? ' ...' : '');
}
