/**
 * The swarm room: everything that moves image bytes between hosts (BitTorrent swarm, web seed, super-seeding,
 * peer guard, running digests, replica scrub) and this host's replicas as the swarm keeps them. It uses only
 * the image-directory room: what it must know of the host's domains (which depend on a replica) is passed
 * in as {@link ReplicaDependents} by the wiring.
 */
export { ImageTransfers, type ImageTransfersOptions } from './image-transfers.js';
export { deleteLocalReplica, type ReplicaDependents } from './replicas.js';
export type { SwarmLimits } from './swarm.js';
