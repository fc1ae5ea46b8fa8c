/**
 * Image versions as the catalog keeps them: the KV bucket of image heads (`image-heads`, one ImageHead per image
 * id: version numbers handed out, where the aliases point, the retention) and the resolution of a caller's
 * image name to one version number. Names and storage keys are in resource-names.ts.
 */
import type { ImageHead } from '../../gen/cowherd/inventory/v1/resources.js';
import { LATEST_ALIAS, type ImageReference } from './resource-names.js';

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
