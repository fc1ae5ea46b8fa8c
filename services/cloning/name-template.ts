/**
 * Clone name templates: literal text with `{source}`, `{index}`, `{random}` and `{host}`. A template is
 * parsed once (syntax errors are INVALID_ARGUMENT on `name_template`), then rendered for every clone
 * against the names already used in the fleet: `{random}` is drawn again on a collision, any other
 * collision is refused before anything changes.
 */
import { randomInt } from 'node:crypto';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../common/platform/errors.js';
import { VIRTUAL_MACHINE_ID } from '../common/domain/resource-names.js';

/** The template used when the request leaves name_template empty (as in the 2011 tool). */
export const DEFAULT_NAME_TEMPLATE = '{source}-{random}';
/** Characters of `{random}`. */
export const RANDOM_ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789';
/** Length of `{random}`. */
export const RANDOM_LENGTH = 6;
/** How often `{random}` is drawn for one clone before giving up (36^6 names make this practically unreachable). */
const MAX_DRAWS = 100;
const FIELD = 'name_template';
const PLACEHOLDERS = ['source', 'index', 'random', 'host'] as const;
type Placeholder = (typeof PLACEHOLDERS)[number];
type Part = { readonly literal: string } | { readonly placeholder: Placeholder };

/** A parsed name template. */
export interface NameTemplate {
  /** The template text (the default when the request left it empty). */
  readonly text: string;
  readonly parts: readonly Part[];
  readonly uses: ReadonlySet<Placeholder>;
}

/** The values of one clone's placeholders, `{random}` aside. */
export interface NameValues {
  /** The image id, or the source virtual machine's domain name. */
  readonly source: string;
  /** 1-based index in the request. */
  readonly index: number;
  /** The host id (not `hosts/{host}`). */
  readonly host: string;
}

/** Six random characters of [a-z0-9]. */
export function randomSuffix(): string {
  let value = '';
  for (let i = 0; i < RANDOM_LENGTH; i++) value += RANDOM_ALPHABET[randomInt(RANDOM_ALPHABET.length)];
  return value;
}

/**
 * Parses a template; empty means {@link DEFAULT_NAME_TEMPLATE}. Unknown placeholders, stray braces and
 * literal characters that no domain name may hold are INVALID_ARGUMENT, and so is a template that would
 * give several clones the same name (count above 1 without `{index}` or `{random}`).
 */
export function parseNameTemplate(template: string, count: number): NameTemplate {
  const text = template === '' ? DEFAULT_NAME_TEMPLATE : template;
  if (text.length > 256) throw CowherdError.invalidArgument(FIELD, 'must be at most 256 characters');
  const parts: Part[] = [];
  const uses = new Set<Placeholder>();
  let literal = '';
  for (let position = 0; position < text.length; ) {
    const char = text[position]!;
    if (char === '{') {
      const end = text.indexOf('}', position);
      const name = end < 0 ? undefined : text.slice(position + 1, end);
      if (name === undefined || !(PLACEHOLDERS as readonly string[]).includes(name)) {
        throw CowherdError.invalidArgument(
          FIELD,
          `has an unknown or unclosed placeholder at position ${position + 1}; use {source}, {index}, {random} or {host}`,
        );
      }
      if (literal !== '') parts.push({ literal });
      literal = '';
      parts.push({ placeholder: name as Placeholder });
      uses.add(name as Placeholder);
      position = end + 1;
      continue;
    }
    if (char === '}') throw CowherdError.invalidArgument(FIELD, `has a "}" without "{" at position ${position + 1}`);
    if (!/[A-Za-z0-9._-]/.test(char))
      throw CowherdError.invalidArgument(FIELD, `may hold only letters, digits, ".", "_", "-" and placeholders; found ${JSON.stringify(char)}`);
    literal += char;
    position += 1;
  }
  if (literal !== '') parts.push({ literal });
  if (count > 1 && !uses.has('index') && !uses.has('random')) {
    throw CowherdError.invalidArgument(FIELD, 'must contain {index} or {random} when count is above 1, or every clone would get the same name');
  }
  return { text, parts, uses };
}

/** Renders one name; `random` fills `{random}`. */
export function renderName(template: NameTemplate, values: NameValues, random: string): string {
  return template.parts
    .map((part) => {
      if ('literal' in part) return part.literal;
      switch (part.placeholder) {
        case 'source':
          return values.source;
        case 'index':
          return String(values.index);
        case 'random':
          return random;
        case 'host':
          return values.host;
      }
    })
    .join('');
}

/** Options of {@link renderNames}. */
export interface RenderNamesOptions {
  /** Domain name -> virtual machine resource name, for every virtual machine in the fleet. */
  readonly namesInUse: ReadonlyMap<string, string>;
  /** Draws `{random}`; default {@link randomSuffix}. */
  readonly random?: () => string;
}

/**
 * Names every clone, in the order of `clones`. Throws INVALID_ARGUMENT (name_template) for a name that is
 * no valid domain name or that repeats within the request, ALREADY_EXISTS (VIRTUAL_MACHINE_NAME_TAKEN) for
 * a name without `{random}` that the fleet already uses.
 */
export function renderNames(template: NameTemplate, clones: readonly NameValues[], options: RenderNamesOptions): string[] {
  const draw = options.random ?? randomSuffix;
  const chosen = new Map<string, number>();
  const names: string[] = [];
  for (const clone of clones) {
    for (let attempt = 1; ; attempt++) {
      const name = renderName(template, clone, template.uses.has('random') ? draw() : '');
      if (!VIRTUAL_MACHINE_ID.test(name)) {
        throw CowherdError.invalidArgument(
          FIELD,
          `yields ${JSON.stringify(name)} for clone ${clone.index}, which is no valid domain name (${VIRTUAL_MACHINE_ID.source})`,
        );
      }
      const existing = options.namesInUse.get(name);
      const sibling = chosen.get(name);
      if (existing === undefined && sibling === undefined) {
        chosen.set(name, clone.index);
        names.push(name);
        break;
      }
      if (template.uses.has('random') && attempt < MAX_DRAWS) continue;
      if (existing !== undefined) {
        throw new CowherdError(GrpcStatus.ALREADY_EXISTS, `the name ${JSON.stringify(name)} of clone ${clone.index} is taken by ${existing}`, {
          reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NAME_TAKEN,
          metadata: { domain_name: name, virtual_machine: existing },
        });
      }
      throw CowherdError.invalidArgument(FIELD, `yields ${JSON.stringify(name)} for both clone ${sibling} and clone ${clone.index}`);
    }
  }
  return names;
}
