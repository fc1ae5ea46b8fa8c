/**
 * Parsing layer of domain XML: a small typed tree over fast-xml-parser's `preserveOrder` form. The layers
 * above parse, change the tree and build it again, so element order, attributes, unknown elements and
 * comments survive; nothing is string surgery. Entities are decoded strictly (the five XML entities and
 * character references; a DOCTYPE that declares entities, an unknown entity or a bare `&` is refused), so
 * what the safety layer checks is exactly what libvirt reads from the output.
 */
import { XMLBuilder, XMLParser, XMLValidator } from 'fast-xml-parser';
import { DomainXmlError } from './errors.js';

/** Domain XML is a few KiB; anything this large is not a domain definition. */
const MAX_DOCUMENT_CHARS = 4 * 1024 * 1024;

export interface XmlElement {
  readonly kind: 'element';
  readonly name: string;
  /** In document order. Values are decoded; the builder step escapes them again. */
  readonly attributes: Map<string, string>;
  children: XmlNode[];
}
export interface XmlText {
  readonly kind: 'text' | 'cdata' | 'comment';
  readonly value: string;
}
export interface XmlInstruction {
  readonly kind: 'instruction';
  readonly name: string;
  readonly attributes: Map<string, string>;
}
export type XmlNode = XmlElement | XmlText | XmlInstruction;

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
          const isXmlChar =
            code === 0x9 ||
            code === 0xa ||
            code === 0xd ||
            (code >= 0x20 && code <= 0xd7ff) ||
            (code >= 0xe000 && code <= 0xfffd) ||
            (code >= 0x10000 && code <= 0x10ffff);
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

export interface ParsedDomain {
  readonly nodes: XmlNode[];
  readonly domain: XmlElement;
}

export function parseDomainDocument(document: string): ParsedDomain {
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
  if (roots.length !== 1 || !domain || domain.name !== 'domain')
    throw DomainXmlError.untrusted('domain', 'the document must have exactly one root element, <domain>');
  if (nodes.some((node) => node.kind === 'text' || node.kind === 'cdata')) throw DomainXmlError.untrusted('domain', 'text outside the root element');
  return { nodes, domain };
}

export function buildDocument(parsed: ParsedDomain): string {
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

export function elementChildren(element: XmlElement, name?: string): XmlElement[] {
  return element.children.filter((child): child is XmlElement => child.kind === 'element' && (name === undefined || child.name === name));
}

export function firstChild(element: XmlElement | undefined, name: string): XmlElement | undefined {
  return element ? elementChildren(element, name)[0] : undefined;
}

export function textOf(element: XmlElement): string {
  return element.children
    .filter((child): child is XmlText => child.kind === 'text' || child.kind === 'cdata')
    .map((child) => child.value)
    .join('');
}

export function setText(element: XmlElement, value: string): void {
  element.children = value === '' ? [] : [{ kind: 'text', value }];
}

export function removeChildren(element: XmlElement, remove: (child: XmlElement) => boolean): void {
  element.children = element.children.filter((child) => child.kind !== 'element' || !remove(child));
}

export function newElement(name: string, attributes: Record<string, string> = {}, children: XmlNode[] = []): XmlElement {
  return { kind: 'element', name, attributes: new Map(Object.entries(attributes)), children };
}

/** Visits every element below `root` (not root itself) with its path of element names, e.g. "devices/disk/source". */
/** A domain's `<devices>` (added when missing), its `<disk>` children and the target devices they take. */
export function diskDevices(domain: XmlElement): { devices: XmlElement; disks: XmlElement[]; usedTargets: Set<string> } {
  let devices = firstChild(domain, 'devices');
  if (!devices) {
    devices = newElement('devices');
    domain.children.push(devices);
  }
  const disks = elementChildren(devices, 'disk');
  const usedTargets = new Set(disks.map((disk) => firstChild(disk, 'target')?.attributes.get('dev') ?? '').filter((dev) => dev !== ''));
  return { devices, disks, usedTargets };
}

export function walk(root: XmlElement, visit: (element: XmlElement, elementPath: string) => void, prefix = ''): void {
  for (const child of elementChildren(root)) {
    const elementPath = prefix === '' ? child.name : `${prefix}/${child.name}`;
    visit(child, elementPath);
    walk(child, visit, elementPath);
  }
}

export function removeAllNamed(root: XmlElement, name: string): void {
  removeChildren(root, (child) => child.name === name);
  for (const child of elementChildren(root)) removeAllNamed(child, name);
}

export function hasNamed(root: XmlElement, name: string): boolean {
  return elementChildren(root).some((child) => child.name === name || hasNamed(child, name));
}

/** The local part of a qualified name (`cowherd:clone` is `clone`). */
export function localName(qualifiedName: string): string {
  return qualifiedName.slice(qualifiedName.indexOf(':') + 1);
}
