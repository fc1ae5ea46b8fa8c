/**
 * Attaching a clone's NoCloud seed image (seed-image.ts) to its rendered domain XML, read-only. Which device:
 *   - KVM, a template whose disks are virtio (or that has none): a read-only virtio disk at the first free
 *     `vdX`, the cheapest device for the guest and one needing no extra controller;
 *   - KVM, a template whose disks are SATA, IDE or SCSI: a CD-ROM on that bus at the first free name, as
 *     Proxmox attaches its cloud-init drive, so guests without virtio drivers read it too;
 *   - Xen: a read-only `xvdX` disk with the qemu (qdisk) backend, which reads a raw file for PV and HVM
 *     guests alike (blktap's tapdisk reads only VHD). Untested here: no Xen host in the test fleet.
 * cloud-init finds the seed by its label, so the device name does not matter to it.
 */
import path from 'node:path';
import { DomainXmlError } from './errors.js';
import { assertInsideDirectory } from './safe-paths.js';
import type { HypervisorKind } from './clone-rendering.js';
import { buildDocument, diskDevices, elementChildren, firstChild, localName, newElement, parseDomainDocument, type XmlElement } from './xml-tree.js';

/** Where the seed was attached. */
export interface SeedAttachment {
  readonly xml: string;
  /** The `<target dev>` given to the seed. */
  readonly target: string;
}

const LETTERS = 'abcdefghijklmnopqrstuvwxyz';

/**
 * Adds the seed image `seedPath` (inside `cloneDirectory`) to a clone's rendered XML as a read-only device
 * on a free target. Throws DomainXmlError when no target of the chosen kind is free.
 */
export async function attachSeedImage(
  xml: string,
  options: { readonly seedPath: string; readonly cloneDirectory: string; readonly hypervisor: HypervisorKind; readonly digest?: string },
): Promise<SeedAttachment> {
  const seedPath = await assertInsideDirectory(path.resolve(options.cloneDirectory), options.seedPath, 'seed_path');
  const parsed = parseDomainDocument(xml);
  const { devices, disks, usedTargets: used } = diskDevices(parsed.domain);
  const buses = disks.map((disk) => busOf(disk));
  let device: 'disk' | 'cdrom';
  let bus: string;
  let prefix: string;
  if (options.hypervisor === 'xen') {
    [device, bus, prefix] = ['disk', 'xen', 'xvd'];
  } else if (buses.length === 0 || buses.includes('virtio')) {
    [device, bus, prefix] = ['disk', 'virtio', 'vd'];
  } else {
    bus = buses.find((candidate) => candidate === 'sata' || candidate === 'scsi' || candidate === 'ide') ?? 'sata';
    [device, prefix] = ['cdrom', bus === 'ide' ? 'hd' : 'sd'];
  }
  // IDE has four places (hda-hdd); the others take far more than any template uses.
  const letters = bus === 'ide' ? LETTERS.slice(0, 4) : LETTERS;
  const free = [...letters].map((letter) => `${prefix}${letter}`).find((name) => !used.has(name));
  if (free === undefined) throw DomainXmlError.invalidField('guest_configuration', `the template leaves no free ${bus} device for the seed disk`);
  const driver = newElement('driver', { name: 'qemu', type: 'raw' });
  const disk = newElement('disk', { type: 'file', device }, [
    driver,
    newElement('source', { file: seedPath }),
    newElement('target', { dev: free, bus }),
    newElement('readonly'),
  ]);
  // After the last disk, so the template's boot order (first disk first) is untouched.
  const last = disks.at(-1);
  devices.children.splice(last ? devices.children.indexOf(last) + 1 : 0, 0, disk);
  // The configuration's digest beside the lineage in `<cowherd:clone>`, so the reporter shows it in inventory.
  const metadata = firstChild(parsed.domain, 'metadata');
  const record = metadata ? elementChildren(metadata).find((child) => localName(child.name) === 'clone' && child.name.includes(':')) : undefined;
  if (record && options.digest !== undefined && options.digest !== '') {
    const prefix = record.name.slice(0, record.name.indexOf(':'));
    record.children.push(newElement(`${prefix}:guestConfigurationDigest`, {}, [{ kind: 'text', value: options.digest }]));
  }
  return { xml: buildDocument(parsed), target: free };
}

function busOf(disk: XmlElement): string {
  const target = firstChild(disk, 'target');
  const bus = target?.attributes.get('bus');
  if (bus) return bus;
  const dev = target?.attributes.get('dev') ?? '';
  if (dev.startsWith('vd')) return 'virtio';
  if (dev.startsWith('hd')) return 'ide';
  if (dev.startsWith('xvd')) return 'xen';
  return 'sata';
}
