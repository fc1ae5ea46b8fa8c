/**
 * Progress deadlines on a fake clock: only real progress (bytes beyond the most seen, a state past the
 * furthest reached) moves a step's deadline; VERIFYING gets a budget proportional to the bytes it hashes;
 * polls of an unchanged step, silence and back-and-forth states never keep a step alive.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ProgressDeadlines, verifyBudgetMs, type ProgressDeadlineOptions } from '../../services/common/platform/progress-deadline.js';

const MiB = 1024 * 1024;
const options: ProgressDeadlineOptions = { stallMs: 10_000, verifyFloorMs: 2_000, verifyBytesPerSecond: 10 * MiB };

function clock(): { now: () => number; advance: (ms: number) => void } {
  let time = 1_000_000;
  return { now: () => time, advance: (ms) => void (time += ms) };
}

describe('progress deadlines', () => {
  it('a replica that stays VERIFYING fails after its verify budget, however often it is polled', () => {
    const time = clock();
    const deadlines = new ProgressDeadlines(options, time.now);
    deadlines.observe('h', { stage: 'transferring', bytesDone: 50 * MiB, bytesTotal: 100 * MiB });
    time.advance(1_000);
    const entered = deadlines.observe('h', { stage: 'verifying', bytesDone: 0, bytesTotal: 100 * MiB });
    // 2 s floor + 100 MiB at 10 MiB/s = 12 s.
    assert.equal(entered.budgetMs, 12_000);
    assert.equal(entered.deadline, time.now() + 12_000);
    for (let poll = 0; poll < 11; poll++) {
      time.advance(1_000);
      const verdict = deadlines.observe('h', { stage: 'verifying', bytesDone: 0, bytesTotal: 100 * MiB });
      assert.equal(verdict.expired, false, `poll ${poll}`);
      assert.equal(verdict.deadline, entered.deadline, 'polling VERIFYING never moves the deadline');
    }
    time.advance(1_000);
    const last = deadlines.observe('h', { stage: 'verifying', bytesDone: 100 * MiB, bytesTotal: 100 * MiB });
    assert.equal(last.expired, true);
    assert.equal(last.stage, 'verifying');
  });

  it('bytes that grow extend the deadline by the stall time; the same bytes do not', () => {
    const time = clock();
    const deadlines = new ProgressDeadlines(options, time.now);
    const first = deadlines.observe('h', { stage: 'transferring', bytesDone: 0, bytesTotal: MiB });
    time.advance(9_000);
    assert.equal(deadlines.observe('h', { stage: 'transferring', bytesDone: 0, bytesTotal: MiB }).deadline, first.deadline);
    const grown = deadlines.observe('h', { stage: 'transferring', bytesDone: 10, bytesTotal: MiB });
    assert.equal(grown.deadline, time.now() + 10_000);
    time.advance(10_000);
    assert.equal(deadlines.observe('h', { stage: 'transferring', bytesDone: 10, bytesTotal: MiB }).expired, true);
  });

  it('bytes that drop and climb back to the old maximum are not progress', () => {
    const time = clock();
    const deadlines = new ProgressDeadlines(options, time.now);
    deadlines.observe('h', { stage: 'transferring', bytesDone: 500, bytesTotal: MiB });
    const start = time.now();
    for (const bytes of [100, 200, 300, 500, 100, 500]) {
      time.advance(1_500);
      deadlines.observe('h', { stage: 'transferring', bytesDone: bytes, bytesTotal: MiB });
    }
    assert.equal(deadlines.observe('h', { stage: 'transferring', bytesDone: 500, bytesTotal: MiB }).deadline, start + 10_000);
  });

  it('each state counts once: PENDING -> TRANSFERRING -> VERIFYING, and going back and forth adds nothing', () => {
    const time = clock();
    const deadlines = new ProgressDeadlines(options, time.now);
    deadlines.observe('h', { stage: 'pending', bytesDone: 0, bytesTotal: 10 * MiB });
    time.advance(5_000);
    const transferring = deadlines.observe('h', { stage: 'transferring', bytesDone: 0, bytesTotal: 10 * MiB });
    assert.equal(transferring.deadline, time.now() + 10_000, 'advancing to TRANSFERRING counts');
    time.advance(5_000);
    const verifying = deadlines.observe('h', { stage: 'verifying', bytesDone: 0, bytesTotal: 10 * MiB });
    assert.equal(verifying.deadline, time.now() + 3_000, 'advancing to VERIFYING gets the verify budget (2 s + 1 s)');
    time.advance(1_000);
    deadlines.observe('h', { stage: 'transferring', bytesDone: 0, bytesTotal: 10 * MiB });
    time.advance(1_000);
    const again = deadlines.observe('h', { stage: 'verifying', bytesDone: 0, bytesTotal: 10 * MiB });
    assert.equal(again.deadline, verifying.deadline, 'VERIFYING entered a second time gets no new budget');
    time.advance(1_000);
    assert.equal(deadlines.observe('h', { stage: 'verifying', bytesDone: 0, bytesTotal: 10 * MiB }).expired, true);
  });

  it('a repair that fetches bytes after VERIFYING counts them as progress', () => {
    const time = clock();
    const deadlines = new ProgressDeadlines(options, time.now);
    deadlines.observe('h', { stage: 'transferring', bytesDone: 9 * MiB, bytesTotal: 10 * MiB });
    deadlines.observe('h', { stage: 'verifying', bytesDone: 10 * MiB, bytesTotal: 10 * MiB });
    time.advance(2_000);
    const fetched = deadlines.observe('h', { stage: 'transferring', bytesDone: 9.5 * MiB, bytesTotal: 10 * MiB });
    assert.equal(fetched.deadline, time.now() + 10_000);
  });

  it('silence keeps the deadline: a step never heard from, or whose host is unreachable, fails on time', () => {
    const time = clock();
    const deadlines = new ProgressDeadlines(options, time.now);
    const first = deadlines.silent('never');
    assert.equal(first.deadline, time.now() + 10_000);
    deadlines.observe('gone', { stage: 'transferring', bytesDone: 100, bytesTotal: MiB });
    time.advance(9_999);
    assert.equal(deadlines.silent('never').expired, false);
    assert.equal(deadlines.silent('gone').expired, false);
    time.advance(1);
    assert.equal(deadlines.silent('never').expired, true);
    assert.equal(deadlines.silent('gone').expired, true);
    // The host comes back and reports more bytes: the step resumes.
    assert.equal(deadlines.observe('gone', { stage: 'transferring', bytesDone: 200, bytesTotal: MiB }).expired, false);
  });

  it('the verify budget formula and its checks', () => {
    assert.equal(verifyBudgetMs({ stallMs: 1, verifyFloorMs: 120_000, verifyBytesPerSecond: 16 * MiB }, 10 * 1024 * MiB), 120_000 + 640_000);
    assert.throws(() => new ProgressDeadlines({ ...options, verifyBytesPerSecond: 0 }), RangeError);
  });
});
