/**
 * The domain XML of an imported image when the caller gives parameters instead of XML (ImportImage): a
 * plain, conservative machine that any cloud image boots on, rendered with this module's own element tree
 * (never string concatenation of caller values). The result is not yet a template: the import job passes it
 * through {@link sanitizeDomainTemplate} like every other XML, so a published and an imported template have
 * exactly the same form (file names instead of paths, no identity).
 */
import { DomainXmlError } from './errors.js';
import { buildDocument, newElement, parseDomainDocument, setText, type XmlElement } from './xml-tree.js';

/** What an imported image's machine is made of (validated here; defaults as in the proto). */
export interface ImportDomainParameters {
  /** "kvm" or "qemu" on KVM hosts (what libvirt offers), "xen" on Xen hosts. */
  readonly domainType: 'kvm' | 'qemu' | 'xen';
  /** 1..256. */
  readonly vcpus: number;
  /** 16..4194304. */
  readonly memoryMib: number;
  readonly firmware: 'bios' | 'uefi';
  /** virtio and sata on KVM only; xen (paravirtual) on Xen only. */
  readonly diskBus: 'virtio' | 'sata' | 'ide' | 'xen';
  /** The image's disk file (its path until the sanitizer turns it into the file name). */
  readonly diskPath: string;
  /** The format the disk will have in the image: qcow2 (KVM) or vpc (Xen). */
  readonly diskFormat: 'qcow2' | 'vpc';
  /** A libvirt network name; undefined: no interface. */
  readonly network?: string;
  /** Direct kernel boot: host paths of the kernel and initrd (the sanitizer turns them into boot-kernel, boot-initrd). */
  readonly kernelPath?: string;
  readonly initrdPath?: string;
  readonly kernelCommandLine?: string;
}

const TARGET_PREFIX: Readonly<Record<ImportDomainParameters['diskBus'], string>> = { virtio: 'vd', sata: 'sd', ide: 'hd', xen: 'xvd' };
/** libvirt network names: what `virsh net-define` accepts without surprises. */
const NETWORK_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** Renders the domain XML of an imported image; throws DomainXmlError (INVALID_FIELD, naming `domain.<field>`) for bad parameters. */
export function renderImportDomain(parameters: ImportDomainParameters): string {
  const { domainType } = parameters;
  const xen = domainType === 'xen';
  if (!Number.isInteger(parameters.vcpus) || parameters.vcpus < 1 || parameters.vcpus > 256)
    throw DomainXmlError.invalidField('domain.vcpus', 'must be 1 to 256');
  if (!Number.isInteger(parameters.memoryMib) || parameters.memoryMib < 16 || parameters.memoryMib > 4_194_304)
    throw DomainXmlError.invalidField('domain.memory_mib', 'must be 16 to 4194304 (4 TiB)');
  if (xen && (parameters.diskBus === 'virtio' || parameters.diskBus === 'sata'))
    throw DomainXmlError.invalidField('domain.disk_bus', `${parameters.diskBus} is not available on Xen hosts (use xen or ide)`);
  if (!xen && parameters.diskBus === 'xen') throw DomainXmlError.invalidField('domain.disk_bus', 'xen is only available on Xen hosts');
  if (parameters.network !== undefined && !NETWORK_NAME.test(parameters.network))
    throw DomainXmlError.invalidField('domain.network', `must be a libvirt network name matching ${NETWORK_NAME.source}, or "none"`);
  if (parameters.initrdPath !== undefined && parameters.kernelPath === undefined)
    throw DomainXmlError.invalidField('domain.initrd_path', 'needs a kernel_path');
  if (parameters.kernelCommandLine !== undefined) {
    if (parameters.kernelPath === undefined) throw DomainXmlError.invalidField('domain.kernel_command_line', 'needs a kernel_path');
    if (parameters.kernelCommandLine.length > 4096 || /[\u0000-\u001f\u007f]/.test(parameters.kernelCommandLine))
      throw DomainXmlError.invalidField('domain.kernel_command_line', 'must be at most 4096 characters without control characters');
  }

  const os = newElement('os');
  const type = newElement('type', { arch: 'x86_64', ...(xen ? { machine: 'xenfv' } : parameters.firmware === 'uefi' ? { machine: 'q35' } : {}) });
  setText(type, 'hvm');
  os.children.push(type);
  if (parameters.firmware === 'uefi') os.attributes.set('firmware', 'efi');
  const text = (name: string, value: string): XmlElement => {
    const element = newElement(name);
    setText(element, value);
    return element;
  };
  if (parameters.kernelPath !== undefined) {
    os.children.push(text('kernel', parameters.kernelPath));
    if (parameters.initrdPath !== undefined) os.children.push(text('initrd', parameters.initrdPath));
    if (parameters.kernelCommandLine !== undefined) os.children.push(text('cmdline', parameters.kernelCommandLine));
  } else os.children.push(newElement('boot', { dev: 'hd' }));

  const disk = newElement('disk', { type: 'file', device: 'disk' });
  disk.children.push(
    newElement('driver', { name: 'qemu', type: parameters.diskFormat }),
    newElement('source', { file: parameters.diskPath }),
    newElement('target', { dev: `${TARGET_PREFIX[parameters.diskBus]}a`, bus: parameters.diskBus }),
  );
  const devices = newElement('devices');
  devices.children.push(disk);
  if (parameters.network !== undefined) {
    const nic = newElement('interface', { type: 'network' });
    nic.children.push(newElement('source', { network: parameters.network }));
    if (!xen) nic.children.push(newElement('model', { type: 'virtio' }));
    devices.children.push(nic);
  }
  // A serial console: what cloud images print to, and what `virsh console` reads.
  devices.children.push(newElement('serial', { type: 'pty' }), newElement('console', { type: 'pty' }));
  if (!xen) devices.children.push(newElement('memballoon', { model: 'virtio' }));

  const features = newElement('features');
  features.children.push(newElement('acpi'), newElement('apic'));
  const memory = text('memory', String(parameters.memoryMib));
  memory.attributes.set('unit', 'MiB');
  const parsed = parseDomainDocument(`<domain type='${domainType}'><name>import</name></domain>`);
  parsed.domain.children.push(memory, text('vcpu', String(parameters.vcpus)), os, features, newElement('clock', { offset: 'utc' }), devices);
  return buildDocument(parsed);
}
