/**
 * Reading every page of an AIP-158 List method: ask with the empty page token, then with each
 * `next_page_token` until one comes back empty.
 */

/** One page as {@link pages} and {@link readAllPages} need it. */
export interface Page<T> {
  readonly items: readonly T[];
  readonly nextPageToken: string;
}

/** The items of every page, one page at a time (stop early by breaking out of the loop). */
export async function* pages<T>(fetchPage: (pageToken: string) => Promise<Page<T>>): AsyncGenerator<readonly T[], void, undefined> {
  let pageToken = '';
  do {
    const page = await fetchPage(pageToken);
    yield page.items;
    pageToken = page.nextPageToken;
  } while (pageToken !== '');
}

/** The items of every page, in order. */
export async function readAllPages<T>(fetchPage: (pageToken: string) => Promise<Page<T>>): Promise<T[]> {
  const all: T[] = [];
  for await (const items of pages(fetchPage)) all.push(...items);
  return all;
}
