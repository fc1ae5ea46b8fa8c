/**
 * Domain XML for images and clones. {@link sanitizeDomainTemplate} turns a powered-off VM's
 * `virsh dumpxml --inactive` into an image's template (identity and host paths gone, the disks to export
 * listed); {@link renderClone} turns a template into one clone's definition (fresh identity, every file
 * inside the clone's own directory, cowherd's lineage in `<metadata>`).
 *
 * XML from callers is never trusted, and that includes a template cowherd wrote itself: it travelled through
 * the swarm and sat on disk. Both functions parse with fast-xml-parser (`preserveOrder`), change the tree, and
 * build it again, so element order, attributes, unknown elements and comments survive; nothing is string
 * surgery. Both refuse what would reach outside the guest: device passthrough, qemu/xen command-line
 * namespaces, non-file disks, scripts, host paths that cowherd does not rewrite or allow. Entities are decoded
 * strictly (the five XML entities and character references; a DOCTYPE that declares entities, an unknown
 * entity or a bare `&` is refused), so what this module checks is exactly what libvirt reads from its output.
 *
 * Failures are {@link DomainXmlError}s (CowherdErrors): UNTRUSTED_DOMAIN_XML (FAILED_PRECONDITION, metadata
 * "element") for XML that cowherd will not carry, PATH_OUTSIDE_IMAGE_DIRECTORY (INVALID_ARGUMENT, metadata
 * "path") for a caller's path outside its directory, INVALID_FIELD for other bad options.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { lstat, readlink, realpath } from 'node:fs/promises';
import path from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { XMLBuilder, XMLParser, XMLValidator } from 'fast-xml-parser';
import { CowherdError } from '../../common/platform/errors.js';
import { ErrorReason, errorReasonToJSON } from '../../gen/cowherd/common/v1/error_reason.js';

/** The namespace of the `<cowherd:clone>` element that {@link renderClone} writes into `<metadata>`. */
export const CLONE_METADATA_NAMESPACE = 'https://cowherd.dev/xmlns/clone/1';
/** Every namespace under this prefix is cowherd's own; other tools' metadata is dropped from templates. */
export const COWHERD_NAMESPACE_PREFIX = 'https://cowherd.dev/xmlns/';
const CLONE_METADATA_PREFIX = 'cowherd';

/** libvirt's pass-through namespaces: `<qemu:commandline>`, `<qemu:override>`, `<xen:commandline>`, ... */
const HYPERVISOR_NAMESPACES: Readonly<Record<string, string>> = {
  'http://libvirt.org/schemas/domain/qemu/1.0': 'qemu',
  'http://libvirt.org/schemas/domain/xen/1.0': 'xen',
  'http://libvirt.org/schemas/domain/lxc/1.0': 'lxc',
  'http://libvirt.org/schemas/domain/bhyve/1.0': 'bhyve',
  'http://libvirt.org/schemas/domain/vmware/1.0': 'vmware',
};
const XML_NAMESPACE = 'http://www.w3.org/XML/1998/namespace';

/** A domain name as cowherd accepts it (also the virtual machine id). */
export const DOMAIN_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
/** File names inside an image or clone directory: one path segment, nothing hidden. */
const FILE_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** Domain XML is a few KiB; anything this large is not a domain definition. */
const MAX_DOCUMENT_CHARS = 4 * 1024 * 1024;

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
const CHARACTER_DEVICES = ['serial', 'parallel', 'console', 'channel'] as const;
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
const BOOT_FILE_ELEMENTS = ['kernel', 'initrd', 'dtb'] as const;
const RANDOM_DEVICES = new Set(['/dev/random', '/dev/urandom', '/dev/hwrng']);

/** Disk image formats cowherd publishes, as qemu-img names them ("vpc" is VHD). */
export type DiskFormatName = 'qcow2' | 'raw' | 'vpc';
/** The hypervisor a clone is rendered for. */
export type HypervisorKind = 'kvm' | 'xen';

// ---------------------------------------------------------------------------------------------------------
// Errors

/**
 * Thrown when domain XML or an option cannot be used. A CowherdError, so the gRPC boundary maps it as it
 * is; `reasonName` is the ErrorReason's proto name, e.g. "ERROR_REASON_UNTRUSTED_DOMAIN_XML".
 */
export class DomainXmlError extends CowherdError {
  get reasonName(): string {
    return errorReasonToJSON(this.reason);
  }

  /** The XML holds something cowherd will not carry into a template or clone (FAILED_PRECONDITION). */
  static untrusted(element: string, problem: string): DomainXmlError {
    return new DomainXmlError(GrpcStatus.FAILED_PRECONDITION, `domain XML: <${element}>: ${problem}`, {
      reason: ErrorReason.ERROR_REASON_UNTRUSTED_DOMAIN_XML,
      metadata: { element },
    });
  }

  /** A caller's path resolves outside the directory it must stay in (INVALID_ARGUMENT). */
  static pathOutside(field: string, value: string, problem: string): DomainXmlError {
    return new DomainXmlError(GrpcStatus.INVALID_ARGUMENT, `${field} ${problem}`, {
      reason: ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY,
      field,
      metadata: { field, path: value },
    });
  }

  /** A caller's option is malformed (INVALID_ARGUMENT). */
  static invalidField(field: string, problem: string): DomainXmlError {
    return new DomainXmlError(GrpcStatus.INVALID_ARGUMENT, `${field} ${problem}`, {
      reason: ErrorReason.ERROR_REASON_INVALID_FIELD,
      field,
      metadata: { field },
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// A small typed tree over fast-xml-parser's preserveOrder form

interface XmlElement {
  readonly kind: 'element';
  readonly name: string;
  /** In document order. Values are decoded; the builder step escapes them again. */
  readonly attributes: Map<string, string>;
  children: XmlNode[];
}
interface XmlText {
  readonly kind: 'text' | 'cdata' | 'comment';
  readonly value: string;
}
interface XmlInstruction {
  readonly kind: 'instruction';
  readonly name: string;
  readonly attributes: Map<string, string>;
}
type XmlNode = XmlElement | XmlText | XmlInstruction;

/**
 * Decodes exactly what libxml2 decodes for a document without a DTD: the five predefined entities and
 * character references. Everything else would make our reading differ from libvirt's: refused.
 */
function strictEntityDecoder(): {
  setExternalEntities(entities: Record<string, string>): void;
  addInputEntities(entities: Record<string, string>): void;
  reset(): void;
  decode(text: string): string;
  setXmlVersion(version: number): void;
} {
  const named: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };
  return {
    setExternalEntities: () => undefined,
    addInputEntities: (entities) => {
      if (Object.keys(entities).length > 0) throw new EntityError('a DOCTYPE that declares entities');
    },
    reset: () => undefined,
    setXmlVersion: () => undefined,
    decode: (text) => {
      if (text.includes('<')) throw new EntityError("an unescaped '<' in a value");
      const [first = '', ...rest] = text.split('&');
      let decoded = first;
      for (const piece of rest) {
        const match = /^(#x[0-9a-fA-F]{1,6}|#[0-9]{1,7}|[A-Za-z]+);/.exec(piece);
        if (!match) throw new EntityError("a bare '&'");
        const reference = match[1]!;
        let value: string | undefined;
        if (reference.startsWith('#')) {
          const code = reference.startsWith('#x') ? Number.parseInt(reference.slice(2), 16) : Number.parseInt(reference.slice(1), 10);
          const isXmlChar = code === 0x9 || code === 0xa || code === 0xd || (code >= 0x20 && code <= 0xd7ff) || (code >= 0xe000 && code <= 0xfffd) || (code >= 0x10000 && code <= 0x10ffff);
          if (!isXmlChar) throw new EntityError(`the character reference &${reference};`);
          value = String.fromCodePoint(code);
        } else {
          value = named[reference];
          if (value === undefined) throw new EntityError(`the undefined entity &${reference};`);
        }
        decoded += value + piece.slice(match[0].length);
      }
      return decoded;
    },
  };
}

class EntityError extends Error {}

const PARSER_OPTIONS = {
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  parseTagValue: false,
  parseAttributeValue: false,
  // libvirt's own output is indented; whitespace-only text is layout, and the builder indents again.
  trimValues: true,
  commentPropName: '#comment',
  cdataPropName: '#cdata',
  ignoreDeclaration: false,
  ignorePiTags: false,
  processEntities: true,
} as const;

// processEntities false: values are escaped by escapeText/escapeAttribute below, so the builder adds nothing.
const builder = new XMLBuilder({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  textNodeName: '#text',
  commentPropName: '#comment',
  cdataPropName: '#cdata',
  format: true,
  indentBy: '  ',
  suppressEmptyNode: true,
  suppressBooleanAttributes: false,
  processEntities: false,
});

function escapeText(value: string): string {
  return value.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;').replaceAll('\r', '&#13;');
}

/** Tabs and line breaks as character references: a literal one would be normalized to a space on reading. */
function escapeAttribute(value: string): string {
  return escapeText(value).replaceAll('"', '&quot;').replaceAll("'", '&apos;').replaceAll('\n', '&#10;').replaceAll('\t', '&#9;');
}

function fromOrdered(entries: unknown): XmlNode[] {
  if (!Array.isArray(entries)) return [];
  const nodes: XmlNode[] = [];
  for (const entry of entries as Array<Record<string, unknown>>) {
    const key = Object.keys(entry).find((name) => name !== ':@');
    if (key === undefined) continue;
    const rawAttributes = (entry[':@'] ?? {}) as Record<string, unknown>;
    const attributes = new Map(Object.entries(rawAttributes).map(([name, value]) => [name, String(value)]));
    const content = entry[key];
    if (key === '#text') nodes.push({ kind: 'text', value: String(content) });
    else if (key === '#comment' || key === '#cdata') {
      const inner = Array.isArray(content) ? (content as Array<Record<string, unknown>>).map((part) => String(part['#text'] ?? '')).join('') : '';
      nodes.push({ kind: key === '#comment' ? 'comment' : 'cdata', value: inner });
    } else if (key.startsWith('?')) nodes.push({ kind: 'instruction', name: key, attributes });
    else nodes.push({ kind: 'element', name: key, attributes, children: fromOrdered(content) });
  }
  return nodes;
}

function toOrdered(nodes: readonly XmlNode[]): unknown[] {
  const attributesOf = (attributes: Map<string, string>): Record<string, unknown> =>
    attributes.size === 0 ? {} : { ':@': Object.fromEntries([...attributes].map(([name, value]) => [name, escapeAttribute(value)])) };
  return nodes.map((node) => {
    switch (node.kind) {
      case 'text':
        return { '#text': escapeText(node.value) };
      case 'cdata':
        return { '#cdata': [{ '#text': node.value }] };
      case 'comment':
        return { '#comment': [{ '#text': node.value }] };
      case 'instruction':
        return { [node.name]: [{ '#text': '' }], ...attributesOf(node.attributes) };
      case 'element':
        return { [node.name]: toOrdered(node.children), ...attributesOf(node.attributes) };
    }
  });
}

interface ParsedDomain {
  readonly nodes: XmlNode[];
  readonly domain: XmlElement;
}

function parseDomainDocument(document: string): ParsedDomain {
  if (typeof document !== 'string' || document.trim() === '') throw DomainXmlError.untrusted('domain', 'the document is empty');
  if (document.length > MAX_DOCUMENT_CHARS) throw DomainXmlError.untrusted('domain', `the document is larger than ${MAX_DOCUMENT_CHARS} characters`);
  const validation = XMLValidator.validate(document, { allowBooleanAttributes: false });
  if (validation !== true) {
    throw DomainXmlError.untrusted('domain', `not well-formed XML: ${validation.err.msg} (line ${validation.err.line}, column ${validation.err.col})`);
  }
  let parsed: unknown;
  try {
    parsed = new XMLParser({ ...PARSER_OPTIONS, entityDecoder: strictEntityDecoder() }).parse(document);
  } catch (error) {
    if (error instanceof EntityError) throw DomainXmlError.untrusted('domain', `refused ${error.message}`);
    throw DomainXmlError.untrusted('domain', `not well-formed XML: ${(error as Error).message}`);
  }
  const nodes = fromOrdered(parsed);
  const roots = nodes.filter((node): node is XmlElement => node.kind === 'element');
  const domain = roots[0];
  if (roots.length !== 1 || !domain || domain.name !== 'domain') throw DomainXmlError.untrusted('domain', 'the document must have exactly one root element, <domain>');
  if (nodes.some((node) => node.kind === 'text' || node.kind === 'cdata')) throw DomainXmlError.untrusted('domain', 'text outside the root element');
  return { nodes, domain };
}

function buildDocument(parsed: ParsedDomain): string {
  let built: string;
  try {
    built = builder.build(toOrdered(parsed.nodes)) as string;
  } catch (error) {
    // For example more than the builder's 100 nested elements: no domain definition looks like that.
    throw DomainXmlError.untrusted('domain', `cannot be written back: ${(error as Error).message}`);
  }
  // The builder starts with a line break when formatting.
  return `${built.trim()}\n`;
}

function elementChildren(element: XmlElement, name?: string): XmlElement[] {
  return element.children.filter((child): child is XmlElement => child.kind === 'element' && (name === undefined || child.name === name));
}

function firstChild(element: XmlElement | undefined, name: string): XmlElement | undefined {
  return element ? elementChildren(element, name)[0] : undefined;
}

function textOf(element: XmlElement): string {
  return element.children
    .filter((child): child is XmlText => child.kind === 'text' || child.kind === 'cdata')
    .map((child) => child.value)
    .join('');
}

function setText(element: XmlElement, value: string): void {
  element.children = value === '' ? [] : [{ kind: 'text', value }];
}

function removeChildren(element: XmlElement, remove: (child: XmlElement) => boolean): void {
  element.children = element.children.filter((child) => child.kind !== 'element' || !remove(child));
}

function newElement(name: string, attributes: Record<string, string> = {}, children: XmlNode[] = []): XmlElement {
  return { kind: 'element', name, attributes: new Map(Object.entries(attributes)), children };
}

/** Visits every element below `root` (not root itself) with its path of element names, e.g. "devices/disk/source". */
function walk(root: XmlElement, visit: (element: XmlElement, elementPath: string) => void, prefix = ''): void {
  for (const child of elementChildren(root)) {
    const elementPath = prefix === '' ? child.name : `${prefix}/${child.name}`;
    visit(child, elementPath);
    walk(child, visit, elementPath);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Checks shared by sanitize and render

/**
 * Resolves namespaces (fast-xml-parser keeps prefixes as they are) and refuses, outside `<metadata>`, every
 * element or attribute in a namespace: that is how libvirt spells its pass-through extensions, whatever the
 * prefix. Returns each `<metadata>` child's namespace URI.
 */
function checkNamespaces(domain: XmlElement): Map<XmlElement, string> {
  const metadataNamespaces = new Map<XmlElement, string>();
  const visit = (element: XmlElement, elementPath: string, inherited: ReadonlyMap<string, string>, insideMetadata: boolean, parentIsMetadata: boolean): void => {
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
        extension ? `elements in libvirt's ${extension} namespace pass settings straight to the hypervisor` : `element in namespace "${namespace}" outside <metadata>`,
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

function checkDomainType(domain: XmlElement, allowed: readonly string[], why: string): string {
  const type = domain.attributes.get('type') ?? '';
  if (!allowed.includes(type)) throw DomainXmlError.untrusted('domain', `type "${type}" is not one of ${allowed.join(', ')} (${why})`);
  return type;
}

/** Disk formats by libvirt's `<driver type>`, normalized to qemu-img's names. */
function diskFormatOf(driverType: string | undefined, elementPath: string): DiskFormatName {
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
function refuseUnsafeDevices(domain: XmlElement): void {
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
        if (firstChild(source, name) ?? firstChild(device, name)) throw DomainXmlError.untrusted(`${elementPath}/${name}`, 'external data files and encrypted disks cannot be cloned');
      }
      if (firstChild(device, 'mirror')) throw DomainXmlError.untrusted(`${elementPath}/mirror`, 'a block job is running on the disk');
    } else if (device.name === 'interface') {
      const type = device.attributes.get('type') ?? '';
      if (!ALLOWED_INTERFACE_TYPES.has(type)) throw DomainXmlError.untrusted(elementPath, `interface type "${type}" is not one of ${[...ALLOWED_INTERFACE_TYPES].join(', ')}`);
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
function checkAllowedHostPath(elementPath: string, attribute: string | undefined, value: string, firmwareDirectories: readonly string[]): 'allowed' | 'not-a-site' {
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
function refuseStrayHostPaths(domain: XmlElement, firmwareDirectories: readonly string[], skip: (elementPath: string, attribute: string | undefined) => boolean): void {
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

function isRewrittenSite(elementPath: string, attribute: string | undefined): boolean {
  if (elementPath === 'devices/disk/source' && attribute === 'file') return true;
  if (attribute === undefined && (elementPath === 'os/nvram' || (BOOT_FILE_ELEMENTS as readonly string[]).map((name) => `os/${name}`).includes(elementPath))) return true;
  return isCharacterDevicePath(elementPath, attribute);
}

/** Removes what identifies one VM and would collide between clones. */
function removeIdentity(domain: XmlElement): void {
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

function removeAllNamed(root: XmlElement, name: string): void {
  removeChildren(root, (child) => child.name === name);
  for (const child of elementChildren(root)) removeAllNamed(child, name);
}

function hasNamed(root: XmlElement, name: string): boolean {
  return elementChildren(root).some((child) => child.name === name || hasNamed(child, name));
}

// ---------------------------------------------------------------------------------------------------------
// Paths

function hasControlCharacters(value: string): boolean {
  return /[\u0000-\u001f\u007f]/.test(value);
}

/** Absolute, no `.`/`..` segments, no control characters. */
function isPlainAbsolute(value: string): boolean {
  return path.posix.isAbsolute(value) && !hasControlCharacters(value) && !value.split('/').some((segment) => segment === '..' || segment === '.');
}

function isInsideLexically(directory: string, candidate: string): boolean {
  const relative = path.posix.relative(path.posix.resolve(directory), path.posix.resolve(candidate));
  return relative !== '' && !relative.startsWith('..') && !path.posix.isAbsolute(relative);
}

/**
 * The real path of `candidate`, resolving symlinks in the part that exists and appending the rest. A dangling
 * symlink is followed by hand (realpath fails on it), since whoever opens the path would create its target.
 */
async function realPathOfExistingPart(candidate: string, depth = 0): Promise<string> {
  if (depth > 40) throw DomainXmlError.pathOutside('path', candidate, 'has too many levels of symbolic links');
  const missing: string[] = [];
  let current = path.posix.resolve(candidate);
  for (;;) {
    try {
      return path.posix.join(await realpath(current), ...missing.reverse());
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if ((code !== 'ENOENT' && code !== 'ENOTDIR') || current === '/') throw error;
      const entry = await lstat(current).catch(() => undefined);
      if (entry?.isSymbolicLink()) {
        const target = path.posix.resolve(path.posix.dirname(current), await readlink(current));
        return realPathOfExistingPart(path.posix.join(target, ...missing.reverse()), depth + 1);
      }
      missing.push(path.posix.basename(current));
      current = path.posix.dirname(current);
    }
  }
}

/**
 * Checks that `candidate` stays inside `directory`: absolute, no `..`, lexically inside, and inside after
 * resolving the symlinks of whatever part of it exists. Returns the normalized path.
 */
async function assertInsideDirectory(directory: string, candidate: string, field: string): Promise<string> {
  if (typeof candidate !== 'string' || candidate === '') throw DomainXmlError.invalidField(field, 'is empty');
  if (!isPlainAbsolute(candidate)) throw DomainXmlError.pathOutside(field, candidate, 'must be an absolute path without "." or ".." segments or control characters');
  if (!isInsideLexically(directory, candidate)) throw DomainXmlError.pathOutside(field, candidate, `is not inside ${directory}`);
  const [realDirectory, realCandidate] = await Promise.all([realPathOfExistingPart(directory), realPathOfExistingPart(candidate)]);
  if (!isInsideLexically(realDirectory, realCandidate)) throw DomainXmlError.pathOutside(field, candidate, `resolves through a symlink to ${realCandidate}, outside ${directory}`);
  return path.posix.normalize(candidate);
}

function assertDirectoryOption(value: string | undefined, field: string): string {
  if (typeof value !== 'string' || !isPlainAbsolute(value)) throw DomainXmlError.invalidField(field, 'must be an absolute path without "." or ".." segments');
  return path.posix.normalize(value);
}

function assertFileName(value: string, field: string): string {
  if (!FILE_NAME_PATTERN.test(value)) throw DomainXmlError.pathOutside(field, value, `must be a single file name matching ${FILE_NAME_PATTERN.source}`);
  return value;
}

// ---------------------------------------------------------------------------------------------------------
// sanitizeDomainTemplate

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
      const fileName = assertFileName(options.diskFileName ? options.diskFileName({ index, target, format }) : `disk-${index}.${FILE_EXTENSIONS[format]}`, `disks[${index}].file_name`);
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

  refuseStrayHostPaths(domain, options.firmwareDirectories ?? DEFAULT_FIRMWARE_DIRECTORIES, (elementPath, attribute) => isRewrittenSite(elementPath, attribute));
  return { xml: buildDocument(parsed), domainType, disks, bootFiles };
}

function localName(qualifiedName: string): string {
  return qualifiedName.slice(qualifiedName.indexOf(':') + 1);
}

// ---------------------------------------------------------------------------------------------------------
// renderClone

/** The lineage cowherd records in a clone's `<metadata>`. */
export interface CloneMetadata {
  /** What the clone was made from: an image, `images/{image}`, or a VM, `hosts/{host}/virtualMachines/{vm}`. */
  readonly source: { readonly image: string } | { readonly virtualMachine: string };
  /** The CloneVirtualMachines operation, `operations/{operation}`. */
  readonly operation: string;
  /** The request's idempotency key. */
  readonly requestId: string;
}

/** One copy-on-write child made for a template disk. */
export interface CloneDiskOption {
  /** The template disk's `<target dev>`. */
  readonly target: string;
  /** The child's absolute path; must be inside the clone directory. */
  readonly path: string;
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
 * libvirt `<driver>` of a child disk. KVM: a qcow2 overlay opened by qemu. Xen: a VHD differencing disk
 * opened by blktap (`name='tap' type='vhd'`): libxl maps `tap` + `vhd` to its TAP backend, whose tapdisk
 * follows the VHD parent locators. qemu's VHD ("vpc") driver, which `name='qemu'` would select (libxl's
 * qdisk backend), ignores a differencing VHD's parent and shows garbage; and libxl does not accept the
 * format name "vpc" at all.
 */
const CHILD_DISK_DRIVER: Readonly<Record<HypervisorKind, { readonly name: string; readonly type: string }>> = {
  kvm: { name: 'qemu', type: 'qcow2' },
  xen: { name: 'tap', type: 'vhd' },
};

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
  if (typeof options.name !== 'string' || !DOMAIN_NAME_PATTERN.test(options.name)) {
    throw DomainXmlError.invalidField('domain_name', `must match ${DOMAIN_NAME_PATTERN.source}`);
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
  const driver = CHILD_DISK_DRIVER[options.hypervisor];
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
  for (const { option, index } of wanted.values()) throw DomainXmlError.invalidField(`disks[${index}].target`, `"${option.target}" is not a file disk of the template`);

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
    if (!isPlainAbsolute(value) || !isInsideLexically(cloneDirectory, value)) throw DomainXmlError.untrusted(elementPath, `"${value}" is neither a file name nor inside the clone directory`);
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
      if ((nvram.attributes.get('type') ?? 'file') !== 'file' || firstChild(nvram, 'source')) throw DomainXmlError.untrusted('os/nvram', 'only file NVRAM can be cloned');
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
    newElement(`${CLONE_METADATA_PREFIX}:clone`, { [`xmlns:${CLONE_METADATA_PREFIX}`]: CLONE_METADATA_NAMESPACE }, [
      'image' in metadata.source ? field('image', metadata.source.image) : field('virtualMachine', metadata.source.virtualMachine),
      field('operation', metadata.operation),
      field('requestId', metadata.requestId),
    ]),
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

/**
 * Reads the `<cowherd:clone>` record from a domain's XML (whatever prefix it uses); undefined when the
 * domain is not a cowherd clone or the record is incomplete.
 */
export function readCloneMetadata(xml: string): CloneMetadata | undefined {
  let parsed: ParsedDomain;
  let namespaces: Map<XmlElement, string>;
  try {
    parsed = parseDomainDocument(xml);
    namespaces = metadataNamespacesOnly(parsed.domain);
  } catch {
    return undefined;
  }
  const metadata = firstChild(parsed.domain, 'metadata');
  const record = metadata ? elementChildren(metadata).find((child) => namespaces.get(child) === CLONE_METADATA_NAMESPACE && localName(child.name) === 'clone') : undefined;
  if (!record) return undefined;
  const value = (name: string): string | undefined => {
    const element = elementChildren(record).find((child) => localName(child.name) === name);
    return element ? textOf(element) : undefined;
  };
  const image = value('image');
  const virtualMachine = value('virtualMachine');
  const operation = value('operation') ?? '';
  const requestId = value('requestId') ?? '';
  if (image) return { source: { image }, operation, requestId };
  if (virtualMachine) return { source: { virtualMachine }, operation, requestId };
  return undefined;
}

/** The namespace of each `<metadata>` child, without refusing anything (for reading live domains). */
function metadataNamespacesOnly(domain: XmlElement): Map<XmlElement, string> {
  const result = new Map<XmlElement, string>();
  const declared = (element: XmlElement, prefix: string): string | undefined => element.attributes.get(prefix === '' ? 'xmlns' : `xmlns:${prefix}`);
  const metadata = firstChild(domain, 'metadata');
  for (const child of metadata ? elementChildren(metadata) : []) {
    const prefix = child.name.includes(':') ? child.name.slice(0, child.name.indexOf(':')) : '';
    const uri = declared(child, prefix) ?? declared(metadata!, prefix) ?? declared(domain, prefix);
    if (uri !== undefined) result.set(child, uri);
  }
  return result;
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
    disks.push({ target, fileName: assertFileName(fileName, `disks[${disks.length}].file_name`), format: diskFormatOf(firstChild(disk, 'driver')?.attributes.get('type'), 'devices/disk/driver') });
  }
  return disks;
}
