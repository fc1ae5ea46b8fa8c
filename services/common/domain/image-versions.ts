/**
 * Image versions as the catalog keeps them: the KV bucket of image heads (`image-heads`, one ImageHead per image
 * id: version numbers handed out, where the aliases point, the retention) and the resolution of a caller's
 * image name to one version number. Names and storage keys are in resource-names.ts.
 */
import type { Image, ImageHead } from '../../gen/cowherd/inventory/v1/resources.js';
import { IMAGE_NAME, imageVersionName, LATEST_ALIAS, parseImageKey, type ImageReference } from './resource-names.js';

/** The KV bucket of ImageHead records, keyed by image id (written by the distribution service only). */
export const IMAGE_HEADS_BUCKET = 'image-heads';

/** How many versions garbage collection keeps per image when its keep_versions is 0. */
export const DEFAULT_KEEP_VERSIONS = 3;

/**
 * The version number a reference stands for, given the image's head (undefined when the image has none: it
 * then has the single version 1, published before versions existed). Undefined for an unknown alias, and for
 * `latest` while no version is AVAILABLE yet.
 */
export function resolveVersionNumber(reference: ImageReference, head: ImageHead | undefined): number | undefined {
  if (reference.version !== undefined) return reference.version;
  const alias = reference.alias ?? LATEST_ALIAS;
  if (alias === LATEST_ALIAS) {
    if (!head) return 1;
    const latest = Number(head.latestVersion);
    return latest > 0 ? latest : undefined;
  }
  const target = head?.aliases[alias];
  return target === undefined ? undefined : Number(target);
}

/** Every alias of an image with the version it points at, `latest` included (for the image view). */
export function aliasesOf(head: ImageHead | undefined): Record<string, string> {
  const latest = head ? Number(head.latestVersion) : 1;
  return { ...(head?.aliases ?? {}), ...(latest > 0 ? { [LATEST_ALIAS]: String(latest) } : {}) };
}

// ---------------------------------------------------------------------------------------------------------
// The image view and version records as the catalog answers them (GetImage, ListImages, ListImageVersions;
// UpdateImage's answer). Pure: the caller brings the records of one image id and its head.

/**
 * The image id and version number of a catalog record: the id from its name, the number from its `version`
 * (records written before versions existed have none: then from the name's storage key, which is version 1).
 * Undefined when the name is no image name.
 */
export function recordVersionOf(record: Image): { id: string; version: number } | undefined {
  const key = IMAGE_NAME.parse(record.name)?.image;
  const parsed = key === undefined ? undefined : parseImageKey(key);
  if (!parsed) return undefined;
  const stored = Number(record.version);
  return { id: parsed.id, version: Number.isSafeInteger(stored) && stored > 0 ? stored : parsed.version };
}

/**
 * A version's record as it leaves the catalog: named by number (`images/x/versions/1` also for version 1),
 * `version` set, without the fields only the image view carries (aliases, versions).
 */
export function imageVersionRecord(record: Image): Image {
  const parsed = recordVersionOf(record);
  if (!parsed) return record;
  return { ...record, name: imageVersionName(parsed.id, parsed.version), version: String(parsed.version), aliases: {}, versions: [] };
}

/**
 * The image view `images/{image}` (GetImage, ListImages, UpdateImage's answer): the record of its latest version
 * (resolved with the head; no head means version 1) named `images/{image}`, with `version` the latest, every
 * alias (`latest` included), the numbers of the versions that exist (oldest first), and the head's keep_versions
 * and default_disk_backend.
 * While no version is AVAILABLE yet (the head's latest is 0) or the latest's record is missing, the newest
 * record stands in, so that an image being published reads as it did before versions existed. `records` are
 * the catalog records of one image id (any order), named by storage key (IMAGE_NAME); undefined when none.
 */
export function imageViewOf(records: readonly Image[], head: ImageHead | undefined): Image | undefined {
  const numbered = numberedRecords(records);
  if (numbered.length === 0) return undefined;
  const id = numbered[0]!.id;
  const latest = resolveVersionNumber({ id, alias: LATEST_ALIAS }, head);
  const chosen = numbered.find((entry) => entry.version === latest) ?? numbered.at(-1)!;
  return {
    ...chosen.record,
    name: `images/${id}`,
    version: String(chosen.version),
    aliases: aliasesOf(head),
    versions: numbered.map((entry) => String(entry.version)),
    keepVersions: head?.keepVersions ?? 0,
    defaultDiskBackend: head?.defaultDiskBackend ?? 0,
  };
}

/**
 * The record of the version `reference` names (number, alias, or `latest` for `images/{image}`), as
 * {@link imageVersionRecord} returns it, with the image's default_disk_backend (a setting of the image that
 * applies to clones of every version); undefined for an unknown alias or a version without a record.
 */
export function findImageVersion(records: readonly Image[], head: ImageHead | undefined, reference: ImageReference): Image | undefined {
  const version = resolveVersionNumber(reference, head);
  if (version === undefined) return undefined;
  const found = numberedRecords(records).find((entry) => entry.id === reference.id && entry.version === version);
  return found && { ...imageVersionRecord(found.record), defaultDiskBackend: head?.defaultDiskBackend ?? 0 };
}

/** The versions among `records` (records of one image id), oldest first, each with its id and number. */
export function numberedRecords(records: readonly Image[]): Array<{ id: string; version: number; record: Image }> {
  return records
    .map((record) => ({ record, parsed: recordVersionOf(record) }))
    .filter((entry): entry is { record: Image; parsed: { id: string; version: number } } => entry.parsed !== undefined)
    .map(({ record, parsed }) => ({ id: parsed.id, version: parsed.version, record }))
    .sort((a, b) => a.version - b.version);
}
