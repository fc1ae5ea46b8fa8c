/**
 * Which domains on this host depend on an image replica's files: cloned from it (their cowherd metadata
 * names it), or with a disk whose backing chain reaches a file of one of its generations. A reflink copy
 * (disk backend `reflink-copy`) is neither: its metadata says so and its disks have no backing chain, so a
 * replica can be deleted under it.
 */
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { parseStreamBackingUri } from '../image-directory/index.js';
import { virtualMachineId } from './domain-state.js';
import { cloneImageKey, dependsOnBase } from './domain-xml/clone-metadata.js';
import type { DomainInfo, Libvirt } from './libvirt.js';
import { readDiskHeader, type DiskHeader } from './overlays.js';

/** Dependents of an image's replica as the swarm asks for them (swarm/replicas.ts ReplicaDependents). */
export interface ImageDependents {
  clonedFrom(imageId: string): Promise<string[]>;
  backedBy(imageId: string, directories: readonly string[]): Promise<string[]>;
}

/** {@link domainsClonedFrom} and {@link domainsBackedBy} over the host's domains as libvirt lists them now. */
export function imageDependents(libvirt: Pick<Libvirt, 'listDomains'>): ImageDependents {
  return {
    clonedFrom: async (imageId) => domainsClonedFrom(await libvirt.listDomains(), imageId),
    backedBy: async (imageId, directories) => {
      const domains = await libvirt.listDomains();
      const users = new Set<string>();
      for (const directory of directories) for (const user of await domainsBackedBy(domains, directory, imageId)) users.add(user);
      return [...users];
    },
  };
}

/**
 * The `{virtualMachine}` ids of the domains whose cowherd metadata says they stand on the version with storage
 * key `imageId` (cloned from it, or rebased onto it); not reflink copies of it, which depend on it for nothing.
 */
export function domainsClonedFrom(domains: readonly DomainInfo[], imageId: string): string[] {
  return domains.filter((domain) => clonedFrom(domain, imageId)).map((domain) => virtualMachineId(domain));
}

function clonedFrom(domain: DomainInfo, imageId: string): boolean {
  return domain.clone !== undefined && dependsOnBase(domain.clone) && cloneImageKey(domain.clone) === imageId;
}

/**
 * The `{virtualMachine}` ids of the domains whose disks chain to a file in `directory` (a replica
 * generation's directory): each file disk's qcow2 backing chain is followed through the headers (a read of a few hundred bytes per
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
      if (chain === undefined) uses = clonedFrom(domain, image);
      else uses = [disk.sourcePath, ...chain].some((path) => dirname(resolve(path)) === target);
    }
    if (uses) users.push(virtualMachineId(domain));
  }
  return users;
}

/** The backing files of a qcow2 chain from its headers (absolute, nearest first); [] for a file that is not qcow2 (raw); undefined when unreadable or VHD. */
export async function backingChain(path: string): Promise<string[] | undefined> {
  const chain: string[] = [];
  let current = path;
  for (let depth = 0; depth < 16; depth += 1) {
    let header: DiskHeader;
    try {
      header = await readDiskHeader(current);
    } catch {
      return depth === 0 ? undefined : chain;
    }
    // A VHD child's parent is not followed here (the caller decides by metadata); raw ends a chain.
    if (header.format === 'vpc') return undefined;
    if (header.format === 'raw' || header.backing === undefined) return chain;
    // A streaming clone's base is its replica's file served over NBD: the chain ends at that file (where the
    // replica's bytes are, or will be once it is complete), so the replica counts its streaming clones.
    const streamed = parseStreamBackingUri(header.backing);
    if (streamed) {
      chain.push(streamed.replicaPath);
      return chain;
    }
    current = isAbsolute(header.backing) ? header.backing : join(dirname(current), header.backing);
    chain.push(current);
  }
  return chain;
}
