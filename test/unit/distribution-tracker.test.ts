/**
 * The tracker's filter from a fake catalog: which images are accepted, catalog changes in any order,
 * and real HTTP announces against a tracker fed by a fake KvStore (no NATS).
 */
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { after, describe, it } from 'node:test';
import type { Change, KvStore, Versioned } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { PublishedInfoHashes, publishedInfoHash, startTracker, type Tracker } from '../../services/distribution/tracker.js';
import { Image, Image_State } from '../../services/gen/cowherd/inventory/v1/resources.js';

const log = createLogger({ service: 'test', level: 'silent' });
const HASH_A = 'aa'.repeat(20);
const HASH_B = 'bb'.repeat(20);

function image(state: Image_State, infoHash?: string): Image {
  return Image.fromPartial({ name: 'images/debian-12', state, ...(infoHash === undefined ? {} : { torrent: { infoHash } }) });
}

describe('publishedInfoHash', () => {
  it('is the info-hash of a PUBLISHING or AVAILABLE image with a torrent, lower-cased', () => {
    assert.equal(publishedInfoHash(image(Image_State.STATE_AVAILABLE, HASH_A)), HASH_A);
    assert.equal(publishedInfoHash(image(Image_State.STATE_PUBLISHING, HASH_A.toUpperCase())), HASH_A);
  });

  it('is undefined for other states, a missing torrent, a malformed hash or no image', () => {
    assert.equal(publishedInfoHash(image(Image_State.STATE_DELETING, HASH_A)), undefined);
    assert.equal(publishedInfoHash(image(Image_State.STATE_FAILED, HASH_A)), undefined);
    assert.equal(publishedInfoHash(image(Image_State.STATE_UNSPECIFIED, HASH_A)), undefined);
    assert.equal(publishedInfoHash(image(Image_State.STATE_PUBLISHING)), undefined);
    assert.equal(publishedInfoHash(image(Image_State.STATE_PUBLISHING, '')), undefined);
    assert.equal(publishedInfoHash(image(Image_State.STATE_AVAILABLE, 'zz'.repeat(20))), undefined);
    assert.equal(publishedInfoHash(image(Image_State.STATE_AVAILABLE, HASH_A.slice(2))), undefined);
    assert.equal(publishedInfoHash(undefined), undefined);
  });
});

describe('PublishedInfoHashes', () => {
  const change = (key: string, revision: number, value: Image | undefined): Change<Image> => ({ key, revision, value });

  it('follows an image through its life', () => {
    const filter = new PublishedInfoHashes();
    assert.deepEqual(filter.apply(change('debian-12', 1, image(Image_State.STATE_PUBLISHING))), { accepted: [], withdrawn: [] });
    assert.equal(filter.accepts(HASH_A), false);
    assert.deepEqual(filter.apply(change('debian-12', 2, image(Image_State.STATE_PUBLISHING, HASH_A))), { accepted: [HASH_A], withdrawn: [] });
    assert.equal(filter.accepts(HASH_A), true);
    assert.equal(filter.accepts(HASH_A.toUpperCase()), true);
    assert.deepEqual(filter.apply(change('debian-12', 3, image(Image_State.STATE_AVAILABLE, HASH_A))), { accepted: [], withdrawn: [] });
    assert.deepEqual(filter.apply(change('debian-12', 4, image(Image_State.STATE_DELETING, HASH_A))), { accepted: [], withdrawn: [HASH_A] });
    assert.equal(filter.accepts(HASH_A), false);
    assert.deepEqual(filter.apply(change('debian-12', 5, undefined)), { accepted: [], withdrawn: [] });
    assert.equal(filter.size, 0);
  });

  it('withdraws on deletion and on a new torrent for the same key', () => {
    const filter = new PublishedInfoHashes();
    filter.apply(change('debian-12', 1, image(Image_State.STATE_AVAILABLE, HASH_A)));
    assert.deepEqual(filter.apply(change('debian-12', 2, image(Image_State.STATE_AVAILABLE, HASH_B))), { accepted: [HASH_B], withdrawn: [HASH_A] });
    assert.deepEqual(filter.apply(change('debian-12', 3, undefined)), { accepted: [], withdrawn: [HASH_B] });
    assert.equal(filter.accepts(HASH_B), false);
  });

  it('ignores values older than what it applied, deletions included (snapshot after watch)', () => {
    const filter = new PublishedInfoHashes();
    // The watch saw the delete at revision 7; the snapshot, read a moment earlier, still had revision 6.
    filter.apply(change('debian-12', 7, undefined));
    assert.deepEqual(filter.apply(change('debian-12', 6, image(Image_State.STATE_AVAILABLE, HASH_A))), { accepted: [], withdrawn: [] });
    assert.equal(filter.accepts(HASH_A), false);
    // The same revision twice (watch and snapshot both) counts once.
    filter.apply(change('ubuntu', 8, image(Image_State.STATE_AVAILABLE, HASH_B)));
    filter.apply(change('ubuntu', 8, image(Image_State.STATE_AVAILABLE, HASH_B)));
    assert.deepEqual(filter.apply(change('ubuntu', 9, undefined)), { accepted: [], withdrawn: [HASH_B] });
  });

  it('keeps a hash two records share until both are gone', () => {
    const filter = new PublishedInfoHashes();
    assert.deepEqual(filter.apply(change('one', 1, image(Image_State.STATE_AVAILABLE, HASH_A))).accepted, [HASH_A]);
    assert.deepEqual(filter.apply(change('two', 2, image(Image_State.STATE_AVAILABLE, HASH_A))).accepted, []);
    assert.deepEqual(filter.apply(change('one', 3, undefined)).withdrawn, []);
    assert.equal(filter.accepts(HASH_A), true);
    assert.deepEqual(filter.apply(change('two', 4, image(Image_State.STATE_FAILED, HASH_A))).withdrawn, [HASH_A]);
  });
});

/** A KvStore<Image> with just what the tracker uses: list and watch. */
function fakeCatalog(initial: Array<Versioned<Image>>): { store: KvStore<Image>; emit(change: Change<Image>): void; watching(): boolean } {
  let listener: ((change: Change<Image>) => void) | undefined;
  const store = {
    list: async () => initial,
    watch: async (_filter: string, onChange: (change: Change<Image>) => void) => {
      listener = onChange;
      return () => void (listener = undefined);
    },
  };
  return { store: store as unknown as KvStore<Image>, emit: (change) => listener?.(change), watching: () => listener !== undefined };
}

/** The percent-encoding of raw bytes, as BitTorrent clients send info_hash and peer_id. */
function binaryParameter(bytes: Buffer): string {
  return [...bytes].map((byte) => `%${byte.toString(16).padStart(2, '0')}`).join('');
}

function peerId(n: number): Buffer {
  return Buffer.from(`-CH0001-${String(n).padStart(12, '0')}`);
}

async function get(port: number, path: string): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    request({ host: '127.0.0.1', port, path, method: 'GET' }, (response) => {
      const chunks: Buffer[] = [];
      response.on('data', (chunk: Buffer) => chunks.push(chunk));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body: Buffer.concat(chunks) }));
      response.on('error', reject);
    })
      .on('error', reject)
      .end();
  });
}

function announcePath(infoHash: string, peer: number, port: number, extra = ''): string {
  return `/announce?info_hash=${binaryParameter(Buffer.from(infoHash, 'hex'))}&peer_id=${binaryParameter(peerId(peer))}&port=${port}&uploaded=0&downloaded=0&left=100&compact=1${extra}`;
}

/** The length of the compact `peers` string in a bencoded announce answer (6 bytes a peer). */
function compactPeerCount(body: Buffer): number {
  const text = body.toString('latin1');
  const match = /5:peers(\d+):/.exec(text);
  assert.ok(match, `no peers in ${text}`);
  return Number(match[1]) / 6;
}

describe('startTracker with a fake catalog', () => {
  let tracker: Tracker | undefined;
  after(() => tracker?.stop());

  it('answers published hashes with the whole swarm, refuses the rest, serves nothing else', async () => {
    const catalog = fakeCatalog([{ key: 'debian-12', revision: 1, value: image(Image_State.STATE_AVAILABLE, HASH_A) }]);
    tracker = await startTracker({ address: '127.0.0.1:0', images: catalog.store, log, intervalSeconds: 7 });
    assert.equal(tracker.announceUrl('tracker.example'), `http://tracker.example:${tracker.port}/announce`);
    assert.equal(tracker.announceUrl('::1'), `http://[::1]:${tracker.port}/announce`);

    // 100 peers: more than the library's numwant cap (82) and webtorrent's default numwant (50).
    for (let peer = 0; peer < 100; peer++) {
      const answer = await get(tracker.port, announcePath(HASH_A, peer, 10_000 + peer, '&event=started&numwant=50'));
      assert.equal(answer.status, 200);
      assert.match(answer.body.toString('latin1'), /8:intervali7e/);
    }
    const last = await get(tracker.port, announcePath(HASH_A, 100, 10_100, '&numwant=50'));
    assert.equal(compactPeerCount(last.body), 101);

    const refused = await get(tracker.port, announcePath(HASH_B, 1, 10_001));
    assert.match(refused.body.toString('latin1'), /^d14:failure reason\d+:info_hash is not published/);

    const invalid = await get(tracker.port, '/announce?info_hash=short&peer_id=short&port=1');
    assert.match(invalid.body.toString('latin1'), /failure reason/);
    assert.match((await get(tracker.port, '/scrape')).body.toString('latin1'), /^d14:failure reason\d+:scrape is not supported/);
    assert.equal((await get(tracker.port, '/stats')).status, 404);
    assert.equal((await get(tracker.port, '/stats.json')).status, 404);
    assert.equal((await get(tracker.port, '/')).status, 404);

    assert.deepEqual(tracker.stats(), { announces: 101, refused: 1, invalid: 1, completed: 0, publishedInfoHashes: 1, swarms: 1, peers: 101 });

    // Withdrawn: the swarm goes, announces are refused.
    catalog.emit({ key: 'debian-12', revision: 2, value: image(Image_State.STATE_DELETING, HASH_A) });
    assert.match((await get(tracker.port, announcePath(HASH_A, 0, 10_000))).body.toString('latin1'), /failure reason/);
    assert.equal(tracker.stats().swarms, 0);
    assert.equal(tracker.stats().publishedInfoHashes, 0);

    await tracker.stop();
    assert.equal(catalog.watching(), false);
    await assert.rejects(get(tracker.port, '/announce'));
  });

  it('rejects a bad address or interval', async () => {
    const catalog = fakeCatalog([]);
    await assert.rejects(startTracker({ address: 'no-port', images: catalog.store, log }), /host:port/);
    await assert.rejects(startTracker({ address: '127.0.0.1:0', images: catalog.store, log, intervalSeconds: 0 }), /intervalSeconds/);
  });
});
