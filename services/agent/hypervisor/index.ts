/**
 * The hypervisor room: libvirt (virsh, its events and facts, a view scoped to the image directory), domain
 * XML (parsing, safety checks, image templates, clone rendering), clones' disks behind one disk-backend
 * interface (qcow2 overlays, VHD differencing disks, reflink copies), disk inspection, and the domains that depend on an image's files. It uses only
 * the image-directory room; the swarm and the host are not its business.
 */
export {
  LibvirtError,
  VirshLibvirt,
  type DomainDisk,
  type DomainInfo,
  type DomainState,
  type EventWatch,
  type HypervisorFacts,
  type Libvirt,
  type LibvirtEvent,
} from './libvirt.js';
export { scopedLibvirt } from './scoped-libvirt.js';
export { virtualMachineId, virtualMachineState } from './domain-state.js';
export { backingChain, domainsBackedBy, domainsClonedFrom, imageDependents, type ImageDependents } from './dependents.js';
export {
  cloneImageKey,
  dependsOnBase,
  imageKeyOfBackingFile,
  readCloneMetadata,
  updateCloneMetadata,
  type CloneMetadata,
  type CloneMetadataUpdate,
} from './domain-xml/clone-metadata.js';
export { attachDataDisk } from './domain-xml/data-disk-attachment.js';
export { DomainXmlError } from './domain-xml/errors.js';
export type { DiskFormatName } from './domain-xml/safety.js';
export { sanitizeDomainTemplate, templateBootFiles, templateDisks, type DomainTemplate } from './domain-xml/template.js';
export { renderClone, type HypervisorKind, type RenderedClone } from './domain-xml/clone-rendering.js';
export { renderImportDomain, type ImportDomainParameters } from './domain-xml/import-domain.js';
export { attachSeedImage } from './domain-xml/seed-attachment.js';
export { buildSeedImage, readSeedImage, SEED_SYSTEM_AREA_BYTES, SEED_VOLUME_LABEL, withNewInstanceId } from './seed-image.js';
export { protectBase, readBackingFileName, repointOverlay } from './overlays.js';
export {
  childDiskFormat,
  diskBackendChoice,
  diskBackendFor,
  diskBackendValue,
  reflinkSupported,
  type BaseDisk,
  type ChildDiskFormat,
  type DiskBackend,
  type DiskBackendName,
  type DiskDriver,
} from './disk-backends.js';
export { readVhdInfo } from './vhd.js';
export { createQemuImgDiskInspector, inspectAll, type DiskInspector } from './disks.js';
