/**
 * The catalog's versions of an image: its ImageHead (KV `image-heads`, key the image id, written only here) and
 * its version records (KV `images`, key the storage key: `<id>` for version 1, `<id>_v<n>` after). Every place
 * where distribution reads or changes versions goes through this module: claiming the next version for a publish
 * or import, moving `latest`, resolving a caller's name to one version, the view, and forgetting a deleted
 * version.
 *
 * Claiming is atomic without a lock: the claimant reads the head, lists the id's records (any PUBLISHING or
 * DELETING one refuses), creates the new version's record (create-if-absent: of two claimants of the same
 * number one loses and, listing again, finds the winner PUBLISHING), and only then compare-and-sets the head's
 * last_version. A claimant that read the head after that CAS lists after the winner's record existed, so it
 * is refused; one whose CAS loses removes its record and tries again.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { Hypervisor } from '../gen/cowherd/common/v1/types.js';
import { Image_State, ImageHead, type Image } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import { KvConflictError, type KvStore, type Versioned } from '../common/platform/kv.js';
import { imageViewOf, resolveVersionNumber } from '../common/domain/image-versions.js';
import { checkDiskBackend, checkDiskBackendFor } from '../common/domain/disk-backend-choice.js';
import { IMAGE_ALIAS, IMAGE_NAME, LATEST_ALIAS, imageKey, imageVersionNameOfKey, parseImageKey, parseImageReference } from '../common/domain/resource-names.js';

/** The buckets of the version model. */
export interface ImageHeadsDeps {
  readonly images: KvStore<Image>;
  readonly heads: KvStore<ImageHead>;
}

/** One version record of an image. */
export interface VersionRecord {
  readonly id: string;
  readonly version: number;
  readonly key: string;
  readonly record: Versioned<Image>;
}

/** A caller's image name resolved to one version. */
export interface ResolvedImage {
  readonly id: string;
  readonly version: number;
  readonly key: string;
  readonly record: Image;
}

/** The image's head, or undefined (an image without one has the single version 1). */
export async function readHead(deps: Pick<ImageHeadsDeps, 'heads'>, id: string): Promise<Versioned<ImageHead> | undefined> {
  return deps.heads.get(id);
}

/** Every version record of image `id`, oldest first (the catalog is small: one pass over the bucket). */
export async function versionRecords(deps: Pick<ImageHeadsDeps, 'images'>, id: string): Promise<VersionRecord[]> {
  return groupVersions(await deps.images.list()).get(id) ?? [];
}

/** Every version record of every image, by image id, oldest first. */
export function groupVersions(entries: readonly Versioned<Image>[]): Map<string, VersionRecord[]> {
  const byId = new Map<string, VersionRecord[]>();
  for (const entry of entries) {
    const parsed = parseImageKey(entry.key);
    if (!parsed) continue;
    const list = byId.get(parsed.id) ?? [];
    list.push({ id: parsed.id, version: parsed.version, key: entry.key, record: entry });
    byId.set(parsed.id, list);
  }
  for (const list of byId.values()) list.sort((a, b) => a.version - b.version);
  return byId;
}

function stateWord(state: Image_State): string {
  return Image_State[state]?.replace('STATE_', '') ?? 'UNKNOWN';
}

/**
 * Claims a version of image `id` for a publish or import and writes its PUBLISHING record (`make` builds it from
 * the version's name and number). Version 1 when the id has no record (or only a FAILED version 1, which is
 * replaced, as before versions existed); the next unused number otherwise. FAILED_PRECONDITION
 * (RESOURCE_STATE_CONFLICT) while another version is PUBLISHING or DELETING.
 */
export async function claimVersion(
  deps: ImageHeadsDeps,
  id: string,
  make: (name: string, version: number) => Image,
): Promise<{ key: string; version: number; name: string; revision: number }> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const head = await deps.heads.get(id);
    const records = await versionRecords(deps, id);
    const busy = records.find((entry) => entry.record.value.state === Image_State.STATE_PUBLISHING || entry.record.value.state === Image_State.STATE_DELETING);
    if (busy)
      throw CowherdError.failedPrecondition(
        `${imageVersionNameOfKey(busy.key)} is ${stateWord(busy.record.value.state)}; wait for that operation to end`,
        ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        { image: `images/${id}`, version: imageVersionNameOfKey(busy.key) },
      );
    const onlyFailedFirst =
      records.length === 1 &&
      records[0]!.version === 1 &&
      records[0]!.record.value.state === Image_State.STATE_FAILED &&
      Number(head?.value.lastVersion ?? 1) <= 1;
    try {
      if (records.length === 0 && !head) {
        const name = IMAGE_NAME.format({ image: id });
        const revision = await deps.images.create(id, make(name, 1));
        return { key: id, version: 1, name, revision };
      }
      if (onlyFailedFirst) {
        const name = IMAGE_NAME.format({ image: id });
        const revision = await deps.images.update(id, make(name, 1), records[0]!.record.revision);
        return { key: id, version: 1, name, revision };
      }
    } catch (error) {
      if (error instanceof KvConflictError) continue;
      throw error;
    }
    const highest = Math.max(Number(head?.value.lastVersion ?? 1), ...records.map((entry) => entry.version));
    const version = highest + 1;
    const key = imageKey(id, version);
    const name = IMAGE_NAME.format({ image: key });
    let revision: number;
    try {
      revision = await deps.images.create(key, make(name, version));
    } catch (error) {
      if (error instanceof KvConflictError) continue;
      throw error;
    }
    const availableFirst = records.find((entry) => entry.version === 1 && entry.record.value.state === Image_State.STATE_AVAILABLE);
    const next = head
      ? ImageHead.fromPartial({ ...head.value, lastVersion: String(version), updateTime: new Date() })
      : ImageHead.fromPartial({
          image: `images/${id}`,
          latestVersion: availableFirst ? '1' : '0',
          lastVersion: String(version),
          updateTime: new Date(),
        });
    try {
      if (head) await deps.heads.update(id, next, head.revision);
      else await deps.heads.create(id, next);
      return { key, version, name, revision };
    } catch (error) {
      await deps.images.delete(key, revision).catch(() => undefined);
      if (error instanceof KvConflictError) continue;
      throw error;
    }
  }
  throw new CowherdError(GrpcStatus.ABORTED, `the versions of images/${id} kept changing; retry`, { reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT });
}

/** Version `version` of image `id` is AVAILABLE: it becomes `latest` unless a newer one already is (the head is made if missing). */
export async function setLatest(deps: Pick<ImageHeadsDeps, 'heads'>, id: string, version: number): Promise<void> {
  await deps.heads.mutate(id, (current) => {
    const latest = Number(current?.latestVersion ?? 0);
    const last = Number(current?.lastVersion ?? 0);
    if (current && latest >= version && last >= version) return undefined;
    return ImageHead.fromPartial({
      ...current,
      image: `images/${id}`,
      latestVersion: String(Math.max(latest, version)),
      lastVersion: String(Math.max(last, version)),
      updateTime: new Date(),
    });
  });
}

/**
 * A version left the catalog: aliases that pointed at it go; `latest` moves to the newest remaining AVAILABLE
 * version (0 if none). When no version is left, the head goes too (the id is free again).
 */
export async function forgetVersion(deps: ImageHeadsDeps, id: string, version: number): Promise<void> {
  const remaining = (await versionRecords(deps, id)).filter((entry) => entry.version !== version);
  if (remaining.length === 0) {
    await deps.heads.delete(id).catch(() => undefined);
    return;
  }
  const available = remaining.filter((entry) => entry.record.value.state === Image_State.STATE_AVAILABLE).map((entry) => entry.version);
  await deps.heads.mutate(id, (current) => {
    const aliases = Object.fromEntries(Object.entries(current?.aliases ?? {}).filter(([, target]) => Number(target) !== version));
    const latest = Number(current?.latestVersion ?? 1);
    const nextLatest = latest === version || !available.includes(latest) ? Math.max(0, ...available) : latest;
    return ImageHead.fromPartial({
      ...current,
      image: `images/${id}`,
      aliases,
      latestVersion: String(nextLatest),
      lastVersion: String(Math.max(Number(current?.lastVersion ?? 1), version, ...remaining.map((entry) => entry.version))),
      updateTime: new Date(),
    });
  });
}

/**
 * Resolves a caller's image name (`images/{image}`: latest; `images/{image}/versions/{number or alias}`) to one
 * existing version record. INVALID_ARGUMENT naming `field` for a malformed name; NOT_FOUND for an unknown
 * image, version or alias.
 */
export async function resolveImage(deps: ImageHeadsDeps, name: string, field: string): Promise<ResolvedImage> {
  const reference = parseImageReference(name);
  if (!reference) throw CowherdError.invalidArgument(field, 'must be images/{image} or images/{image}/versions/{version}, {version} a number or an alias');
  const head = (await readHead(deps, reference.id))?.value;
  const version = resolveVersionNumber(reference, head);
  if (version === undefined) throw CowherdError.notFound(name);
  const key = imageKey(reference.id, version);
  const record = (await deps.images.get(key))?.value;
  if (!record) throw CowherdError.notFound(name);
  return { id: reference.id, version, key, record };
}

/** The image view `images/{image}` (see imageViewOf); NOT_FOUND when the image has no version. */
export async function imageView(deps: ImageHeadsDeps, id: string): Promise<Image> {
  const records = await versionRecords(deps, id);
  const view = imageViewOf(
    records.map((entry) => ({ ...entry.record.value, version: String(entry.version) })),
    (await readHead(deps, id))?.value,
  );
  if (!view) throw CowherdError.notFound(`images/${id}`);
  return view;
}

/** At most this many operator aliases per image. */
export const MAX_ALIASES = 100;
/** The largest keep_versions UpdateImage accepts. */
export const MAX_KEEP_VERSIONS = 1000;

/** The update_mask paths UpdateImage accepts. */
const UPDATABLE_PATHS = ['aliases', 'keep_versions', 'default_disk_backend'];

/**
 * UpdateImage: `aliases` (the whole map; `latest` is the catalog's; every target an existing AVAILABLE version),
 * `keep_versions` (0 to 1000; 0 = the service's default) and `default_disk_backend` (a DiskBackend the image's
 * hypervisor runs, or UNSPECIFIED for the hosts' standard). Returns the image view.
 */
export async function updateImage(deps: ImageHeadsDeps, request: { image: Image | undefined; updateMask: string[] | undefined }): Promise<Image> {
  const image = request.image;
  if (!image) throw CowherdError.invalidArgument('image', 'is required');
  const parts = image.name.split('/');
  const reference = parts.length === 2 ? parseImageReference(image.name) : undefined;
  if (!reference) throw CowherdError.invalidArgument('image.name', 'must be images/{image} (settings belong to the image, not to one version)');
  const paths = request.updateMask ?? [];
  if (paths.length === 0 || paths.includes('*'))
    throw CowherdError.invalidArgument('update_mask', `must name the fields to change: ${UPDATABLE_PATHS.join(', ')} (not empty, not *)`);
  for (const path of paths)
    if (!UPDATABLE_PATHS.includes(path))
      throw CowherdError.invalidArgument('update_mask', `${JSON.stringify(path)} cannot be changed; only ${UPDATABLE_PATHS.join(', ')}`);
  const id = reference.id;
  const records = await versionRecords(deps, id);
  if (records.length === 0) throw CowherdError.notFound(image.name);
  let aliases: Record<string, string> | undefined;
  if (paths.includes('aliases')) {
    const entries = Object.entries(image.aliases);
    if (entries.length > MAX_ALIASES) throw CowherdError.invalidArgument('image.aliases', `must have at most ${MAX_ALIASES} aliases`);
    aliases = {};
    for (const [alias, target] of entries) {
      if (alias === LATEST_ALIAS)
        throw CowherdError.invalidArgument('image.aliases', '"latest" is moved by the catalog (the newest AVAILABLE version) and cannot be set');
      if (!IMAGE_ALIAS.test(alias))
        throw CowherdError.invalidArgument('image.aliases', `alias ${JSON.stringify(alias)} must be a lowercase DNS label that does not start with a digit`);
      const version = Number(target);
      const record = records.find((entry) => entry.version === version);
      if (!record || record.record.value.state !== Image_State.STATE_AVAILABLE)
        throw CowherdError.invalidArgument(
          'image.aliases',
          `alias ${JSON.stringify(alias)} names version ${target}, which is no AVAILABLE version of images/${id}`,
        );
      aliases[alias] = String(version);
    }
  }
  if (paths.includes('keep_versions') && (image.keepVersions < 0 || image.keepVersions > MAX_KEEP_VERSIONS))
    throw CowherdError.invalidArgument('image.keep_versions', `must be 0 (the default) to ${MAX_KEEP_VERSIONS}`);
  if (paths.includes('default_disk_backend')) {
    const backend = checkDiskBackend(image.defaultDiskBackend, 'image.default_disk_backend');
    // Every version of an image has its hypervisor (that of its origin host).
    const hypervisor = records.map((entry) => entry.record.value.hypervisor).find((value) => value !== Hypervisor.HYPERVISOR_UNSPECIFIED);
    checkDiskBackendFor(backend, hypervisor ?? Hypervisor.HYPERVISOR_UNSPECIFIED, 'image.default_disk_backend', `images/${id}`);
  }
  const firstAvailable = records.some((entry) => entry.version === 1 && entry.record.value.state === Image_State.STATE_AVAILABLE);
  await deps.heads.mutate(id, (current) =>
    ImageHead.fromPartial({
      image: `images/${id}`,
      latestVersion: firstAvailable ? '1' : '0',
      lastVersion: String(Math.max(1, ...records.map((entry) => entry.version))),
      ...current,
      ...(aliases ? { aliases } : {}),
      ...(paths.includes('keep_versions') ? { keepVersions: image.keepVersions } : {}),
      ...(paths.includes('default_disk_backend') ? { defaultDiskBackend: image.defaultDiskBackend } : {}),
      updateTime: new Date(),
    }),
  );
  return imageView(deps, id);
}
