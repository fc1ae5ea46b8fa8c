/** Reads from inventory that several commands share, every page fetched, and how resources read as text. */
import type {
  ListHostsResponse,
  ListImageReplicasResponse,
  ListImagesResponse,
  ListImageVersionsResponse,
  ListVirtualMachinesResponse,
} from '../gen/cowherd/inventory/v1/inventory_service.js';
import {
  host_StateToJSON,
  image_StateToJSON,
  imageReplica_StateToJSON,
  ImageView,
  virtualMachine_StateToJSON,
  type Host,
  type Image,
  type ImageReplica,
  type VirtualMachine,
} from '../gen/cowherd/inventory/v1/resources.js';
import { hypervisorToJSON, type Hypervisor } from '../gen/cowherd/common/v1/types.js';
import { EVERY_HOST, HOST_NAME, IMAGE_NAME, parseImageReference, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';
import type { CliContext } from './cli-context.js';
import { enumWord, percent } from './output.js';

const PAGE = 1000;

/** Every host matching `filter`. */
export function listHosts(context: CliContext, filter = ''): Promise<Host[]> {
  return context.listAll<Host, ListHostsResponse>(
    'inventory',
    (pageToken, cb) => context.inventory.listHosts({ pageSize: PAGE, pageToken, filter }, cb),
    (response) => response.hosts,
  );
}

/** Every image of the catalog matching `filter` (basic view). */
export function listImages(context: CliContext, filter = ''): Promise<Image[]> {
  return context.listAll<Image, ListImagesResponse>(
    'inventory',
    (pageToken, cb) => context.inventory.listImages({ pageSize: PAGE, pageToken, filter, view: ImageView.IMAGE_VIEW_BASIC }, cb),
    (response) => response.images,
  );
}

/** Every version of `image` (`images/{image}`), oldest first (basic view). */
export function listImageVersions(context: CliContext, image: string): Promise<Image[]> {
  return context.listAll<Image, ListImageVersionsResponse>(
    'inventory',
    (pageToken, cb) => context.inventory.listImageVersions({ parent: image, pageSize: PAGE, pageToken, view: ImageView.IMAGE_VIEW_BASIC }, cb),
    (response) => response.versions,
  );
}

/** Every replica under `parent` (`hosts/{host}` or `hosts/-`) matching `filter`. */
export function listReplicas(context: CliContext, parent = EVERY_HOST, filter = ''): Promise<ImageReplica[]> {
  return context.listAll<ImageReplica, ListImageReplicasResponse>(
    'inventory',
    (pageToken, cb) => context.inventory.listImageReplicas({ parent, pageSize: PAGE, pageToken, filter }, cb),
    (response) => response.imageReplicas,
  );
}

/** Every VM under `parent` (`hosts/{host}` or `hosts/-`) matching `filter`. */
export function listVirtualMachines(context: CliContext, parent = EVERY_HOST, filter = ''): Promise<VirtualMachine[]> {
  return context.listAll<VirtualMachine, ListVirtualMachinesResponse>(
    'inventory',
    (pageToken, cb) => context.inventory.listVirtualMachines({ parent, pageSize: PAGE, pageToken, filter }, cb),
    (response) => response.virtualMachines,
  );
}

/** READY, DRAINING, ... */
export function hostState(host: Host): string {
  return enumWord(host_StateToJSON(host.state), 'STATE_');
}

/** AVAILABLE, PUBLISHING, ... */
export function imageState(image: Image): string {
  return enumWord(image_StateToJSON(image.state), 'STATE_');
}

/** AVAILABLE, or TRANSFERRING 45% while it moves. */
export function replicaState(replica: ImageReplica): string {
  const state = enumWord(imageReplica_StateToJSON(replica.state), 'STATE_');
  return state === 'TRANSFERRING' || state === 'VERIFYING' ? `${state} ${percent(replica.progress?.bytesDone, replica.progress?.bytesTotal)}` : state;
}

/** RUNNING, SHUT_OFF, ... */
export function virtualMachineState(vm: VirtualMachine): string {
  return enumWord(virtualMachine_StateToJSON(vm.state), 'STATE_');
}

/** KVM, XEN. */
export function hypervisorWord(hypervisor: Hypervisor): string {
  return enumWord(hypervisorToJSON(hypervisor), 'HYPERVISOR_');
}

/** `hosts/kvm-01/virtualMachines/web-1` -> `kvm-01/web-1`, what `vms` commands accept. */
export function shortVirtualMachineName(name: string): string {
  const ids = VIRTUAL_MACHINE_NAME.parse(name);
  return ids ? `${ids.host}/${ids.virtualMachine}` : name;
}

/**
 * `hosts/kvm-01` -> `kvm-01`, `images/debian-12` -> `debian-12`, `images/debian-12/versions/3` ->
 * `debian-12/versions/3` (what the commands accept), `hosts/-` -> `-`; any other text as it is.
 */
export function bareId(name: string): string {
  if (name === EVERY_HOST) return '-';
  if (name.startsWith('images/') && name.includes('/versions/') && parseImageReference(name)) return name.slice('images/'.length);
  return HOST_NAME.parse(name)?.host ?? IMAGE_NAME.parse(name)?.image ?? name;
}

/** The version number a record or view describes (0 from a server without versions reads as 1). */
export function versionOf(image: Image): number {
  return Number(image.version) || 1;
}

/** `stable, latest` -> the aliases that point at `version`, `latest` last; `-` when none. */
export function aliasesAt(aliases: Readonly<Record<string, string>>, version: number): string {
  const names = Object.entries(aliases)
    .filter(([, target]) => Number(target) === version)
    .map(([alias]) => alias)
    .sort((a, b) => (a === 'latest' ? 1 : b === 'latest' ? -1 : a.localeCompare(b)));
  return names.length > 0 ? names.join(', ') : '-';
}

/** `images/x/versions/3` -> 3; undefined for a name without a version number. */
export function versionNumberOf(name: string): number | undefined {
  return parseImageReference(name)?.version;
}

/** `key=value,key=value` or `-`. */
export function labelText(labels: Readonly<Record<string, string>>): string {
  const pairs = Object.entries(labels).map(([key, value]) => `${key}=${value}`);
  return pairs.length > 0 ? pairs.join(',') : '-';
}
