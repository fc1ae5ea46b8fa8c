/** How the CLI prints: aligned tables and key/value blocks for people, proto JSON for scripts. */

/** Where and how a command prints. */
export interface Output {
  readonly format: 'table' | 'json';
  /** A line (or block) on stdout. */
  line(text?: string): void;
  /** A value as indented JSON on stdout. */
  json(value: unknown): void;
  /** A value as one line of JSON (streams of events). */
  jsonLine(value: unknown): void;
  /** Progress and notes for people, on stderr, so that stdout stays parseable. */
  note(text: string): void;
}

/** Output on the process's streams. */
export function processOutput(format: 'table' | 'json', quiet: boolean): Output {
  return {
    format,
    line: (text = '') => void process.stdout.write(`${text}\n`),
    json: (value) => void process.stdout.write(`${JSON.stringify(value, null, 2)}\n`),
    jsonLine: (value) => void process.stdout.write(`${JSON.stringify(value)}\n`),
    note: (text) => {
      if (!quiet) process.stderr.write(`${text}\n`);
    },
  };
}

/** Rows aligned in columns, two spaces apart, headers upper-case; the last column is not padded. */
export function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const all = [headers.map((header) => header.toUpperCase()), ...rows];
  const widths = headers.map((_, column) => Math.max(...all.map((row) => (row[column] ?? '').length)));
  return all
    .map((row) =>
      row
        .map((cell, column) => (column === row.length - 1 ? cell : cell.padEnd(widths[column]!)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/** `key:  value` lines with the values aligned. */
export function keyValues(pairs: readonly (readonly [string, string])[]): string {
  const width = Math.max(...pairs.map(([key]) => key.length + 1));
  return pairs.map(([key, value]) => `${`${key}:`.padEnd(width)}  ${value}`).join('\n');
}

/** 1536 -> "1.5 KiB"; int64 fields arrive as strings. */
export function formatBytes(value: string | number | undefined): string {
  const bytes = Number(value ?? 0);
  if (!Number.isFinite(bytes) || bytes < 1024) return `${Number.isFinite(bytes) ? bytes : 0} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let scaled = bytes / 1024;
  let unit = 0;
  while (scaled >= 1024 && unit < units.length - 1) {
    scaled /= 1024;
    unit++;
  }
  return `${scaled.toFixed(scaled < 10 ? 1 : 0)} ${units[unit]}`;
}

/** 75 -> "1m15s". */
export function formatSeconds(total: number): string {
  if (!Number.isFinite(total) || total < 0) return '?';
  const seconds = Math.round(total);
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m${String(seconds % 60).padStart(2, '0')}s`;
  const hours = Math.floor(minutes / 60);
  return `${hours}h${String(minutes % 60).padStart(2, '0')}m`;
}

/** "3m ago", "in 1h00m", or "-" for an unset time. */
export function formatAge(time: Date | undefined, now = Date.now()): string {
  if (!time) return '-';
  const seconds = (now - time.getTime()) / 1000;
  return seconds >= 0 ? `${formatSeconds(seconds)} ago` : `in ${formatSeconds(-seconds)}`;
}

/** "2024-05-01 12:00:03 UTC (3m ago)". */
export function formatTime(time: Date | undefined): string {
  if (!time) return '-';
  return `${time
    .toISOString()
    .replace('T', ' ')
    .replace(/\.\d+Z$/, ' UTC')} (${formatAge(time)})`;
}

/** An enum value's JSON name without its prefix: STATE_READY -> READY. */
export function enumWord(json: string, prefix: string): string {
  return json.startsWith(prefix) ? json.slice(prefix.length) : json;
}

/** A percentage of done/total, "-" when total is unknown. */
export function percent(done: string | number | undefined, total: string | number | undefined): string {
  const all = Number(total ?? 0);
  if (!(all > 0)) return '-';
  return `${Math.min(100, Math.floor((Number(done ?? 0) / all) * 100))}%`;
}
