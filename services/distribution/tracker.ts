/// <reference path="./tracker.d.ts" />
/**
 * The private BitTorrent tracker embedded in every distribution replica: bittorrent-tracker's Server,
 * HTTP announce only (no UDP, no WebSocket, no /stats page, no scrape), behind a filter that accepts only
 * the info-hashes of images the catalog (`images` KV bucket) holds as PUBLISHING or AVAILABLE with a torrent.
 * The filter is an in-memory copy of the catalog kept by a KV watch, so every replica accepts the same hashes.
 *
 * High availability. The tracker has two kinds of state:
 * - which info-hashes are allowed: derived from the `images` bucket, the same on every replica within a
 *   watch round trip (an image deleted or marked DELETING is refused everywhere in well under a second);
 * - the peer lists: soft state in the memory of the replica that received the announces, shared with nobody.
 * Replicas share their announces over core NATS (`relay`, subject `cowherd.tracker.announces`: no
 * JetStream, nothing stored): every accepted announce a replica receives over HTTP is relayed to the others,
 * which add the peer to their own lists. So any replica can answer any announce with the whole swarm, an
 * announce URL behind a load-balanced Service works, and when the replica that handed out the URL dies the
 * others still know every peer (clients re-announce within one interval; an `update` from an unknown peer
 * counts as a `started`). Without a relay (tests, one replica) each replica knows only its own announces.
 * Relayed announces pass the same filter (a replica that no longer publishes the info-hash drops them).
 *
 * Peer addresses are the TCP source of the announce (`trustProxy` is off: an X-Forwarded-For header from
 * anyone would let any client register any address). A Service in front must keep source addresses
 * (`externalTrafficPolicy: Local` or host networking); SNAT would hand out the node's address as the peer.
 *
 * Logging: nothing per announce at info. Refused and malformed announces are logged at debug with the
 * info-hash and the peer's address (host addresses of the fleet, useful to find a misconfigured agent);
 * counters are in `stats()`.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { NatsConnection } from '@nats-io/transport-node';
import type { AddressInfo } from 'node:net';
import TrackerServer from 'bittorrent-tracker/server';
import type { Logger } from '../common/platform/logger.js';
import type { Change, KvStore } from '../common/platform/kv.js';
import { Image_State, type Image } from '../gen/cowherd/inventory/v1/resources.js';

/** Options of {@link startTracker}. */
export interface TrackerOptions {
  /** host:port to listen on (`0.0.0.0:6969`, `[::]:6969`); port 0 picks a free port. */
  readonly address: string;
  /** The catalog bucket. */
  readonly images: KvStore<Image>;
  readonly log: Logger;
  /**
   * The announce interval told to clients, in seconds. Default 30: a datacenter swarm should form in
   * seconds, and an announce is one small HTTP request. Peers that miss three intervals drop out of the lists.
   */
  readonly intervalSeconds?: number;
  /**
   * Peers kept per swarm and returned per announce (default 2000): clients get the whole swarm, whatever
   * numwant they ask for (webtorrent asks for 50). Beyond it the least recently announced peer is dropped.
   */
  readonly maxPeersPerSwarm?: number;
  /** Shares announces with the other replicas (core NATS in the service); unset: this replica alone. */
  readonly relay?: TrackerRelay;
}

/** An announce as replicas share it. */
export interface RelayedAnnounce {
  /** Hex info-hash and peer id. */
  readonly infoHash: string;
  readonly peerId: string;
  readonly ip: string;
  readonly port: number;
  readonly left: number;
  readonly event: string;
}

/** How replicas share announces. */
export interface TrackerRelay {
  publish(announce: RelayedAnnounce): void;
  /** Calls `onAnnounce` for announces other replicas published; returns the unsubscribe. */
  subscribe(onAnnounce: (announce: RelayedAnnounce) => void): () => void;
}

/** Counters since the start. */
export interface TrackerStats {
  /** Announces for published info-hashes (answered with peers). */
  readonly announces: number;
  /** Announces refused because the info-hash is not published. */
  readonly refused: number;
  /** Requests the library could not parse (bad info_hash, peer_id, port, event). */
  readonly invalid: number;
  /** `completed` events: a peer finished downloading. */
  readonly completed: number;
  /** Info-hashes the filter accepts now. */
  readonly publishedInfoHashes: number;
  /** Swarms with state in memory. */
  readonly swarms: number;
  /** Peers in those swarms, as of their last announces. */
  readonly peers: number;
}

/** A running tracker. */
export interface Tracker {
  /** The port it listens on. */
  readonly port: number;
  /** The URL clients announce to, `http://<hostname>:<port>/announce`, for the torrent's announce list. */
  announceUrl(hostname: string): string;
  stats(): TrackerStats;
  /** Stops watching the catalog and closes the listener and its connections. */
  stop(): Promise<void>;
}

/** The info-hash the tracker should accept for an image, or undefined. */
export function publishedInfoHash(image: Image | undefined): string | undefined {
  if (image === undefined) return undefined;
  if (image.state !== Image_State.STATE_PUBLISHING && image.state !== Image_State.STATE_AVAILABLE) return undefined;
  const infoHash = image.torrent?.infoHash.toLowerCase() ?? '';
  return /^[0-9a-f]{40}$/.test(infoHash) ? infoHash : undefined;
}

/** What one catalog change did to the accepted set. */
export interface FilterChange {
  readonly accepted: readonly string[];
  readonly withdrawn: readonly string[];
}

/**
 * The accepted info-hashes, built from catalog changes (watch) and snapshots (list) in any order: each key
 * keeps the revision last applied, deletions included, so an older value never overwrites a newer one.
 */
export class PublishedInfoHashes {
  private readonly byKey = new Map<string, { readonly infoHash: string | undefined; readonly revision: number }>();
  /** Keys per accepted info-hash (two image records could name the same torrent). */
  private readonly keyCounts = new Map<string, number>();

  /** Applies one change or listed value; returns the info-hashes it accepted and withdrew. */
  apply(change: Change<Image>): FilterChange {
    const previous = this.byKey.get(change.key);
    if (previous !== undefined && previous.revision >= change.revision) return { accepted: [], withdrawn: [] };
    const infoHash = publishedInfoHash(change.value);
    this.byKey.set(change.key, { infoHash, revision: change.revision });
    if (previous?.infoHash === infoHash) return { accepted: [], withdrawn: [] };
    const accepted: string[] = [];
    const withdrawn: string[] = [];
    if (previous?.infoHash !== undefined) {
      const count = (this.keyCounts.get(previous.infoHash) ?? 1) - 1;
      if (count > 0) this.keyCounts.set(previous.infoHash, count);
      else {
        this.keyCounts.delete(previous.infoHash);
        withdrawn.push(previous.infoHash);
      }
    }
    if (infoHash !== undefined) {
      const count = this.keyCounts.get(infoHash) ?? 0;
      this.keyCounts.set(infoHash, count + 1);
      if (count === 0) accepted.push(infoHash);
    }
    return { accepted, withdrawn };
  }

  /** True when announces for `infoHash` (hex, any case) are accepted. */
  accepts(infoHash: string): boolean {
    return this.keyCounts.has(infoHash.toLowerCase());
  }

  /** How many info-hashes are accepted. */
  get size(): number {
    return this.keyCounts.size;
  }
}

/** The error that refuses an announce; its message is the bencoded failure reason. */
class RefusedAnnounce extends Error {
  constructor() {
    super('info_hash is not published by this tracker');
  }
}

/**
 * Starts the tracker: reads the catalog (watch first, then a snapshot, so no change falls in between),
 * then listens. Rejects if the catalog cannot be read or the address is taken.
 */
export async function startTracker(options: TrackerOptions): Promise<Tracker> {
  const intervalSeconds = options.intervalSeconds ?? 30;
  if (!Number.isInteger(intervalSeconds) || intervalSeconds < 1) throw new Error(`intervalSeconds must be a positive integer, got ${intervalSeconds}`);
  const maxPeers = options.maxPeersPerSwarm ?? 2000;
  if (!Number.isInteger(maxPeers) || maxPeers < 1) throw new Error(`maxPeersPerSwarm must be a positive integer, got ${maxPeers}`);
  const { host, port } = parseAddress(options.address);
  const log = options.log.child({ component: 'tracker' });

  const catalog = new PublishedInfoHashes();
  const counters = { announces: 0, refused: 0, invalid: 0, completed: 0 };
  const tracker = new TrackerServer({
    http: false,
    udp: false,
    ws: false,
    stats: false,
    interval: intervalSeconds * 1000,
    peersCacheLength: maxPeers,
    // Expiry is lazy (checked when a list is built): a peer silent for three intervals is not handed out.
    peersCacheTtl: 3 * intervalSeconds * 1000,
    filter: (infoHash, params, callback) => {
      if (catalog.accepts(infoHash)) {
        // The library caps numwant at 82 (default 50); a datacenter swarm wants everyone.
        params.numwant = params.event === 'stopped' ? 0 : maxPeers;
        if (params.relayed !== true) {
          counters.announces++;
          const peer = { infoHash, peerId: params.peer_id, ip: params.ip, port: params.port, left: Number(params.left ?? 0), event: params.event ?? 'update' };
          if (peer.peerId && peer.ip && Number.isInteger(peer.port)) options.relay?.publish(peer);
        }
        callback(null);
        return;
      }
      counters.refused++;
      // A swarm created just before its image was withdrawn goes here at the latest.
      delete tracker.torrents[infoHash];
      log.debug({ infoHash, peer: params.addr }, 'refused an announce for an info-hash that is not published');
      callback(new RefusedAnnounce());
    },
  });
  tracker.on('warning', (error: Error) => {
    if (error instanceof RefusedAnnounce) return;
    counters.invalid++;
    log.debug({ reason: error.message }, 'invalid tracker request');
  });
  tracker.on('error', (error: Error) => log.warn({ err: error }, 'tracker error'));
  tracker.on('complete', (addr: string, params: { info_hash?: string }) => {
    counters.completed++;
    log.debug({ infoHash: params.info_hash, peer: addr }, 'peer completed');
  });

  const onChange = (change: Change<Image>): void => {
    const { accepted, withdrawn } = catalog.apply(change);
    for (const infoHash of accepted) log.debug({ infoHash, image: change.key }, 'tracking info-hash');
    for (const infoHash of withdrawn) {
      delete tracker.torrents[infoHash];
      log.debug({ infoHash, image: change.key }, 'no longer tracking info-hash');
    }
  };
  const stopWatching = await options.images.watch('>', onChange);
  // Announces other replicas received: into this replica's lists, through the same filter.
  const stopRelay = options.relay?.subscribe((peer) => {
    const params = {
      type: 'http',
      action: 1,
      relayed: true,
      info_hash: peer.infoHash,
      peer_id: peer.peerId,
      ip: peer.ip,
      port: peer.port,
      addr: `${peer.ip}:${peer.port}`,
      left: peer.left,
      event: peer.event,
      numwant: 0,
      compact: 1,
    };
    (tracker as unknown as { _onAnnounce(params: object, callback: (error?: Error | null) => void): void })._onAnnounce(params, () => undefined);
  });
  const server = createServer({ requestTimeout: 10_000, headersTimeout: 5_000 }, (request, response) => route(request, response));
  try {
    for (const entry of await options.images.list()) onChange(entry);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (error) {
    stopWatching();
    stopRelay?.();
    tracker.close();
    throw error;
  }
  server.on('error', (error) => log.warn({ err: error }, 'tracker listener error'));
  const boundPort = (server.address() as AddressInfo).port;
  log.info({ address: `${host.includes(':') ? `[${host}]` : host}:${boundPort}`, intervalSeconds, publishedInfoHashes: catalog.size }, 'tracker listening');

  function route(request: IncomingMessage, response: ServerResponse): void {
    const path = (request.url ?? '').split('?', 1)[0];
    if (path === '/announce') {
      if (request.method !== 'GET') return plain(response, 405, 'method not allowed\n');
      tracker.onHttpRequest(request, response, { action: 'announce' });
      return;
    }
    // Scrape is not served: the library does not filter it and answers an empty query with every swarm.
    if (path === '/scrape') {
      response.setHeader('Content-Type', 'text/plain');
      response.end(bencodedFailure('scrape is not supported by this tracker'));
      return;
    }
    plain(response, 404, 'not found\n');
  }

  let stopped: Promise<void> | undefined;
  return {
    port: boundPort,
    announceUrl: (hostname) => `http://${hostname.includes(':') && !hostname.startsWith('[') ? `[${hostname}]` : hostname}:${boundPort}/announce`,
    stats: () => {
      const swarms = Object.values(tracker.torrents);
      return {
        ...counters,
        publishedInfoHashes: catalog.size,
        swarms: swarms.length,
        peers: swarms.reduce((sum, swarm) => sum + swarm.complete + swarm.incomplete, 0),
      };
    },
    stop: () => {
      stopped ??= (async () => {
        stopWatching();
        stopRelay?.();
        tracker.close();
        await new Promise<void>((resolve) => {
          server.close(() => resolve());
          server.closeAllConnections();
        });
        log.info('tracker stopped');
      })();
      return stopped;
    },
  };
}

function plain(response: ServerResponse, status: number, body: string): void {
  response.statusCode = status;
  response.setHeader('Content-Type', 'text/plain');
  response.end(body);
}

/** `d14:failure reason<n>:<reason>e`, what BitTorrent clients read as a refusal. */
function bencodedFailure(reason: string): Buffer {
  const bytes = Buffer.from(reason, 'utf8');
  return Buffer.concat([Buffer.from(`d14:failure reason${bytes.length}:`), bytes, Buffer.from('e')]);
}

function parseAddress(address: string): { host: string; port: number } {
  const match = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(address);
  if (!match || Number(match[2]) > 65535) throw new Error(`tracker address must be host:port, got ${JSON.stringify(address)}`);
  return { host: match[1]!.replace(/^\[(.*)\]$/, '$1'), port: Number(match[2]) };
}

/** The subject replicas share announces on (core NATS; only services may publish there). */
export const TRACKER_RELAY_SUBJECT = 'cowherd.tracker.announces';

/** A {@link TrackerRelay} over core NATS: fire and forget, this replica's own messages ignored. */
export function natsTrackerRelay(connection: NatsConnection): TrackerRelay {
  const self = randomUUID();
  return {
    publish: (announce) => connection.publish(TRACKER_RELAY_SUBJECT, JSON.stringify({ ...announce, from: self })),
    subscribe: (onAnnounce) => {
      const subscription = connection.subscribe(TRACKER_RELAY_SUBJECT, {
        callback: (error, message) => {
          if (error) return;
          let data: RelayedAnnounce & { from?: string };
          try {
            data = JSON.parse(message.string()) as RelayedAnnounce & { from?: string };
          } catch {
            return;
          }
          if (data.from === self) return;
          if (
            !/^[0-9a-f]{40}$/.test(data.infoHash) ||
            !/^[0-9a-f]{40}$/.test(data.peerId) ||
            typeof data.ip !== 'string' ||
            !Number.isInteger(data.port) ||
            data.port < 1 ||
            data.port > 65535
          )
            return;
          onAnnounce({
            infoHash: data.infoHash,
            peerId: data.peerId,
            ip: data.ip,
            port: data.port,
            left: Number(data.left) || 0,
            event: typeof data.event === 'string' ? data.event : 'update',
          });
        },
      });
      return () => subscription.unsubscribe();
    },
  };
}
