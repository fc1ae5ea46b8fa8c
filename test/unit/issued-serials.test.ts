/**
 * IssuedSerials and followIssuedSerials (services/common/platform/revocation.ts) with a fake list source: a serial
 * the set lacks is looked up with a fetch that starts after the question, misses share fetches that start
 * at most once per interval, and a CA that does not answer leaves the answer unknown (the boundary then
 * refuses UNAVAILABLE), never "issued".
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { createLogger } from '../../services/common/platform/logger.js';
import { followIssuedSerials, IssuedSerials } from '../../services/common/platform/revocation.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** A list source that records when each fetch started. */
function source(initial: string[]): { serials: string[]; starts: number[]; failing: boolean; fetch: () => Promise<string[]> } {
  const state = {
    serials: [...initial],
    starts: [] as number[],
    failing: false,
    fetch: async (): Promise<string[]> => {
      state.starts.push(Date.now());
      await new Promise((resolve) => setTimeout(resolve, 20));
      if (state.failing) throw new Error('CA unreachable');
      return [...state.serials];
    },
  };
  return state;
}

describe('issued serials', () => {
  it('admits a serial issued after the last fetch by looking again, and refuses one the fresh list lacks', async () => {
    const list = source(['a1']);
    const set = new IssuedSerials();
    const stop = await followIssuedSerials({ set, fetch: list.fetch, log, intervalMs: 60_000, minIntervalMs: 200 });
    try {
      assert.equal(await set.isIssued('a1'), true);
      const fetchesBefore = list.starts.length;
      list.serials.push('b2'); // issued a moment ago: not in the list the set holds
      assert.equal(set.has('b2'), false);
      assert.equal(await set.isIssued('b2'), true);
      assert.equal(list.starts.length, fetchesBefore + 1, 'one fresh fetch');
      assert.equal(await set.isIssued('f0'), false, 'a fresh list without it: never issued');
    } finally {
      stop();
    }
  });

  it('shares fetches between misses and starts them at most once per interval, whatever the flood', async () => {
    const list = source([]);
    const set = new IssuedSerials();
    const stop = await followIssuedSerials({ set, fetch: list.fetch, log, intervalMs: 60_000, minIntervalMs: 300 });
    try {
      const first = list.starts.length;
      const started = Date.now();
      const answers = await Promise.all(Array.from({ length: 200 }, (_, index) => set.isIssued(`f${index}`)));
      assert.ok(answers.every((answer) => answer === false));
      const fetches = list.starts.slice(first);
      assert.ok(fetches.length <= 2, `${fetches.length} fetches for 200 misses`);
      for (let index = 1; index < list.starts.length; index++)
        assert.ok(list.starts[index]! - list.starts[index - 1]! >= 290, 'fetches at least minIntervalMs apart');
      assert.ok(
        fetches.every((time) => time >= started),
        'every miss was answered by a fetch that started after it',
      );
    } finally {
      stop();
    }
  });

  it('answers unknown (not issued, not admitted) when the CA does not answer, and keeps what it knew', async () => {
    const list = source(['a1']);
    const set = new IssuedSerials();
    const stop = await followIssuedSerials({ set, fetch: list.fetch, log, intervalMs: 60_000, minIntervalMs: 50 });
    try {
      list.failing = true;
      assert.equal(await set.isIssued('b2'), undefined);
      assert.equal(await set.isIssued('a1'), true, 'known serials keep working through a CA outage');
      const slow = new IssuedSerials();
      const stopSlow = await followIssuedSerials({ set: slow, fetch: () => new Promise(() => undefined), log, intervalMs: 60_000, firstFetchTimeoutMs: 10 });
      try {
        assert.equal(await slow.isIssued('a1', 100), undefined, 'a CA that hangs: unknown after the lookup timeout');
      } finally {
        stopSlow();
      }
    } finally {
      stop();
    }
  });

  it('admits nothing before it is connected to a source, and what the CA added itself at once', async () => {
    const set = new IssuedSerials();
    assert.equal(await set.isIssued('a1'), undefined);
    set.add('a1');
    assert.equal(await set.isIssued('a1'), true);
    set.replace(['b2'], Date.now());
    assert.equal(set.has('a1'), true, 'a list fetched before the CA recorded it does not drop it');
  });
});
