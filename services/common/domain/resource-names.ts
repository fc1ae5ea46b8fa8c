/**
 * AIP resource names: the one place that formats and parses them, and the one place that holds the rules
 * of their ids. Parsing is strict (every id checked against its rule), so a name from a caller never carries
 * a path separator, `..` or anything else into a file path, a KV key or a NATS subject. The patterns are
 * those of the protos' `google.api.resource` options (proto/cowherd/{inventory,certauthority}/v1/resources.proto)
 * with the ids named as the code names them (`{virtualMachine}` for the proto's `{virtual_machine}`).
 */

import { hostname } from 'node:os';
import { DNS_LABEL } from '../platform/identity.js';

/** `{host}`: an RFC 1123 label (one NATS subject token, so no dots). */
export const HOST_ID = DNS_LABEL;
/** `{image}`: lowercase letters, digits and dashes, as a DNS label (it names a directory and a torrent). */
export const IMAGE_ID = DNS_LABEL;
/** `{virtualMachine}`: a libvirt domain name of safe characters, or the domain's UUID. */
export const VIRTUAL_MACHINE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
/** `{operation}`: the lowercase UUID the operation was created with (`randomUUID()`). */
export const OPERATION_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
/** `{certificate}`: the certificate's serial number in lowercase hex (at most 20 bytes, RFC 5280). */
export const CERTIFICATE_ID = /^[0-9a-f]{1,40}$/;
/** `{joinToken}`: the token's public id, 16 lowercase hex digits (the middle of `cjt1.<id>.<secret>.<pin>`). */
export const JOIN_TOKEN_ID = /^[0-9a-f]{16}$/;

/** A resource name pattern with the rule of each of its ids. */
export interface ResourcePattern<K extends string> {
  /** The pattern, e.g. `hosts/{host}/images/{image}`. */
  readonly pattern: string;
  /** The name of these ids; throws (a programming error) when an id breaks its rule. */
  format(ids: Readonly<Record<K, string>>): string;
  /** The ids of `name`; undefined unless it has exactly this pattern's form and every id keeps its rule. */
  parse(name: string): Record<K, string> | undefined;
  /** True when {@link parse} would give the ids. */
  matches(name: string): boolean;
}

/** A pattern of literal segments and `{id}` segments, each id with its rule. */
function resourcePattern<K extends string>(pattern: string, rules: Readonly<Record<K, RegExp>>): ResourcePattern<K> {
  const segments = pattern.split('/').map((segment) => {
    const id = /^\{(\w+)\}$/.exec(segment)?.[1] as K | undefined;
    if (id !== undefined && !(id in rules)) throw new Error(`${pattern}: no rule for {${id}}`);
    return id === undefined ? { literal: segment } : { id, rule: rules[id] };
  });
  const parse = (name: string): Record<K, string> | undefined => {
    const parts = name.split('/');
    if (parts.length !== segments.length) return undefined;
    const ids = {} as Record<K, string>;
    for (const [index, segment] of segments.entries()) {
      const part = parts[index]!;
      if ('literal' in segment) {
        if (part !== segment.literal) return undefined;
      } else {
        if (!segment.rule.test(part)) return undefined;
        ids[segment.id] = part;
      }
    }
    return ids;
  };
  return {
    pattern,
    format(ids) {
      return segments
        .map((segment) => {
          if ('literal' in segment) return segment.literal;
          const value = ids[segment.id];
          if (typeof value !== 'string' || !segment.rule.test(value))
            throw new Error(`${pattern}: {${segment.id}} ${JSON.stringify(value)} does not match ${segment.rule.source}`);
          return value;
        })
        .join('/');
    },
    parse,
    matches: (name) => parse(name) !== undefined,
  };
}

// ---------------------------------------------------------------------------------------------------------
// Image versions
//
// An image has numbered versions. Each version has a storage key: the image id for version 1 (so images made
// before versions existed are their own version 1), `<id>_v<n>` for version n >= 2 (`_` is in no image id,
// so no key is another image's id). The key names the version's catalog record (KV `images`), its replicas
// (KV `replicas`, `<host>.<key>`), its directory on every host (`images/<key>/`) and its torrent. Names carry
// the version, never the key: `images/{image}/versions/{version}`.

/** `{version}` as a number: 1 to 999999999. */
export const IMAGE_VERSION_NUMBER = /^[1-9][0-9]{0,8}$/;
/** An alias of a version (`latest`, `stable`, ...): a DNS label that does not start with a digit. */
export const IMAGE_ALIAS = /^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/;
/** The alias every image has: its newest AVAILABLE version. */
export const LATEST_ALIAS = 'latest';
/** A storage key: an image id, or `<id>_v<n>` (n >= 2). */
export const IMAGE_KEY = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(_v([2-9]|[1-9][0-9]{1,8}))?$/;

/** The storage key of version `version` of image `id`. */
export function imageKey(id: string, version: number): string {
  if (!IMAGE_ID.test(id) || !Number.isSafeInteger(version) || !IMAGE_VERSION_NUMBER.test(String(version)))
    throw new Error(`no image key for ${JSON.stringify(id)} version ${version}`);
  return version === 1 ? id : `${id}_v${version}`;
}

/** The image id and version number of a storage key; undefined when it is none. */
export function parseImageKey(key: string): { id: string; version: number } | undefined {
  if (!IMAGE_KEY.test(key)) return undefined;
  const at = key.indexOf('_v');
  return at < 0 ? { id: key, version: 1 } : { id: key.slice(0, at), version: Number(key.slice(at + 2)) };
}

/** `images/{image}/versions/{version}` of a storage key, always with the number (also for version 1). */
export function imageVersionNameOfKey(key: string): string {
  const parsed = parseImageKey(key);
  if (!parsed) throw new Error(`not an image key: ${JSON.stringify(key)}`);
  return `images/${parsed.id}/versions/${parsed.version}`;
}

/** `images/{image}/versions/{version}` */
export function imageVersionName(id: string, version: number): string {
  return imageVersionNameOfKey(imageKey(id, version));
}

/** What a caller's image name refers to: an image id and a version number, an alias, or neither (`latest`). */
export interface ImageReference {
  readonly id: string;
  /** Set for `images/{image}/versions/{number}`. */
  readonly version?: number;
  /** Set for `images/{image}/versions/{alias}`, and `latest` for `images/{image}`. */
  readonly alias?: string;
}

/**
 * Parses a caller's image name: `images/{image}` (its latest version), `images/{image}/versions/{number}` or
 * `images/{image}/versions/{alias}`. Undefined when it is none of these (strictly: every id keeps its rule).
 */
export function parseImageReference(name: string): ImageReference | undefined {
  const parts = name.split('/');
  if (parts[0] !== 'images' || parts[1] === undefined || !IMAGE_ID.test(parts[1])) return undefined;
  if (parts.length === 2) return { id: parts[1], alias: LATEST_ALIAS };
  if (parts.length !== 4 || parts[2] !== 'versions') return undefined;
  const version = parts[3]!;
  if (IMAGE_VERSION_NUMBER.test(version)) return { id: parts[1], version: Number(version) };
  if (IMAGE_ALIAS.test(version)) return { id: parts[1], alias: version };
  return undefined;
}

/**
 * A name pattern whose `{image}` is a storage key: `<prefix>images/{id}` for version 1 and
 * `<prefix>images/{id}/versions/{n}` for later ones; parsing also takes `.../versions/1`. Aliases do not parse:
 * the catalog resolves them first (see parseImageReference).
 */
function keyedImagePattern<K extends string>(prefix: ResourcePattern<K> | undefined, pattern: string): ResourcePattern<K | 'image'> {
  const split = (name: string): { head: Record<K, string> | undefined; rest: string[] } => {
    const parts = name.split('/');
    const headLength = prefix ? prefix.pattern.split('/').length : 0;
    const head = prefix ? prefix.parse(parts.slice(0, headLength).join('/')) : ({} as Record<K, string>);
    return { head, rest: parts.slice(headLength) };
  };
  const parse = (name: string): Record<K | 'image', string> | undefined => {
    const { head, rest } = split(name);
    if (!head || rest[0] !== 'images' || rest[1] === undefined || !IMAGE_ID.test(rest[1])) return undefined;
    if (rest.length === 2) return { ...head, image: rest[1] };
    if (rest.length !== 4 || rest[2] !== 'versions' || !IMAGE_VERSION_NUMBER.test(rest[3]!)) return undefined;
    return { ...head, image: imageKey(rest[1], Number(rest[3])) };
  };
  return {
    pattern,
    format(ids) {
      const key = ids.image;
      const parsed = typeof key === 'string' ? parseImageKey(key) : undefined;
      if (!parsed) throw new Error(`${pattern}: {image} ${JSON.stringify(key)} is not an image key`);
      const head = prefix ? `${prefix.format(ids)}/` : '';
      return parsed.version === 1 ? `${head}images/${parsed.id}` : `${head}images/${parsed.id}/versions/${parsed.version}`;
    },
    parse,
    matches: (name) => parse(name) !== undefined,
  };
}

/** `hosts/{host}` */
export const HOST_NAME: ResourcePattern<'host'> = resourcePattern('hosts/{host}', { host: HOST_ID });
/**
 * `images/{image}` or `images/{image}/versions/{version}` (numbered), with `{image}` the version's storage key:
 * `images/debian-12` is key `debian-12` (version 1), `images/debian-12/versions/3` key `debian-12_v3`. This is
 * the agent's and the records' reading; where a caller names an image, `images/{image}` means its latest version
 * and the catalog resolves it with parseImageReference first.
 */
export const IMAGE_NAME: ResourcePattern<'image'> = keyedImagePattern(undefined, 'images/{image}');
/** The image (not version) name `images/{image}` of a storage key or image id. */
export function imageNameOfKey(key: string): string {
  const parsed = parseImageKey(key);
  if (!parsed) throw new Error(`not an image key: ${JSON.stringify(key)}`);
  return `images/${parsed.id}`;
}
/** `hosts/{host}/images/{image}[/versions/{version}]`: a version's replica on a host (`{image}` the storage key). */
export const HOST_IMAGE_NAME: ResourcePattern<'host' | 'image'> = keyedImagePattern(
  resourcePattern('hosts/{host}', { host: HOST_ID }),
  'hosts/{host}/images/{image}',
);
/** `hosts/{host}/virtualMachines/{virtualMachine}` */
export const VIRTUAL_MACHINE_NAME: ResourcePattern<'host' | 'virtualMachine'> = resourcePattern('hosts/{host}/virtualMachines/{virtualMachine}', {
  host: HOST_ID,
  virtualMachine: VIRTUAL_MACHINE_ID,
});
/** `operations/{operation}` */
export const OPERATION_NAME: ResourcePattern<'operation'> = resourcePattern('operations/{operation}', { operation: OPERATION_ID });
/** `certificates/{certificate}` */
export const CERTIFICATE_NAME: ResourcePattern<'certificate'> = resourcePattern('certificates/{certificate}', { certificate: CERTIFICATE_ID });
/** `joinTokens/{joinToken}` */
export const JOIN_TOKEN_NAME: ResourcePattern<'joinToken'> = resourcePattern('joinTokens/{joinToken}', { joinToken: JOIN_TOKEN_ID });

/** The parent `hosts/-` of List and Watch methods: every host (AIP-159). */
export const EVERY_HOST = 'hosts/-';

/**
 * Host ids no host may have: a host certificate carries its id (and `<id>.<domain>`) as DNS names, so a host
 * called `inventory` or `nats-0` would hold a CA-signed certificate for a service's or a NATS server's DNS
 * name (`inventory.cowherd.svc`, `nats-0.nats-headless`). The services, the agent, NATS and its pods
 * (`nats-<n>`), `localhost` and `cowherd` itself. Names of existing hosts with such ids still parse: the
 * rule is applied where a host id is handed out (join tokens, the agent's configuration).
 */
export const RESERVED_HOST_IDS: readonly string[] = [
  'certificate-authority',
  'inventory',
  'distribution',
  'cloning',
  'agent',
  'nats',
  'nats-headless',
  'localhost',
  'cowherd',
];

/** True when `id` is reserved (see RESERVED_HOST_IDS; also `nats-<digits>`, NATS's StatefulSet pods). */
export function isReservedHostId(id: string): boolean {
  return RESERVED_HOST_IDS.includes(id) || /^nats-\d+$/.test(id);
}

/** The `{host}` of `hosts/{host}` or of any name below it; undefined when malformed. */
export function hostOf(name: string): string | undefined {
  const [collection, host] = name.split('/');
  return collection === 'hosts' && host !== undefined && HOST_ID.test(host) ? host : undefined;
}

/**
 * The OS hostname's first label, lowercased: a host's default id ("local-host" when that is no label or a
 * reserved id such as "localhost").
 */
export function defaultHostId(): string {
  const label = hostname().toLowerCase().split('.')[0] ?? '';
  return HOST_ID.test(label) && !isReservedHostId(label) ? label : 'local-host';
}
