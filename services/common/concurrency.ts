/** Bounded concurrency for fan-outs (hosts, files, clones). */

/**
 * Maps with at most `limit` calls in flight; results in input order. After a failure no new call starts, and
 * it rejects (with the first error) only once the calls in flight have ended, so nothing runs on afterwards.
 */
export async function mapLimited<T, R>(items: readonly T[], limit: number, map: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  let failure: { error: unknown } | undefined;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length && !failure) {
        const index = next++;
        try {
          results[index] = await map(items[index]!);
        } catch (error) {
          failure ??= { error };
        }
      }
    }),
  );
  if (failure) throw failure.error;
  return results;
}
