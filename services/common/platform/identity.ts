/**
 * Caller identities. Every certificate cowherd issues names exactly one SPIFFE ID in its URI SAN:
 * spiffe://cowherd/service/<name>, spiffe://cowherd/host/<hostname> or spiffe://cowherd/admin/<user>.
 */

/** The three kinds of principal in the fleet. */
export type IdentityKind = 'service' | 'host' | 'admin';

/** A parsed SPIFFE identity. */
export interface Identity {
  readonly kind: IdentityKind;
  /** Service name, hostname or user name. */
  readonly name: string;
  /** The URI as it stands in the certificate. */
  readonly uri: string;
}

/** The trust domain of every cowherd identity. */
export const TRUST_DOMAIN = 'cowherd';

/** One lowercase RFC 1123 label: letters, digits and inner dashes, at most 63 characters. The rule of host ids. */
export const DNS_LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** A lowercase DNS name: labels joined by dots, at most 253 characters. */
export const DNS_NAME = /^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/;

/**
 * Names of services, hosts and users: a DNS label or dotted hostname (DNS_NAME). A host's id is one label
 * (`hosts/{host}`, see common/domain/resource-names.ts), so a host's identity and its resource name agree.
 */
export const PRINCIPAL_NAME = DNS_NAME;

const KINDS: readonly IdentityKind[] = ['service', 'host', 'admin'];

/** Builds the URI for an identity; throws on a malformed name. */
export function identityUri(kind: IdentityKind, name: string): string {
  if (!isPrincipalName(name)) throw new Error(`not a valid ${kind} name: ${JSON.stringify(name)}`);
  return `spiffe://${TRUST_DOMAIN}/${kind}/${name}`;
}

/** Parses a SPIFFE URI; undefined when it is not a well-formed cowherd identity. */
export function parseIdentity(uri: string): Identity | undefined {
  const match = /^spiffe:\/\/([^/]+)\/([a-z]+)\/([^/]+)$/.exec(uri);
  if (!match || match[1] !== TRUST_DOMAIN) return undefined;
  const kind = match[2] as IdentityKind;
  const name = match[3]!;
  if (!KINDS.includes(kind) || !isPrincipalName(name)) return undefined;
  return { kind, name, uri };
}

/** True when `name` may name a service, host or admin. */
export function isPrincipalName(name: string): boolean {
  return name.length <= 253 && PRINCIPAL_NAME.test(name);
}

/** "host/kvm-01": short form for logs. */
export function describeIdentity(identity: Identity): string {
  return `${identity.kind}/${identity.name}`;
}
