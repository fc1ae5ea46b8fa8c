/**
 * The README's start command (`bash scripts/start.sh`) as a user runs it in a terminal: a foreground job in its
 * own process group, so that Ctrl-C reaches what a terminal reaches with it: SIGINT to every process of the group
 * at once (the fleet, NATS, every service and agent, anything they run), not to start.sh alone.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { REPOSITORY } from './processes.js';

/** A live process found by {@link StartCommand.leftovers}. */
export interface LeftoverProcess {
  readonly pid: number;
  readonly command: string;
}

/** `bash scripts/start.sh <args>` in its own process group, its stdout and stderr collected. */
export class StartCommand {
  private text = '';
  private readonly child: ChildProcess;
  private readonly exited: Promise<number | null>;

  /**
   * `stateDirectory` is COWHERD_STATE_DIR; `temporaryDirectory` is the TMPDIR of the whole run, so that what it
   * leaves in the temp directory can be checked.
   */
  constructor(
    readonly stateDirectory: string,
    readonly temporaryDirectory: string,
    args: readonly string[],
  ) {
    this.child = spawn('bash', [join(REPOSITORY, 'scripts/start.sh'), ...args], {
      cwd: REPOSITORY,
      env: { ...process.env, COWHERD_STATE_DIR: stateDirectory, COWHERD_FLEET_DYNAMIC_PORTS: '1', TMPDIR: temporaryDirectory },
      stdio: ['ignore', 'pipe', 'pipe'],
      // A shell puts a foreground job in a process group of its own; the terminal signals that group.
      detached: true,
    });
    this.child.stdout!.on('data', (chunk: Buffer) => (this.text += chunk.toString()));
    this.child.stderr!.on('data', (chunk: Buffer) => (this.text += chunk.toString()));
    this.exited = new Promise((resolve) => this.child.on('close', (code) => resolve(code)));
  }

  /** The process group's id: start.sh's pid (it execs the fleet, so also the fleet's). */
  get processGroup(): number {
    return this.child.pid!;
  }

  get output(): string {
    return this.text;
  }

  /** True until start.sh (the fleet) has exited. */
  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Waits until the output holds `text`; fails with the output when the command ends or time runs out. */
  async waitFor(text: string, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.text.includes(text)) {
      if (!this.running) throw new Error(`start.sh exited (${this.child.exitCode ?? this.child.signalCode}) before "${text}":\n${this.text}`);
      if (Date.now() > deadline) throw new Error(`no "${text}" within ${timeoutMs / 1000} s:\n${this.text}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  /**
   * Ctrl-C in the terminal: SIGINT to the whole process group at once. Resolves with start.sh's exit code;
   * after a minute the group gets SIGKILL (the test then fails on the code and the leftovers).
   */
  async interrupt(): Promise<number | null> {
    if (this.running) signalGroup(this.processGroup, 'SIGINT');
    const timer = setTimeout(() => signalGroup(this.processGroup, 'SIGKILL'), 60_000);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** For clean-up after a failed test: SIGKILL to whatever is left of the group. */
  kill(): void {
    signalGroup(this.processGroup, 'SIGKILL');
  }

  /** What the run left in its temp directory, but tsx's compile cache (`tsx-<uid>`, reused by every later run). */
  async temporaryLeftovers(): Promise<string[]> {
    const cache = `tsx-${process.getuid?.() ?? ''}`;
    return (await readdir(this.temporaryDirectory)).filter((name) => name !== cache);
  }

  /**
   * Every live process of this run: those still in its process group, and those that left the group (setsid,
   * a double fork) but name the state or temp directory in their command line or environment; but those
   * that `except` accepts (what the run leaves by design, like libvirt's guests).
   */
  async leftovers(except: (process: LeftoverProcess) => boolean = () => false): Promise<LeftoverProcess[]> {
    const found: LeftoverProcess[] = [];
    for (const entry of await readdir('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      const pid = Number(entry);
      if (pid === process.pid) continue;
      const [stat, command, environment] = await Promise.all(
        ['stat', 'cmdline', 'environ'].map((file) => readFile(`/proc/${pid}/${file}`, 'utf8').catch(() => '')),
      );
      // /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
      const fields = stat!.slice(stat!.lastIndexOf(')') + 2).split(' ');
      const [state, , group] = fields;
      if (state === undefined || state === 'Z' || state === 'X') continue;
      const mentions = (text: string): boolean => text.includes(this.stateDirectory) || text.includes(this.temporaryDirectory);
      if (Number(group) !== this.processGroup && !mentions(command!) && !mentions(environment!)) continue;
      const leftover = { pid, command: command!.split('\0').join(' ').trim() };
      if (!except(leftover)) found.push(leftover);
    }
    return found;
  }
}

function signalGroup(group: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-group, signal);
  } catch {
    // The group is gone already.
  }
}

/** True while a process with this pid exists (signal 0 checks without sending anything). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
