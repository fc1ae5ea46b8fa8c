/**
 * AIP-158 pagination. Page tokens are opaque to callers: they carry the last key returned and a
 * fingerprint of the query (parent, filter, order), sealed with an HMAC under a fleet-wide secret kept
 * in KV, so any replica accepts another's tokens and a tampered or foreign token is INVALID_ARGUMENT.
 */
import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from './errors.js';
import { jsonCodec, KvStore } from './kv.js';
import type { JetStreamClient } from '@nats-io/jetstream';

/** Page size when the caller sends 0. */
export const DEFAULT_PAGE_SIZE = 100;
/** Larger page sizes are lowered to this. */
export const MAX_PAGE_SIZE = 1000;

/** Seals and opens page tokens. */
export class PageTokens {
  constructor(private readonly secret: Buffer) {}

  /** Loads (or, on the fleet's first start, creates) the shared secret from the `cowherd-config` bucket. */
  static async open(js: JetStreamClient): Promise<PageTokens> {
    const store = await KvStore.open(js, 'cowherd-config', jsonCodec<{ secret: string }>());
    const existing = await store.mutate('page-token-secret', (current) => current ?? { secret: randomBytes(32).toString('base64') });
    return new PageTokens(Buffer.from(existing!.value.secret, 'base64'));
  }

  /** A token that resumes after `lastKey` for the same query. */
  seal(lastKey: string, query: string): string {
    const body = Buffer.from(JSON.stringify({ k: lastKey, q: fingerprint(query) })).toString('base64url');
    return `${body}.${this.mac(body)}`;
  }

  /** The key to resume after; '' for the first page. Throws INVALID_ARGUMENT naming page_token. */
  open(token: string, query: string): string {
    if (token === '') return '';
    const [body, mac, extra] = token.split('.');
    if (!body || !mac || extra !== undefined || !safeEqual(mac, this.mac(body))) throw invalidToken('is not a token this service issued');
    let parsed: { k?: unknown; q?: unknown };
    try {
      parsed = JSON.parse(Buffer.from(body, 'base64url').toString()) as { k?: unknown; q?: unknown };
    } catch (cause) {
      throw invalidToken('is not a token this service issued', cause);
    }
    if (typeof parsed.k !== 'string' || parsed.q !== fingerprint(query)) throw invalidToken('belongs to a different query (parent, filter or order changed)');
    return parsed.k;
  }

  private mac(body: string): string {
    return createHmac('sha256', this.secret).update(body).digest('base64url').slice(0, 22);
  }
}

/** The page size to use: default for 0, capped at the maximum; negative is INVALID_ARGUMENT. */
export function pageSizeOf(requested: number, field = 'page_size'): number {
  if (requested < 0) throw CowherdError.invalidArgument(field, 'must not be negative');
  if (requested === 0) return DEFAULT_PAGE_SIZE;
  return Math.min(requested, MAX_PAGE_SIZE);
}

/** One page of `items` sorted by key, after the token's key; the next token when more remain. */
export function paginate<T>(
  items: readonly T[],
  keyOf: (item: T) => string,
  options: { pageSize: number; pageToken: string; query: string; tokens: PageTokens },
): { page: T[]; nextPageToken: string } {
  return paginateSorted(
    [...items].sort((a, b) => compare(keyOf(a), keyOf(b))),
    keyOf,
    options,
  );
}

/** Like {@link paginate} for items already sorted by `keyOf` (in-memory indexes): no sort per call. */
export function paginateSorted<T>(
  sorted: readonly T[],
  keyOf: (item: T) => string,
  options: { pageSize: number; pageToken: string; query: string; tokens: PageTokens },
): { page: T[]; nextPageToken: string } {
  const after = options.tokens.open(options.pageToken, options.query);
  const size = pageSizeOf(options.pageSize);
  let start = 0;
  if (after !== '') {
    // Binary search: the first item whose key is greater than the token's. Items added or removed
    // between pages neither repeat nor shift the pages that follow.
    let low = 0;
    let high = sorted.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (compare(keyOf(sorted[middle]!), after) <= 0) low = middle + 1;
      else high = middle;
    }
    start = low;
  }
  const page = sorted.slice(start, start + size);
  const more = start + size < sorted.length;
  return { page, nextPageToken: more && page.length > 0 ? options.tokens.seal(keyOf(page[page.length - 1]!), options.query) : '' };
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function fingerprint(query: string): string {
  return createHash('sha256').update(query).digest('base64url').slice(0, 16);
}

function safeEqual(a: string, b: string): boolean {
  const left = Buffer.from(a);
  const right = Buffer.from(b);
  return left.length === right.length && timingSafeEqual(left, right);
}

function invalidToken(problem: string, cause?: unknown): CowherdError {
  return CowherdError.invalidArgument('page_token', problem, ErrorReason.ERROR_REASON_PAGE_TOKEN_INVALID, cause);
}
