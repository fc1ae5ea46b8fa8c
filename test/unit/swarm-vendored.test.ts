// Unit tests of cowherd's changes to the two vendored webtorrent packages (vendor/*/CHANGES.md): the peer wire
// takes messages out of the socket's chunks whatever their boundaries, and a piece assembles its blocks in place.
//
//   node --import tsx --test test/unit/swarm-vendored.test.ts
import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import { describe, test } from 'node:test';

interface PieceLike {
  readonly length: number;
  readonly missing: number;
  reserve(): number;
  chunkOffset(index: number): number;
  chunkLength(index: number): number;
  set(index: number, data: Uint8Array, source: unknown): boolean;
  get(index: number): Uint8Array | null;
  flush(): Uint8Array | null;
}
interface WireLike {
  on(event: 'piece', listener: (index: number, offset: number, buffer: Uint8Array) => void): void;
  on(event: 'request', listener: (index: number, offset: number, length: number) => void): void;
  on(event: 'have', listener: (index: number) => void): void;
  write(chunk: Uint8Array): boolean;
  _parse(size: number, parser: (buffer: Uint8Array) => void): void;
  _onMessageLength(buffer: Uint8Array): void;
  peerPieces: unknown;
  requests: Array<{ piece: number; offset: number; length: number; callback: (error: Error | null, buffer?: Uint8Array) => void }>;
  destroy(): void;
}

const vendored = (name: string): string => new URL(`../../vendor/${name}/index.js`, import.meta.url).href;
const { default: Piece } = (await import(vendored('torrent-piece'))) as {
  default: (new (length: number) => PieceLike) & { BLOCK_LENGTH: number; release(buffer: Uint8Array): boolean };
};
const { default: Wire } = (await import(vendored('bittorrent-protocol'))) as { default: new () => WireLike };

/** A "piece" message: <len=0009+X><id=7><index><begin><block>. */
function pieceMessage(index: number, offset: number, block: Uint8Array): Buffer {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(9 + block.length, 0);
  header[4] = 7;
  header.writeUInt32BE(index, 5);
  header.writeUInt32BE(offset, 9);
  return Buffer.concat([header, block]);
}

describe('vendored torrent-piece', () => {
  test('64 KiB blocks, copied into the piece in any order; flush hands over the assembled piece', () => {
    assert.equal(Piece.BLOCK_LENGTH, 64 * 1024);
    const content = randomBytes(512 * 1024 + 1000);
    const piece = new Piece(content.length);
    const reservations: number[] = [];
    for (let index = piece.reserve(); index !== -1; index = piece.reserve()) reservations.push(index);
    assert.equal(reservations.length, 9);
    assert.equal(piece.chunkLength(8), 1000);
    let complete = false;
    for (const index of reservations.reverse()) {
      const start = piece.chunkOffset(index);
      // The block arrives in a buffer that is reused right after, as a socket's would be.
      const arriving = Buffer.from(content.subarray(start, start + piece.chunkLength(index)));
      complete = piece.set(index, arriving, 'peer');
      arriving.fill(0);
      assert.deepEqual(Buffer.from(piece.get(index)!), content.subarray(start, start + piece.chunkLength(index)));
    }
    assert.equal(complete, true);
    assert.equal(piece.missing, 0);
    assert.deepEqual(Buffer.from(piece.flush()!), content);
    assert.equal(piece.flush(), null);
  });

  test('a block set twice counts once; an incomplete piece does not flush', () => {
    const piece = new Piece(3 * 64 * 1024);
    const block = randomBytes(64 * 1024);
    assert.equal(piece.set(0, block, 'a'), false);
    assert.equal(piece.set(0, randomBytes(64 * 1024), 'b'), false);
    assert.deepEqual(Buffer.from(piece.get(0)!), block);
    assert.equal(piece.get(1), null);
    assert.equal(piece.flush(), null);
    assert.equal(piece.missing, 2 * 64 * 1024);
  });
});

describe('vendored torrent-piece buffer pool', () => {
  const complete = (length: number, fill: number): PieceLike => {
    const piece = new Piece(length);
    for (let index = piece.reserve(); index !== -1; index = piece.reserve()) piece.set(index, Buffer.alloc(piece.chunkLength(index), fill), 'peer');
    return piece;
  };

  test('a released buffer is handed to the next piece of its length, once, with all its blocks rewritten', () => {
    const length = 3 * 64 * 1024 + 5;
    const first = complete(length, 1).flush()!;
    assert.equal(Piece.release(first), true);
    assert.equal(Piece.release(first), false, 'a buffer already in the pool is not taken twice');
    const second = complete(length, 2).flush()!;
    assert.equal(second, first, 'the pooled buffer is reused');
    assert.ok(second.every((byte) => byte === 2));
    const third = complete(length, 3).flush()!;
    assert.notEqual(third, first, 'the pool held one buffer: the next piece gets a new one');
  });

  test('takes back only buffers it made', () => {
    assert.equal(Piece.release(new Uint8Array(64 * 1024)), false);
    const piece = complete(64 * 1024, 4).flush()!;
    assert.equal(Piece.release(piece.subarray(0, 1024)), false);
    assert.equal(Piece.release(piece), true);
  });
});

describe('vendored bittorrent-protocol', () => {
  test('takes piece messages out of socket chunks of any size, across chunk boundaries', async () => {
    const wire = new Wire();
    // Past the handshake: straight to length-prefixed messages, as the wire does after its handshake.
    wire._parse(4, (buffer) => wire._onMessageLength(buffer));
    const blocks = Array.from({ length: 40 }, (_, index) => ({ index, offset: index * 1000, block: randomBytes(randomInt(1, 3 * 64 * 1024)) }));
    const received: Array<{ index: number; offset: number; block: Buffer }> = [];
    for (const { index, offset, block } of blocks) {
      wire.requests.push({
        piece: index,
        offset,
        length: block.length,
        callback: (error, buffer) => {
          assert.equal(error, null);
          received.push({ index, offset, block: Buffer.from(buffer!) });
        },
      });
    }
    const stream = Buffer.concat(blocks.map(({ index, offset, block }) => pieceMessage(index, offset, block)));
    for (let position = 0; position < stream.length; ) {
      // Chunks from 1 byte to 100 KiB: messages inside one chunk, across two, across many.
      const size = Math.min(stream.length - position, [1, 13, 17, 4096, 65536, 100 * 1024][randomInt(6)]!);
      wire.write(Buffer.from(stream.subarray(position, position + size)));
      position += size;
      if (randomInt(4) === 0) await new Promise(setImmediate);
    }
    await new Promise(setImmediate);
    assert.equal(received.length, blocks.length);
    for (const [i, { index, offset, block }] of blocks.entries()) assert.deepEqual(received[i], { index, offset, block });
    wire.destroy();
  });
});
