/**
 * Safety layer of domain XML: what cowherd refuses in XML from callers, and that includes a template
 * cowherd wrote itself (it travelled through the swarm and sat on disk): device passthrough, qemu/xen
 * command-line namespaces, non-file disks, scripts, host paths that cowherd does not rewrite or allow.
 */
import path from 'node:path';
import { DomainXmlError } from './errors.js';
import { isInsideLexically, isPlainAbsolute } from './safe-paths.js';
import { elementChildren, firstChild, textOf, walk, type XmlElement } from './xml-tree.js';

/** libvirt's pass-through namespaces: `<qemu:commandline>`, `<qemu:override>`, `<xen:commandline>`, ... */
const HYPERVISOR_NAMESPACES: Readonly<Record<string, string>> = {
  'http://libvirt.org/schemas/domain/qemu/1.0': 'qemu',
  'http://libvirt.org/schemas/domain/xen/1.0': 'xen',
  'http://libvirt.org/schemas/domain/lxc/1.0': 'lxc',
  'http://libvirt.org/schemas/domain/bhyve/1.0': 'bhyve',
  'http://libvirt.org/schemas/domain/vmware/1.0': 'vmware',
};
const XML_NAMESPACE = 'http://www.w3.org/XML/1998/namespace';

/**
 * Where read-only firmware may live (`<loader>`, `<nvram template>`): the directories of Debian's, Fedora's
 * and SUSE's OVMF, AAVMF, SeaBIOS and Xen firmware packages. Root-owned system directories, so the check is
 * lexical (no `..`, under one of them).
 */
export const DEFAULT_FIRMWARE_DIRECTORIES: readonly string[] = [
  '/usr/share/OVMF',
  '/usr/share/ovmf',
  '/usr/share/AAVMF',
  '/usr/share/edk2',
  '/usr/share/edk2-ovmf',
  '/usr/share/qemu',
  '/usr/share/qemu-efi-aarch64',
  '/usr/share/seabios',
  '/usr/lib/xen/boot',
  '/usr/libexec/xen/boot',
];

/** Devices whose `<source path>` / `<log file>` are character-device files cowherd relocates. */
export const CHARACTER_DEVICES = ['serial', 'parallel', 'console', 'channel'] as const;
/** Character device types that touch nothing on the host but a file cowherd relocates or a network port. */
const ALLOWED_CHARACTER_DEVICE_TYPES = new Set(['pty', 'null', 'vc', 'file', 'unix', 'pipe', 'tcp', 'udp', 'spicevmc', 'spiceport', 'qemu-vdagent', 'dbus']);
/** Interface types whose host side is a libvirt network, a bridge, user-mode networking or macvtap. */
const ALLOWED_INTERFACE_TYPES = new Set(['network', 'bridge', 'user', 'direct']);
/** Devices that hand host resources to the guest. */
const REFUSED_DEVICES: Readonly<Record<string, string>> = {
  hostdev: 'host device passthrough',
  filesystem: 'host file system passthrough',
  shmem: 'shared memory with the host and other guests',
};
export const BOOT_FILE_ELEMENTS = ['kernel', 'initrd', 'dtb'] as const;
const RANDOM_DEVICES = new Set(['/dev/random', '/dev/urandom', '/dev/hwrng']);

/** Disk image formats cowherd publishes, as qemu-img names them ("vpc" is VHD). */
export type DiskFormatName = 'qcow2' | 'raw' | 'vpc';

/**
 * Resolves namespaces (fast-xml-parser keeps prefixes as they are) and refuses, outside `<metadata>`, every
 * element or attribute in a namespace: that is how libvirt spells its pass-through extensions, whatever the
 * prefix. Returns each `<metadata>` child's namespace URI.
 */
export function checkNamespaces(domain: XmlElement): Map<XmlElement, string> {
  const metadataNamespaces = new Map<XmlElement, string>();
  const visit = (
    element: XmlElement,
    elementPath: string,
    inherited: ReadonlyMap<string, string>,
    insideMetadata: boolean,
    parentIsMetadata: boolean,
  ): void => {
    let scope = inherited;
    for (const [name, value] of element.attributes) {
      if (name === 'xmlns' || name.startsWith('xmlns:')) {
        if (scope === inherited) scope = new Map(inherited);
        (scope as Map<string, string>).set(name === 'xmlns' ? '' : name.slice(6), value);
      }
    }
    const resolve = (qualifiedName: string, isAttribute: boolean): string => {
      const colon = qualifiedName.indexOf(':');
      if (colon < 0) return isAttribute ? '' : (scope.get('') ?? '');
      const prefix = qualifiedName.slice(0, colon);
      if (prefix === 'xml') return XML_NAMESPACE;
      const uri = scope.get(prefix);
      if (uri === undefined) throw DomainXmlError.untrusted(elementPath, `namespace prefix "${prefix}" is not declared`);
      return uri;
    };
    const namespace = resolve(element.name, false);
    if (!insideMetadata && namespace !== '') {
      const extension = HYPERVISOR_NAMESPACES[namespace];
      throw DomainXmlError.untrusted(
        elementPath,
        extension
          ? `elements in libvirt's ${extension} namespace pass settings straight to the hypervisor`
          : `element in namespace "${namespace}" outside <metadata>`,
      );
    }
    if (parentIsMetadata) {
      if (namespace === '') throw DomainXmlError.untrusted(elementPath, '<metadata> children must be in a namespace');
      metadataNamespaces.set(element, namespace);
    }
    for (const name of element.attributes.keys()) {
      if (name === 'xmlns' || name.startsWith('xmlns:')) continue;
      const attributeNamespace = resolve(name, true);
      if (!insideMetadata && attributeNamespace !== '' && attributeNamespace !== XML_NAMESPACE) {
        throw DomainXmlError.untrusted(elementPath, `attribute ${name} in namespace "${attributeNamespace}" outside <metadata>`);
      }
    }
    const isMetadata = !insideMetadata && element !== domain && element.name === 'metadata' && elementPath === 'metadata';
    for (const child of elementChildren(element)) {
      visit(child, element === domain ? child.name : `${elementPath}/${child.name}`, scope, insideMetadata || isMetadata, isMetadata);
    }
  };
  visit(domain, 'domain', new Map(), false, false);
  return metadataNamespaces;
}

export function checkDomainType(domain: XmlElement, allowed: readonly string[], why: string): string {
  const type = domain.attributes.get('type') ?? '';
  if (!allowed.includes(type)) throw DomainXmlError.untrusted('domain', `type "${type}" is not one of ${allowed.join(', ')} (${why})`);
  return type;
}

/** Disk formats by libvirt's `<driver type>`, normalized to qemu-img's names. */
export function diskFormatOf(driverType: string | undefined, elementPath: string): DiskFormatName {
  switch (driverType ?? 'raw') {
    case 'qcow2':
      return 'qcow2';
    case 'raw':
      return 'raw';
    case 'vpc':
    case 'vhd':
      return 'vpc';
    default:
      throw DomainXmlError.untrusted(elementPath, `disk format "${driverType}" is not qcow2, raw or vhd (vpc)`);
  }
}

/** Refuses devices and settings that reach outside the guest, in a template as in a live domain. */
export function refuseUnsafeDevices(domain: XmlElement): void {
  const devices = firstChild(domain, 'devices');
  if (!devices) return;
  elementChildren(devices).forEach((device, index) => {
    const elementPath = `devices/${device.name}[${index}]`;
    const refused = REFUSED_DEVICES[device.name];
    if (refused) throw DomainXmlError.untrusted(elementPath, `${refused} cannot be published or cloned`);
    if (device.name === 'disk') {
      const type = device.attributes.get('type') ?? 'file';
      if (type !== 'file') throw DomainXmlError.untrusted(elementPath, `disk type "${type}" is not "file": only file disks can be published and cloned`);
      const deviceKind = device.attributes.get('device') ?? 'disk';
      if (!['disk', 'cdrom', 'floppy'].includes(deviceKind)) throw DomainXmlError.untrusted(elementPath, `disk device "${deviceKind}" is not supported`);
      diskFormatOf(firstChild(device, 'driver')?.attributes.get('type'), elementPath);
      const source = firstChild(device, 'source');
      for (const name of ['dataStore', 'encryption']) {
        if (firstChild(source, name) ?? firstChild(device, name))
          throw DomainXmlError.untrusted(`${elementPath}/${name}`, 'external data files and encrypted disks cannot be cloned');
      }
      if (firstChild(device, 'mirror')) throw DomainXmlError.untrusted(`${elementPath}/mirror`, 'a block job is running on the disk');
    } else if (device.name === 'interface') {
      const type = device.attributes.get('type') ?? '';
      if (!ALLOWED_INTERFACE_TYPES.has(type))
        throw DomainXmlError.untrusted(elementPath, `interface type "${type}" is not one of ${[...ALLOWED_INTERFACE_TYPES].join(', ')}`);
      for (const name of ['script', 'downscript']) {
        if (firstChild(device, name)) throw DomainXmlError.untrusted(`${elementPath}/${name}`, 'interface scripts run on the host');
      }
    } else if ((CHARACTER_DEVICES as readonly string[]).includes(device.name)) {
      const type = device.attributes.get('type') ?? 'pty';
      if (!ALLOWED_CHARACTER_DEVICE_TYPES.has(type)) throw DomainXmlError.untrusted(elementPath, `character device type "${type}" reaches a host device`);
    } else if (device.name === 'smartcard') {
      const mode = device.attributes.get('mode') ?? '';
      if (mode !== 'passthrough') throw DomainXmlError.untrusted(elementPath, `smartcard mode "${mode}" uses the host's smartcard or certificate database`);
    }
  });
}

/**
 * Absolute host paths that may stay in a template and a clone, each with its own rule. Any other attribute
 * or text that looks like a host path is refused: this catches devices this module has no rule for
 * (`<emulator>`, nvdimm `<path>`, evdev inputs, TPM passthrough, `<sysinfo>` fw_cfg files, audio files...).
 */
function checkAllowedHostPath(
  elementPath: string,
  attribute: string | undefined,
  value: string,
  firmwareDirectories: readonly string[],
): 'allowed' | 'not-a-site' {
  const site = attribute === undefined ? elementPath : `${elementPath}@${attribute}`;
  const inFirmware = (): boolean => isPlainAbsolute(value) && firmwareDirectories.some((directory) => isInsideLexically(directory, value));
  const refuse = (problem: string): never => {
    throw DomainXmlError.untrusted(elementPath, `${attribute === undefined ? 'text' : `attribute ${attribute}`} "${value}" ${problem}`);
  };
  switch (site) {
    case 'os/loader':
    case 'os/nvram@template':
      if (!inFirmware()) refuse(`is not under a firmware directory (${firmwareDirectories.join(', ')})`);
      return 'allowed';
    case 'os/cmdline':
    case 'title':
    case 'description':
      return 'allowed';
    case 'bootloader':
      if (!(isPlainAbsolute(value) && value.startsWith('/usr/') && path.posix.basename(value) === 'pygrub')) refuse('is not pygrub under /usr');
      return 'allowed';
    case 'resource/partition':
      if (!/^\/machine(\/[A-Za-z0-9_][A-Za-z0-9._-]*)*$/.test(value)) refuse('is not a cgroup partition under /machine');
      return 'allowed';
    case 'devices/rng/backend':
      if (!RANDOM_DEVICES.has(value)) refuse(`is not one of ${[...RANDOM_DEVICES].join(', ')}`);
      return 'allowed';
    default:
      return 'not-a-site';
  }
}

function looksLikePath(value: string): boolean {
  return value.startsWith('/') || value.startsWith('./') || value.startsWith('../') || value === '..' || value.includes('/../') || value.endsWith('/..');
}

/** Refuses every host-path-like value outside the sites that this module rewrites (`skip`) or allows. */
export function refuseStrayHostPaths(
  domain: XmlElement,
  firmwareDirectories: readonly string[],
  skip: (elementPath: string, attribute: string | undefined) => boolean,
): void {
  walk(domain, (element, elementPath) => {
    if (elementPath === 'metadata' || elementPath.startsWith('metadata/')) return;
    for (const [name, value] of element.attributes) {
      if (name === 'xmlns' || name.startsWith('xmlns:') || skip(elementPath, name)) continue;
      if (checkAllowedHostPath(elementPath, name, value, firmwareDirectories) === 'allowed') continue;
      if (looksLikePath(value)) throw DomainXmlError.untrusted(elementPath, `attribute ${name} holds the host path "${value}", which cowherd does not rewrite`);
    }
    const text = textOf(element);
    if (text === '' || skip(elementPath, undefined)) return;
    if (checkAllowedHostPath(elementPath, undefined, text, firmwareDirectories) === 'allowed') return;
    if (looksLikePath(text)) throw DomainXmlError.untrusted(elementPath, `holds the host path "${text}", which cowherd does not rewrite`);
  });
}

function isCharacterDevicePath(elementPath: string, attribute: string | undefined): boolean {
  const [device, child, ...rest] = elementPath.split('/').slice(1);
  if (elementPath.split('/')[0] !== 'devices' || rest.length > 0 || !device || !(CHARACTER_DEVICES as readonly string[]).includes(device)) return false;
  return (child === 'source' && attribute === 'path') || (child === 'log' && attribute === 'file');
}

export function isRewrittenSite(elementPath: string, attribute: string | undefined): boolean {
  if (elementPath === 'devices/disk/source' && attribute === 'file') return true;
  if (attribute === undefined && (elementPath === 'os/nvram' || (BOOT_FILE_ELEMENTS as readonly string[]).map((name) => `os/${name}`).includes(elementPath)))
    return true;
  return isCharacterDevicePath(elementPath, attribute);
}
