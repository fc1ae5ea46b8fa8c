/**
 * Progress deadlines for the steps of long-running operations (a host's image transfer in DistributeImage,
 * clones waiting for an image in CloneVirtualMachines), so that every operation ends.
 *
 * Only real progress moves a step's deadline:
 * - the bytes it holds grow beyond the most it ever held (a re-read of the same number, or a count that drops
 *   and climbs back, does not count): the deadline becomes now + `stallMs`;
 * - its state advances past the furthest state it reached (PENDING -> TRANSFERRING -> VERIFYING, each once):
 *   the deadline becomes now + the new state's budget. Polling a step that stays in one state changes
 *   nothing, so a replica record stuck in VERIFYING (the hang that issue 12 found: the old stall timer was
 *   refreshed on every poll while a replica showed VERIFYING) now ends.
 *
 * VERIFYING hashes every byte of the image, and its bytes do not grow meanwhile, so it gets a budget of its
 * own when it is entered: `verifyFloorMs + bytesTotal / verifyBytesPerSecond`. The floor covers a small
 * image's start-up (opening files, a restarted agent re-reading its pieces); the rate is far below what one
 * core hashes (node:crypto SHA-256 ~730 MiB/s, webtorrent's re-check ~500 MiB/s, MACHINE.md) so that a
 * loaded host on a slow disk still finishes: at the default 16 MiB/s and 120 s, 10 GiB gets 12.7 minutes.
 *
 * A step seen without news (no record yet, its host UNREACHABLE, its service not answering) keeps the
 * deadline it has: silence is not progress. The clock is injectable for tests.
 */

/** The states a step goes through, in order. */
export type StepStage = 'pending' | 'transferring' | 'verifying';

const RANK: Readonly<Record<StepStage, number>> = { pending: 0, transferring: 1, verifying: 2 };

/** How long steps may go without progress. */
export interface ProgressDeadlineOptions {
  /** A step whose bytes stop growing and whose state stops advancing fails after this long. */
  readonly stallMs: number;
  /** The fixed part of VERIFYING's budget. */
  readonly verifyFloorMs: number;
  /** The hashing rate VERIFYING's budget assumes (bytes per second); must be > 0. */
  readonly verifyBytesPerSecond: number;
}

/** Production defaults: 10 minutes without progress; VERIFYING 2 minutes plus 16 MiB/s of hashing. */
export const DEFAULT_PROGRESS_DEADLINES: ProgressDeadlineOptions = { stallMs: 10 * 60_000, verifyFloorMs: 120_000, verifyBytesPerSecond: 16 * 1024 * 1024 };

/** What a step looks like now. */
export interface StepObservation {
  readonly stage: StepStage;
  /** Bytes the step holds (received so far). */
  readonly bytesDone: number;
  /** Bytes the step needs in all (what VERIFYING hashes). */
  readonly bytesTotal: number;
}

/** A step's deadline after an observation. */
export interface StepVerdict {
  /** When the step fails unless it makes progress, on the clock's scale (ms). */
  readonly deadline: number;
  /** The deadline has passed. */
  readonly expired: boolean;
  /** The budget the step got at its last progress (ms), for the error message. */
  readonly budgetMs: number;
  /** The furthest state the step reached. */
  readonly stage: StepStage;
}

/** VERIFYING's budget for an image of `bytesTotal` bytes. */
export function verifyBudgetMs(options: ProgressDeadlineOptions, bytesTotal: number): number {
  return options.verifyFloorMs + Math.ceil((Math.max(0, bytesTotal) / options.verifyBytesPerSecond) * 1000);
}

interface StepRecord {
  rank: number;
  stage: StepStage;
  maxBytes: number;
  deadline: number;
  budgetMs: number;
}

/** Deadlines for a set of steps, by key (a host name). */
export class ProgressDeadlines {
  private readonly steps = new Map<string, StepRecord>();

  constructor(
    private readonly options: ProgressDeadlineOptions,
    private readonly now: () => number = Date.now,
  ) {
    if (!(options.stallMs > 0) || !(options.verifyFloorMs >= 0) || !(options.verifyBytesPerSecond > 0))
      throw new RangeError('progress deadlines must be positive');
  }

  /** Records what the step shows now; moves its deadline only for real progress. */
  observe(key: string, observation: StepObservation): StepVerdict {
    const now = this.now();
    const rank = RANK[observation.stage];
    const budgetFor = (stage: StepStage): number => (stage === 'verifying' ? verifyBudgetMs(this.options, observation.bytesTotal) : this.options.stallMs);
    // Bytes count as received only outside VERIFYING: while hashing, the step has its fixed budget (hashing is
    // bounded by the bytes), and a repair that goes back to TRANSFERRING after a failed check counts the
    // bytes it fetches then.
    const received = observation.stage === 'verifying' ? 0 : observation.bytesDone;
    let step = this.steps.get(key);
    if (!step) {
      const budgetMs = budgetFor(observation.stage);
      step = { rank, stage: observation.stage, maxBytes: received, deadline: now + budgetMs, budgetMs };
      this.steps.set(key, step);
    } else if (rank > step.rank) {
      step.rank = rank;
      step.stage = observation.stage;
      step.budgetMs = budgetFor(observation.stage);
      step.deadline = now + step.budgetMs;
      step.maxBytes = Math.max(step.maxBytes, received);
    } else if (received > step.maxBytes) {
      step.maxBytes = received;
      step.budgetMs = this.options.stallMs;
      step.deadline = Math.max(step.deadline, now + step.budgetMs);
    }
    return this.verdict(step, now);
  }

  /** A step seen without news: it starts PENDING if new, and its deadline stays. */
  silent(key: string): StepVerdict {
    const now = this.now();
    let step = this.steps.get(key);
    if (!step) {
      step = { rank: 0, stage: 'pending', maxBytes: 0, deadline: now + this.options.stallMs, budgetMs: this.options.stallMs };
      this.steps.set(key, step);
    }
    return this.verdict(step, now);
  }

  /** Forgets a step that ended. */
  forget(key: string): void {
    this.steps.delete(key);
  }

  private verdict(step: StepRecord, now: number): StepVerdict {
    return { deadline: step.deadline, expired: now >= step.deadline, budgetMs: step.budgetMs, stage: step.stage };
  }
}
