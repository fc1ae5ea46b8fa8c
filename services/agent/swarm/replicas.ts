/**
 * Image replicas on this host: `<image dir>/images/<image>/`. Removing one is refused while any domain on
 * the host was cloned from it (its disks are the clones' bases), whatever inventory believes.
 */
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../../common/platform/errors.js';
import type { Logger } from '../../common/platform/logger.js';
import { HOST_IMAGE_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../common/domain/resource-names.js';
import { pathExists, removeTree, replicaDirectory, replicaGenerationDirectories } from '../image-directory/index.js';

/** The image id of this host's replica name `hosts/{host}/images/{image}`; INVALID_ARGUMENT (`name`) otherwise. */
export function replicaIdOf(host: string, name: string): string {
  const ids = HOST_IMAGE_NAME.parse(name);
  if (!ids || ids.host !== host) throw CowherdError.invalidArgument('name', `must be hosts/${host}/images/{image}`);
  return ids.image;
}

/**
 * Which domains on this host depend on a replica's files (the hypervisor room answers; the wiring passes
 * its answer in, so the swarm needs no libvirt).
 */
export interface ReplicaDependents {
  /** Names of the domains cloned from the image (their cowherd metadata names it), whatever files they use. */
  clonedFrom(imageId: string): Promise<string[]>;
  /**
   * Names of the domains whose disks chain to a file in one of `directories` (generation directories of the
   * replica); a disk whose chain cannot be read counts when the domain was cloned from the image.
   */
  backedBy(imageId: string, directories: readonly string[]): Promise<string[]>;
}

/** Removes the replica `hosts/{host}/images/{image}` of this host; a missing one is success. */
export async function deleteLocalReplica(
  options: {
    host: string;
    imageDirectory: string;
    dependents: ReplicaDependents;
    log: Logger;
    /** Stops the swarm's use of the replica around the removal (ImageTransfers.release). */
    release?: (id: string, removeFiles: () => Promise<void>) => Promise<void>;
  },
  name: string,
): Promise<void> {
  const id = replicaIdOf(options.host, name);
  const image = IMAGE_NAME.format({ image: id });
  // Cloned from the image (metadata), or chained to any generation's files (a clone of such a clone).
  const dependents = new Set(await options.dependents.clonedFrom(id));
  for (const user of await options.dependents.backedBy(id, await replicaGenerationDirectories(options.imageDirectory, id))) dependents.add(user);
  if (dependents.size > 0) {
    throw CowherdError.failedPrecondition(`${dependents.size} domains on this host use ${image} as a base`, ErrorReason.ERROR_REASON_IMAGE_IN_USE, {
      dependents: [...dependents]
        .slice(0, 50)
        .map((domain) => VIRTUAL_MACHINE_NAME.format({ host: options.host, virtualMachine: domain }))
        .join(','),
    });
  }
  const directory = replicaDirectory(options.imageDirectory, id);
  // Replicas are read-only on disk (immutable): removeTree makes the directory writable first.
  const removeFiles = async (): Promise<void> => {
    if (await pathExists(directory)) await removeTree(directory);
  };
  if (options.release) await options.release(id, removeFiles);
  else await removeFiles();
  options.log.info({ replica: name }, 'replica removed');
}
