/**
 * AIP resource names: `hosts/{host}`, `images/{image}`, `hosts/{host}/images/{image}`,
 * `hosts/{host}/virtualMachines/{virtual_machine}`, `operations/{operation}`. Parsing is strict, so a
 * name from a caller never carries a path separator, `..` or anything else into a file path or a KV key.
 */

import { hostname } from 'node:os';

/** `{host}`: an RFC 1123 label (one NATS subject token, so no dots). */
export const HOST_ID = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
/** `{image}`: lowercase letters, digits and dashes. */
export const IMAGE_ID = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
/** `{virtual_machine}`: a libvirt domain name of safe characters, or the domain's UUID. */
export const VIRTUAL_MACHINE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/**
 * Host ids no host may have: a host certificate carries its id (and `<id>.<domain>`) as DNS names, so a host
 * called `inventory` or `nats-0` would hold a CA-signed certificate for a service's or a NATS server's DNS
 * name (`inventory.cowherd.svc`, `nats-0.nats-headless`). The services, the agent, NATS and its pods
 * (`nats-<n>`), `localhost` and `cowherd` itself.
 */
export const RESERVED_HOST_IDS: readonly string[] = ['certificate-authority', 'inventory', 'distribution', 'cloning', 'agent', 'nats', 'nats-headless', 'localhost', 'cowherd'];

/** True when `id` is reserved (see RESERVED_HOST_IDS; also `nats-<digits>`, NATS's StatefulSet pods). */
export function isReservedHostId(id: string): boolean {
  return RESERVED_HOST_IDS.includes(id) || /^nats-\d+$/.test(id);
}

/** The `{host}` of `hosts/{host}` or of any name below it; undefined when malformed. */
export function hostOf(name: string): string | undefined {
  const match = /^hosts\/([^/]+)(\/.*)?$/.exec(name);
  return match && HOST_ID.test(match[1]!) ? match[1] : undefined;
}

/**
 * The OS hostname's first label, lowercased: a host's default id ("local-host" when that is no label or a
 * reserved id such as "localhost").
 */
export function defaultHostId(): string {
  const label = hostname().toLowerCase().split('.')[0] ?? '';
  return HOST_ID.test(label) && !isReservedHostId(label) ? label : 'local-host';
}
