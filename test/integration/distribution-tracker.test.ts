/**
 * The embedded tracker on a real nats-server: the filter follows the `images` KV bucket (an image present
 * before the start, one added after, one deleted), real HTTP announces get peers or a bencoded failure,
 * and two real webtorrent clients move a file through it on 127.0.0.1.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { KvStore, protoCodec } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { natsTrackerRelay, startTracker, type Tracker } from '../../services/distribution/tracker.js';
import { Image, Image_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';

const log = createLogger({ service: 'test', level: 'silent' });

// The BitTorrent packages have no typings: the few members used here, imported by a computed name.
type Bencoded = Uint8Array | number | Bencoded[] | { [key: string]: Bencoded };
interface Bencode {
  decode(data: Uint8Array): Bencoded;
}
interface WebTorrentTorrent {
  readonly infoHash: string;
  readonly done: boolean;
  readonly numPeers: number;
  on(event: 'done' | 'ready', listener: () => void): void;
  on(event: 'error' | 'warning', listener: (error: Error) => void): void;
}
interface WebTorrentClient {
  add(torrent: Uint8Array, options: { path: string }, onTorrent?: (torrent: WebTorrentTorrent) => void): WebTorrentTorrent;
  on(event: 'error', listener: (error: Error) => void): void;
  destroy(callback?: (error?: Error | null) => void): void;
}
type WebTorrentConstructor = new (options: { dht: boolean; lsd: boolean; natUpnp: boolean; natPmp: boolean; utp: boolean }) => WebTorrentClient;
type CreateTorrent = (
  input: string,
  options: { announceList: string[][]; private: boolean; createdBy?: string; creationDate?: number },
  callback: (error: Error | null, torrent: Uint8Array) => void,
) => void;
type ParseTorrent = (torrent: Uint8Array) => Promise<{ infoHash: string }>;

async function load<T>(name: string): Promise<T> {
  return ((await import(name)) as { default: T }).default;
}

function binaryParameter(bytes: Buffer): string {
  return [...bytes].map((byte) => `%${byte.toString(16).padStart(2, '0')}`).join('');
}

/** One HTTP announce as a BitTorrent client sends it; the decoded bencoded answer. */
async function announce(port: number, infoHash: string, peer: { id: string; port: number; event?: string }): Promise<Record<string, Bencoded>> {
  const query = [
    `info_hash=${binaryParameter(Buffer.from(infoHash, 'hex'))}`,
    `peer_id=${binaryParameter(Buffer.from(peer.id.padEnd(20, '0').slice(0, 20)))}`,
    `port=${peer.port}`,
    'uploaded=0',
    'downloaded=0',
    'left=1048576',
    'compact=1',
    ...(peer.event === undefined ? [] : [`event=${peer.event}`]),
  ].join('&');
  const body = await new Promise<Buffer>((resolve, reject) => {
    request({ host: '127.0.0.1', port, path: `/announce?${query}` }, (response) => {
      const chunks: Buffer[] = [];
      response.on('data', (chunk: Buffer) => chunks.push(chunk));
      response.on('end', () => resolve(Buffer.concat(chunks)));
      response.on('error', reject);
    })
      .on('error', reject)
      .end();
  });
  const bencode = await load<Bencode>('bencode');
  return bencode.decode(body) as Record<string, Bencoded>;
}

function text(value: Bencoded | undefined): string {
  assert.ok(value instanceof Uint8Array, `expected a byte string, got ${JSON.stringify(value)}`);
  return Buffer.from(value).toString('utf8');
}

/** `ip:port` of every peer in a compact peers string. */
function compactPeers(value: Bencoded | undefined): string[] {
  assert.ok(value instanceof Uint8Array);
  const peers: string[] = [];
  for (let offset = 0; offset + 6 <= value.length; offset += 6) {
    peers.push(`${value.subarray(offset, offset + 4).join('.')}:${(value[offset + 4]! << 8) | value[offset + 5]!}`);
  }
  return peers;
}

function image(infoHash: string, state = Image_State.STATE_AVAILABLE): Image {
  return Image.fromPartial({ name: 'images/x', state, torrent: { infoHash, pieceLengthBytes: '16384', totalBytes: '1048576', pieceCount: 64 } });
}

async function waitFor(what: string, predicate: () => Promise<boolean> | boolean, timeoutMs: number, stepMs = 25): Promise<number> {
  const start = Date.now();
  while (!(await predicate())) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, stepMs));
  }
  return Date.now() - start;
}

describe('distribution tracker', () => {
  const resources = new Resources();
  let connection: Nats;
  let images: KvStore<Image>;
  let tracker: Tracker;
  let directory: string;
  const known = randomBytes(20).toString('hex');
  const failed = randomBytes(20).toString('hex');

  before(async () => {
    directory = await resources.tempDir();
    const pki = await TestPki.create(directory);
    const nats = await startTestNats(resources, pki);
    connection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'distribution'), name: 'distribution', log });
    resources.defer(() => connection.close());
    images = await KvStore.open(connection.jetstream, 'images', protoCodec(Image));
    // Present before the tracker starts: reaches the filter through the snapshot.
    await images.create('known', image(known));
    await images.create('failed', image(failed, Image_State.STATE_FAILED));
    tracker = await startTracker({ address: '127.0.0.1:0', images, log, intervalSeconds: 5 });
    resources.defer(() => tracker.stop());
  });
  after(() => resources.release());

  it('answers a published info-hash with the interval and the peers that announced', async () => {
    const first = await announce(tracker.port, known, { id: '-CH0001-first', port: 6881, event: 'started' });
    assert.equal(first['failure reason'], undefined);
    assert.equal(first['interval'], 5);
    const second = await announce(tracker.port, known, { id: '-CH0001-second', port: 6882, event: 'started' });
    assert.equal(second['interval'], 5);
    assert.equal(second['incomplete'], 2);
    assert.ok(compactPeers(second['peers']).includes('127.0.0.1:6881'), `peers: ${compactPeers(second['peers']).join(', ')}`);
    // A peer that stops leaves the lists.
    await announce(tracker.port, known, { id: '-CH0001-first', port: 6881, event: 'stopped' });
    const third = await announce(tracker.port, known, { id: '-CH0001-second', port: 6882 });
    assert.deepEqual(compactPeers(third['peers']), ['127.0.0.1:6882']);
  });

  it('shares announces between replicas over core NATS: a peer announced to one is handed out by the other', async () => {
    const relayA = natsTrackerRelay(connection.connection);
    const relayB = natsTrackerRelay(connection.connection);
    const replicaA = await startTracker({ address: '127.0.0.1:0', images, log, intervalSeconds: 5, relay: relayA });
    resources.defer(() => replicaA.stop());
    const replicaB = await startTracker({ address: '127.0.0.1:0', images, log, intervalSeconds: 5, relay: relayB });
    resources.defer(() => replicaB.stop());
    await connection.connection.flush();
    await announce(replicaA.port, known, { id: '-CH0001-relayA', port: 7001, event: 'started' });
    let peers: string[] = [];
    await waitFor(
      'the relayed peer at replica B',
      async () => {
        peers = compactPeers((await announce(replicaB.port, known, { id: '-CH0001-relayB', port: 7002, event: 'started' }))['peers']);
        return peers.includes('127.0.0.1:7001');
      },
      5_000,
      100,
    );
    // And back: replica A hands out the peer that announced to B, once B's relay reaches it (core NATS is
    // asynchronous: B answered its announcer before A heard of it).
    let fromA: string[] = [];
    await waitFor(
      'the relayed peer at replica A',
      async () => {
        fromA = compactPeers((await announce(replicaA.port, known, { id: '-CH0001-relayA', port: 7001 }))['peers']);
        return fromA.includes('127.0.0.1:7002');
      },
      5_000,
      100,
    );
    // A replica that does not publish an info-hash drops relayed announces for it like any other.
    const unknown = randomBytes(20).toString('hex');
    relayA.publish({ infoHash: unknown, peerId: randomBytes(20).toString('hex'), ip: '127.0.0.1', port: 7003, left: 0, event: 'started' });
    await connection.connection.flush();
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(replicaB.stats().swarms, 1, 'no swarm was created for an unpublished info-hash');
  });

  it('refuses an unknown info-hash and a FAILED image with a bencoded failure reason', async () => {
    const unknown = await announce(tracker.port, randomBytes(20).toString('hex'), { id: '-CH0001-stranger', port: 6883, event: 'started' });
    assert.match(text(unknown['failure reason']), /not published/);
    assert.equal(unknown['peers'], undefined);
    const notPublished = await announce(tracker.port, failed, { id: '-CH0001-stranger', port: 6883, event: 'started' });
    assert.match(text(notPublished['failure reason']), /not published/);
    assert.equal(tracker.stats().refused, 2);
  });

  it('follows the catalog: accepts an image put after the start, stops accepting a deleted one within a second', async () => {
    const later = randomBytes(20).toString('hex');
    await images.create('later', image(later, Image_State.STATE_PUBLISHING));
    await waitFor(
      'the new image to be accepted',
      async () => (await announce(tracker.port, later, { id: '-CH0001-later', port: 6884 }))['failure reason'] === undefined,
      1_000,
    );

    const entry = await images.get('known');
    await images.delete('known', entry!.revision);
    const elapsed = await waitFor(
      'the deleted image to be refused',
      async () => (await announce(tracker.port, known, { id: '-CH0001-second', port: 6882 }))['failure reason'] !== undefined,
      1_000,
    );
    assert.ok(elapsed < 1_000);
    const stats = tracker.stats();
    assert.equal(stats.publishedInfoHashes, 1);
    assert.equal(stats.swarms, 1, "the deleted image's swarm is dropped");
  });

  it('lets a webtorrent client download from a webtorrent seeder through the tracker', { timeout: 60_000 }, async () => {
    const WebTorrent = await load<WebTorrentConstructor>('webtorrent');
    const createTorrent = await load<CreateTorrent>('create-torrent');
    const parseTorrent = await load<ParseTorrent>('parse-torrent');
    const seedDirectory = join(directory, 'seed');
    const leechDirectory = join(directory, 'leech');
    await mkdir(seedDirectory, { recursive: true });
    await mkdir(leechDirectory, { recursive: true });
    const content = randomBytes(3 * 1024 * 1024 + 12_345);
    const file = join(seedDirectory, 'disk.raw');
    await writeFile(file, content);

    const url = tracker.announceUrl('127.0.0.1');
    const torrentFile = await new Promise<Uint8Array>((resolve, reject) =>
      createTorrent(file, { announceList: [[url]], private: true, createdBy: 'cowherd test', creationDate: 0 }, (error, torrent) =>
        error ? reject(error) : resolve(torrent),
      ),
    );
    const { infoHash } = await parseTorrent(torrentFile);
    await images.create('webtorrent', image(infoHash));
    await waitFor(
      'the torrent to be accepted',
      async () => (await announce(tracker.port, infoHash, { id: '-CH0001-probe', port: 6885, event: 'stopped' }))['failure reason'] === undefined,
      1_000,
    );

    // uTP off: utp-native's sockets (native handles) keep the process alive ~30 s after destroy.
    const options = { dht: false, lsd: false, natUpnp: false, natPmp: false, utp: false };
    const seeder = new WebTorrent(options);
    const leecher = new WebTorrent(options);
    resources.defer(() => new Promise<void>((resolve) => seeder.destroy(() => resolve())));
    resources.defer(() => new Promise<void>((resolve) => leecher.destroy(() => resolve())));
    const errors: Error[] = [];
    seeder.on('error', (error) => errors.push(error));
    leecher.on('error', (error) => errors.push(error));
    const warnings: string[] = [];

    const announcesBefore = tracker.stats().announces;
    const seeding = seeder.add(torrentFile, { path: seedDirectory });
    seeding.on('warning', (error) => warnings.push(`seeder: ${error.message}`));
    await waitFor('the seeder to verify its copy', () => seeding.done, 20_000);
    // The seeder has announced (the probe above left the swarm, so any peer is the seeder).
    await waitFor('the seeder to announce', () => tracker.stats().peers >= 1 && tracker.stats().announces > announcesBefore, 20_000);

    const leeching = leecher.add(torrentFile, { path: leechDirectory });
    leeching.on('warning', (error) => warnings.push(`leecher: ${error.message}`));
    await waitFor('the download', () => leeching.done, 40_000, 50);
    assert.deepEqual(errors, []);
    assert.deepEqual(
      warnings.filter((warning) => /not published|failure/i.test(warning)),
      [],
    );

    const downloaded = await readFile(join(leechDirectory, 'disk.raw'));
    assert.equal(createHash('sha256').update(downloaded).digest('hex'), createHash('sha256').update(content).digest('hex'));
    assert.ok(tracker.stats().completed >= 1, JSON.stringify(tracker.stats()));
  });
});
