/**
 * Image replicas on this host: `<image dir>/images/<image>/`. Removing one is refused while any domain on
 * the host was cloned from it (its disks are the clones' bases), whatever inventory believes.
 */
import { join } from 'node:path';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../common/errors.js';
import type { Logger } from '../common/logger.js';
import { IMAGE_ID } from '../common/resource-names.js';
import { pathExists, removeTree } from './file-tree.js';
import type { Libvirt } from './libvirt.js';

/** The image id of this host's replica name `hosts/{host}/images/{image}`; INVALID_ARGUMENT (`name`) otherwise. */
export function replicaIdOf(host: string, name: string): string {
  const match = /^hosts\/([^/]+)\/images\/([^/]+)$/.exec(name);
  if (!match || match[1] !== host || !IMAGE_ID.test(match[2]!)) throw CowherdError.invalidArgument('name', `must be hosts/${host}/images/{image}`);
  return match[2]!;
}

/** Removes the replica `hosts/{host}/images/{image}` of this host; a missing one is success. */
export async function deleteLocalReplica(
  options: {
    host: string;
    imageDirectory: string;
    libvirt: Libvirt;
    log: Logger;
    /** Stops the swarm's use of the replica around the removal (ImageTransfers.release). */
    release?: (id: string, removeFiles: () => Promise<void>) => Promise<void>;
  },
  name: string,
): Promise<void> {
  const id = replicaIdOf(options.host, name);
  const image = `images/${id}`;
  const dependents = (await options.libvirt.listDomains()).filter((domain) => domain.clone && 'image' in domain.clone.source && domain.clone.source.image === image);
  if (dependents.length > 0) {
    throw CowherdError.failedPrecondition(`${dependents.length} domains on this host were cloned from ${image}`, ErrorReason.ERROR_REASON_IMAGE_IN_USE, {
      dependents: dependents.slice(0, 50).map((domain) => `hosts/${options.host}/virtualMachines/${domain.name}`).join(','),
    });
  }
  const directory = join(options.imageDirectory, 'images', id);
  // Replicas are read-only on disk (immutable): removeTree makes the directory writable first.
  const removeFiles = async (): Promise<void> => {
    if (await pathExists(directory)) await removeTree(directory);
  };
  if (options.release) await options.release(id, removeFiles);
  else await removeFiles();
  options.log.info({ replica: name }, 'replica removed');
}
