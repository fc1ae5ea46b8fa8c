// Unit tests of services/agent/swarm/replica-scrub.ts on real files in a temporary directory: the fingerprint that
// vouches for a verified replica, and the scan that the scrub and every re-verification run.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { chmod, mkdtemp, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { changedFiles, fingerprintFiles, scanReplica } from '../../services/agent/swarm/replica-scrub.js';
import type { ExpectedImageFile } from '../../services/agent/swarm/swarm.js';
import { createImageTorrent, type ImageTorrent } from '../../services/agent/swarm/torrent.js';

const MiB = 1024 * 1024;
let directory: string;
let torrent: ImageTorrent;
let files: ExpectedImageFile[];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), 'cowherd-test-scrub-'));
  files = [];
  // Sizes that do not end on a piece boundary, so a piece spans both files.
  for (const [path, size] of [
    ['vda.qcow2', 3 * MiB + 1234],
    ['domain-template.xml', 700 * 1024],
  ] as const) {
    const data = randomBytes(size);
    await writeFile(join(directory, path), data);
    files.push({ path, sizeBytes: size, sha256: createHash('sha256').update(data).digest('hex') });
  }
  torrent = await createImageTorrent({
    directory,
    files: files.map((file) => file.path),
    announce: 'http://127.0.0.1:1/announce',
    name: 'img-scrub',
    pieceLengthBytes: 512 * 1024,
  });
});

after(() => rm(directory, { recursive: true, force: true }));

describe('replica scrub', () => {
  test('an intact replica scans clean, every byte read once', async () => {
    const result = await scanReplica(directory, torrent, files);
    assert.deepEqual(result, { badFiles: [], badPieces: 0, bytesRead: torrent.totalBytes });
  });

  test('a chmod changes the fingerprint (ctime) but not the content: a re-verification finds nothing', async () => {
    const before = await fingerprintFiles(directory, files);
    await new Promise((resolve) => setTimeout(resolve, 5));
    await chmod(join(directory, 'vda.qcow2'), 0o444);
    const after = await fingerprintFiles(directory, files);
    assert.deepEqual(changedFiles(before, after), ['vda.qcow2']);
    assert.deepEqual((await scanReplica(directory, torrent, files)).badFiles, []);
  });

  test('23 bytes written in the middle of a file: that file and one piece are bad; a byte across files spoils the shared piece', async () => {
    const before = await fingerprintFiles(directory, files);
    const handle = await open(join(directory, 'vda.qcow2'), 'r+');
    const original = Buffer.alloc(23);
    await handle.read(original, 0, 23, MiB + 10);
    await handle.write(Buffer.from('twenty-three bytes here'), 0, 23, MiB + 10);
    await handle.close();
    assert.deepEqual(changedFiles(before, await fingerprintFiles(directory, files)), ['vda.qcow2']);
    assert.deepEqual(await scanReplica(directory, torrent, files), { badFiles: ['vda.qcow2'], badPieces: 1, bytesRead: torrent.totalBytes });
    const restore = await open(join(directory, 'vda.qcow2'), 'r+');
    await restore.write(original, 0, 23, MiB + 10);
    await restore.close();
    // The template's first byte sits in the piece that vda.qcow2's tail shares.
    const template = await open(join(directory, 'domain-template.xml'), 'r+');
    const first = Buffer.alloc(1);
    await template.read(first, 0, 1, 0);
    await template.write(Buffer.from([first[0]! ^ 0xff]), 0, 1, 0);
    await template.close();
    assert.deepEqual(await scanReplica(directory, torrent, files), { badFiles: ['domain-template.xml'], badPieces: 1, bytesRead: torrent.totalBytes });
    const back = await open(join(directory, 'domain-template.xml'), 'r+');
    await back.write(first, 0, 1, 0);
    await back.close();
  });

  test('a missing file makes its pieces bad; a replaced file changes the inode', async () => {
    const before = await fingerprintFiles(directory, files);
    const saved = join(directory, 'saved');
    await writeFile(saved, await readFile(join(directory, 'domain-template.xml')));
    await rm(join(directory, 'domain-template.xml'));
    const missing = await scanReplica(directory, torrent, files);
    assert.deepEqual(missing.badFiles, ['domain-template.xml']);
    assert.equal(missing.badPieces, 2, "the shared piece and the template's own");
    await rename(saved, join(directory, 'domain-template.xml'));
    assert.deepEqual(changedFiles(before, await fingerprintFiles(directory, files)), ['domain-template.xml']);
    assert.deepEqual((await scanReplica(directory, torrent, files)).badFiles, []);
  });

  test('the rate bound holds and an abort stops the scan', async () => {
    const started = performance.now();
    await scanReplica(directory, torrent, files, { bytesPerSecond: 8 * MiB });
    const seconds = (performance.now() - started) / 1000;
    assert.ok(seconds >= torrent.totalBytes / (8 * MiB) - 0.1, `took ${seconds.toFixed(2)} s at 8 MiB/s`);
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('stop')), 50);
    await assert.rejects(scanReplica(directory, torrent, files, { bytesPerSecond: MiB, signal: controller.signal }), /stop/);
  });
});
