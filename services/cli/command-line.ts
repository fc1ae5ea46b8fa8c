/**
 * The CLI's argument parser and help, without a framework: a tree of commands, each with its options and
 * positionals. Global options may stand anywhere (before or after the command words), every command and
 * group answers `--help`, and anything the tree does not know is a UsageError (exit 2) that names the
 * command's usage line. `node:util` parseArgs cannot do this: it must know every option before it knows
 * which command the words select.
 */

/** One `--name [value]` option. */
export interface OptionSpec {
  /** The long name without dashes. */
  readonly name: string;
  /** Placeholder of the value, e.g. `<host>`; absent for a boolean flag. */
  readonly value?: string;
  readonly description: string;
  readonly required?: boolean;
  /** May be given several times; the values are collected in order. */
  readonly repeatable?: boolean;
}

/** A positional argument of a leaf command. */
export interface PositionalSpec {
  /** Shown as `<name>`. */
  readonly name: string;
  readonly description: string;
  /** May be left out (only the last positionals may be optional). */
  readonly optional?: boolean;
}

/** A command: a group (with subcommands) or a leaf (with run). */
export interface CommandSpec<Context = unknown> {
  readonly name: string;
  /** One line, shown in the parent's command list. */
  readonly summary: string;
  readonly positionals?: readonly PositionalSpec[];
  readonly options?: readonly OptionSpec[];
  readonly subcommands?: readonly CommandSpec<Context>[];
  /** More help text: rules, examples. */
  readonly details?: string;
  readonly run?: (invocation: Invocation, context: Context) => Promise<number>;
}

/** Parsed option values: a string, true for flags, or a list for repeatable options. */
export type OptionValues = Readonly<Record<string, string | true | readonly string[] | undefined>>;

/** What a leaf command receives. */
export interface Invocation {
  /** The command words, e.g. ['hosts', 'show']. */
  readonly path: readonly string[];
  /** The commands the words selected, root first: for usage errors raised while running. */
  readonly command: readonly CommandSpec<never>[];
  readonly options: OptionValues;
  readonly positionals: readonly string[];
  /** The string value of an option, undefined when absent. */
  string(name: string): string | undefined;
  /** True when the flag is given. */
  flag(name: string): boolean;
  /** Every value of a repeatable option. */
  list(name: string): readonly string[];
}

/** Thrown for a wrong invocation; `command` is the deepest command the words selected. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
  constructor(
    message: string,
    readonly command: readonly CommandSpec<never>[],
  ) {
    super(message);
  }
}

/** The outcome of parsing: help to print, or a leaf command to run. */
export type ParseResult<Context> =
  | { readonly kind: 'help'; readonly command: readonly CommandSpec<Context>[] }
  | { readonly kind: 'run'; readonly command: readonly CommandSpec<Context>[]; readonly invocation: Invocation };

/** Parses `argv` against the tree rooted at `root`, with `globals` accepted everywhere. */
export function parseCommandLine<Context>(root: CommandSpec<Context>, globals: readonly OptionSpec[], argv: readonly string[]): ParseResult<Context> {
  const path: CommandSpec<Context>[] = [root];
  const values: Record<string, string | true | string[]> = {};
  const positionals: string[] = [];
  let help = false;
  let optionsEnded = false;
  const current = (): CommandSpec<Context> => path[path.length - 1]!;
  // The command's own options first: a near miss suggests them before the global ones.
  const known = (): OptionSpec[] => [...[...path].reverse().flatMap((command) => command.options ?? []), ...globals];

  for (let index = 0; index < argv.length; index++) {
    const word = argv[index]!;
    if (!optionsEnded && word === '--') {
      optionsEnded = true;
      continue;
    }
    if (!optionsEnded && (word === '-h' || word === '--help')) {
      help = true;
      continue;
    }
    if (!optionsEnded && word.startsWith('-') && word !== '-') {
      if (!word.startsWith('--')) throw new UsageError(`unknown option ${word} (options are long: --name)`, path);
      const equals = word.indexOf('=');
      const name = word.slice(2, equals === -1 ? undefined : equals);
      const spec = known().find((option) => option.name === name);
      if (!spec)
        throw new UsageError(
          `unknown option --${name}${suggestion(
            name,
            known().map((option) => option.name),
            '--',
          )}`,
          path,
        );
      if (spec.value === undefined) {
        if (equals !== -1) throw new UsageError(`--${name} is a flag and takes no value`, path);
        values[name] = true;
        continue;
      }
      let value: string;
      if (equals !== -1) value = word.slice(equals + 1);
      else {
        const next = argv[index + 1];
        if (next === undefined || (next.startsWith('--') && next.length > 2)) throw new UsageError(`--${name} needs a value ${spec.value}`, path);
        value = next;
        index++;
      }
      // Like getopt tools, the last value wins: a wrapper or alias may set a default that the line overrides.
      if (spec.repeatable) values[name] = [...((values[name] as string[] | undefined) ?? []), value];
      else values[name] = value;
      continue;
    }
    const subcommands = current().subcommands;
    if (subcommands && positionals.length === 0) {
      const next = subcommands.find((command) => command.name === word);
      if (!next) {
        if (help) return { kind: 'help', command: path };
        const words = path
          .slice(1)
          .map((command) => `${command.name} `)
          .join('');
        throw new UsageError(
          `unknown command "${words}${word}"${suggestion(
            word,
            subcommands.map((command) => command.name),
            words,
          )}`,
          path,
        );
      }
      path.push(next);
      continue;
    }
    positionals.push(word);
  }

  const leaf = current();
  if (help) return { kind: 'help', command: path };
  if (!leaf.run) {
    if (path.length === 1) throw new UsageError('no command given', path);
    throw new UsageError(`"${commandWords(path.slice(1))}" needs a command`, path);
  }
  const expected = leaf.positionals ?? [];
  const required = expected.filter((positional) => !positional.optional).length;
  if (positionals.length < required)
    throw new UsageError(
      `missing ${expected
        .slice(positionals.length, required)
        .map((positional) => `<${positional.name}>`)
        .join(' ')}`,
      path,
    );
  if (positionals.length > expected.length) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[expected.length])}`, path);
  for (const option of leaf.options ?? []) {
    if (option.required && values[option.name] === undefined) throw new UsageError(`missing --${option.name} ${option.value ?? ''}`.trimEnd(), path);
  }
  const options: OptionValues = values;
  const invocation: Invocation = {
    path: path.slice(1).map((command) => command.name),
    command: path,
    options,
    positionals,
    string: (name) => {
      const value = options[name];
      return typeof value === 'string' ? value : undefined;
    },
    flag: (name) => options[name] === true,
    list: (name) => {
      const value = options[name];
      return Array.isArray(value) ? value : typeof value === 'string' ? [value] : [];
    },
  };
  return { kind: 'run', command: path, invocation };
}

/** `cowherd hosts show`, for messages. */
export function commandWords(path: readonly CommandSpec<never>[] | readonly CommandSpec<unknown>[]): string {
  return path.map((command) => command.name).join(' ');
}

/** The one-line usage of a command. */
export function usageLine(path: readonly CommandSpec<never>[] | readonly CommandSpec<unknown>[]): string {
  const command = path[path.length - 1]!;
  const parts = [commandWords(path)];
  if (command.subcommands) parts.push('<command>');
  for (const positional of command.positionals ?? []) parts.push(positional.optional ? `[<${positional.name}>]` : `<${positional.name}>`);
  for (const option of command.options ?? []) if (option.required) parts.push(`--${option.name} ${option.value}`);
  if ((command.options ?? []).some((option) => !option.required)) parts.push('[options]');
  return parts.join(' ');
}

/** The short answer to a missing or unknown command: the commands there are, and where help is. */
export function renderCommandList(path: readonly CommandSpec<never>[] | readonly CommandSpec<unknown>[]): string {
  const command = path[path.length - 1]!;
  const subcommands = command.subcommands ?? [];
  const width = Math.max(...subcommands.map((sub) => sub.name.length));
  return [
    `usage: ${usageLine(path)}`,
    'commands:',
    ...subcommands.map((sub) => `  ${sub.name.padEnd(width)}  ${sub.summary}`),
    `run '${commandWords(path)} --help' for more`,
    '',
  ].join('\n');
}

/** The full help of a command: usage, summary, subcommands or arguments and options, global options. */
export function renderHelp(path: readonly CommandSpec<never>[] | readonly CommandSpec<unknown>[], globals: readonly OptionSpec[]): string {
  const command = path[path.length - 1]!;
  const lines = [`usage: ${usageLine(path)}`, '', command.summary];
  if (command.subcommands) {
    lines.push('', 'commands:');
    const width = Math.max(...command.subcommands.map((sub) => sub.name.length));
    for (const sub of command.subcommands) lines.push(`  ${sub.name.padEnd(width)}  ${sub.summary}`);
  }
  if (command.positionals?.length) {
    lines.push('', 'arguments:');
    const width = Math.max(...command.positionals.map((positional) => positional.name.length + 2));
    for (const positional of command.positionals) lines.push(`  ${`<${positional.name}>`.padEnd(width)}  ${positional.description}`);
  }
  if (command.options?.length) lines.push('', 'options:', ...renderOptions(command.options));
  if (command.details) lines.push('', command.details.trimEnd());
  lines.push('', 'global options (anywhere on the line):', ...renderOptions(globals));
  if (command.subcommands) lines.push('', `run '${commandWords(path)} <command> --help' for a command's options`);
  return `${lines.join('\n')}\n`;
}

function renderOptions(options: readonly OptionSpec[]): string[] {
  const labels = options.map((option) => `--${option.name}${option.value ? ` ${option.value}` : ''}`);
  const width = Math.max(...labels.map((label) => label.length));
  return options.map(
    (option, index) =>
      `  ${labels[index]!.padEnd(width)}  ${option.description}${option.required ? ' (required)' : ''}${option.repeatable ? ' (repeatable)' : ''}`,
  );
}

/** ", did you mean --x?" for a near miss (edit distance at most 2), otherwise nothing. */
function suggestion(word: string, candidates: readonly string[], prefix: string): string {
  let best: { name: string; distance: number } | undefined;
  for (const candidate of candidates) {
    const distance = editDistance(word, candidate);
    if (distance <= 2 && (!best || distance < best.distance)) best = { name: candidate, distance };
  }
  return best ? `; did you mean "${prefix}${best.name}"?` : '';
}

/** Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`. */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i]![j] = Math.min(d[i]![j]!, d[i - 2]![j - 2]! + 1);
    }
  }
  return d[a.length]![b.length]!;
}
