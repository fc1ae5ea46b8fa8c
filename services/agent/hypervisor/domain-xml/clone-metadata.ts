/** cowherd's lineage record in a clone's `<metadata>` (`<cowherd:clone>`): its namespace, shape and reader. */
import { basename, dirname } from 'node:path';
import { IMAGE_NAME, parseImageKey } from '../../../common/domain/resource-names.js';
import {
  buildDocument,
  elementChildren,
  firstChild,
  localName,
  newElement,
  parseDomainDocument,
  removeChildren,
  textOf,
  type ParsedDomain,
  type XmlElement,
} from './xml-tree.js';

/** The namespace of the `<cowherd:clone>` element that {@link renderClone} writes into `<metadata>`. */
export const CLONE_METADATA_NAMESPACE = 'https://cowherd.dev/xmlns/clone/1';
/** Every namespace under this prefix is cowherd's own; other tools' metadata is dropped from templates. */
export const COWHERD_NAMESPACE_PREFIX = 'https://cowherd.dev/xmlns/';
export const CLONE_METADATA_PREFIX = 'cowherd';

/** The disk backends there are (disk-backends.ts), as a request, an image default and a clone's record name them. */
export const DISK_BACKEND_NAMES = ['qcow2-overlay', 'vhd-differencing', 'reflink-copy'] as const;
export type DiskBackendName = (typeof DISK_BACKEND_NAMES)[number];

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
  /**
   * The exact version the system disk stands on, `images/{image}/versions/{version}` (numbered); absent in
   * clones made before versions existed (then the backing file's replica directory says it, see
   * {@link imageKeyOfBackingFile}).
   */
  readonly imageVersion?: string;
  /** The version before the last rebase, `images/{image}/versions/{version}`; absent if never rebased. */
  readonly previousImageVersion?: string;
  /** `<target dev>` of each persistent disk (data_disk_bytes): kept by a rebase, reported with Disk.persistent. */
  readonly persistentDisks?: readonly string[];
  /** The RebaseVirtualMachines operation of the last rebase: its retry records the same clone.rebased again. */
  readonly rebaseOperation?: string;
  /**
   * How its disks were made from the base (`<cowherd:diskBackend>`); absent in clones made before it was
   * recorded, which have the host's standard backend. A `reflink-copy` clone depends on no base (see
   * {@link dependsOnBase}); a rebase makes its new disks with the same backend.
   */
  readonly diskBackend?: DiskBackendName;
}

/**
 * Whether a clone's disks depend on the files it was made from (its image replica's, or its source VM's):
 * true unless it is a reflink copy, which shares blocks with its base but reads nothing through it. Only such
 * clones count as dependents of a replica or a source VM; a reflink clone's lineage still names its source.
 */
export function dependsOnBase(metadata: Pick<CloneMetadata, 'diskBackend'>): boolean {
  return metadata.diskBackend !== 'reflink-copy';
}

/** The fields of the record that {@link updateCloneMetadata} may set; a field given as '' is removed. */
export interface CloneMetadataUpdate {
  readonly imageVersion?: string;
  readonly previousImageVersion?: string;
  readonly persistentDisks?: readonly string[];
  readonly rebaseOperation?: string;
}

/** The record's elements in the order renderClone writes them (readers look them up by name). */
export function cloneMetadataFields(metadata: CloneMetadata): Array<[string, string]> {
  return [
    'image' in metadata.source ? ['image', metadata.source.image] : ['virtualMachine', metadata.source.virtualMachine],
    ['operation', metadata.operation],
    ['requestId', metadata.requestId],
    ...(metadata.imageVersion ? [['imageVersion', metadata.imageVersion] as [string, string]] : []),
    ...(metadata.previousImageVersion ? [['previousImageVersion', metadata.previousImageVersion] as [string, string]] : []),
    ...(metadata.persistentDisks ?? []).map((target): [string, string] => ['persistentDisk', target]),
    ...(metadata.rebaseOperation ? [['rebaseOperation', metadata.rebaseOperation] as [string, string]] : []),
    ...(metadata.diskBackend ? [['diskBackend', metadata.diskBackend] as [string, string]] : []),
  ];
}

/**
 * The storage key of the version a clone's metadata names: its imageVersion, else (a clone made before
 * versions existed) its image, which was then always version 1. Undefined for clones of a virtual machine.
 */
export function cloneImageKey(metadata: CloneMetadata | undefined): string | undefined {
  if (!metadata || !('image' in metadata.source)) return undefined;
  return IMAGE_NAME.parse(metadata.imageVersion ?? metadata.source.image)?.image;
}

/**
 * The storage key of the replica a backing file lies in: `<image dir>/images/<key>[.generation-<n>]/<file>`;
 * undefined for any other path (a VM's own disk, a file outside a replica).
 */
export function imageKeyOfBackingFile(path: string): string | undefined {
  const directory = dirname(path);
  if (basename(dirname(directory)) !== 'images') return undefined;
  const name = basename(directory).replace(/\.generation-[1-9][0-9]{0,8}$/, '');
  return parseImageKey(name) ? name : undefined;
}

/**
 * Sets fields of the `<cowherd:clone>` record in a domain's XML (a rebase's new and previous version, the
 * persistent disks), keeping everything else of the document. Throws when the domain has no record.
 */
export function updateCloneMetadata(xml: string, update: CloneMetadataUpdate): string {
  const parsed = parseDomainDocument(xml);
  const namespaces = metadataNamespacesOnly(parsed.domain);
  const metadata = firstChild(parsed.domain, 'metadata');
  const record = metadata
    ? elementChildren(metadata).find((child) => namespaces.get(child) === CLONE_METADATA_NAMESPACE && localName(child.name) === 'clone')
    : undefined;
  if (!record) throw new Error('the domain has no cowherd clone record');
  const prefix = record.name.includes(':') ? `${record.name.slice(0, record.name.indexOf(':'))}:` : '';
  const set = (name: string, values: readonly string[]): void => {
    removeChildren(record, (child) => localName(child.name) === name);
    for (const value of values) record.children.push(newElement(`${prefix}${name}`, {}, [{ kind: 'text', value }]));
  };
  if (update.imageVersion !== undefined) set('imageVersion', update.imageVersion === '' ? [] : [update.imageVersion]);
  if (update.previousImageVersion !== undefined) set('previousImageVersion', update.previousImageVersion === '' ? [] : [update.previousImageVersion]);
  if (update.persistentDisks !== undefined) set('persistentDisk', update.persistentDisks);
  if (update.rebaseOperation !== undefined) set('rebaseOperation', update.rebaseOperation === '' ? [] : [update.rebaseOperation]);
  return buildDocument(parsed);
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
  const imageVersion = value('imageVersion');
  const previousImageVersion = value('previousImageVersion');
  const rebaseOperation = value('rebaseOperation');
  // An unknown name (a newer agent's backend) is left out: the clone then counts as depending on its base.
  const diskBackend = DISK_BACKEND_NAMES.find((name) => name === value('diskBackend')?.trim());
  const persistentDisks = elementChildren(record)
    .filter((child) => localName(child.name) === 'persistentDisk')
    .map((child) => textOf(child).trim())
    .filter((target) => target !== '');
  const extra = {
    ...(digest ? { guestConfigurationDigest: digest } : {}),
    ...(imageVersion ? { imageVersion } : {}),
    ...(previousImageVersion ? { previousImageVersion } : {}),
    ...(persistentDisks.length > 0 ? { persistentDisks } : {}),
    ...(rebaseOperation ? { rebaseOperation } : {}),
    ...(diskBackend ? { diskBackend } : {}),
  };
  if (image) return { source: { image }, operation, requestId, ...extra };
  if (virtualMachine) return { source: { virtualMachine }, operation, requestId, ...extra };
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
