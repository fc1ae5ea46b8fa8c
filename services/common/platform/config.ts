/**
 * Typed configuration from the environment. Each process declares its variables once (name, meaning,
 * default, parser); `readConfig` returns a frozen object or throws ConfigError listing every variable
 * that is missing or malformed, so an operator fixes them all in one go. Nothing else reads process.env.
 */
import { resolve } from 'node:path';

/** One environment variable: how to parse it and what it means. */
export interface Variable<T> {
  readonly name: string;
  readonly description: string;
  /** Printed in docs and help; undefined means required. */
  readonly defaultText: string | undefined;
  parse(raw: string | undefined): T;
}

/** Thrown when configuration is missing or malformed; `problems` has one line per variable. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  constructor(readonly problems: readonly string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
  }
}

type Spec = Record<string, Variable<unknown>>;
/** The typed, frozen result of reading a spec. */
export type ConfigOf<S extends Spec> = { readonly [K in keyof S]: S[K] extends Variable<infer T> ? T : never };

/** Reads every variable of `spec` from `env`; throws ConfigError naming all bad ones. */
export function readConfig<S extends Spec>(spec: S, env: Readonly<Record<string, string | undefined>>): ConfigOf<S> {
  const problems: string[] = [];
  const result: Record<string, unknown> = {};
  for (const [key, variable] of Object.entries(spec)) {
    const raw = env[variable.name];
    try {
      result[key] = variable.parse(raw === '' ? undefined : raw);
    } catch (error) {
      problems.push(`${variable.name}: ${(error as Error).message} (${variable.description})`);
    }
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return Object.freeze(result) as ConfigOf<S>;
}

/** Markdown table rows documenting a spec, for READMEs and --help. */
export function describeConfig(spec: Spec): string {
  const rows = Object.values(spec).map((v) => `| \`${v.name}\` | ${v.defaultText === undefined ? '(required)' : `\`${v.defaultText}\``} | ${v.description} |`);
  return ['| variable | default | meaning |', '|---|---|---|', ...rows].join('\n');
}

function variable<T>(
  name: string,
  description: string,
  defaultValue: T | undefined,
  parse: (raw: string) => T,
  show: (value: T) => string = String,
): Variable<T> {
  return {
    name,
    description,
    defaultText: defaultValue === undefined ? undefined : show(defaultValue),
    parse(raw) {
      if (raw === undefined) {
        if (defaultValue === undefined) throw new Error('is required');
        return defaultValue;
      }
      return parse(raw.trim());
    },
  };
}

/** A string; `defaultValue` undefined means required. */
export function stringVariable(name: string, description: string, defaultValue?: string): Variable<string> {
  return variable(name, description, defaultValue, (raw) => raw);
}

/** An optional string that may stay unset. */
export function optionalStringVariable(name: string, description: string): Variable<string | undefined> {
  return { name, description, defaultText: '', parse: (raw) => raw };
}

/** A file path, resolved against the working directory. */
export function pathVariable(name: string, description: string, defaultValue?: string): Variable<string> {
  return variable(name, description, defaultValue === undefined ? undefined : resolve(defaultValue), (raw) => resolve(raw));
}

/** An integer within [min, max]. */
export function integerVariable(name: string, description: string, defaultValue: number | undefined, min: number, max: number): Variable<number> {
  return variable(name, description, defaultValue, (raw) => {
    if (!/^-?\d+$/.test(raw)) throw new Error(`must be an integer, got ${JSON.stringify(raw)}`);
    const value = Number(raw);
    if (value < min || value > max) throw new Error(`must be between ${min} and ${max}, got ${value}`);
    return value;
  });
}

/** "host:port" with port 0..65535 (0 = any free port). */
export function addressVariable(name: string, description: string, defaultValue?: string): Variable<string> {
  return variable(name, description, defaultValue, (raw) => {
    const match = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(raw);
    if (!match || Number(match[2]) > 65535) throw new Error(`must be host:port, got ${JSON.stringify(raw)}`);
    return raw;
  });
}

/** One of a fixed set of words. */
export function enumVariable<T extends string>(name: string, description: string, defaultValue: T | undefined, values: readonly T[]): Variable<T> {
  return variable(name, description, defaultValue, (raw) => {
    if (!values.includes(raw as T)) throw new Error(`must be one of ${values.join(', ')}, got ${JSON.stringify(raw)}`);
    return raw as T;
  });
}

/** A comma-separated list of URLs such as nats://localhost:4222. */
export function urlListVariable(name: string, description: string, defaultValue?: readonly string[]): Variable<readonly string[]> {
  return variable(
    name,
    description,
    defaultValue,
    (raw) => {
      const urls = raw
        .split(',')
        .map((part) => part.trim())
        .filter((part) => part.length > 0);
      if (urls.length === 0) throw new Error('must list at least one URL');
      for (const url of urls) {
        try {
          new URL(url);
        } catch {
          throw new Error(`is not a URL: ${JSON.stringify(url)}`);
        }
      }
      return urls;
    },
    (urls) => urls.join(','),
  );
}
