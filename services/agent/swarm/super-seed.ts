/**
 * Super-seeding for the origin of an image (BEP 16 in spirit): the origin hides that it holds every piece
 * and reveals pieces one receiver at a time, each piece to one receiver first, so that it sends each piece
 * about once and the receivers spread it among themselves.
 *
 * Why (MACHINE.md, measured on the 7-host test bed): with webtorrent's defaults the origin sends 3-4 full
 * copies of an image. Receivers in lockstep all want the same next pieces and queue their requests at the
 * origin (the fastest wire, which has every piece), reserving exactly the pieces other receivers could
 * offer; the origin never chokes anyone. Revealing distinct pieces per receiver removes both effects
 * without touching webtorrent's wire protocol: only `have` messages change.
 *
 * How, per wire of the origin's seeding torrent:
 * - The first bitfield (or have-all) webtorrent sends is replaced by an empty one (have-none).
 * - The origin keeps `revealPerWire` (one) piece revealed to each receiver that it does not have yet: first the
 *   pieces nobody has been offered (in order), then, when every piece has been offered once (the end), the
 *   pieces held by the fewest receivers (at most `endgameHolders`) that this receiver lacks.
 * - A receiver announcing a piece (from anyone) makes room for the next reveal; pieces whose only holder
 *   left, or that were revealed but not announced within `revealTimeoutMs`, become offerable again.
 * - A receiver streaming the image asks for the pieces a guest waits on (piece-wants.ts): they are revealed to
 *   it at once.
 * Requests for pieces that were not revealed are still served (a receiver may learn of them otherwise).
 */
import type { Torrent, Wire } from 'webtorrent';
import type { Logger } from '../../common/platform/logger.js';
import { usePieceWants } from './piece-wants.js';

/** The parts of bittorrent-protocol's Wire the policy uses. */
interface SeedWire extends Wire {
  readonly hasFast: boolean;
  readonly destroyed: boolean;
  readonly peerPieces: { get(index: number): boolean };
  bitfield(bitfield: unknown): void;
  haveAll(): void;
  haveNone(): void;
  have(index: number): void;
  piece(index: number, offset: number, buffer: Uint8Array): void;
}

/** Options of {@link superSeed}. */
export interface SuperSeedOptions {
  /**
   * Pieces revealed to a receiver and not yet held by it, at most. Default 1: measured on the test bed (256 MiB,
   * 1 MiB pieces, 6 receivers) 1 gave 1.31x S/B with the origin sending 1.05 S, 2 gave 1.33x / 1.12 S, 4 1.40x / 1.21 S.
   */
  readonly revealPerWire?: number;
  /** At the end, pieces held by at most this many receivers are offered again. Default 2. */
  readonly endgameHolders?: number;
  /** A revealed piece not announced by then may be offered to others. Default 30 s. */
  readonly revealTimeoutMs?: number;
  readonly log?: Logger;
}

/** The torrent's pieces, known before webtorrent has parsed its metadata. */
export interface PieceLayout {
  readonly pieceCount: number;
  readonly pieceLength: number;
  readonly totalBytes: number;
}

/** Counters of a super-seeded torrent. */
export interface SuperSeedStats {
  /** `have` messages sent. */
  reveals: number;
  /** Pieces offered once at least. */
  offered: number;
  /** Pieces revealed because a streaming receiver wanted them (piece-wants.ts). */
  wanted: number;
}

/** Makes the seeding `torrent` (every piece present) super-seed; returns live counters. */
export function superSeed(torrent: Torrent, layout: PieceLayout, options: SuperSeedOptions = {}): SuperSeedStats {
  const { pieceCount, pieceLength, totalBytes } = layout;
  const revealPerWire = options.revealPerWire ?? 1;
  const endgameHolders = options.endgameHolders ?? 2;
  const revealTimeoutMs = options.revealTimeoutMs ?? 30_000;
  const stats: SuperSeedStats = { reveals: 0, offered: 0, wanted: 0 };
  const holders = new Uint16Array(pieceCount);
  /** When each piece was last revealed (to anyone), 0 = never. */
  const revealedAt = new Float64Array(pieceCount);
  let wantsLoggedAt = Number.NEGATIVE_INFINITY;
  /** Pieces revealed to a wire that it has not announced yet. */
  const pending = new Map<SeedWire, Set<number>>();
  /** Bytes of each pending piece sent on its wire: a piece mostly sent stops counting against the budget. */
  const sent = new Map<SeedWire, Map<number, number>>();
  const lengthOf = (index: number): number => (index === pieceCount - 1 ? totalBytes - pieceLength * (pieceCount - 1) : pieceLength);
  const mostlySent = (wire: SeedWire, index: number): boolean => (sent.get(wire)?.get(index) ?? 0) * 2 >= lengthOf(index);
  let nextFresh = 0;

  const offerable = (index: number, now: number): boolean => holders[index] === 0 && (revealedAt[index] === 0 || now - revealedAt[index]! > revealTimeoutMs);

  const pick = (wire: SeedWire, mine: Set<number>): number | undefined => {
    const now = performance.now();
    // Pieces offered before that nobody holds (their receiver left, or never announced them) come first.
    for (let index = 0; index < nextFresh; index += 1) {
      if (!mine.has(index) && !wire.peerPieces.get(index) && revealedAt[index]! > 0 && offerable(index, now)) return index;
    }
    while (nextFresh < pieceCount) {
      const index = nextFresh++;
      if (!wire.peerPieces.get(index)) {
        stats.offered += 1;
        return index;
      }
    }
    // The end: the rarest piece this receiver lacks, if rare enough. With few receivers, fewer holders count
    // as rare (with three receivers, "at most 2 holders" would be every piece: the origin would send all).
    const rare = Math.min(endgameHolders, Math.floor(pending.size / 3));
    let best: number | undefined;
    for (let index = 0; index < pieceCount; index += 1) {
      if (mine.has(index) || wire.peerPieces.get(index) || holders[index]! > rare) continue;
      if (best === undefined || holders[index]! < holders[best]!) best = index;
    }
    return best;
  };

  const topUp = (wire: SeedWire): void => {
    // A wire is in `pending` only once webtorrent's own first message (the have-none we substitute) went
    // out: a `have` sent earlier would be wiped out by it, and the receiver would never see the piece.
    const mine = pending.get(wire);
    if (wire.destroyed || !mine) return;
    const now = performance.now();
    let open = 0;
    for (const index of mine) {
      // Announced, or revealed long ago without being announced (its slot goes to a fresh piece).
      if (wire.peerPieces.get(index) || now - revealedAt[index]! > revealTimeoutMs) {
        mine.delete(index);
        sent.get(wire)?.delete(index);
      } else if (!mostlySent(wire, index)) open += 1;
    }
    while (open < revealPerWire) {
      const index = pick(wire, mine);
      if (index === undefined) break;
      mine.add(index);
      open += 1;
      revealedAt[index] = performance.now();
      stats.reveals += 1;
      wire.have(index);
    }
  };

  const topUpAll = (): void => {
    for (const wire of pending.keys()) topUp(wire);
  };

  torrent.on('wire', (raw: Wire) => {
    const wire = raw as SeedWire;
    if (wire.type === 'webSeed') return;
    // A streaming receiver's wants (piece-wants.ts): revealed to it at once, outside the one-piece budget; they
    // count as revealed, so they are not offered to others as fresh pieces before their time.
    usePieceWants(wire, (indices) => {
      if (!pending.has(wire) || wire.destroyed) return;
      const now = performance.now();
      for (const index of indices) {
        if (index >= pieceCount || wire.peerPieces.get(index)) continue;
        revealedAt[index] = now;
        stats.reveals += 1;
        stats.wanted += 1;
        wire.have(index);
      }
      // Streaming receivers' wants, at most every 10 s while they come.
      if (now - wantsLoggedAt >= 10_000) {
        wantsLoggedAt = now;
        options.log?.info({ wanted: stats.wanted, reveals: stats.reveals }, 'super-seeding: wants of streaming receivers');
      }
    });
    // webtorrent announces every piece right after this event: announce none instead.
    const bitfield = wire.bitfield.bind(wire);
    let first = true;
    const introduce = (): void => {
      if (wire.destroyed) return;
      pending.set(wire, new Set());
      sent.set(wire, new Map());
      setImmediate(() => topUp(wire));
    };
    wire.bitfield = (value: unknown) => {
      if (!first) return bitfield(value);
      first = false;
      if (wire.hasFast) wire.haveNone();
      else bitfield(new Uint8Array(Math.ceil(pieceCount / 8)));
      introduce();
    };
    wire.haveAll = () => {
      first = false;
      wire.haveNone();
      introduce();
    };
    const seen = new Uint8Array(pieceCount);
    const count = (index: number): void => {
      if (index < 0 || index >= pieceCount || seen[index]) return;
      seen[index] = 1;
      holders[index] = holders[index]! + 1;
    };
    wire.on('bitfield', () => {
      for (let index = 0; index < pieceCount; index += 1) if (wire.peerPieces.get(index)) count(index);
      topUpAll();
    });
    wire.on('have', (index: number) => {
      count(index);
      // Any receiver's progress may free another one's slot (it got the piece from a peer).
      topUpAll();
    });
    wire.on('interested', () => setImmediate(() => topUp(wire)));
    // The next piece is revealed once half of the current one is on its way, so the receiver's requests for
    // it queue behind the rest of the current one: the uplink never idles between a piece's last block
    // going out and the receiver's `have` coming back (all receivers finish their pieces at about the same
    // time, so those gaps line up). It is still one piece per receiver that nobody else is offered.
    const piece = wire.piece.bind(wire);
    wire.piece = (index: number, offset: number, buffer: Uint8Array) => {
      piece(index, offset, buffer);
      const bytes = sent.get(wire);
      if (!bytes || !pending.get(wire)?.has(index)) return;
      const before = bytes.get(index) ?? 0;
      bytes.set(index, before + buffer.length);
      if (before * 2 < lengthOf(index) && (before + buffer.length) * 2 >= lengthOf(index)) topUp(wire);
    };
    // Reveals that time out are replaced at the next event; make sure there is one.
    const tick = setInterval(() => topUp(wire), Math.max(1000, revealTimeoutMs / 2));
    tick.unref();
    wire.once('close', () => clearInterval(tick));
    wire.once('close', () => {
      // Its unannounced pieces may be offered to others at once.
      for (const index of pending.get(wire) ?? []) if (holders[index] === 0) revealedAt[index] = 1;
      pending.delete(wire);
      sent.delete(wire);
      for (let index = 0; index < pieceCount; index += 1) if (seen[index]) holders[index] = holders[index]! - 1;
      // What only this receiver held is offerable again.
      topUpAll();
    });
  });
  options.log?.debug({ pieces: pieceCount, revealPerWire, endgameHolders }, 'super-seeding');
  return stats;
}
