/**
 * Clone rendering layer of domain XML: {@link renderClone} turns a template into one clone's definition
 * (fresh identity, every file inside the clone's own directory, cowherd's lineage in `<metadata>`). The
 * template is checked again by the safety layer as if a stranger wrote it.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import path from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CowherdError } from '../../../common/platform/errors.js';
import { VIRTUAL_MACHINE_ID } from '../../../common/domain/resource-names.js';
import { ErrorReason } from '../../../gen/cowherd/common/v1/error_reason.js';
import { CLONE_METADATA_NAMESPACE, CLONE_METADATA_PREFIX, cloneMetadataFields, type CloneMetadata } from './clone-metadata.js';
import { DomainXmlError } from './errors.js';
import { assertDirectoryOption, assertInsideDirectory, FILE_NAME_PATTERN, isInsideLexically, isPlainAbsolute } from './safe-paths.js';
import {
  BOOT_FILE_ELEMENTS,
  CHARACTER_DEVICES,
  checkDomainType,
  checkNamespaces,
  DEFAULT_FIRMWARE_DIRECTORIES,
  isRewrittenSite,
  refuseStrayHostPaths,
  refuseUnsafeDevices,
} from './safety.js';
import { removeIdentity } from './template.js';
import {
  buildDocument,
  elementChildren,
  firstChild,
  hasNamed,
  localName,
  newElement,
  parseDomainDocument,
  removeChildren,
  setText,
  textOf,
  type XmlElement,
} from './xml-tree.js';
import { diskBackendFor, type DiskDriver } from '../disk-backends.js';

/** The hypervisor a clone is rendered for. */
export type HypervisorKind = 'kvm' | 'xen';

/** One copy-on-write child made for a template disk. */
export interface CloneDiskOption {
  /** The template disk's `<target dev>`. */
  readonly target: string;
  /** The child's absolute path; must be inside the clone directory. */
  readonly path: string;
  /**
   * The child's libvirt `<driver>` (disk-backends.ts `childDiskFormat`: a reflink copy of a raw base is
   * `qemu`/`raw`); default the hypervisor's standard backend's (`qemu`/`qcow2` on KVM, `tap`/`vhd` on Xen).
   */
  readonly driver?: DiskDriver;
}

/** Where randomness comes from (node:crypto by default; tests make collisions happen). */
export interface RandomSource {
  randomBytes(size: number): Uint8Array;
  randomUUID(): string;
}

/** Options of {@link renderClone}. */
export interface RenderCloneOptions {
  /** The domain name, `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`. */
  readonly name: string;
  /** The host's hypervisor: decides the allowed `<domain type>` and the disk driver. */
  readonly hypervisor: HypervisorKind;
  /** The clone's own directory (absolute). Disks, NVRAM, logs and sockets must all be inside it. */
  readonly cloneDirectory: string;
  /** One child per template disk that has a source. */
  readonly disks: readonly CloneDiskOption[];
  /** The image replica's directory: where kernel, initrd and dtb of direct-boot templates are. */
  readonly imageDirectory?: string;
  /** MAC addresses already used on the host (any case); the clone's MACs avoid them. */
  readonly usedMacAddresses?: Iterable<string>;
  readonly metadata: CloneMetadata;
  /** Default {@link DEFAULT_FIRMWARE_DIRECTORIES}. */
  readonly firmwareDirectories?: readonly string[];
  readonly random?: RandomSource;
}

/** A rendered clone. */
export interface RenderedClone {
  /** The definition to pass to `virsh define`. */
  readonly xml: string;
  readonly name: string;
  /** Lowercase, with hyphens. */
  readonly uuid: string;
  /** One per `<interface>`, in XML order, lowercase. */
  readonly macAddresses: readonly string[];
  readonly disks: readonly { readonly target: string; readonly path: string; readonly driverName: string; readonly driverType: string }[];
  /** Where libvirt keeps the clone's UEFI variables, when it has any. */
  readonly nvramPath?: string;
}

const NODE_RANDOM: RandomSource = { randomBytes: (size) => randomBytes(size), randomUUID: () => randomUUID() };

/**
 * Renders one clone of a template: `<name>` and a fresh `<uuid>`; a fresh MAC (52:54:00:xx:xx:xx, unique,
 * avoiding `usedMacAddresses`) per interface; each disk's source at its child with the hypervisor's driver;
 * NVRAM at `<cloneDirectory>/nvram.fd`; character-device files and logs in the clone directory; kernel,
 * initrd and dtb in the image directory; cowherd's `<cowherd:clone>` record in `<metadata>`. Everything else
 * is kept, `<features><acpi/>` included. The template is validated again as if it came from a stranger;
 * `<domain type>` must be "kvm" or "qemu" (TCG) on KVM hosts and "xen" on Xen hosts, and is kept as given.
 */
export async function renderClone(templateXml: string, options: RenderCloneOptions): Promise<RenderedClone> {
  const random = options.random ?? NODE_RANDOM;
  const firmwareDirectories = options.firmwareDirectories ?? DEFAULT_FIRMWARE_DIRECTORIES;
  // A clone's domain name is its virtual machine id.
  if (typeof options.name !== 'string' || !VIRTUAL_MACHINE_ID.test(options.name)) {
    throw DomainXmlError.invalidField('domain_name', `must match ${VIRTUAL_MACHINE_ID.source}`);
  }
  if (options.hypervisor !== 'kvm' && options.hypervisor !== 'xen') throw DomainXmlError.invalidField('hypervisor', 'must be "kvm" or "xen"');
  const cloneDirectory = assertDirectoryOption(options.cloneDirectory, 'clone_directory');
  const imageDirectory = options.imageDirectory === undefined ? undefined : assertDirectoryOption(options.imageDirectory, 'image_directory');
  const { metadata } = options;
  const sourceName = 'image' in metadata.source ? metadata.source.image : metadata.source.virtualMachine;
  if (typeof sourceName !== 'string' || sourceName === '') throw DomainXmlError.invalidField('source', 'names no image or virtual machine');

  const parsed = parseDomainDocument(templateXml);
  const { domain } = parsed;
  if (options.hypervisor === 'kvm') checkDomainType(domain, ['kvm', 'qemu'], 'a KVM host runs "kvm" domains, or "qemu" under TCG');
  else checkDomainType(domain, ['xen'], 'a Xen host runs "xen" domains');
  const metadataNamespaces = checkNamespaces(domain);
  refuseUnsafeDevices(domain);
  if (hasNamed(domain, 'seclabel')) throw DomainXmlError.untrusted('seclabel', 'a template must not choose the security label of its clones');
  const devices = firstChild(domain, 'devices');
  if (devices && firstChild(devices, 'emulator')) throw DomainXmlError.untrusted('devices/emulator', 'a template must not choose the emulator binary');
  if (devices && elementChildren(devices, 'disk').some((disk) => firstChild(disk, 'backingStore'))) {
    throw DomainXmlError.untrusted('devices/disk/backingStore', 'a template must not name backing files');
  }
  refuseStrayHostPaths(domain, firmwareDirectories, (elementPath, attribute) => isRewrittenSite(elementPath, attribute));

  // Identity.
  removeIdentity(domain);
  const uuid = random.randomUUID().toLowerCase();
  domain.children.unshift(newElement('name', {}, [{ kind: 'text', value: options.name }]), newElement('uuid', {}, [{ kind: 'text', value: uuid }]));

  // Disks.
  const wanted = new Map<string, { readonly option: CloneDiskOption; readonly index: number }>();
  options.disks.forEach((option, index) => {
    if (typeof option.target !== 'string' || option.target === '') throw DomainXmlError.invalidField(`disks[${index}].target`, 'is empty');
    if (wanted.has(option.target)) throw DomainXmlError.invalidField(`disks[${index}].target`, `repeats "${option.target}"`);
    wanted.set(option.target, { option, index });
  });
  const renderedDisks: Array<{ target: string; path: string; driverName: string; driverType: string }> = [];
  // Each child's libvirt <driver> is its own (a reflink copy's is its base's format), else the hypervisor's
  // standard backend's (qcow2 overlays: qemu; VHD differencing disks: blktap).
  const standardDriver = diskBackendFor(options.hypervisor).driver;
  for (const disk of devices ? elementChildren(devices, 'disk') : []) {
    const source = firstChild(disk, 'source');
    const placeholder = source?.attributes.get('file') ?? '';
    if (placeholder === '') continue;
    const target = firstChild(disk, 'target')?.attributes.get('dev') ?? '';
    if (!FILE_NAME_PATTERN.test(placeholder)) throw DomainXmlError.untrusted('devices/disk/source', `file "${placeholder}" is not an image file name`);
    const entry = wanted.get(target);
    if (!entry) throw DomainXmlError.invalidField('disks', `has no child for the template disk "${target}"`);
    wanted.delete(target);
    const childPath = await assertInsideDirectory(cloneDirectory, entry.option.path, `disks[${entry.index}].path`);
    const driver = entry.option.driver ?? standardDriver;
    if (!/^[a-z0-9]+$/.test(driver.name) || !/^[a-z0-9]+$/.test(driver.type))
      throw DomainXmlError.invalidField(`disks[${entry.index}].driver`, 'must be a libvirt driver name and type');
    source!.attributes.set('file', childPath);
    source!.attributes.delete('index');
    let driverElement = firstChild(disk, 'driver');
    if (!driverElement) {
      driverElement = newElement('driver');
      disk.children.unshift(driverElement);
    }
    driverElement.attributes.set('name', driver.name);
    driverElement.attributes.set('type', driver.type);
    renderedDisks.push({ target, path: childPath, driverName: driver.name, driverType: driver.type });
  }
  for (const { option, index } of wanted.values())
    throw DomainXmlError.invalidField(`disks[${index}].target`, `"${option.target}" is not a file disk of the template`);

  // MAC addresses.
  const used = new Set<string>();
  for (const mac of options.usedMacAddresses ?? []) used.add(mac.trim().toLowerCase().replaceAll('-', ':'));
  const macAddresses: string[] = [];
  for (const nic of devices ? elementChildren(devices, 'interface') : []) {
    const mac = freshMacAddress(used, random);
    macAddresses.push(mac);
    nic.children.unshift(newElement('mac', { address: mac }));
  }

  // Files in the clone directory.
  // Through assertInsideDirectory even for plain names: a symlink planted in the clone directory must not
  // make virtlogd append to a host file.
  const inClone = async (value: string, elementPath: string): Promise<string> => {
    if (FILE_NAME_PATTERN.test(value)) return assertInsideDirectory(cloneDirectory, path.posix.join(cloneDirectory, value), 'clone_directory');
    if (!isPlainAbsolute(value) || !isInsideLexically(cloneDirectory, value))
      throw DomainXmlError.untrusted(elementPath, `"${value}" is neither a file name nor inside the clone directory`);
    return assertInsideDirectory(cloneDirectory, value, 'clone_directory');
  };
  for (const device of devices ? elementChildren(devices).filter((child) => (CHARACTER_DEVICES as readonly string[]).includes(child.name)) : []) {
    for (const source of elementChildren(device, 'source')) {
      const value = source.attributes.get('path');
      if (value !== undefined) source.attributes.set('path', await inClone(value, `devices/${device.name}/source`));
    }
    for (const log of elementChildren(device, 'log')) {
      const value = log.attributes.get('file');
      if (value !== undefined) log.attributes.set('file', await inClone(value, `devices/${device.name}/log`));
    }
  }
  const os = firstChild(domain, 'os');
  let nvramPath: string | undefined;
  if (os) {
    const loader = firstChild(os, 'loader');
    const needsNvram = firstChild(os, 'nvram') !== undefined || os.attributes.get('firmware') === 'efi' || loader?.attributes.get('type') === 'pflash';
    if (needsNvram) {
      nvramPath = await assertInsideDirectory(cloneDirectory, path.posix.join(cloneDirectory, 'nvram.fd'), 'clone_directory');
      let nvram = firstChild(os, 'nvram');
      if (!nvram) {
        nvram = newElement('nvram');
        os.children.splice(loader ? os.children.indexOf(loader) + 1 : os.children.length, 0, nvram);
      }
      if ((nvram.attributes.get('type') ?? 'file') !== 'file' || firstChild(nvram, 'source'))
        throw DomainXmlError.untrusted('os/nvram', 'only file NVRAM can be cloned');
      setText(nvram, nvramPath);
    }
    for (const element of BOOT_FILE_ELEMENTS) {
      for (const bootFile of elementChildren(os, element)) {
        const value = textOf(bootFile).trim();
        if (value === '') continue;
        if (imageDirectory === undefined) throw DomainXmlError.invalidField('image_directory', `is needed: the template boots a <${element}> from the image`);
        if (!FILE_NAME_PATTERN.test(value)) throw DomainXmlError.untrusted(`os/${element}`, `"${value}" is not an image file name`);
        setText(bootFile, await assertInsideDirectory(imageDirectory, path.posix.join(imageDirectory, value), 'image_directory'));
      }
    }
  }

  // Lineage.
  let metadataElement = firstChild(domain, 'metadata');
  if (!metadataElement) {
    metadataElement = newElement('metadata');
    const after = domain.children.findLastIndex((child) => child.kind === 'element' && ['name', 'uuid', 'genid', 'title', 'description'].includes(child.name));
    domain.children.splice(after + 1, 0, metadataElement);
  }
  removeChildren(metadataElement, (child) => metadataNamespaces.get(child) === CLONE_METADATA_NAMESPACE && localName(child.name) === 'clone');
  const field = (name: string, value: string): XmlElement => newElement(`${CLONE_METADATA_PREFIX}:${name}`, {}, [{ kind: 'text', value }]);
  metadataElement.children.push(
    newElement(
      `${CLONE_METADATA_PREFIX}:clone`,
      { [`xmlns:${CLONE_METADATA_PREFIX}`]: CLONE_METADATA_NAMESPACE },
      cloneMetadataFields(metadata).map(([name, value]) => field(name, value)),
    ),
  );

  return {
    xml: buildDocument(parsed),
    name: options.name,
    uuid,
    macAddresses,
    disks: renderedDisks,
    ...(nvramPath === undefined ? {} : { nvramPath }),
  };
}

/** A locally administered unicast MAC in libvirt's 52:54:00 prefix that is not in `used` (which it joins). */
function freshMacAddress(used: Set<string>, random: RandomSource): string {
  for (let attempt = 0; attempt < 10_000; attempt++) {
    const bytes = random.randomBytes(3);
    const mac = ['52', '54', '00', ...[...bytes.subarray(0, 3)].map((byte) => byte.toString(16).padStart(2, '0'))].join(':');
    if (!used.has(mac)) {
      used.add(mac);
      return mac;
    }
  }
  throw new CowherdError(GrpcStatus.RESOURCE_EXHAUSTED, 'no free MAC address found in 52:54:00:00:00:00/24', { reason: ErrorReason.ERROR_REASON_INTERNAL });
}
