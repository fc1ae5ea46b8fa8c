/**
 * The part of bittorrent-tracker 11 (no typings of its own) that tracker.ts uses: the Server with
 * its HTTP request handler, filter and swarms.
 *
 * Pulled in by `/// <reference path="./tracker.d.ts" />` in tracker.ts: tsc drops a `foo.d.ts` that sits
 * next to a `foo.ts` from the `include` glob, so without the reference these declarations are ignored.
 */
declare module 'bittorrent-tracker/server' {
  import type { EventEmitter } from 'node:events';
  import type { IncomingMessage, ServerResponse } from 'node:http';

  /** The announce parameters after parsing; the filter may change `numwant`. */
  export interface AnnounceParams {
    /** 'http', 'udp' or 'ws'. */
    type: string;
    /** The info-hash, 40 lowercase hex characters. */
    info_hash: string;
    /** The peer id, 40 hex characters. */
    peer_id: string;
    /** 'started', 'stopped', 'completed', 'update' or 'paused' (missing for a plain update). */
    event?: string;
    numwant: number;
    ip: string;
    port: number;
    /** `ip:port`, the peer's key in its swarm. */
    addr: string;
    /** cowherd's own mark: the announce came from another replica (tracker relay), not over HTTP. */
    relayed?: boolean;
    left: number;
    compact: number;
  }

  export interface SwarmPeer {
    type: string;
    complete: boolean;
    peerId: string;
    ip: string;
    port: number;
  }

  export class Swarm {
    readonly infoHash: string;
    complete: number;
    incomplete: number;
    readonly peers: { readonly length: number; keys: string[] };
  }

  export interface ServerOptions {
    /** Announce interval told to clients, in milliseconds. */
    interval?: number;
    trustProxy?: boolean;
    http?: boolean | object;
    udp?: boolean | object;
    ws?: boolean | object;
    stats?: boolean;
    /** Calls back with an error to refuse the announce (its message becomes the failure reason). */
    filter?: (infoHash: string, params: AnnounceParams, callback: (error?: Error | null) => void) => void;
    /** Peers kept per swarm (LRU; default 1000). */
    peersCacheLength?: number;
    /** Milliseconds a peer stays in its swarm after its last announce (default 20 minutes). */
    peersCacheTtl?: number;
  }

  export default class Server extends EventEmitter {
    constructor(options?: ServerOptions);
    /** Swarms by hex info-hash. */
    torrents: Record<string, Swarm>;
    destroyed: boolean;
    /** Answers one HTTP tracker request (announce or scrape) with a bencoded body. */
    onHttpRequest(request: IncomingMessage, response: ServerResponse, options?: { trustProxy?: boolean; action?: 'announce' | 'scrape' }): void;
    close(callback?: (error?: Error | null) => void): void;
  }
}
