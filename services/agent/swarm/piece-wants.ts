/**
 * `cowherd_want`: a BEP 10 extension message by which a receiver that streams a replica (a guest waits on some of
 * its bytes) asks its peers for exactly those pieces. A super-seeding origin (super-seed.ts) hides the pieces it
 * holds and reveals them one at a time in its own order; on a want it reveals the wanted pieces to that receiver
 * at once (`have`), outside its one-piece budget, and the receiver's webtorrent, which has them marked critical,
 * requests them first. Other peers announce what they hold anyway and ignore wants.
 *
 * Payload: 1 to {@link MAX_WANTED} piece indices, uint32 big-endian each. Anything else is ignored: a want can
 * only make the origin say sooner that it holds a piece, which it would say anyway.
 */
import type { Wire } from 'webtorrent';

/** The extension's name in the extended handshake. */
export const WANT_EXTENSION = 'cowherd_want';
/** Indices in one message, at most (a guest's read is a few pieces; 64 x 512 KiB = 32 MiB, the largest read). */
export const MAX_WANTED = 64;

interface ExtendedWire extends Wire {
  use(extension: unknown): void;
  extended(extension: string, payload: Uint8Array): void;
  readonly destroyed: boolean;
  [WANT_EXTENSION]?: WantExtension;
}

interface WantExtension {
  peerSupports: boolean;
}

/**
 * Installs the extension on `wire` (call it in the torrent's 'wire' event, before the handshakes);
 * `onWant` gets the indices a peer asks for.
 */
export function usePieceWants(wire: Wire, onWant?: (indices: number[]) => void): void {
  class CowherdWant implements WantExtension {
    peerSupports = false;
    onExtendedHandshake(handshake: { m?: Record<string, unknown> }): void {
      this.peerSupports = handshake.m?.[WANT_EXTENSION] !== undefined;
    }
    onMessage(payload: Uint8Array): void {
      if (!onWant || payload.length === 0 || payload.length % 4 !== 0 || payload.length > MAX_WANTED * 4) return;
      const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
      const indices: number[] = [];
      for (let offset = 0; offset < payload.length; offset += 4) indices.push(view.getUint32(offset));
      onWant(indices);
    }
  }
  (CowherdWant.prototype as unknown as { name: string }).name = WANT_EXTENSION;
  (wire as ExtendedWire).use(CowherdWant);
}

/** Asks the peer on `wire` for `indices` (the first {@link MAX_WANTED}); false when the peer does not speak the extension. */
export function sendWants(wire: Wire, indices: readonly number[]): boolean {
  const extended = wire as ExtendedWire;
  if (extended.destroyed || !extended[WANT_EXTENSION]?.peerSupports || indices.length === 0) return false;
  const wanted = indices.slice(0, MAX_WANTED);
  const payload = new Uint8Array(wanted.length * 4);
  const view = new DataView(payload.buffer);
  wanted.forEach((index, position) => view.setUint32(position * 4, index));
  extended.extended(WANT_EXTENSION, payload);
  return true;
}
