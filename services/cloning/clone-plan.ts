/**
 * Checking a CloneVirtualMachines request and planning it, before any operation exists: the request's
 * shape, the source, the hosts, placement and every clone's name. The plan is the operation's initial
 * metadata (every clone PENDING with its host and domain name), so names are fixed once and persisted with
 * the operation; the operation itself never re-plans.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { DiskBackend, hypervisorToJSON } from '../gen/cowherd/common/v1/types.js';
import {
  CloneResult_State,
  CloneVirtualMachinesRequest_Delivery,
  Placement_Strategy,
  type CloneResult,
  type CloneVirtualMachinesMetadata,
  type CloneVirtualMachinesRequest,
} from '../gen/cowherd/cloning/v1/cloning_service.js';
import type { CreateClonesRequest } from '../gen/cowherd/agent/v1/agent_service.js';
import {
  Host_State,
  Image_State,
  VirtualMachine_State,
  host_StateToJSON,
  image_StateToJSON,
  virtualMachine_StateToJSON,
  type GuestConfiguration,
  type Host,
  type Image,
} from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import {
  checkGuestConfiguration,
  effectiveGuestConfiguration,
  guestConfigurationDigest,
  PLACEHOLDER_UUID,
  renderGuestIdentity,
} from '../common/domain/guest-configuration.js';
import { HOST_NAME, imageVersionName, parseImageReference, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';
import { checkDiskBackend, checkDiskBackendFor, diskBackendLabel } from '../common/domain/disk-backend-choice.js';
import type { FleetView } from './fleet-view.js';
import { parseNameTemplate, renderNames } from './name-template.js';
import { placeRoundRobin, placeSpread } from './placement.js';

/** Clones per request at most: the proto's limit, and what keeps one operation record well below NATS's 1 MiB. */
export const MAX_CLONE_COUNT = 1000;
/** Hosts in placement.hosts at most (the proto's limit). */
export const MAX_PLACEMENT_HOSTS = 1000;
/** The largest persistent data disk a clone may get (the proto's limit): 16 TiB. */
export const MAX_DATA_DISK_BYTES = 16 * 2 ** 40;

/** What planning needs. */
export interface PlanOptions {
  readonly fleet: FleetView;
  /**
   * Asks a host's agent to check a CreateClones request without making anything (validate_only): what only
   * the agent can see of a source virtual machine (its domain XML, disk and boot file paths and formats).
   * Without it (tests of planning alone) those checks happen when the agent makes the clones.
   */
  readonly checkOnHost?: (host: Host, request: CreateClonesRequest) => Promise<void>;
  /** Draws `{random}`; default 6 random [a-z0-9]. */
  readonly random?: () => string;
  readonly now?: () => Date;
}

/** The source of a request after the shape check. */
export type CloneSource =
  | { readonly kind: 'image'; readonly name: string; readonly id: string }
  | { readonly kind: 'virtualMachine'; readonly name: string; readonly host: string };

/**
 * Checks the request without reading the fleet: source, count, placement and template. Throws
 * INVALID_ARGUMENT naming the first bad field.
 */
export function checkRequestShape(request: CloneVirtualMachinesRequest): CloneSource {
  const source = parseSource(request);
  if (!Number.isInteger(request.count) || request.count < 1 || request.count > MAX_CLONE_COUNT) {
    throw CowherdError.invalidArgument('count', `must be 1 to ${MAX_CLONE_COUNT}, got ${request.count}`);
  }
  const placement = request.placement;
  if (placement) {
    if (placement.maxClonesPerHost < 0) throw CowherdError.invalidArgument('placement.max_clones_per_host', 'must not be negative (0 means no limit)');
    switch (placement.strategy) {
      case Placement_Strategy.STRATEGY_UNSPECIFIED:
        if (placement.hosts.length > 0) throw CowherdError.invalidArgument('placement.hosts', 'must be empty unless strategy is STRATEGY_HOSTS');
        break;
      case Placement_Strategy.STRATEGY_HOSTS: {
        if (placement.hosts.length === 0 || placement.hosts.length > MAX_PLACEMENT_HOSTS) {
          throw CowherdError.invalidArgument('placement.hosts', `must list 1 to ${MAX_PLACEMENT_HOSTS} hosts for STRATEGY_HOSTS`);
        }
        const seen = new Set<string>();
        placement.hosts.forEach((host, index) => {
          const field = `placement.hosts[${index}]`;
          if (parseHostName(host) === undefined) throw CowherdError.invalidArgument(field, `must be hosts/{host}, got ${JSON.stringify(host)}`);
          if (seen.has(host)) throw CowherdError.invalidArgument(field, `repeats ${host}`);
          seen.add(host);
          if (source.kind === 'virtualMachine' && host !== source.host) {
            throw CowherdError.invalidArgument(field, `must be the source virtual machine's host ${source.host}: clones of a virtual machine stay on its host`);
          }
        });
        break;
      }
      case Placement_Strategy.STRATEGY_WHERE_IMAGE_IS:
        if (source.kind !== 'image') throw CowherdError.invalidArgument('placement.strategy', 'STRATEGY_WHERE_IMAGE_IS is only for image sources');
        if (placement.hosts.length > 0) throw CowherdError.invalidArgument('placement.hosts', 'must be empty for STRATEGY_WHERE_IMAGE_IS');
        break;
      default:
        throw CowherdError.invalidArgument('placement.strategy', `is not a known strategy (${String(placement.strategy)})`);
    }
  }
  parseNameTemplate(request.nameTemplate, request.count);
  if (request.guestConfiguration !== undefined) checkGuestConfiguration(request.guestConfiguration);
  dataDiskBytesOf(request);
  checkDelivery(request, source.kind);
  checkRequestedDiskBackend(request);
  return source;
}

/**
 * INVALID_ARGUMENT naming `disk_backend` for a value that is no DiskBackend, or REFLINK_COPY with
 * DELIVERY_STREAM: a reflink copy needs the replica's complete files, a streaming clone's base is still arriving.
 */
export function checkRequestedDiskBackend(request: Pick<CloneVirtualMachinesRequest, 'diskBackend' | 'delivery'>): void {
  const backend = checkDiskBackend(request.diskBackend, 'disk_backend');
  if (backend === DiskBackend.DISK_BACKEND_REFLINK_COPY && request.delivery === CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM)
    throw CowherdError.invalidArgument(
      'disk_backend',
      "REFLINK_COPY cannot be used with DELIVERY_STREAM: a reflink copy needs the replica's complete files, and a streaming clone's base is still arriving (use QCOW2_OVERLAY to stream, or DELIVERY_DISTRIBUTE)",
    );
}

/**
 * The backend the clones are made with: the request's, else (an image source) the image's default. INVALID_ARGUMENT
 * (`disk_backend`) when the source's hypervisor does not run it, or when the image's default is REFLINK_COPY and
 * the request streams without choosing another backend.
 */
function effectiveDiskBackend(
  request: Pick<CloneVirtualMachinesRequest, 'diskBackend' | 'delivery'>,
  source: { readonly name: string; readonly hypervisor: Host['hypervisor']; readonly defaultDiskBackend?: DiskBackend },
): DiskBackend {
  const requested = checkDiskBackend(request.diskBackend, 'disk_backend');
  if (requested !== DiskBackend.DISK_BACKEND_UNSPECIFIED) {
    checkDiskBackendFor(requested, source.hypervisor, 'disk_backend', source.name);
    return requested;
  }
  // The image's default (UNSPECIFIED without one: the hosts' standard).
  const backend = checkDiskBackend(source.defaultDiskBackend ?? DiskBackend.DISK_BACKEND_UNSPECIFIED, 'disk_backend');
  if (backend === DiskBackend.DISK_BACKEND_REFLINK_COPY && request.delivery === CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM)
    throw CowherdError.invalidArgument(
      'disk_backend',
      `is unset, and ${source.name}'s default_disk_backend is REFLINK_COPY, which cannot stream (DELIVERY_STREAM): set disk_backend to QCOW2_OVERLAY to stream, or use DELIVERY_DISTRIBUTE`,
    );
  checkDiskBackendFor(backend, source.hypervisor, 'disk_backend', `${source.name} (its default_disk_backend)`);
  return backend;
}

/** FAILED_PRECONDITION (HYPERVISOR_MISMATCH) unless the host reports that its image directory makes reflink copies. */
function requireReflinks(host: Host): void {
  if (host.imageDirectoryReflinks) return;
  throw CowherdError.failedPrecondition(
    `${host.name}'s image directory${host.imageDirectory ? ` ${host.imageDirectory}` : ''} cannot make reflink copies (or its agent could not tell): disk_backend REFLINK_COPY needs btrfs, or xfs made with reflink=1`,
    ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
    { host: host.name, disk_backend: diskBackendLabel(DiskBackend.DISK_BACKEND_REFLINK_COPY) },
  );
}

/**
 * INVALID_ARGUMENT naming `delivery` for a value that is not a known Delivery, or DELIVERY_STREAM for a
 * virtual machine source: a virtual machine's clones are always made on its own host, where nothing arrives.
 */
export function checkDelivery(request: Pick<CloneVirtualMachinesRequest, 'delivery'>, sourceKind: CloneSource['kind']): void {
  const delivery = request.delivery;
  const known = [
    CloneVirtualMachinesRequest_Delivery.DELIVERY_UNSPECIFIED,
    CloneVirtualMachinesRequest_Delivery.DELIVERY_DISTRIBUTE,
    CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM,
  ];
  if (!known.includes(delivery)) throw CowherdError.invalidArgument('delivery', `is not a known delivery (${String(delivery)})`);
  if (sourceKind === 'virtualMachine' && delivery === CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM) {
    throw CowherdError.invalidArgument(
      'delivery',
      "must be DELIVERY_UNSPECIFIED or DELIVERY_DISTRIBUTE for a virtual machine source: its clones are made on the virtual machine's own host, where no image has to arrive",
    );
  }
}

/** The request's data_disk_bytes as a number; INVALID_ARGUMENT (`data_disk_bytes`) unless 0 to 16 TiB. */
export function dataDiskBytesOf(request: Pick<CloneVirtualMachinesRequest, 'dataDiskBytes'>): number {
  const bytes = Number(request.dataDiskBytes || '0');
  if (!Number.isSafeInteger(bytes) || bytes < 0 || bytes > MAX_DATA_DISK_BYTES)
    throw CowherdError.invalidArgument('data_disk_bytes', `must be 0 (no data disk) to ${MAX_DATA_DISK_BYTES} (16 TiB), got ${request.dataDiskBytes}`);
  return bytes;
}

/**
 * The exact version a catalog answer stands for, `images/{image}/versions/{version}` (numbered): the id from
 * the caller's name, the number from the answer's `version` (a record without one is version 1, as before
 * versions existed).
 */
export function exactImageVersion(id: string, image: Pick<Image, 'version'>): string {
  const version = Number(image.version);
  return imageVersionName(id, Number.isSafeInteger(version) && version > 0 ? version : 1);
}

/**
 * Checks the request against the fleet and plans it. Throws, before anything changes: INVALID_ARGUMENT
 * (INVALID_FIELD), NOT_FOUND (RESOURCE_NOT_FOUND) for the source or a host, FAILED_PRECONDITION
 * (RESOURCE_STATE_CONFLICT, VIRTUAL_MACHINE_RUNNING, HYPERVISOR_MISMATCH), ALREADY_EXISTS
 * (VIRTUAL_MACHINE_NAME_TAKEN). Returns the operation's initial metadata.
 */
export async function planClones(request: CloneVirtualMachinesRequest, options: PlanOptions): Promise<CloneVirtualMachinesMetadata> {
  return (await planClonesWithGuest(request, options)).metadata;
}

/** A plan and the guest configuration its clones get (the request's over the image's default), if any. */
export interface GuestPlan {
  readonly metadata: CloneVirtualMachinesMetadata;
  readonly guestConfiguration?: GuestConfiguration;
  /** For an image source: the exact version the caller's name resolved to, `images/{image}/versions/{version}`. */
  readonly imageVersion?: string;
}

/** {@link planClones}, also returning the guest configuration the operation must hand to the agents. */
export async function planClonesWithGuest(request: CloneVirtualMachinesRequest, options: PlanOptions): Promise<GuestPlan> {
  const source = checkRequestShape(request);
  const template = parseNameTemplate(request.nameTemplate, request.count);
  const { fleet } = options;
  const placement = request.placement;
  const maxPerHost = placement?.maxClonesPerHost ?? 0;
  const hosts = new Map((await fleet.listHosts()).map((host) => [host.name, host]));

  let sourceValue: string;
  let hostsOfClones: string[];
  let imageDefault: GuestConfiguration | undefined;
  let imageVersion: string | undefined;
  let diskBackend: DiskBackend;
  if (source.kind === 'virtualMachine') {
    const machine = await fleet.getVirtualMachine(source.name);
    if (!machine) throw CowherdError.notFound(source.name);
    if (machine.state !== VirtualMachine_State.STATE_SHUT_OFF) {
      throw CowherdError.failedPrecondition(
        `${source.name} is ${virtualMachine_StateToJSON(machine.state)}; only a powered-off virtual machine can be cloned`,
        ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING,
        {
          virtual_machine: source.name,
          state: virtualMachine_StateToJSON(machine.state),
        },
      );
    }
    const host = requireReady(hosts, source.host);
    diskBackend = effectiveDiskBackend(request, { name: source.name, hypervisor: host.hypervisor });
    if (diskBackend === DiskBackend.DISK_BACKEND_REFLINK_COPY) requireReflinks(host);
    sourceValue = machine.domainName;
    hostsOfClones = placeRoundRobin([source.host], request.count, maxPerHost);
  } else {
    const image = await fleet.getImage(source.name);
    if (!image) throw CowherdError.notFound(source.name);
    if (image.state !== Image_State.STATE_AVAILABLE) {
      throw CowherdError.failedPrecondition(
        `${source.name} is ${image_StateToJSON(image.state)}, not STATE_AVAILABLE`,
        ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        {
          resource: source.name,
          state: image_StateToJSON(image.state),
        },
      );
    }
    sourceValue = source.id;
    imageVersion = exactImageVersion(source.id, image);
    imageDefault = image.defaultGuestConfiguration;
    diskBackend = effectiveDiskBackend(request, { name: source.name, hypervisor: image.hypervisor, defaultDiskBackend: image.defaultDiskBackend });
    const reflinks = diskBackend === DiskBackend.DISK_BACKEND_REFLINK_COPY;
    const hypervisorMatches = (host: Host): void => {
      if (host.hypervisor !== image.hypervisor) {
        throw CowherdError.failedPrecondition(
          `${host.name} runs ${hypervisorToJSON(host.hypervisor)}, but ${source.name} is for ${hypervisorToJSON(image.hypervisor)}`,
          ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
          {
            host: host.name,
            host_hypervisor: hypervisorToJSON(host.hypervisor),
            image_hypervisor: hypervisorToJSON(image.hypervisor),
          },
        );
      }
    };
    if (placement?.strategy === Placement_Strategy.STRATEGY_HOSTS) {
      for (const name of placement.hosts) {
        const host = requireReady(hosts, name);
        hypervisorMatches(host);
        if (reflinks) requireReflinks(host);
      }
      hostsOfClones = placeRoundRobin(placement.hosts, request.count, maxPerHost);
    } else {
      // Reflink copies go only where the image directory makes them.
      const ready = [...hosts.values()].filter(
        (host) => host.state === Host_State.STATE_READY && !host.draining && host.hypervisor === image.hypervisor && (!reflinks || host.imageDirectoryReflinks),
      );
      const readyNames = new Set(ready.map((host) => host.name));
      const holding = [...new Set((await fleet.listReplicas(imageVersion)).map((replica) => replica.host))].filter((host) => readyNames.has(host));
      if (ready.length === 0) {
        throw CowherdError.failedPrecondition(
          `no READY ${hypervisorToJSON(image.hypervisor)} host ${reflinks ? 'whose image directory makes reflink copies (disk_backend REFLINK_COPY) ' : ''}can take clones of ${source.name}`,
          ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
          {
            resource: source.name,
            state: 'NO_READY_HOST',
          },
        );
      }
      hostsOfClones = placeSpread(
        holding,
        ready.map((host) => host.name),
        request.count,
        maxPerHost,
      );
    }
  }

  const names = renderNames(
    template,
    hostsOfClones.map((host, offset) => ({ source: sourceValue, index: offset + 1, host: parseHostName(host)! })),
    { namesInUse: await fleet.domainNamesInUse(), ...(options.random === undefined ? {} : { random: options.random }) },
  );
  const guest = effectiveGuestConfiguration(imageDefault, request.guestConfiguration);
  if (guest !== undefined) {
    // The image's part too: a default a request does not override must still be valid.
    if (imageDefault !== undefined) checkGuestConfiguration(guest);
    // Each clone's hostname and documents as the agent will render them, `{uuid}` aside (the agent draws it).
    names.forEach((name, offset) =>
      renderGuestIdentity(guest, { name, index: offset + 1, host: parseHostName(hostsOfClones[offset]!)!, uuid: PLACEHOLDER_UUID }),
    );
  }
  if (source.kind === 'virtualMachine' && options.checkOnHost) {
    // Everything the agent would refuse for the whole batch, refused now, before any operation exists: a
    // source whose domain XML, disks or <kernel> cowherd cannot clone used to fail inside the operation.
    await options.checkOnHost(hosts.get(source.host)!, {
      dataDiskBytes: String(dataDiskBytesOf(request)),
      source: { $case: 'virtualMachine', value: source.name },
      clones: names.map((domainName, offset) => ({ domainName, start: request.start, index: guest === undefined ? 0 : offset + 1 })),
      guestConfiguration: guest,
      guestConfigurationDigest: '',
      operation: '',
      requestId: '',
      stream: false,
      validateOnly: true,
      diskBackend,
    });
  }
  const now = (options.now ?? (() => new Date()))();
  const clones: CloneResult[] = hostsOfClones.map((host, offset) => ({
    index: offset + 1,
    virtualMachine: '',
    host,
    domainName: names[offset]!,
    uuid: '',
    state: CloneResult_State.STATE_PENDING,
    error: undefined,
    overlays: [],
    started: false,
    baseProgress: undefined,
  }));
  const metadata: CloneVirtualMachinesMetadata = {
    source: source.name,
    totalCount: request.count,
    doneCount: 0,
    failedCount: 0,
    clones,
    imageTransfers: [],
    distributeOperations: [],
    startTime: now,
    updateTime: now,
    guestConfigurationDigest: guest === undefined ? '' : guestConfigurationDigest(guest),
    diskBackend,
  };
  return { metadata, ...(guest === undefined ? {} : { guestConfiguration: guest }), ...(imageVersion === undefined ? {} : { imageVersion }) };
}

/** `{host}` of an exact `hosts/{host}`; undefined otherwise. */
export function parseHostName(name: string): string | undefined {
  return HOST_NAME.parse(name)?.host;
}

function parseSource(request: CloneVirtualMachinesRequest): CloneSource {
  const source = request.source;
  if (source?.$case === 'image') {
    const parsed = parseImageReference(source.value);
    if (!parsed)
      throw CowherdError.invalidArgument(
        'image',
        `must be images/{image} or images/{image}/versions/{version} (number or alias), got ${JSON.stringify(source.value)}`,
      );
    return { kind: 'image', name: source.value, id: parsed.id };
  }
  if (source?.$case === 'virtualMachine') {
    const parsed = VIRTUAL_MACHINE_NAME.parse(source.value);
    if (!parsed)
      throw CowherdError.invalidArgument('virtual_machine', `must be hosts/{host}/virtualMachines/{virtual_machine}, got ${JSON.stringify(source.value)}`);
    return { kind: 'virtualMachine', name: source.value, host: HOST_NAME.format({ host: parsed.host }) };
  }
  throw CowherdError.invalidArgument('source', 'must set image or virtual_machine');
}

/** The host record of a host named in placement; NOT_FOUND, or FAILED_PRECONDITION unless READY. */
function requireReady(hosts: ReadonlyMap<string, Host>, name: string): Host {
  const host = hosts.get(name);
  if (!host) throw CowherdError.notFound(name);
  if (host.state !== Host_State.STATE_READY || host.draining) {
    const state = host.state === Host_State.STATE_READY ? 'STATE_DRAINING' : host_StateToJSON(host.state);
    throw new CowherdError(GrpcStatus.FAILED_PRECONDITION, `${name} is ${state}; clones go only to READY hosts`, {
      reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
      metadata: { resource: name, state },
    });
  }
  return host;
}
