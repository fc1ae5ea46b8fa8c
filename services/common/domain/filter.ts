/**
 * The AIP-160 subset every List method accepts (proto/README.md): comparisons `field = value` or
 * `field != value` joined by AND; values are quoted strings, bare words (enum names without prefix),
 * or true/false; a string value ending in `*` matches by prefix where the field allows it.
 *
 * Every value is checked against what its field can hold before anything is listed: an enum field takes
 * only its value names (from the generated enum, never typed by hand), a boolean only true or false, a
 * resource name only its pattern. A value that no item could ever have (`state = RUNING`, `state = 7`,
 * `managed = maybe`) is INVALID_ARGUMENT naming the value and the allowed ones, not an empty page that
 * reads as "there are none".
 */
import { CowherdError } from '../platform/errors.js';
import { HOST_NAME, IMAGE_NAME, imageNameOfKey, imageVersionNameOfKey, parseImageReference, type ResourcePattern } from './resource-names.js';

/** One comparison. */
export interface Comparison {
  readonly field: string;
  readonly negated: boolean;
  readonly value: string;
  readonly prefix: boolean;
}

/** How a List method reads and checks one field of its items. */
export interface FilterField<T> {
  /** The field's value(s) on an item; a field named `labels.*` gets the label key as `subkey`. */
  readonly read: (item: T, subkey: string) => string | readonly string[];
  /** Whether `value*` (prefix match) is allowed. */
  readonly prefix?: boolean;
  /** Every value the field can hold (enum names, true/false); any other value is INVALID_ARGUMENT. */
  readonly values?: readonly string[];
  /** For free-form fields: why a value is impossible (e.g. not a resource name), or undefined when it is fine. */
  readonly check?: (value: string) => string | undefined;
}

/**
 * How a List method reads a field of its items; `prefix` allows `value*`. A field named `labels.*` serves
 * every `labels.<key>` and gets the key as `subkey`.
 */
export type FilterFields<T> = Readonly<Record<string, FilterField<T>>>;

const TERM = /^\s*([a-z_][a-z0-9_.]*)\s*(!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_.:/*-]+))\s*$/;

/** A ts-proto enum object: names to numbers and numbers back to names. */
type GeneratedEnum = Readonly<Record<string, string | number>>;

/**
 * The value names of a generated enum as filters spell them: `prefix` removed, without the zero value
 * (`*_UNSPECIFIED`, which no resource has) and ts-proto's UNRECOGNIZED.
 */
export function enumValueNames(enumeration: GeneratedEnum, prefix: string): string[] {
  return Object.entries(enumeration)
    .filter(([name, number]) => typeof number === 'number' && number > 0 && name !== 'UNRECOGNIZED')
    .sort(([, a], [, b]) => (a as number) - (b as number))
    .map(([name]) => (name.startsWith(prefix) ? name.slice(prefix.length) : name));
}

/** An enum field: read as its value name without `prefix`, checked against the generated enum's names. */
export function enumField<T>(enumeration: GeneratedEnum, prefix: string, read: (item: T) => number): FilterField<T> {
  return {
    read: (item) => {
      const number = read(item);
      const name = enumeration[number];
      return typeof name === 'string' ? (name.startsWith(prefix) ? name.slice(prefix.length) : name) : String(number);
    },
    values: enumValueNames(enumeration, prefix),
  };
}

/** A boolean field: `true` or `false`. */
export function booleanField<T>(read: (item: T) => boolean): FilterField<T> {
  return { read: (item) => String(read(item)), values: ['true', 'false'] };
}

/** A resource-name (or id) field such as `images/{image}`: a value that does not match `pattern` names nothing. */
export function resourceNameField<T>(
  read: (item: T) => string,
  pattern: ResourcePattern<string> | RegExp | ((value: string) => boolean),
  shape: string,
  options: { prefix?: boolean; allowEmpty?: boolean } = {},
): FilterField<T> {
  const named = (value: string): boolean =>
    pattern instanceof RegExp ? pattern.test(value) : typeof pattern === 'function' ? pattern(value) : pattern.matches(value);
  const fine = (value: string): boolean => named(value) || (options.allowEmpty === true && value === '');
  return {
    read,
    ...(options.prefix ? { prefix: true } : {}),
    check: (value) => (fine(value) ? undefined : `is not of the form ${shape}${options.allowEmpty ? ' (or "" for none)' : ''}`),
  };
}

/**
 * An `images/{image}` field (`source_image`, `image`): the image, every version of it. A value naming one
 * version (`images/x/versions/2`) is refused (the `*_version` fields take those); a recorded version name
 * (`images/x/versions/2`) reads as its image (`images/x`).
 */
export function imageNameField<T>(read: (item: T) => string, options: { allowEmpty?: boolean } = {}): FilterField<T> {
  const isImage = (value: string): boolean => parseImageReference(value) !== undefined && value.split('/').length === 2;
  return resourceNameField((item) => imageOfName(read(item)), isImage, IMAGE_NAME.pattern, options);
}

/**
 * An `images/{image}/versions/{version}` field (`source_image_version`, `image_version`): one exact version,
 * by number (aliases move, so they name no recorded version). What an item recorded is read numbered, so
 * `images/x/versions/1` also matches a version 1 recorded as `images/x`.
 */
export function imageVersionNameField<T>(read: (item: T) => string, options: { allowEmpty?: boolean } = {}): FilterField<T> {
  const isNumbered = (value: string): boolean => parseImageReference(value)?.version !== undefined;
  return resourceNameField((item) => numberedVersionOfName(read(item)), isNumbered, 'images/{image}/versions/{number}', options);
}

/** `images/{image}` of a recorded image or version name; the name itself when it is neither. */
function imageOfName(name: string): string {
  const key = IMAGE_NAME.parse(name)?.image;
  return key === undefined ? name : imageNameOfKey(key);
}

/** The numbered `images/{image}/versions/{version}` of a recorded image or version name; the name itself when it is neither. */
function numberedVersionOfName(name: string): string {
  const key = IMAGE_NAME.parse(name)?.image;
  return key === undefined ? name : imageVersionNameOfKey(key);
}

/** A `hosts/{host}` field (`origin_host`). */
export function hostNameField<T>(read: (item: T) => string): FilterField<T> {
  return resourceNameField(read, HOST_NAME, HOST_NAME.pattern);
}

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
    const value = prefix ? raw.slice(0, -1) : raw;
    if (spec.values && !spec.values.includes(value)) {
      throw CowherdError.invalidArgument('filter', `${JSON.stringify(raw)} is not a value of ${field}; allowed: ${spec.values.join(', ')}`);
    }
    // A prefix is checked only as far as it goes: `hosts/kv*` is a fine start of a name.
    const problem = prefix ? undefined : spec.check?.(value);
    if (problem !== undefined) throw CowherdError.invalidArgument('filter', `${field} value ${JSON.stringify(raw)} ${problem}`);
    return { field: field!, negated: operator === '!=', value, prefix };
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
