// Type declarations for the parts of the untyped BitTorrent packages cowherd uses (webtorrent 3.0.21,
// bittorrent-tracker 11, create-torrent 6). Only what services/agent/swarm/swarm.ts and its tests touch.

declare module 'webtorrent' {
  import { EventEmitter } from 'node:events';

  /** The chunk store contract webtorrent drives (abstract-chunk-store). */
  export interface ChunkStore {
    readonly chunkLength: number;
    put(index: number, buffer: Uint8Array, callback: (error: Error | null) => void): void;
    get(index: number, options: { offset?: number; length?: number } | null | undefined, callback: (error: Error | null, buffer?: Uint8Array) => void): void;
    close(callback: (error: Error | null) => void): void;
    destroy(callback: (error: Error | null) => void): void;
  }

  export interface ChunkStoreOptions {
    readonly files: ReadonlyArray<{ readonly path: string; readonly length: number; readonly offset: number }>;
    readonly length: number;
    readonly path: string;
    readonly name: string;
  }

  export type ChunkStoreConstructor = new (chunkLength: number, options: ChunkStoreOptions) => ChunkStore;

  export interface WebTorrentOptions {
    dht?: boolean | object;
    lsd?: boolean;
    utPex?: boolean;
    natUpnp?: boolean | 'permanent';
    natPmp?: boolean;
    webSeeds?: boolean;
    utp?: boolean;
    tracker?: false | object;
    torrentPort?: number;
    maxConns?: number;
    downloadLimit?: number;
    uploadLimit?: number;
    secure?: number;
    peerId?: string;
    seedOutgoingConnections?: boolean;
  }

  export interface TorrentOptions {
    announce?: string[];
    urlList?: string[];
    path?: string;
    private?: boolean;
    store?: ChunkStoreConstructor;
    storeCacheSlots?: number;
    skipVerify?: boolean;
    /** Pieces already on disk (a startup bitfield): only these are checked before the torrent is ready. */
    bitfield?: Uint8Array;
    strategy?: 'sequential' | 'rarest';
    maxWebConns?: number;
    noPeersIntervalTime?: number;
    destroyStoreOnDestroy?: boolean;
    alwaysChokeSeeders?: boolean;
    uploads?: number | false;
  }

  export interface Wire extends EventEmitter {
    readonly type: string;
    readonly remoteAddress?: string;
    readonly remotePort?: number;
    readonly downloaded: number;
    readonly uploaded: number;
    /** The pieces the peer announced (its bitfield and every `have` since). */
    readonly peerPieces: { get(index: number): boolean };
  }

  export interface Torrent extends EventEmitter {
    readonly infoHash: string;
    readonly name: string;
    readonly length: number;
    readonly pieceLength: number;
    /** Bytes of verified pieces plus bytes of pieces in progress. */
    readonly downloaded: number;
    /** Bytes received from peers and web seeds (wire level). */
    readonly received: number;
    readonly uploaded: number;
    readonly downloadSpeed: number;
    readonly uploadSpeed: number;
    readonly numPeers: number;
    readonly progress: number;
    readonly timeRemaining: number;
    readonly done: boolean;
    readonly ready: boolean;
    readonly destroyed: boolean;
    readonly wires: Wire[];
    readonly pieces: unknown[];
    /** Verified pieces (set once a piece's SHA-1 matched and the store wrote it). */
    readonly bitfield?: { get(index: number): boolean };
    /** The torrent's files: `path` is `<torrent name>/<file>`, `offset` its first byte in the torrent. */
    readonly files: ReadonlyArray<{ readonly path: string; readonly offset: number; readonly length: number }>;
    /**
     * Marks pieces start..end (inclusive) critical: their blocks may be requested again from a faster peer (hotswap).
     * It does not change which pieces are selected first (that is the selections' priority, `_select`).
     */
    critical(start: number, end: number): void;
    /**
     * Adds a selection (webtorrent's file streams use it): pieces of higher-priority selections are requested first,
     * rarest first within one. A stream selection is counted, not merged; completed ones are dropped by webtorrent.
     */
    _select(start: number, end: number, priority: number, notify: (() => void) | undefined, isStreamSelection: true): void;
    /** Selects pieces start..end (merged with other plain selections); the whole torrent is selected at priority 0 when it starts. */
    select(start: number, end: number, priority?: number): void;
    /** Removes start..end from the plain (not stream) selections. */
    deselect(start: number, end: number): void;
    /** Removes one stream selection of exactly start..end. */
    _deselect(start: number, end: number, isStreamSelection: true): void;
    /** torrent-discovery; `tracker` is the bittorrent-tracker client (null without trackers). */
    readonly discovery?: { readonly tracker?: { setInterval(intervalMs?: number): void; update(): void } | null } | null;
    destroy(options?: { destroyStore?: boolean }, callback?: (error?: Error | null) => void): void;
    addPeer(peer: string): boolean;
    addWebSeed(url: string): void;
  }

  export default class WebTorrent extends EventEmitter {
    constructor(options?: WebTorrentOptions);
    readonly torrents: Torrent[];
    readonly listening: boolean;
    readonly destroyed: boolean;
    readonly torrentPort: number;
    /** This client's peer id, hex. */
    readonly peerId: string;
    readonly downloadSpeed: number;
    readonly uploadSpeed: number;
    address(): { address: string; family: string; port: number } | null;
    add(torrentId: Uint8Array | string, options?: TorrentOptions, onTorrent?: (torrent: Torrent) => void): Torrent;
    remove(torrentId: Torrent | string, options?: { destroyStore?: boolean }, callback?: (error?: Error | null) => void): Promise<void>;
    /** Bytes per second; -1 disables the throttle. Returns false for an invalid rate. */
    throttleDownload(rate: number): false | undefined;
    throttleUpload(rate: number): false | undefined;
    destroy(callback?: (error?: Error | null) => void): void;
  }
}

declare module 'bittorrent-tracker' {
  import { EventEmitter } from 'node:events';

  export interface ServerOptions {
    http?: boolean | object;
    udp?: boolean;
    ws?: boolean;
    stats?: boolean;
    interval?: number;
    trustProxy?: boolean;
    /** Calls back with an error to refuse an announce for `infoHash` (hex). */
    filter?: (infoHash: string, params: Record<string, unknown>, callback: (error?: Error | null) => void) => void;
  }

  export class Server extends EventEmitter {
    constructor(options?: ServerOptions);
    readonly torrents: Record<string, { complete: number; incomplete: number; peers: { keys: string[] } }>;
    listen(port: number, hostname: string, onListening?: () => void): void;
    close(callback?: (error?: Error | null) => void): void;
    readonly http: import('node:http').Server | null;
  }

  const Client: unknown;
  export default Client;
}

declare module 'create-torrent' {
  export interface CreateTorrentOptions {
    name?: string;
    creationDate?: Date | number;
    createdBy?: string;
    private?: boolean | number;
    pieceLength?: number;
    announceList?: string[][];
    announce?: string | string[];
    urlList?: string[];
  }
  export default function createTorrent(
    input: string | string[] | Uint8Array,
    options: CreateTorrentOptions,
    callback: (error: Error | null, torrent: Uint8Array) => void,
  ): void;
  export const announceList: string[][];
}

/** The vendored torrent-piece (vendor/torrent-piece/CHANGES.md): only what the chunk store uses. */
declare module 'torrent-piece' {
  export default class Piece {
    /** Bytes per request/piece message. */
    static readonly BLOCK_LENGTH: number;
    /** Gives a flushed piece's buffer back for the next piece once nothing reads it; false if not taken. */
    static release(buffer: Uint8Array): boolean;
  }
}
