/**
 * The order a streaming host asks the swarm for a list of pieces (a read profile, the boot files): pieces of a
 * file, the range a piece is waited for by, and the rarest-first pick that spreads hosts booting at once over
 * different pieces.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { nextWanted, pieceRange, piecesOf } from '../../services/agent/streamed-clones.js';

const KiB = 1024;
const layout = {
  pieceLength: 512 * KiB,
  files: [
    { path: 'domain.xml', length: 3 * KiB },
    { path: 'vmlinuz', length: 1024 * KiB },
    { path: 'vda.qcow2', length: 4096 * KiB },
    { path: 'empty', length: 0 },
  ],
  starts: new Map([
    ['domain.xml', 0],
    ['vmlinuz', 3 * KiB],
    ['vda.qcow2', 1027 * KiB],
    ['empty', 5123 * KiB],
  ]),
};

describe('streamed clones fetch lists of pieces', () => {
  it('finds the pieces of a file, shared boundary pieces included', () => {
    assert.deepEqual(piecesOf(layout, 'domain.xml'), [0]);
    assert.deepEqual(piecesOf(layout, 'vmlinuz'), [0, 1, 2], 'bytes 3 KiB .. 1027 KiB lie in pieces 0 to 2');
    assert.deepEqual(piecesOf(layout, 'vda.qcow2'), [2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert.deepEqual(piecesOf(layout, 'empty'), []);
    assert.deepEqual(piecesOf(layout, 'missing'), []);
  });

  it('waits for a piece by the part of its first file it holds', () => {
    assert.deepEqual(pieceRange(layout, 0), { file: 'domain.xml', offset: 0, length: 3 * KiB });
    assert.deepEqual(pieceRange(layout, 1), { file: 'vmlinuz', offset: 509 * KiB, length: 512 * KiB });
    assert.deepEqual(pieceRange(layout, 2), { file: 'vmlinuz', offset: 1021 * KiB, length: 3 * KiB });
    assert.deepEqual(pieceRange(layout, 10), { file: 'vda.qcow2', offset: 4093 * KiB, length: 3 * KiB });
    assert.equal(pieceRange(layout, 11), undefined);
  });

  it('asks for the piece the fewest peers hold, the first when nobody says', () => {
    assert.equal(nextWanted([7, 3, 9], [2, 1, 2]), 1);
    assert.equal(nextWanted([7, 3, 9], undefined), 0);
    assert.equal(nextWanted([7, 3, 9], [1, 1]), 0, 'counts that do not match the window are ignored');
    assert.equal(nextWanted([], []), 0);
  });

  it('breaks ties at random, so hosts that start together take different pieces', () => {
    const window = Array.from({ length: 32 }, (_, index) => index);
    const holders = window.map(() => 0);
    const picks = new Set(Array.from({ length: 6 }, (_, host) => nextWanted(window, holders, () => host / 6)));
    assert.equal(picks.size, 6, `six hosts, six different first pieces: ${[...picks].join(', ')}`);
    assert.equal(
      nextWanted(window, holders, () => 0.999),
      31,
    );
  });
});
