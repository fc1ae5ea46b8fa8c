/**
 * The streaming room: serving a replica that is still arriving to qemu as a block device. A read-only NBD
 * server on a unix socket (each read waiting for its range), run by the host's streaming server, a process of
 * its own that outlives the agent's restarts and checks every piece it serves against the torrent's SHA-1
 * hashes; and the agent's client of that server. It knows nothing of swarms, images or libvirt: the agent's jobs
 * describe the files (ExportSpec) and answer the server's wants from the swarm.
 */
export { MAX_REQUEST_BYTES, startNbdServer, type NbdRead, type NbdServer, type NbdServerOptions, type NbdStatistics, type StreamedFile } from './nbd-server.js';
export { PROFILE_WINDOW_MS, RECHECK_MS, runStreamServer, streamServerPaths, type ExportSpec, type RunningStreamServer } from './stream-server.js';
export { StreamServerClient, type StreamServerClientOptions, type StreamServerStatus } from './stream-client.js';
