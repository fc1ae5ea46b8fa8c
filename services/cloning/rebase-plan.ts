/**
 * Checking a RebaseVirtualMachines request and choosing its clones, before any operation exists: the request's
 * shape, the target version (resolved once, here, to its number), the clones the filter selects (only managed
 * clones of the target's image), the canaries. The choice is the operation's initial metadata (every clone
 * pending, canaries first), so a replica that takes the operation over moves exactly these clones to exactly
 * this version.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import type { RebaseResult, RebaseVirtualMachinesMetadata, RebaseVirtualMachinesRequest } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { Image_State, image_StateToJSON, type VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import type { Status } from '../gen/google/rpc/status.js';
import { CowherdError } from '../common/platform/errors.js';
import { EVERY_HOST, HOST_NAME, IMAGE_NAME, parseImageKey, parseImageReference } from '../common/domain/resource-names.js';
import { exactImageVersion } from './clone-plan.js';
import type { RebaseFleetView } from './fleet-view.js';

/** Canaries at most (the proto's limit). */
export const MAX_CANARY_COUNT = 100;
/** Clones of one host moving at the same time at most (the proto's limit). */
export const MAX_PER_HOST = 100;
/** canary_count 0 means this many. */
export const DEFAULT_CANARY_COUNT = 1;
/** max_per_host 0 means this many. */
export const DEFAULT_MAX_PER_HOST = 4;
/** shutdown_timeout unset or 0 means 2 minutes. */
export const DEFAULT_SHUTDOWN_TIMEOUT_MS = 120_000;
/** shutdown_timeout at most 1 hour. */
export const MAX_SHUTDOWN_TIMEOUT_MS = 3_600_000;

/** The request's numbers with their defaults applied. */
export interface RebaseSettings {
  readonly parent: string;
  readonly imageId: string;
  readonly canaryCount: number;
  readonly maxPerHost: number;
  readonly shutdownTimeoutMs: number;
}

/** The OK status of a clone that moved (or already stood on the target). */
export const OK_STATUS: Status = { code: GrpcStatus.OK, message: '', details: [] };

/**
 * Checks the request without reading the fleet; INVALID_ARGUMENT naming the first bad field. Also refuses a
 * filter that names clones of another image than the target's (`source_image`, `source_image_version`,
 * `lineage.image_version` compared with `=`).
 */
export function checkRebaseShape(request: RebaseVirtualMachinesRequest): RebaseSettings {
  if (request.parent !== EVERY_HOST && !HOST_NAME.matches(request.parent))
    throw CowherdError.invalidArgument('parent', `must be hosts/{host} or ${EVERY_HOST}, got ${JSON.stringify(request.parent)}`);
  const target = parseImageReference(request.targetImageVersion);
  if (!target)
    throw CowherdError.invalidArgument(
      'target_image_version',
      `must be images/{image} or images/{image}/versions/{version} (number or alias), got ${JSON.stringify(request.targetImageVersion)}`,
    );
  const canaryCount = request.canaryCount === 0 ? DEFAULT_CANARY_COUNT : request.canaryCount;
  if (!Number.isInteger(canaryCount) || canaryCount < 0 || canaryCount > MAX_CANARY_COUNT)
    throw CowherdError.invalidArgument('canary_count', `must be 0 (meaning ${DEFAULT_CANARY_COUNT}) to ${MAX_CANARY_COUNT}, got ${request.canaryCount}`);
  const maxPerHost = request.maxPerHost === 0 ? DEFAULT_MAX_PER_HOST : request.maxPerHost;
  if (!Number.isInteger(maxPerHost) || maxPerHost < 0 || maxPerHost > MAX_PER_HOST)
    throw CowherdError.invalidArgument('max_per_host', `must be 0 (meaning ${DEFAULT_MAX_PER_HOST}) to ${MAX_PER_HOST}, got ${request.maxPerHost}`);
  let shutdownTimeoutMs = DEFAULT_SHUTDOWN_TIMEOUT_MS;
  if (request.shutdownTimeout) {
    const ms = Number(request.shutdownTimeout.seconds) * 1000 + request.shutdownTimeout.nanos / 1e6;
    if (!Number.isFinite(ms) || ms < 0 || ms > MAX_SHUTDOWN_TIMEOUT_MS || request.shutdownTimeout.nanos < 0)
      throw CowherdError.invalidArgument('shutdown_timeout', 'must be 0 (meaning 2 minutes) to 1 hour');
    if (ms > 0) shutdownTimeoutMs = ms;
  }
  checkFilterImage(request.filter, target.id);
  return { parent: request.parent, imageId: target.id, canaryCount, maxPerHost, shutdownTimeoutMs };
}

/** The image fields of ListVirtualMachines' filter, whose values must name the target's image. */
const IMAGE_FIELDS = new Set(['source_image', 'source_image_version', 'lineage.image_version']);

function checkFilterImage(filter: string, imageId: string): void {
  if (filter.trim() === '') return;
  for (const term of filter.split(/\s+AND\s+/)) {
    const match = /^\s*([A-Za-z_.]+)\s*(=|!=)\s*"((?:[^"\\]|\\.)*)"\s*$/.exec(term);
    if (!match || match[2] !== '=' || !IMAGE_FIELDS.has(match[1]!)) continue;
    // The inventory checks the value's shape; here only whose image it is.
    const id = parseImageReference(match[3]!)?.id;
    if (id !== undefined && id !== imageId)
      throw CowherdError.invalidArgument('filter', `selects clones of images/${id}, but the target is a version of images/${imageId}`);
  }
}

/** The inventory filter that selects the request's clones: the caller's, AND managed clones of the image. */
export function selectionFilter(filter: string, imageId: string): string {
  const ours = `source_image = ${JSON.stringify(`images/${imageId}`)} AND managed = true`;
  return filter.trim() === '' ? ours : `${filter.trim()} AND ${ours}`;
}

/** The exact version a clone stands on, numbered; empty when the inventory does not say. */
export function versionOfClone(vm: VirtualMachine): string {
  const recorded = vm.sourceImageVersion || vm.lineage?.imageVersion || vm.sourceImage;
  const key = IMAGE_NAME.parse(recorded)?.image;
  const parsed = key === undefined ? undefined : parseImageKey(key);
  return parsed ? `images/${parsed.id}/versions/${parsed.version}` : '';
}

/**
 * Checks the request against the fleet and chooses its clones. Throws, before anything changes:
 * INVALID_ARGUMENT (INVALID_FIELD), NOT_FOUND (RESOURCE_NOT_FOUND) for the target, FAILED_PRECONDITION
 * (RESOURCE_STATE_CONFLICT) for a target that is not AVAILABLE or a selection without clones. Returns the
 * operation's initial metadata.
 */
export async function planRebase(
  request: RebaseVirtualMachinesRequest,
  fleet: Pick<RebaseFleetView, 'getImage' | 'listVirtualMachines'>,
  now: () => Date = () => new Date(),
): Promise<RebaseVirtualMachinesMetadata> {
  const settings = checkRebaseShape(request);
  const image = await fleet.getImage(request.targetImageVersion);
  if (!image) throw CowherdError.notFound(request.targetImageVersion);
  if (image.state !== Image_State.STATE_AVAILABLE)
    throw CowherdError.failedPrecondition(
      `${request.targetImageVersion} is ${image_StateToJSON(image.state)}, not STATE_AVAILABLE`,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
      { resource: request.targetImageVersion, state: image_StateToJSON(image.state) },
    );
  const target = exactImageVersion(settings.imageId, image);
  const selected = (await fleet.listVirtualMachines(settings.parent, selectionFilter(request.filter, settings.imageId))).sort((a, b) =>
    a.name.localeCompare(b.name),
  );
  if (selected.length === 0)
    throw CowherdError.failedPrecondition(
      `the filter selects no cowherd-managed clone of images/${settings.imageId} under ${settings.parent}`,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
      { resource: settings.parent, state: 'NO_CLONE_SELECTED' },
    );
  const results: RebaseResult[] = selected.map((vm) => {
    const current = versionOfClone(vm);
    const done = current === target;
    return {
      virtualMachine: vm.name,
      // A clone already on the target counts as done; its previous version stays what its lineage says.
      previousImageVersion: done ? (vm.lineage?.previousImageVersion ?? '') : current,
      imageVersion: current,
      status: done ? OK_STATUS : undefined,
      restarted: false,
      pending: !done,
      canary: false,
    };
  });
  markCanaries(results, settings.canaryCount);
  const at = now();
  return {
    targetImageVersion: target,
    totalCount: results.length,
    doneCount: results.filter((result) => !result.pending).length,
    failedCount: 0,
    // Canaries first, as the response lists them.
    results: [...results.filter((result) => result.canary), ...results.filter((result) => !result.canary)],
    distributeOperations: [],
    startTime: at,
    updateTime: at,
  };
}

/** The host, `hosts/{host}`, of a clone's name. */
export function hostOfClone(name: string): string {
  return name.split('/').slice(0, 2).join('/');
}

/** Marks `count` pending clones as canaries, spread over their hosts (one per host in turn, hosts by name). */
function markCanaries(results: RebaseResult[], count: number): void {
  const byHost = new Map<string, RebaseResult[]>();
  for (const result of results) {
    if (!result.pending) continue;
    const host = hostOfClone(result.virtualMachine);
    byHost.set(host, [...(byHost.get(host) ?? []), result]);
  }
  const queues = [...byHost.keys()].sort().map((host) => byHost.get(host)!);
  let left = count;
  while (left > 0 && queues.some((queue) => queue.length > 0)) {
    for (const queue of queues) {
      const next = queue.shift();
      if (!next || left === 0) continue;
      next.canary = true;
      left -= 1;
    }
  }
}

/** Whether a status is OK (unset counts as not decided). */
export function isOk(status: Status | undefined): boolean {
  return status !== undefined && status.code === GrpcStatus.OK;
}
