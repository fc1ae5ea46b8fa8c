import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { READ_BACK_BYTES, RunningDigests, type DigestFiles } from '../../services/agent/swarm/running-digest.js';

/** Two files laid end to end, chunked across the boundary like a torrent's pieces. */
function layout(sizes: number[], chunkLength: number) {
  const contents = sizes.map((size) => randomBytes(size));
  const whole = Buffer.concat(contents);
  let offset = 0;
  const files = sizes.map((length) => {
    const file = { offset, length };
    offset += length;
    return file;
  });
  const disk = sizes.map((size) => Buffer.alloc(size));
  const reads: number[] = [];
  const readSizes: number[] = [];
  const io: DigestFiles = {
    read: async (index, position, buffer) => {
      reads.push(index);
      readSizes.push(buffer.length);
      disk[index]!.copy(buffer, 0, position, position + buffer.length);
    },
    ctimeNs: async (index) => BigInt(1000 + index),
  };
  const chunks = Math.ceil(whole.length / chunkLength);
  /** Writes chunk `index` to the fake disk, then tells the digests. */
  const write = (
    digests: RunningDigests,
    index: number,
    bytes = whole.subarray(index * chunkLength, Math.min(whole.length, (index + 1) * chunkLength)),
  ): void => {
    const start = index * chunkLength;
    for (const [fileIndex, file] of files.entries()) {
      const from = Math.max(start, file.offset);
      const to = Math.min(start + bytes.length, file.offset + file.length);
      if (from < to) bytes.copy(disk[fileIndex]!, from - file.offset, from - start, to - start);
    }
    digests.chunkWritten(index, Buffer.from(bytes));
  };
  const sha = (buffer: Buffer): string => createHash('sha256').update(buffer).digest('hex');
  return { contents, whole, files, io, chunks, write, reads, readSizes, sha };
}

describe('RunningDigests', () => {
  test('hashes each file in order whatever order the chunks arrive in, across file boundaries', async () => {
    const chunkLength = 1000;
    const bed = layout([4321, 2500], chunkLength);
    const digests = new RunningDigests(bed.files, chunkLength, bed.whole.length, bed.io);
    const order = [...Array(bed.chunks).keys()].reverse();
    for (const index of order) {
      bed.write(digests, index);
      // Each chunk's own advance runs before the next arrives, as with pieces from the network.
      await new Promise(setImmediate);
    }
    const result = await digests.finish();
    assert.equal(result[0]?.sha256, bed.sha(bed.contents[0]!));
    assert.equal(result[1]?.sha256, bed.sha(bed.contents[1]!));
    assert.equal(result[0]?.sizeBytes, 4321);
    assert.equal(result[1]?.ctimeNs, 1001n);
    // Chunks that came before the cursor reached them were read back from the files.
    assert.ok(bed.reads.length > 0);
  });

  test('reads back runs of written chunks at most READ_BACK_BYTES at a time, also inside chunks larger than that', async () => {
    for (const chunkLength of [READ_BACK_BYTES / 8, READ_BACK_BYTES + READ_BACK_BYTES / 2]) {
      const bed = layout([3 * chunkLength + 123, chunkLength - 7], chunkLength);
      const digests = new RunningDigests(bed.files, chunkLength, bed.whole.length, bed.io);
      // Every chunk but the first arrives before the cursor can move, then the first one.
      for (let index = 1; index < bed.chunks; index += 1) bed.write(digests, index);
      await new Promise(setImmediate);
      bed.write(digests, 0);
      const result = await digests.finish();
      assert.equal(result[0]?.sha256, bed.sha(bed.contents[0]!), `file 0, chunks of ${chunkLength}`);
      assert.equal(result[1]?.sha256, bed.sha(bed.contents[1]!), `file 1, chunks of ${chunkLength}`);
      // File 0's chunks 1..3 were read back (file 1 was hashed from its chunks' buffers as they came): in reads
      // of READ_BACK_BYTES but the last, runs of small chunks merged, large chunks split.
      const readBack = bed.files[0]!.length - chunkLength;
      assert.equal(
        bed.readSizes.reduce((sum, size) => sum + size, 0),
        readBack,
      );
      assert.deepEqual(bed.readSizes.slice(0, -1), Array(Math.ceil(readBack / READ_BACK_BYTES) - 1).fill(READ_BACK_BYTES), `chunks of ${chunkLength}`);
    }
  });

  test('in-order chunks are hashed from their buffers without reading the files', async () => {
    const chunkLength = 512;
    const bed = layout([3000], chunkLength);
    const digests = new RunningDigests(bed.files, chunkLength, bed.whole.length, bed.io);
    for (let index = 0; index < bed.chunks; index += 1) bed.write(digests, index);
    const [result] = await digests.finish();
    assert.equal(result?.sha256, bed.sha(bed.contents[0]!));
    assert.deepEqual(bed.reads, []);
  });

  test('gives no digest for a file with a missing chunk or a chunk written twice', async () => {
    const chunkLength = 100;
    const bed = layout([250, 250], chunkLength);
    const missing = new RunningDigests(bed.files, chunkLength, bed.whole.length, bed.io);
    for (let index = 0; index < bed.chunks; index += 1) if (index !== 1) bed.write(missing, index);
    const partial = await missing.finish();
    assert.equal(partial[0], undefined);
    assert.equal(partial[1]?.sha256, bed.sha(bed.contents[1]!));

    const twice = new RunningDigests(bed.files, chunkLength, bed.whole.length, bed.io);
    for (let index = 0; index < bed.chunks; index += 1) bed.write(twice, index);
    // Chunk 0 again, with other bytes: what was hashed is no longer what is on disk.
    bed.write(twice, 0, randomBytes(chunkLength));
    const rewritten = await twice.finish();
    assert.equal(rewritten[0], undefined);
    assert.equal(rewritten[1]?.sha256, bed.sha(bed.contents[1]!));
  });

  test('a read that fails leaves that file to be verified by reading', async () => {
    const chunkLength = 100;
    const bed = layout([300], chunkLength);
    const digests = new RunningDigests(bed.files, chunkLength, bed.whole.length, { ...bed.io, read: async () => Promise.reject(new Error('EIO')) });
    bed.write(digests, 2);
    await new Promise(setImmediate);
    bed.write(digests, 1);
    await new Promise(setImmediate);
    bed.write(digests, 0);
    const [result] = await digests.finish();
    assert.equal(result, undefined);
  });
});
