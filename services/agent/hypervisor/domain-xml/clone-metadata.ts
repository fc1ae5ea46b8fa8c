/** cowherd's lineage record in a clone's `<metadata>` (`<cowherd:clone>`): its namespace, shape and reader. */
import { elementChildren, firstChild, localName, parseDomainDocument, textOf, type ParsedDomain, type XmlElement } from './xml-tree.js';

/** The namespace of the `<cowherd:clone>` element that {@link renderClone} writes into `<metadata>`. */
export const CLONE_METADATA_NAMESPACE = 'https://cowherd.dev/xmlns/clone/1';
/** Every namespace under this prefix is cowherd's own; other tools' metadata is dropped from templates. */
export const COWHERD_NAMESPACE_PREFIX = 'https://cowherd.dev/xmlns/';
export const CLONE_METADATA_PREFIX = 'cowherd';

/** The lineage cowherd records in a clone's `<metadata>`. */
export interface CloneMetadata {
  /** What the clone was made from: an image, `images/{image}`, or a VM, `hosts/{host}/virtualMachines/{vm}`. */
  readonly source: { readonly image: string } | { readonly virtualMachine: string };
  /** The CloneVirtualMachines operation, `operations/{operation}`. */
  readonly operation: string;
  /** The request's idempotency key. */
  readonly requestId: string;
  /** SHA-256 of the guest configuration its NoCloud seed was made from (seed-attachment.ts); absent without one. */
  readonly guestConfigurationDigest?: string;
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
  const record = metadata
    ? elementChildren(metadata).find((child) => namespaces.get(child) === CLONE_METADATA_NAMESPACE && localName(child.name) === 'clone')
    : undefined;
  if (!record) return undefined;
  const value = (name: string): string | undefined => {
    const element = elementChildren(record).find((child) => localName(child.name) === name);
    return element ? textOf(element) : undefined;
  };
  const image = value('image');
  const virtualMachine = value('virtualMachine');
  const operation = value('operation') ?? '';
  const requestId = value('requestId') ?? '';
  const digest = value('guestConfigurationDigest');
  const guest = digest ? { guestConfigurationDigest: digest } : {};
  if (image) return { source: { image }, operation, requestId, ...guest };
  if (virtualMachine) return { source: { virtualMachine }, operation, requestId, ...guest };
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
