/**
 * Attaching a clone's persistent data disk (CreateClonesRequest.data_disk_bytes) to its rendered domain XML:
 * a writable disk on the system disk's bus at the first free target of that bus (`vdb` next to `vda`, `sdb`
 * next to `sda`, `xvdb` next to `xvda`), with the driver the clone's children use (qcow2 on KVM; a dynamic
 * VHD through blktap on Xen), recorded as persistent in the `<cowherd:clone>` record so that a rebase keeps
 * it and the reporter marks it. Attached before the seed disk, so the data disk takes the next letter.
 */
import path from 'node:path';
import { updateCloneMetadata } from './clone-metadata.js';
import type { HypervisorKind } from './clone-rendering.js';
import { DomainXmlError } from './errors.js';
import { assertInsideDirectory } from './safe-paths.js';
import { buildDocument, diskDevices, firstChild, newElement, parseDomainDocument, type XmlElement } from './xml-tree.js';

/** Where the data disk was attached. */
export interface DataDiskAttachment {
  readonly xml: string;
  /** The `<target dev>` given to the data disk. */
  readonly target: string;
}

const LETTERS = 'abcdefghijklmnopqrstuvwxyz';
const PREFIX_OF_BUS: Readonly<Record<string, string>> = { virtio: 'vd', sata: 'sd', scsi: 'sd', usb: 'sd', ide: 'hd', xen: 'xvd' };

/**
 * Adds the data disk `diskPath` (inside `cloneDirectory`) to a clone's rendered XML on the system disk's bus
 * and records its target as persistent. Throws DomainXmlError when that bus has no free target.
 */
export async function attachDataDisk(
  xml: string,
  options: { readonly diskPath: string; readonly cloneDirectory: string; readonly hypervisor: HypervisorKind },
): Promise<DataDiskAttachment> {
  const diskPath = await assertInsideDirectory(path.resolve(options.cloneDirectory), options.diskPath, 'data_disk_path');
  const parsed = parseDomainDocument(xml);
  const { devices, disks, usedTargets: used } = diskDevices(parsed.domain);
  const system = disks.find((disk) => (disk.attributes.get('device') ?? 'disk') === 'disk');
  const bus = options.hypervisor === 'xen' ? 'xen' : system ? busOf(system) : 'virtio';
  const prefix = PREFIX_OF_BUS[bus] ?? 'sd';
  // IDE has four places (hda-hdd).
  const letters = bus === 'ide' ? LETTERS.slice(0, 4) : LETTERS;
  const free = [...letters].map((letter) => `${prefix}${letter}`).find((name) => !used.has(name));
  if (free === undefined) throw DomainXmlError.invalidField('data_disk_bytes', `the template leaves no free ${bus} device for the data disk`);
  const driver = options.hypervisor === 'xen' ? { name: 'tap', type: 'vhd' } : { name: 'qemu', type: 'qcow2' };
  const disk = newElement('disk', { type: 'file', device: 'disk' }, [
    newElement('driver', driver),
    newElement('source', { file: diskPath }),
    newElement('target', { dev: free, bus }),
  ]);
  // After the last disk, so the template's boot order (first disk first) is untouched.
  const last = disks.at(-1);
  devices.children.splice(last ? devices.children.indexOf(last) + 1 : 0, 0, disk);
  return { xml: updateCloneMetadata(buildDocument(parsed), { persistentDisks: [free] }), target: free };
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
