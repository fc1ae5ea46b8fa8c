// Unit tests of services/agent/swarm/torrent.ts (determinism, privacy, announce list, create-torrent agreement,
// parsing refusals) and services/agent/swarm/web-seed.ts (real HTTP requests: ranges, 404s, 416s, HEAD, limits).
//
//   node --import tsx --test test/unit/agent-swarm.test.ts
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { request } from 'node:http';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import createTorrent, { announceList as publicTrackers } from 'create-torrent';
import { createImageTorrent, parseImageTorrent, pieceLengthFor, torrentFile } from '../../services/agent/swarm/torrent.js';
import { parseRange, WebSeedServer } from '../../services/agent/swarm/web-seed.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const ANNOUNCE = 'http://127.0.0.1:7449/announce';
let root: string;
let imageDirectory: string;
let disk: Buffer;
let template: Buffer;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'cowherd-test-swarm-unit-'));
  imageDirectory = join(root, 'images', 'img-1');
  await mkdir(imageDirectory, { recursive: true });
  disk = randomBytes(5 * MiB + 123);
  template = Buffer.from('<domain type="kvm"><name>template</name></domain>\n');
  await writeFile(join(imageDirectory, 'vda.qcow2'), disk);
  await writeFile(join(imageDirectory, 'domain-template.xml'), template);
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Decodes just enough bencode to look at a .torrent's top-level keys (latin1 keeps bytes). */
function topLevel(metainfo: Buffer): string {
  return metainfo.toString('latin1');
}

describe('createImageTorrent', () => {
  test('is private, names only the cowherd tracker, pieces sized by the image, and is deterministic', async () => {
    const options = { directory: imageDirectory, files: ['vda.qcow2', 'domain-template.xml'], announce: ANNOUNCE, name: 'img-1' };
    const first = await createImageTorrent(options);
    const second = await createImageTorrent(options);
    assert.equal(first.infoHash, second.infoHash);
    assert.ok(first.metainfo.equals(second.metainfo), 'byte-identical metainfo');
    assert.match(first.infoHash, /^[0-9a-f]{40}$/);
    assert.equal(first.pieceLengthBytes, pieceLengthFor(first.totalBytes));
    assert.equal(first.totalBytes, disk.length + template.length);
    assert.equal(first.pieceCount, Math.ceil(first.totalBytes / first.pieceLengthBytes));
    const text = topLevel(first.metainfo);
    assert.ok(text.startsWith(`d8:announce${ANNOUNCE.length}:${ANNOUNCE}13:announce-listll${ANNOUNCE.length}:${ANNOUNCE}ee4:infod`), text.slice(0, 120));
    assert.ok(text.includes('7:privatei1e'));
    assert.ok(!text.includes('creation date') && !text.includes('url-list') && !text.includes('created by'));
    for (const [tracker] of publicTrackers) assert.ok(!text.includes(tracker!), `public tracker ${tracker}`);

    const parsed = parseImageTorrent(first.metainfo, first.infoHash);
    assert.deepEqual(parsed.files, [
      { path: 'vda.qcow2', length: disk.length },
      { path: 'domain-template.xml', length: template.length },
    ]);
    assert.equal(parsed.name, 'img-1');
    // The bare info dictionary parses to the same torrent.
    assert.equal(parseImageTorrent(first.infoDictionary, first.infoHash).infoHash, first.infoHash);
    // Re-wrapping with another tracker keeps the info-hash.
    const other = torrentFile(first.infoDictionary, 'http://10.0.0.1:7449/announce');
    assert.equal(parseImageTorrent(other).infoHash, first.infoHash);
    assert.ok(!topLevel(other).includes(ANNOUNCE));
  });

  test('file order, names and piece length change the info-hash; the tracker does not', async () => {
    const base = await createImageTorrent({ directory: imageDirectory, files: ['vda.qcow2', 'domain-template.xml'], announce: ANNOUNCE, name: 'img-1' });
    const reordered = await createImageTorrent({ directory: imageDirectory, files: ['domain-template.xml', 'vda.qcow2'], announce: ANNOUNCE, name: 'img-1' });
    const renamed = await createImageTorrent({ directory: imageDirectory, files: ['vda.qcow2', 'domain-template.xml'], announce: ANNOUNCE, name: 'img-2' });
    const smallPieces = await createImageTorrent({
      directory: imageDirectory,
      files: ['vda.qcow2', 'domain-template.xml'],
      announce: ANNOUNCE,
      name: 'img-1',
      pieceLengthBytes: 256 * KiB,
    });
    const otherTracker = await createImageTorrent({
      directory: imageDirectory,
      files: ['vda.qcow2', 'domain-template.xml'],
      announce: 'http://example.invalid/announce',
      name: 'img-1',
    });
    assert.equal(new Set([base.infoHash, reordered.infoHash, renamed.infoHash, smallPieces.infoHash]).size, 4);
    assert.equal(otherTracker.infoHash, base.infoHash);
    assert.equal(smallPieces.pieceCount, Math.ceil(base.totalBytes / (256 * KiB)));
  });

  test('agrees with create-torrent on the info-hash (same files, piece length, privacy, name)', async () => {
    const ours = await createImageTorrent({
      directory: imageDirectory,
      files: ['vda.qcow2', 'domain-template.xml'],
      announce: ANNOUNCE,
      name: 'img-1',
      pieceLengthBytes: MiB,
    });
    const theirs = await new Promise<Uint8Array>((resolve, reject) =>
      createTorrent(
        [join(imageDirectory, 'vda.qcow2'), join(imageDirectory, 'domain-template.xml')],
        { name: 'img-1', pieceLength: MiB, private: true, announceList: [[ANNOUNCE]], creationDate: 0 },
        (error, torrent) => (error ? reject(error) : resolve(torrent)),
      ),
    );
    assert.equal(parseImageTorrent(theirs).infoHash, ours.infoHash);
  });

  test('a one-file image is still a multi-file torrent (web seed paths stay /<id>/<file>)', async () => {
    const single = await createImageTorrent({ directory: imageDirectory, files: ['vda.qcow2'], announce: ANNOUNCE, name: 'img-1' });
    assert.deepEqual(parseImageTorrent(single.metainfo).files, [{ path: 'vda.qcow2', length: disk.length }]);
  });

  test('refuses unsafe names, duplicates, bad piece lengths and non-http trackers', async () => {
    const base = { directory: imageDirectory, announce: ANNOUNCE, name: 'img-1' };
    await assert.rejects(createImageTorrent({ ...base, files: ['../etc/passwd'] }), /single path segment/);
    await assert.rejects(createImageTorrent({ ...base, files: ['..'] }), /single path segment/);
    await assert.rejects(createImageTorrent({ ...base, files: ['vda.qcow2', 'vda.qcow2'] }), /twice/);
    await assert.rejects(createImageTorrent({ ...base, files: ['vda.qcow2'], pieceLengthBytes: 3 * MiB }), /power of two/);
    await assert.rejects(createImageTorrent({ ...base, files: ['vda.qcow2'], announce: 'udp://tracker.example:1337' }), /not http/);
    await assert.rejects(createImageTorrent({ ...base, files: ['vda.qcow2'], name: 'Not_An_Id' }), /image id/);
    await assert.rejects(createImageTorrent({ ...base, files: ['missing.qcow2'] }), /ENOENT/);
  });

  test('parseImageTorrent refuses public torrents, wrong info-hashes, nested paths and garbage', async () => {
    const good = await createImageTorrent({ directory: imageDirectory, files: ['vda.qcow2', 'domain-template.xml'], announce: ANNOUNCE, name: 'img-1' });
    assert.throws(() => parseImageTorrent(good.metainfo, '0'.repeat(40)), /info-hash/);
    const notPrivate = Buffer.from(good.infoDictionary.toString('latin1').replace('7:privatei1e', '7:privatei0e'), 'latin1');
    assert.throws(() => parseImageTorrent(notPrivate), /not private/);
    const nested = Buffer.from(good.infoDictionary.toString('latin1').replace('l9:vda.qcow2e', 'l2:..7:vda.qcoe'), 'latin1');
    assert.throws(() => parseImageTorrent(nested), /single segment|safe file name/);
    assert.throws(() => parseImageTorrent(Buffer.from('not bencode')), /invalid bencoding/);
    assert.throws(() => parseImageTorrent(good.metainfo.subarray(0, good.metainfo.length - 1)), /invalid bencoding/);
    // Public (create-torrent default) torrents are refused.
    const publicTorrent = await new Promise<Uint8Array>((resolve, reject) =>
      createTorrent([join(imageDirectory, 'vda.qcow2'), join(imageDirectory, 'domain-template.xml')], { name: 'img-1' }, (error, torrent) =>
        error ? reject(error) : resolve(torrent),
      ),
    );
    assert.throws(() => parseImageTorrent(publicTorrent), /not private/);
  });
});

describe('parseRange', () => {
  test('single ranges, suffixes, clamping, refusals', () => {
    assert.deepEqual(parseRange('bytes=0-9', 100), [0, 9]);
    assert.deepEqual(parseRange('bytes=90-', 100), [90, 99]);
    assert.deepEqual(parseRange('bytes=90-1000', 100), [90, 99]);
    assert.deepEqual(parseRange('bytes=-10', 100), [90, 99]);
    assert.deepEqual(parseRange('bytes=-1000', 100), [0, 99]);
    assert.equal(parseRange('bytes=100-', 100), undefined);
    assert.equal(parseRange('bytes=5-4', 100), undefined);
    assert.equal(parseRange('bytes=-0', 100), undefined);
    assert.equal(parseRange('bytes=0-1,5-6', 100), undefined);
    assert.equal(parseRange('items=0-1', 100), undefined);
    assert.equal(parseRange('bytes=abc', 100), undefined);
    assert.equal(parseRange('bytes=0-0', 0), undefined);
  });
});

describe('WebSeedServer', () => {
  let server: WebSeedServer;
  let port: number;
  let outside: string;

  before(async () => {
    outside = join(root, 'secret.txt');
    await writeFile(outside, 'secret');
    await symlink(outside, join(imageDirectory, 'link.txt'));
    await writeFile(join(imageDirectory, 'empty.raw'), '');
    server = new WebSeedServer();
    server.addImage('img-1', imageDirectory, ['vda.qcow2', 'domain-template.xml', 'link.txt', 'empty.raw']);
    port = await server.listen({ host: '127.0.0.1', port: 0 });
  });

  after(async () => {
    await server.close();
  });

  function get(
    path: string,
    headers: Record<string, string> = {},
    method = 'GET',
  ): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: Buffer }> {
    return new Promise((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port, path, method, headers }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on('error', reject);
      });
      req.on('error', reject);
      req.end();
    });
  }

  test('the URL is the server root', () => {
    assert.equal(server.url(), `http://127.0.0.1:${port}/`);
  });

  test('a range is 206 with Content-Range and exactly those bytes', async () => {
    const response = await get('/img-1/vda.qcow2', { Range: 'bytes=4194300-4194399' });
    assert.equal(response.status, 206);
    assert.equal(response.headers['content-range'], `bytes 4194300-4194399/${disk.length}`);
    assert.equal(response.headers['content-length'], '100');
    assert.equal(response.headers['accept-ranges'], 'bytes');
    assert.ok(response.body.equals(disk.subarray(4194300, 4194400)));
    const tail = await get('/img-1/vda.qcow2', { Range: 'bytes=-7' });
    assert.equal(tail.status, 206);
    assert.ok(tail.body.equals(disk.subarray(disk.length - 7)));
    const open = await get('/img-1/domain-template.xml', { Range: 'bytes=10-' });
    assert.ok(open.body.equals(template.subarray(10)));
  });

  test('no Range is 200 with the whole file; HEAD sends headers only', async () => {
    const whole = await get('/img-1/vda.qcow2');
    assert.equal(whole.status, 200);
    assert.ok(whole.body.equals(disk));
    const head = await get('/img-1/vda.qcow2', {}, 'HEAD');
    assert.equal(head.status, 200);
    assert.equal(head.headers['content-length'], String(disk.length));
    assert.equal(head.body.length, 0);
    const headRange = await get('/img-1/vda.qcow2', { Range: 'bytes=0-9' }, 'HEAD');
    assert.equal(headRange.status, 206);
    assert.equal(headRange.headers['content-length'], '10');
    const empty = await get('/img-1/empty.raw');
    assert.equal(empty.status, 200);
    assert.equal(empty.body.length, 0);
  });

  test('bad ranges are 416 with the size', async () => {
    for (const range of [`bytes=${disk.length}-`, 'bytes=10-5', 'bytes=0-1,4-5', 'bytes=x-y', 'lines=1-2']) {
      const response = await get('/img-1/vda.qcow2', { Range: range });
      assert.equal(response.status, 416, range);
      assert.equal(response.headers['content-range'], `bytes */${disk.length}`, range);
    }
    assert.equal((await get('/img-1/empty.raw', { Range: 'bytes=0-0' })).status, 416);
  });

  test('anything but a registered file of a registered image is 404', async () => {
    for (const path of [
      '/',
      '/img-1',
      '/img-1/',
      '/img-2/vda.qcow2',
      '/img-1/other.qcow2',
      '/img-1/../secret.txt',
      '/img-1/%2e%2e/secret.txt',
      '/img-1/..%2fsecret.txt',
      '/img-1/vda.qcow2/x',
      '//img-1/vda.qcow2',
      '/img-1/link.txt', // registered, but a symlink: O_NOFOLLOW
      '/%69mg-1/vda.qcow2x',
    ]) {
      const response = await get(path);
      assert.equal(response.status, 404, path);
      assert.ok(!response.body.toString().includes('secret'), path);
    }
    // Percent-encoding of a legal name still works; a query string is ignored.
    assert.equal((await get('/img-1/vda%2Eqcow2?x=1', { Range: 'bytes=0-0' })).status, 206);
    assert.equal((await get('/img-1/vda.qcow2', {}, 'POST')).status, 405);
    assert.equal((await get('/img-1/vda.qcow2', {}, 'PUT')).status, 405);
  });

  test('removeImage stops serving; addImage refuses unsafe names', async () => {
    server.addImage('img-9', imageDirectory, ['vda.qcow2']);
    assert.equal((await get('/img-9/vda.qcow2', { Range: 'bytes=0-0' })).status, 206);
    assert.equal((await get('/img-9/domain-template.xml', { Range: 'bytes=0-0' })).status, 404);
    server.removeImage('img-9');
    assert.equal((await get('/img-9/vda.qcow2', { Range: 'bytes=0-0' })).status, 404);
    assert.throws(() => server.addImage('img-9', imageDirectory, ['../x']));
    assert.throws(() => server.addImage('../x', imageDirectory, ['x']));
  });

  test('the upload limit shapes responses', async () => {
    server.setUploadLimit(4 * MiB);
    const started = performance.now();
    const response = await get('/img-1/vda.qcow2', { Range: `bytes=0-${2 * MiB - 1}` });
    const seconds = (performance.now() - started) / 1000;
    server.setUploadLimit(0);
    assert.equal(response.body.length, 2 * MiB);
    assert.ok(seconds > 0.35 && seconds < 1.5, `2 MiB at 4 MiB/s took ${seconds.toFixed(2)} s`);
  });
});

describe('pieceLengthFor', () => {
  test('keeps pieces at 512 KiB up to 8 GiB, then at most 16384 pieces of up to 16 MiB', () => {
    const MiB = 1024 * 1024;
    assert.equal(pieceLengthFor(1), MiB / 2);
    assert.equal(pieceLengthFor(256 * MiB), MiB / 2);
    assert.equal(pieceLengthFor(512 * MiB), MiB / 2);
    assert.equal(pieceLengthFor(512 * MiB + 1), MiB / 2);
    assert.equal(pieceLengthFor(4096 * MiB + 8 * MiB), MiB / 2, 'a 4 GiB disk with its boot files streams with the pieces of a 1 GiB one');
    assert.equal(pieceLengthFor(8192 * MiB), MiB / 2);
    assert.equal(pieceLengthFor(8192 * MiB + 1), MiB);
    assert.equal(pieceLengthFor(64 * 1024 * MiB), 4 * MiB);
    assert.equal(pieceLengthFor(256 * 1024 * MiB), 16 * MiB);
    assert.equal(pieceLengthFor(1024 * 1024 * MiB), 16 * MiB);
  });
});
