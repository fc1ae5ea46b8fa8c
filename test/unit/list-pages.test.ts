/**
 * Reading every page of a List method, against a fake page source: the tokens asked for, the order of the
 * items, empty pages, errors, and stopping early.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { pages, readAllPages, type Page } from '../../services/common/platform/list-pages.js';

/** A fake List method over `items`, `size` per page, recording the tokens it was asked with. */
function fakeList<T>(items: readonly T[], size: number): { fetch: (pageToken: string) => Promise<Page<T>>; tokens: string[] } {
  const tokens: string[] = [];
  return {
    tokens,
    fetch: async (pageToken) => {
      tokens.push(pageToken);
      const start = pageToken === '' ? 0 : Number(pageToken.slice('after-'.length));
      const end = Math.min(start + size, items.length);
      return { items: items.slice(start, end), nextPageToken: end < items.length ? `after-${end}` : '' };
    },
  };
}

describe('readAllPages', () => {
  it('reads every page in order, starting with the empty token and passing each next token', async () => {
    const items = Array.from({ length: 10 }, (_, index) => index);
    const list = fakeList(items, 3);
    assert.deepEqual(await readAllPages(list.fetch), items);
    assert.deepEqual(list.tokens, ['', 'after-3', 'after-6', 'after-9']);
  });

  it('asks once when everything fits on one page, or there is nothing', async () => {
    const one = fakeList(['a', 'b'], 5);
    assert.deepEqual(await readAllPages(one.fetch), ['a', 'b']);
    assert.deepEqual(one.tokens, ['']);
    const none = fakeList<string>([], 5);
    assert.deepEqual(await readAllPages(none.fetch), []);
    assert.deepEqual(none.tokens, ['']);
  });

  it('follows a token after an empty page (a page may be empty while more remain)', async () => {
    const answers: Page<number>[] = [
      { items: [], nextPageToken: 't1' },
      { items: [1], nextPageToken: 't2' },
      { items: [2], nextPageToken: '' },
    ];
    assert.deepEqual(await readAllPages(async () => answers.shift()!), [1, 2]);
  });

  it('passes on the error of a page', async () => {
    let asked = 0;
    await assert.rejects(
      readAllPages(async (pageToken) => {
        asked++;
        if (pageToken !== '') throw new Error('store unavailable');
        return { items: [1], nextPageToken: 'next' };
      }),
      /store unavailable/,
    );
    assert.equal(asked, 2);
  });

  it('pages() yields page by page and stops asking when the caller stops', async () => {
    const list = fakeList(
      Array.from({ length: 10 }, (_, index) => index),
      4,
    );
    const seen: (readonly number[])[] = [];
    for await (const page of pages(list.fetch)) {
      seen.push(page);
      if (seen.length === 2) break;
    }
    assert.deepEqual(seen, [
      [0, 1, 2, 3],
      [4, 5, 6, 7],
    ]);
    assert.deepEqual(list.tokens, ['', 'after-4']);
  });
});
