/**
 * Image replicas on this host: `<image dir>/images/<image>/`. Removing one is refused while any domain on
 * the host was cloned from it (its disks are the clones' bases), whatever inventory believes.
 */
import { open, readdir } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../../common/platform/errors.js';
import type { Logger } from '../../common/platform/logger.js';
import { IMAGE_ID } from '../../common/domain/resource-names.js';
import { pathExists, removeTree } from '../image-directory/file-tree.js';
import type { DomainInfo, Libvirt } from '../hypervisor/libvirt.js';

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
  const domains = await options.libvirt.listDomains();
  // Cloned from the image (metadata), or chained to any generation's files (a clone of such a clone).
  const dependents = new Set(domains.filter((domain) => domain.clone && 'image' in domain.clone.source && domain.clone.source.image === image).map((domain) => domain.name));
  const generations = (await readdir(join(options.imageDirectory, 'images')).catch(() => [] as string[])).filter((entry) => entry === id || new RegExp(`^${id}\\.generation-[1-9][0-9]*$`).test(entry));
  for (const generation of generations) for (const user of await domainsBackedBy(domains, join(options.imageDirectory, 'images', generation), id)) dependents.add(user);
  if (dependents.size > 0) {
    throw CowherdError.failedPrecondition(`${dependents.size} domains on this host use ${image} as a base`, ErrorReason.ERROR_REASON_IMAGE_IN_USE, {
      dependents: [...dependents].slice(0, 50).map((domain) => `hosts/${options.host}/virtualMachines/${domain}`).join(','),
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

/**
 * The names of the domains whose disks chain to a file in `directory` (a replica generation's directory):
 * each file disk's qcow2 backing chain is followed through the headers (a read of a few hundred bytes per
 * file, no qemu-img process), up to 16 deep, so clones of clones count too. A disk whose chain cannot be
 * read this way (a VHD child, an unreadable file) counts when the domain's cowherd metadata names the image:
 * never rewrite a base by mistake.
 */
export async function domainsBackedBy(domains: readonly DomainInfo[], directory: string, image: string): Promise<string[]> {
  const target = resolve(directory);
  const users: string[] = [];
  for (const domain of domains) {
    let uses = false;
    for (const disk of domain.disks) {
      if (uses || disk.type !== 'file' || !disk.sourcePath) continue;
      const chain = await backingChain(disk.sourcePath);
      if (chain === undefined) uses = !!domain.clone && 'image' in domain.clone.source && domain.clone.source.image === `images/${image}`;
      else uses = [disk.sourcePath, ...chain].some((path) => dirname(resolve(path)) === target);
    }
    if (uses) users.push(domain.name);
  }
  return users;
}

/** The backing files of a qcow2 chain from its headers; [] for a file that is not qcow2 (raw); undefined when unreadable or VHD. */
async function backingChain(path: string): Promise<string[] | undefined> {
  const chain: string[] = [];
  let current = path;
  for (let depth = 0; depth < 16; depth += 1) {
    let handle;
    try {
      handle = await open(current, 'r');
    } catch {
      return depth === 0 ? undefined : chain;
    }
    try {
      const header = Buffer.alloc(20);
      const { bytesRead } = await handle.read(header, 0, 20, 0);
      if (bytesRead < 20 || header.readUInt32BE(0) !== 0x514649fb) {
        // Not qcow2: a VHD child's parent is not followed here (the caller decides by metadata); raw ends a chain.
        const footer = Buffer.alloc(8);
        await handle.read(footer, 0, 8, 0);
        return footer.toString('latin1') === 'conectix' ? undefined : chain;
      }
      const offset = Number(header.readBigUInt64BE(8));
      const size = header.readUInt32BE(16);
      if (offset === 0 || size === 0 || size > 4096) return chain;
      const name = Buffer.alloc(size);
      await handle.read(name, 0, size, offset);
      const backing = name.toString('utf8');
      current = isAbsolute(backing) ? backing : join(dirname(current), backing);
      chain.push(current);
    } finally {
      await handle.close();
    }
  }
  return chain;
}
