/**
 * Templating layer of domain XML: {@link sanitizeDomainTemplate} turns a powered-off VM's
 * `virsh dumpxml --inactive` into an image's template (identity and host paths gone, the disks to export
 * listed); {@link templateDisks} reads a template's disks back.
 */
import { CLONE_METADATA_NAMESPACE, COWHERD_NAMESPACE_PREFIX } from './clone-metadata.js';
import { DomainXmlError } from './errors.js';
import { assertFileName } from './safe-paths.js';
import {
  BOOT_FILE_ELEMENTS,
  CHARACTER_DEVICES,
  checkDomainType,
  checkNamespaces,
  DEFAULT_FIRMWARE_DIRECTORIES,
  diskFormatOf,
  isRewrittenSite,
  refuseStrayHostPaths,
  refuseUnsafeDevices,
  type DiskFormatName,
} from './safety.js';
import {
  buildDocument,
  elementChildren,
  firstChild,
  localName,
  newElement,
  parseDomainDocument,
  removeAllNamed,
  removeChildren,
  setText,
  textOf,
  type XmlElement,
} from './xml-tree.js';

/** Removes what identifies one VM and would collide between clones. */
export function removeIdentity(domain: XmlElement): void {
  removeChildren(domain, (child) => child.name === 'name' || child.name === 'uuid');
  // An empty <genid/> makes libvirt generate a fresh VM generation ID.
  for (const genid of elementChildren(domain, 'genid')) setText(genid, '');
  const devices = firstChild(domain, 'devices');
  if (!devices) return;
  for (const nic of elementChildren(devices, 'interface')) {
    removeChildren(nic, (child) => child.name === 'mac' || child.name === 'target');
  }
  for (const vsock of elementChildren(devices, 'vsock')) {
    for (const cid of elementChildren(vsock, 'cid')) {
      cid.attributes.set('auto', 'yes');
      cid.attributes.delete('address');
    }
  }
}

/** A disk the exporter copies into the image. */
export interface ExportedDisk {
  /** `<target dev>`, e.g. "vda"; unique in the domain. */
  readonly target: string;
  /** "disk", "cdrom" or "floppy". */
  readonly device: string;
  /** The source VM's file, to copy (flattened, if it has a backing chain). */
  readonly sourcePath: string;
  /** The format libvirt opens it with, as qemu-img names it. */
  readonly format: DiskFormatName;
  /** Its name inside the image; the template's `<source file>` holds exactly this name. */
  readonly fileName: string;
}

/** A direct-boot file (`<os><kernel>`, `<initrd>`, `<dtb>`) the exporter copies into the image. */
export interface ExportedBootFile {
  readonly element: (typeof BOOT_FILE_ELEMENTS)[number];
  readonly sourcePath: string;
  /** Its name inside the image; the template's element holds exactly this name. */
  readonly fileName: string;
}

/** What {@link sanitizeDomainTemplate} returns. */
export interface DomainTemplate {
  /** The template: no identity, no host paths but firmware; file names instead of disk and boot paths. */
  readonly xml: string;
  /** `<domain type>`: "kvm", "qemu" or "xen". */
  readonly domainType: string;
  /** File disks with a source, in XML order. Empty CD-ROM drives stay in the template and are not listed. */
  readonly disks: readonly ExportedDisk[];
  readonly bootFiles: readonly ExportedBootFile[];
}

/** Options of {@link sanitizeDomainTemplate}. */
export interface SanitizeOptions {
  /**
   * The image file name of the index-th exported disk. Default `disk-<index>.<qcow2|img|vhd>`. Must be one
   * path segment matching `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
   */
  readonly diskFileName?: (disk: { readonly index: number; readonly target: string; readonly format: DiskFormatName }) => string;
  /** Where `<loader>` and `<nvram template>` may point. Default {@link DEFAULT_FIRMWARE_DIRECTORIES}. */
  readonly firmwareDirectories?: readonly string[];
  /**
   * The format every exported disk will have in the image (the exporter converts to it): the template's
   * `<driver type>` says so. Default: each disk keeps its source format. `ExportedDisk.format` stays the
   * source's (what the exporter reads).
   */
  readonly imageFormat?: DiskFormatName;
}

const FILE_EXTENSIONS: Readonly<Record<DiskFormatName, string>> = { qcow2: 'qcow2', raw: 'img', vpc: 'vhd' };

/**
 * Turns a powered-off domain's `virsh dumpxml --inactive` into an image template and the list of files to
 * export. Removed: `<name>`, `<uuid>`, `<title>`, `<description>`, `<metadata>` children outside cowherd's
 * namespaces (and a previous `<cowherd:clone>` record), `<genid>`'s value, every `<seclabel>`, `<emulator>`,
 * interface `<mac>` and `<target>`, fixed vsock CIDs, disk `<backingStore>`, `<nvram>`'s path, the host
 * side of graphics (passwords, listen addresses, sockets, fixed ports, render nodes) and tap/vhost device
 * paths. Replaced by file names: disk sources, kernel/initrd/dtb, character-device files and logs (the same
 * host path gets the same name, so a console's log stays its serial's log); channel unix sockets lose their
 * path (libvirt generates one). Everything else is kept as it is. Throws DomainXmlError for what cowherd
 * cannot publish safely.
 */
export function sanitizeDomainTemplate(xml: string, options: SanitizeOptions = {}): DomainTemplate {
  const parsed = parseDomainDocument(xml);
  const { domain } = parsed;
  const domainType = checkDomainType(domain, ['kvm', 'qemu', 'xen'], 'cowherd publishes KVM/QEMU and Xen domains');
  const metadataNamespaces = checkNamespaces(domain);
  refuseUnsafeDevices(domain);

  removeIdentity(domain);
  // A live domain's runtime id.
  domain.attributes.delete('id');
  removeChildren(domain, (child) => child.name === 'title' || child.name === 'description');
  for (const metadata of elementChildren(domain, 'metadata')) {
    removeChildren(metadata, (child) => {
      const namespace = metadataNamespaces.get(child) ?? '';
      return !namespace.startsWith(COWHERD_NAMESPACE_PREFIX) || (namespace === CLONE_METADATA_NAMESPACE && localName(child.name) === 'clone');
    });
    // Keep each kept element self-contained: its prefix may have been declared on <domain>.
    for (const child of elementChildren(metadata)) {
      const prefix = child.name.includes(':') ? child.name.slice(0, child.name.indexOf(':')) : '';
      const declaration = prefix === '' ? 'xmlns' : `xmlns:${prefix}`;
      if (!child.attributes.has(declaration)) child.attributes.set(declaration, metadataNamespaces.get(child) ?? '');
    }
  }
  removeChildren(domain, (child) => child.name === 'metadata' && elementChildren(child).length === 0);
  removeAllNamed(domain, 'seclabel');

  const os = firstChild(domain, 'os');
  const bootFiles: ExportedBootFile[] = [];
  if (os) {
    for (const nvram of elementChildren(os, 'nvram')) {
      if ((nvram.attributes.get('type') ?? 'file') !== 'file') throw DomainXmlError.untrusted('os/nvram', 'only file NVRAM can be cloned');
      nvram.attributes.delete('type');
      setText(nvram, '');
    }
    for (const element of BOOT_FILE_ELEMENTS) {
      for (const bootFile of elementChildren(os, element)) {
        const sourcePath = textOf(bootFile).trim();
        if (sourcePath === '') continue;
        const fileName = `boot-${element}`;
        bootFiles.push({ element, sourcePath, fileName });
        setText(bootFile, fileName);
      }
    }
  }

  const devices = firstChild(domain, 'devices');
  const disks: ExportedDisk[] = [];
  if (devices) {
    removeChildren(devices, (child) => child.name === 'emulator');
    const fileNames = new Set<string>(bootFiles.map((bootFile) => bootFile.fileName));
    for (const disk of elementChildren(devices, 'disk')) {
      removeAllNamed(disk, 'backingStore');
      const target = firstChild(disk, 'target')?.attributes.get('dev') ?? '';
      const source = firstChild(disk, 'source');
      const sourcePath = source?.attributes.get('file') ?? '';
      source?.attributes.delete('index');
      if (sourcePath === '') continue;
      if (target === '') throw DomainXmlError.untrusted('devices/disk/target', 'a disk with a source has no target dev');
      if (disks.some((disk) => disk.target === target)) throw DomainXmlError.untrusted('devices/disk/target', `two disks share the target dev "${target}"`);
      const format = diskFormatOf(firstChild(disk, 'driver')?.attributes.get('type'), 'devices/disk/driver');
      const index = disks.length;
      const fileName = assertFileName(
        options.diskFileName ? options.diskFileName({ index, target, format }) : `disk-${index}.${FILE_EXTENSIONS[format]}`,
        `disks[${index}].file_name`,
      );
      if (fileNames.has(fileName)) throw DomainXmlError.invalidField(`disks[${index}].file_name`, `repeats the file name "${fileName}"`);
      fileNames.add(fileName);
      disks.push({ target, device: disk.attributes.get('device') ?? 'disk', sourcePath, format, fileName });
      source!.attributes.set('file', fileName);
      if (options.imageFormat !== undefined && options.imageFormat !== format) {
        const driver = firstChild(disk, 'driver');
        if (driver) driver.attributes.set('type', options.imageFormat);
        else disk.children.unshift(newElement('driver', { name: 'qemu', type: options.imageFormat }));
      }
    }

    for (const nic of elementChildren(devices, 'interface')) {
      for (const backend of elementChildren(nic, 'backend')) {
        backend.attributes.delete('tap');
        backend.attributes.delete('vhost');
      }
    }

    // Named after the device (`serial-1.out`, `serial-0.log`); one name per host path, so that a <console>
    // that logs to its <serial>'s file keeps doing so.
    const characterFileNames = new Map<string, string>();
    const deviceIndexes = new Map<string, number>();
    const placeholder = (hostPath: string, name: string): string => {
      const known = characterFileNames.get(hostPath);
      if (known) return known;
      characterFileNames.set(hostPath, name);
      return name;
    };
    for (const device of elementChildren(devices).filter((child) => (CHARACTER_DEVICES as readonly string[]).includes(child.name))) {
      const index = deviceIndexes.get(device.name) ?? 0;
      deviceIndexes.set(device.name, index + 1);
      const type = device.attributes.get('type') ?? 'pty';
      // A live domain's pty.
      device.attributes.delete('tty');
      for (const source of elementChildren(device, 'source')) {
        const sourcePath = source.attributes.get('path');
        if (sourcePath === undefined) continue;
        if (type === 'file' || type === 'pipe' || (type === 'unix' && device.name !== 'channel')) {
          source.attributes.set('path', placeholder(sourcePath, `${device.name}-${index}.${type === 'file' ? 'out' : type === 'unix' ? 'sock' : 'pipe'}`));
        } else {
          // A pty's /dev/pts/N, or a channel socket whose path libvirt generates per domain.
          source.attributes.delete('path');
        }
      }
      for (const log of elementChildren(device, 'log')) {
        const logPath = log.attributes.get('file');
        if (logPath !== undefined) log.attributes.set('file', placeholder(logPath, `${device.name}-${index}.log`));
      }
    }

    for (const graphics of elementChildren(devices, 'graphics')) {
      for (const name of ['passwd', 'passwdValidTo', 'listen', 'socket', 'xauth', 'display']) graphics.attributes.delete(name);
      let fixedPort = false;
      for (const name of ['port', 'tlsPort', 'websocket']) {
        const value = graphics.attributes.get(name);
        if (value !== undefined && value !== '-1') {
          graphics.attributes.delete(name);
          fixedPort ||= name !== 'websocket';
        }
      }
      if (fixedPort) graphics.attributes.set('autoport', 'yes');
      for (const listen of elementChildren(graphics, 'listen')) {
        listen.attributes.delete('address');
        listen.attributes.delete('socket');
      }
      for (const gl of elementChildren(graphics, 'gl')) gl.attributes.delete('rendernode');
    }
  }

  refuseStrayHostPaths(domain, options.firmwareDirectories ?? DEFAULT_FIRMWARE_DIRECTORIES, (elementPath, attribute) =>
    isRewrittenSite(elementPath, attribute),
  );
  return { xml: buildDocument(parsed), domainType, disks, bootFiles };
}

/** A disk of a template: its target and the image file it names, with the format libvirt opens it with. */
export interface TemplateDisk {
  readonly target: string;
  readonly fileName: string;
  readonly format: DiskFormatName;
}

/** The disks of a template (what {@link sanitizeDomainTemplate} wrote), validated like any untrusted XML. */
export function templateDisks(templateXml: string): TemplateDisk[] {
  const { domain } = parseDomainDocument(templateXml);
  const devices = firstChild(domain, 'devices');
  const disks: TemplateDisk[] = [];
  for (const disk of devices ? elementChildren(devices, 'disk') : []) {
    const fileName = firstChild(disk, 'source')?.attributes.get('file') ?? '';
    if (fileName === '') continue;
    const target = firstChild(disk, 'target')?.attributes.get('dev') ?? '';
    if (target === '') throw DomainXmlError.untrusted('devices/disk/target', 'a disk with a source has no target dev');
    disks.push({
      target,
      fileName: assertFileName(fileName, `disks[${disks.length}].file_name`),
      format: diskFormatOf(firstChild(disk, 'driver')?.attributes.get('type'), 'devices/disk/driver'),
    });
  }
  return disks;
}

/**
 * The image files a template boots directly (`<os><kernel>`, `<initrd>`, `<dtb>`: file names in the replica), in
 * document order; [] for a template that boots from its disks. A streaming clone waits for these whole.
 */
export function templateBootFiles(templateXml: string): string[] {
  const { domain } = parseDomainDocument(templateXml);
  const os = firstChild(domain, 'os');
  const files: string[] = [];
  for (const element of BOOT_FILE_ELEMENTS)
    for (const bootFile of os ? elementChildren(os, element) : []) {
      const value = textOf(bootFile).trim();
      if (value !== '') files.push(assertFileName(value, `os/${element}`));
    }
  return files;
}
