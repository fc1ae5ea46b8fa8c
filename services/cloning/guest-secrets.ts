/**
 * The guest configurations of running CloneVirtualMachines operations, in this replica's memory only. Their
 * user-data and keys are secrets, and the operation record in KV is readable by every replica and by
 * whoever reads the bucket: the record keeps the request without them and the metadata keeps their digest
 * (`guest_configuration_digest`). The replica that accepted the request holds them here, keyed by digest,
 * until its operations that use them end. A replica that takes an operation over finds nothing here and
 * sends the agents the digest alone: they return the clones already made and make no new one without its
 * identity (FAILED_PRECONDITION), so the caller requests those again.
 */
import type { GuestConfiguration } from '../gen/cowherd/inventory/v1/resources.js';

/** How long a configuration stays when no operation ends to release it (a request_id race, a crash between hold and start). */
const LIFETIME_MS = 6 * 60 * 60 * 1000;

interface Entry {
  readonly configuration: GuestConfiguration;
  holders: number;
  expires: number;
}

/** Guest configurations by digest, held while operations use them. */
export class GuestSecrets {
  private readonly entries = new Map<string, Entry>();

  constructor(private readonly now: () => number = Date.now) {}

  /** Keeps `configuration` under `digest` for one more operation; returns its release. */
  hold(digest: string, configuration: GuestConfiguration): () => void {
    this.prune();
    const entry = this.entries.get(digest) ?? { configuration, holders: 0, expires: 0 };
    entry.holders += 1;
    entry.expires = this.now() + LIFETIME_MS;
    this.entries.set(digest, entry);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.release(digest);
    };
  }

  /** The configuration held under `digest`, if this replica has it. */
  get(digest: string): GuestConfiguration | undefined {
    const entry = this.entries.get(digest);
    return entry && entry.expires > this.now() ? entry.configuration : undefined;
  }

  /** One holder of `digest` is done (an operation ended); the configuration goes with the last. */
  release(digest: string): void {
    const entry = this.entries.get(digest);
    if (!entry) return;
    entry.holders -= 1;
    if (entry.holders <= 0) this.entries.delete(digest);
  }

  /** Configurations held (for tests). */
  get size(): number {
    return this.entries.size;
  }

  private prune(): void {
    const now = this.now();
    for (const [digest, entry] of this.entries) if (entry.expires <= now) this.entries.delete(digest);
  }
}
