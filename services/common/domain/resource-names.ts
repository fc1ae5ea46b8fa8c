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

/** `hosts/{host}` */
export const HOST_NAME: ResourcePattern<'host'> = resourcePattern('hosts/{host}', { host: HOST_ID });
/** `images/{image}` */
export const IMAGE_NAME: ResourcePattern<'image'> = resourcePattern('images/{image}', { image: IMAGE_ID });
/** `hosts/{host}/images/{image}`: an image's replica on a host. */
export const HOST_IMAGE_NAME: ResourcePattern<'host' | 'image'> = resourcePattern('hosts/{host}/images/{image}', { host: HOST_ID, image: IMAGE_ID });
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
