/**
 * Live progress of long-running operations on stderr. On a terminal, a block of lines (one per host or
 * stage, each with a bar) is redrawn in place; otherwise, for logs and pipes, a line is printed whenever
 * its text changes, so that a CI log shows the progress without a wall of repeats.
 */
import type { TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { formatBytes, formatSeconds } from './output.js';

/** One line of progress; `key` identifies it across updates (e.g. the host). */
export interface ProgressLine {
  readonly key: string;
  /** What the line is about (a host and its state), printed before the bar. */
  readonly label?: string;
  readonly text: string;
  /** 0..1 when known: draws a bar on a terminal. */
  readonly fraction?: number;
}

/** A progress block. */
export interface ProgressDisplay {
  update(lines: readonly ProgressLine[]): void;
  /** Leaves the last state on screen. */
  finish(): void;
}

const BAR_WIDTH = 24;

/** A display on `stream`: redrawn on a TTY, change-only lines otherwise, nothing when quiet. */
export function createProgressDisplay(stream: NodeJS.WriteStream, options: { quiet?: boolean } = {}): ProgressDisplay {
  if (options.quiet) return { update: () => undefined, finish: () => undefined };
  if (stream.isTTY) {
    let drawn = 0;
    return {
      update: (lines) => {
        const columns = stream.columns || 100;
        let text = drawn > 0 ? `\x1b[${drawn}A` : '';
        for (const line of lines) {
          const full = [line.label, line.fraction === undefined ? undefined : bar(line.fraction), line.text]
            .filter((part) => part !== undefined && part !== '')
            .join('  ');
          text += `\r\x1b[2K${full.length > columns - 1 ? `${full.slice(0, columns - 2)}…` : full}\n`;
        }
        // Lines that disappeared since the last draw are cleared.
        for (let extra = lines.length; extra < drawn; extra++) text += '\r\x1b[2K\n';
        if (drawn > lines.length) text += `\x1b[${drawn - lines.length}A`;
        drawn = lines.length;
        stream.write(text);
      },
      finish: () => undefined,
    };
  }
  const last = new Map<string, string>();
  return {
    update: (lines) => {
      for (const line of lines) {
        const text = [line.label, line.text].filter((part) => part !== undefined && part !== '').join('  ');
        if (last.get(line.key) === text) continue;
        last.set(line.key, text);
        stream.write(`${text}\n`);
      }
    },
    finish: () => undefined,
  };
}

/** `[██████░░░░░░]  50%`. */
export function bar(fraction: number): string {
  const clamped = Math.max(0, Math.min(1, Number.isFinite(fraction) ? fraction : 0));
  const filled = Math.round(clamped * BAR_WIDTH);
  return `[${'█'.repeat(filled)}${'░'.repeat(BAR_WIDTH - filled)}] ${String(Math.floor(clamped * 100)).padStart(3)}%`;
}

/** done/total as 0..1, undefined when the total is unknown. */
export function fractionOf(progress: TransferProgress | undefined): number | undefined {
  const total = Number(progress?.bytesTotal ?? 0);
  return total > 0 ? Number(progress?.bytesDone ?? 0) / total : undefined;
}

/** "120 MiB / 256 MiB  12.3 MiB/s  3 peers  ETA 11s" from a TransferProgress. */
export function describeTransfer(progress: TransferProgress | undefined): string {
  if (!progress) return '';
  const parts = [`${formatBytes(progress.bytesDone)} / ${formatBytes(progress.bytesTotal)}`];
  if (Number(progress.rateBytesPerSecond) > 0) parts.push(`${formatBytes(progress.rateBytesPerSecond)}/s`);
  if (Number(progress.uploadRateBytesPerSecond) > 0) parts.push(`up ${formatBytes(progress.uploadRateBytesPerSecond)}/s`);
  if (progress.peers > 0) parts.push(`${progress.peers} peer${progress.peers === 1 ? '' : 's'}`);
  if (progress.eta && Number(progress.bytesDone) < Number(progress.bytesTotal))
    parts.push(`ETA ${formatSeconds(Number(progress.eta.seconds) + progress.eta.nanos / 1e9)}`);
  return parts.join('  ');
}

/**
 * "host unreachable  12 MiB / 40 MiB held  fails at 12:34:56 UTC unless it comes back": a host the inventory
 * marks UNREACHABLE has no rate, peers or ETA, only what it held and its progress deadline.
 */
export function describeUnreachable(progress: TransferProgress | undefined, deadline: Date | undefined): string {
  const parts = ['host unreachable'];
  if (progress) parts.push(`${formatBytes(progress.bytesDone)} / ${formatBytes(progress.bytesTotal)} held`);
  if (deadline) parts.push(`fails at ${deadline.toISOString().slice(11, 19)} UTC unless it comes back`);
  return parts.join('  ');
}
