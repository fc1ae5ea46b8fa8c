// The agent's read-only NBD server (services/agent/streaming/nbd-server.ts) against qemu's own NBD client: qemu-img
// and qemu-io read through it, a qcow2 overlay uses an export as its backing file (as a streaming clone will), a
// read waits until its range is released, writes are refused, and unknown exports and ranges are errors.
//
//   node --import tsx --test test/unit/agent-nbd-server.test.ts
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { runCommand } from '../../services/common/platform/child-process.js';
import { startNbdServer, type NbdRead, type NbdServer, type StreamedFile } from '../../services/agent/streaming/index.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
let directory: string;
let imagePath: string;
let image: Buffer;
let server: NbdServer;
const errors: Error[] = [];
const reads: NbdRead[] = [];

/** A file whose ranges are released by the test: reads of a range not yet released wait. */
class GatedFile implements StreamedFile {
  readonly requested: Array<[number, number]> = [];
  private released: Array<[number, number]> = [];
  private waiters: Array<{ offset: number; length: number; resolve: () => void }> = [];
  constructor(
    readonly path: string,
    readonly size: number,
  ) {}
  whenAvailable(offset: number, length: number): Promise<void> {
    if (this.covered(offset, length)) return Promise.resolve();
    this.requested.push([offset, length]);
    return new Promise((resolve) => this.waiters.push({ offset, length, resolve }));
  }
  release(offset: number, length: number): void {
    this.released.push([offset, offset + length]);
    this.waiters = this.waiters.filter((waiter) => {
      if (!this.covered(waiter.offset, waiter.length)) return true;
      waiter.resolve();
      return false;
    });
  }
  private covered(offset: number, length: number): boolean {
    return this.released.some(([start, end]) => start <= offset && offset + length <= end);
  }
}

const open: StreamedFile = {
  get path() {
    return imagePath;
  },
  size: SIZE,
  whenAvailable: async () => undefined,
};

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

before(async () => {
  directory = await mkdtemp(path.join(tmpdir(), 'cowherd-nbd-'));
  image = randomBytes(SIZE);
  imagePath = path.join(directory, 'vda.raw');
  await writeFile(imagePath, image);
  server = await startNbdServer({ socketPath: path.join(directory, 'nbd.sock'), onError: (error) => errors.push(error), onRead: (read) => reads.push(read) });
});

after(async () => {
  await server?.close();
  await rm(directory, { recursive: true, force: true });
});

describe('NBD server', () => {
  it('serves an export that qemu-img reads whole, byte for byte', async () => {
    server.addExport('vda.raw', open);
    const info = JSON.parse(await runCommand('qemu-img', ['info', '--output=json', server.uri('vda.raw')]));
    assert.equal(info['virtual-size'], SIZE);
    const copy = path.join(directory, 'copy.raw');
    await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri('vda.raw'), copy]);
    assert.equal(sha256(await readFile(copy)), sha256(image));
  });

  it('backs a qcow2 overlay: reads fall through to the export, writes stay in the overlay', async () => {
    server.addExport('vda.raw', open);
    const overlay = path.join(directory, 'clone.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', server.uri('vda.raw'), '-F', 'raw', overlay]);
    const pattern = image[3 * MiB]!;
    // qemu-io's read -P checks every byte against one value: write a known pattern through the overlay, read it
    // back, and compare a range it did not write with the image.
    await runCommand('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 64k', '-c', 'read -P 0xab 0 64k', overlay]);
    const out = path.join(directory, 'overlay-read.raw');
    await runCommand('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, out]);
    const read = await readFile(out);
    assert.ok(read.subarray(0, 64 * 1024).every((byte) => byte === 0xab));
    assert.equal(read[3 * MiB], pattern);
    assert.equal(sha256(read.subarray(64 * 1024)), sha256(image.subarray(64 * 1024)));
    assert.equal(sha256(await readFile(imagePath)), sha256(image), 'the backing file is never written');
  });

  it('holds a read until its range is available, then answers it', async () => {
    const gated = new GatedFile(imagePath, SIZE);
    server.addExport('gated.raw', gated);
    const out = path.join(directory, 'gated-part.raw');
    const waitsBefore = server.statistics.waitedReads;
    // qemu-img dd reads the first MiB only.
    const reading = runCommand('qemu-img', ['dd', '-f', 'raw', '-O', 'raw', 'bs=1M', 'count=1', `if=${server.uri('gated.raw')}`, `of=${out}`]);
    let finished = false;
    void reading.then(
      () => (finished = true),
      () => (finished = true),
    );
    const deadline = Date.now() + 10_000;
    while (!gated.requested.some(([offset]) => offset < MiB) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    assert.ok(gated.requested.length > 0, 'qemu asked for a range');
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(finished, false, 'the read waits while its range is missing');
    gated.release(0, SIZE);
    await reading;
    assert.equal(sha256(await readFile(out)), sha256(image.subarray(0, MiB)));
    assert.ok(server.statistics.waitedReads > waitsBefore);
    assert.ok(server.statistics.longestWaitMs >= 300);
    // Every read is told in the order served (the read profile of a boot): this one's ranges, the first waiting.
    const gatedReads = reads.filter((read) => read.exportName === 'gated.raw');
    assert.ok(gatedReads.length > 0);
    assert.ok(gatedReads.some((read) => read.waitedMs >= 300));
    assert.ok(gatedReads.every((read) => read.offset >= 0 && read.offset + read.length <= SIZE));
    assert.ok(gatedReads.some((read) => read.offset < MiB));
  });

  it('refuses writes to an export and reads of a range that cannot be had', async () => {
    server.addExport('vda.raw', open);
    await assert.rejects(
      runCommand('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4k', server.uri('vda.raw')]),
      /read-only|Operation not permitted|permission/i,
    );
    const broken: StreamedFile = { path: imagePath, size: SIZE, whenAvailable: async () => Promise.reject(new Error('the swarm lost every peer')) };
    server.addExport('broken.raw', broken);
    const failedBefore = server.statistics.failedReads;
    // qemu-io exits 1 after "read failed: Input/output error" (on its stdout).
    await assert.rejects(runCommand('qemu-io', ['-f', 'raw', '-r', '-c', 'read 0 4k', server.uri('broken.raw')]));
    assert.ok(server.statistics.failedReads > failedBefore);
    assert.ok(errors.some((error) => /the swarm lost every peer/.test(error.message)));
    assert.equal(sha256(await readFile(imagePath)), sha256(image));
  });

  it('refuses an export it does not serve, and stops serving a removed one', async () => {
    await assert.rejects(runCommand('qemu-img', ['info', server.uri('nothing.raw')]), /no export|export|not found|Requested export not available/i);
    server.addExport('gone.raw', open);
    server.removeExport('gone.raw');
    await assert.rejects(runCommand('qemu-img', ['info', server.uri('gone.raw')]));
    assert.throws(() => server.addExport('../etc/passwd', open), /must match/);
  });
});
