/**
 * Keeps peers that send corrupt data out of a transfer. webtorrent checks every piece's SHA-1 and drops a bad
 * piece, but never blames the peer that sent it, so a broken or hostile peer that answers fast keeps winning
 * requests and the transfer can spin on the same pieces for ever (MACHINE.md, "BitTorrent").
 *
 * The guard notes which wires delivered blocks of each piece in flight ('piece' events of bittorrent-protocol's
 * Wire). When webtorrent reports "Piece N failed verification", every contributor gets a strike; a wire that
 * delivered the whole failed piece alone is banned at once: honest peers never send a piece that fails SHA-1
 * (their pieces were verified when they got them). A failed piece with several contributors cannot say which
 * one lied, so there a wire is banned only with two strikes and more strikes than pieces it delivered alone
 * that verified (an honest web seed that shared two pieces with a liar keeps its place). A banned wire's
 * connection is closed and its peer id and address are refused from then on (also when they connect again).
 * Web seeds are wires too and are treated the same way.
 */
import type { Torrent, Wire } from 'webtorrent';
import type { Logger } from '../common/logger.js';

/** What a wire of bittorrent-protocol has beyond the declared type. */
interface GuardedWire extends Wire {
  readonly peerId?: string;
  destroy(): void;
}

const FAILED_PIECE = /^Piece (\d+) failed verification$/;
const STRIKES_TO_BAN = 2;

/** Counters of one guarded torrent. */
export interface GuardCounters {
  piecesFailed: number;
  peersBanned: number;
}

/** Bans shared by every torrent of one client. */
export class PeerGuard {
  private readonly bannedIds = new Set<string>();
  private readonly bannedAddresses = new Set<string>();

  constructor(private readonly log?: Logger) {}

  /** Watches `torrent` until it closes; returns live counters. */
  watch(torrent: Torrent, image: string): GuardCounters {
    const counters: GuardCounters = { piecesFailed: 0, peersBanned: 0 };
    const contributors = new Map<number, Set<GuardedWire>>();
    const strikes = new WeakMap<GuardedWire, number>();
    const verifiedAlone = new WeakMap<GuardedWire, number>();
    const addresses = new WeakMap<GuardedWire, string>();
    const banned = new WeakSet<GuardedWire>();
    const ban = (wire: GuardedWire, why: string): void => {
      if (banned.has(wire)) return;
      banned.add(wire);
      const address = addresses.get(wire);
      if (wire.peerId) this.bannedIds.add(wire.peerId);
      if (address) this.bannedAddresses.add(address);
      counters.peersBanned += 1;
      this.log?.warn({ image, peer: address, peerId: wire.peerId, why }, 'banned a peer that sent corrupt data');
      wire.destroy();
    };
    const onWire = (wire: GuardedWire, address: string | undefined): void => {
      const where = address ?? `${wire.remoteAddress ?? '?'}:${wire.remotePort ?? '?'}`;
      addresses.set(wire, where);
      if ((wire.peerId && this.bannedIds.has(wire.peerId)) || this.bannedAddresses.has(where)) {
        wire.destroy();
        return;
      }
      wire.on('piece', (index: number) => {
        let set = contributors.get(index);
        if (!set) contributors.set(index, (set = new Set()));
        set.add(wire);
      });
    };
    const onWarning = (warning: Error): void => {
      const match = FAILED_PIECE.exec(warning.message);
      if (!match) return;
      const index = Number(match[1]);
      counters.piecesFailed += 1;
      const wires = [...(contributors.get(index) ?? [])];
      contributors.delete(index);
      for (const wire of wires) {
        const count = (strikes.get(wire) ?? 0) + 1;
        strikes.set(wire, count);
        if (wires.length === 1) ban(wire, `sent all of piece ${index}, which failed SHA-1`);
        else if (count >= STRIKES_TO_BAN && count > (verifiedAlone.get(wire) ?? 0)) ban(wire, `contributed to ${count} pieces that failed SHA-1`);
      }
    };
    const onVerified = (index: number): void => {
      const wires = contributors.get(index);
      contributors.delete(index);
      if (wires?.size === 1) for (const wire of wires) verifiedAlone.set(wire, (verifiedAlone.get(wire) ?? 0) + 1);
    };
    torrent.on('wire', onWire);
    torrent.on('warning', onWarning);
    torrent.on('verified', onVerified);
    torrent.once('close', () => {
      torrent.off('wire', onWire);
      torrent.off('warning', onWarning);
      torrent.off('verified', onVerified);
      contributors.clear();
    });
    return counters;
  }
}
