/**
 * The AIP-160 subset every List method accepts (proto/README.md): comparisons `field = value` or
 * `field != value` joined by AND; values are quoted strings, bare words (enum names without prefix),
 * or true/false; a string value ending in `*` matches by prefix where the field allows it.
 */
import { CowherdError } from './errors.js';

/** One comparison. */
export interface Comparison {
  readonly field: string;
  readonly negated: boolean;
  readonly value: string;
  readonly prefix: boolean;
}

/**
 * How a List method reads a field of its items; `prefix` allows `value*`. A field named `labels.*` serves
 * every `labels.<key>` and gets the key as `subkey`.
 */
export type FilterFields<T> = Readonly<Record<string, { read: (item: T, subkey: string) => string | readonly string[]; prefix?: boolean }>>;

const TERM = /^\s*([a-z_][a-z0-9_.]*)\s*(!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_.:/*-]+))\s*$/;

/** Parses `filter` against the fields a method allows; throws INVALID_ARGUMENT naming `filter`. */
export function parseFilter<T>(filter: string, fields: FilterFields<T>): (item: T) => boolean {
  if (filter.trim() === '') return () => true;
  const comparisons = filter.split(/\s+AND\s+/).map((term): Comparison => {
    const match = TERM.exec(term);
    if (!match) throw CowherdError.invalidArgument('filter', `cannot parse ${JSON.stringify(term.trim())}; use field = value joined by AND`);
    const [, field, operator, quoted, bare] = match;
    const raw = quoted !== undefined ? quoted.replace(/\\(.)/g, '$1') : bare!;
    const spec = fields[field!] ?? (field!.startsWith('labels.') ? fields['labels.*'] : undefined);
    if (!spec) throw CowherdError.invalidArgument('filter', `cannot filter on ${field}; allowed: ${Object.keys(fields).join(', ')}`);
    const prefix = raw.endsWith('*');
    if (prefix && !spec.prefix) throw CowherdError.invalidArgument('filter', `${field} does not take a prefix (*)`);
    return { field: field!, negated: operator === '!=', value: prefix ? raw.slice(0, -1) : raw, prefix };
  });
  return (item) =>
    comparisons.every((comparison) => {
      const labelled = comparison.field.startsWith('labels.') && !fields[comparison.field];
      const spec = labelled ? fields['labels.*']! : fields[comparison.field]!;
      const actual = spec.read(item, labelled ? comparison.field.slice('labels.'.length) : '');
      const values = typeof actual === 'string' ? [actual] : actual;
      const matches = values.some((value) => (comparison.prefix ? value.startsWith(comparison.value) : value === comparison.value));
      return comparison.negated ? !matches : matches;
    });
}
