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

/** The `{host}` of `hosts/{host}` or of any name below it; undefined when malformed. */
export function hostOf(name: string): string | undefined {
  const match = /^hosts\/([^/]+)(\/.*)?$/.exec(name);
  return match && HOST_ID.test(match[1]!) ? match[1] : undefined;
}

/** The OS hostname's first label, lowercased: a host's default id ("localhost" when that is no label). */
export function defaultHostId(): string {
  const label = hostname().toLowerCase().split('.')[0] ?? '';
  return HOST_ID.test(label) ? label : 'localhost';
}
