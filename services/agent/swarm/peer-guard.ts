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
 *
 * The guard also keeps one connection per peer. Two cowherd agents that find each other through the tracker
 * both dial (each announce returns the other), and webtorrent keeps both wires: every host ends up with twice
 * the wires it needs, and each wire costs a handshake and a share of webtorrent's per-wire request scanning
 * (MACHINE.md: ~6% and ~18% of a receiver's CPU). When a second wire to the same peer id appears, both ends
 * keep the one dialled by the smaller peer id and close the other, so they agree without talking.
 */
import type { Torrent, Wire } from 'webtorrent';
import type { Logger } from '../../common/platform/logger.js';

/** What a wire of bittorrent-protocol has beyond the declared type. */
interface GuardedWire extends Wire {
  readonly peerId?: string;
  readonly destroyed?: boolean;
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

  /** `ownPeerId`: this client's peer id (hex), for choosing which of two wires to a peer stays. */
  constructor(
    private readonly log?: Logger,
    private readonly ownPeerId?: () => string,
  ) {}

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
    const byPeer = new Map<string, Set<GuardedWire>>();
    const onWire = (wire: GuardedWire, address: string | undefined): void => {
      const where = address ?? `${wire.remoteAddress ?? '?'}:${wire.remotePort ?? '?'}`;
      addresses.set(wire, where);
      if ((wire.peerId && this.bannedIds.has(wire.peerId)) || this.bannedAddresses.has(where)) {
        wire.destroy();
        return;
      }
      const mine = this.ownPeerId?.();
      if (wire.peerId && wire.peerId === mine) {
        // A wire to ourselves (our own address handed out by the tracker): nothing to exchange.
        wire.destroy();
        return;
      }
      if (wire.peerId && mine && wire.type !== 'webSeed') {
        const peerId = wire.peerId;
        const live = [...(byPeer.get(peerId) ?? [])].filter((other) => !other.destroyed);
        if (live.length > 0) {
          // Keep the wire dialled by the smaller peer id; drop the other one (both ends decide the same).
          const dialler = (candidate: GuardedWire): string => (/Outgoing$/.test(candidate.type) ? mine : peerId);
          const preferred = mine < peerId ? mine : peerId;
          for (const candidate of [...live, wire]) {
            if (dialler(candidate) !== preferred && [...live, wire].some((other) => other !== candidate && dialler(other) === preferred)) candidate.destroy();
          }
          if (wire.destroyed) return;
        }
        const set = byPeer.get(peerId) ?? new Set<GuardedWire>();
        set.add(wire);
        byPeer.set(peerId, set);
        wire.once('close', () => set.delete(wire));
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
