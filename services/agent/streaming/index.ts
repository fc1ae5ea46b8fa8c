/**
 * The streaming room: serving a replica that is still arriving to qemu as a block device (a read-only NBD
 * server on a unix socket, each read waiting for its range). It knows nothing of swarms, images or libvirt:
 * the agent's jobs give it `StreamedFile`s whose `whenAvailable` the swarm answers.
 */
export { MAX_REQUEST_BYTES, startNbdServer, type NbdRead, type NbdServer, type NbdServerOptions, type NbdStatistics, type StreamedFile } from './nbd-server.js';
