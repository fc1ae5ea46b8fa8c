/**
 * Who may do what on NATS. nats-server 2.9 has neither CRL/OCSP checks for client certificates nor auth
 * callout, so authorization is an allow-list: `tls { verify_and_map: true }` maps the client certificate
 * to the user whose name is its subject DN (or one of its URI SANs), and `authorization { users = [...] }`
 * lists every certificate that may connect, with least-privilege permissions by identity kind. Every leaf
 * cowherd signs has a distinct subject (the serial is its OU), so dropping one entry and reloading the
 * server refuses that one certificate while the identity's other certificates keep working.
 *
 * Layout: the main config (see {@link renderNatsServerConfig}) includes one file, by default
 * `authorization.conf` beside it, that holds the whole `authorization { ... }` block: the static bootstrap
 * users and the per-certificate users, rendered together by {@link renderNatsAuthorization}. (nats-server
 * 2.9 accepts `include` at top level and inside a block, but not inside an array, and a second `users` key
 * would replace the first, so the two lists cannot live in separate files.) Rewrite it with
 * {@link writeNatsAuthorization} and apply it with {@link reloadNats}.
 *
 * Facts checked against nats-server 2.9.10:
 * - the user of a certificate is its subject as Go prints it, RFC 2253 order (last RDN first):
 *   `CN=host/kvm-01,OU=<serial>,O=cowherd`, what {@link natsUserOf} returns; URI SANs
 *   (`spiffe://cowherd/service/x`) and DNS SANs are tried first, so a user named after a URI admits every
 *   certificate of that identity (revocation by serial cannot apply to it) and no user may be named after
 *   a DNS name such as `localhost`;
 * - an EMPTY users list means no authorization at all (every certificate from the CA is admitted), so an
 *   allow-list that would be empty holds a user no certificate maps to, which keeps authorization on;
 * - a certificate that maps to no user is refused at connect with "Authorization Violation";
 * - on reload (SIGHUP; the server logs "Reloaded server configuration" once applied, a few ms), connected
 *   clients whose user was removed are disconnected at once (no -ERR is sent; nats.js then reconnects, is
 *   refused with "Authorization Violation" and closes the connection for good after two refusals, ~2.5 s),
 *   and the remaining clients keep their connections with the new permissions. Each reload logs a harmless
 *   `[WRN] User "..." found in connect proto, but user required from cert` per connected client;
 * - a certificate's connection outlives its certificate's renewal (TLS is checked at connect): when a
 *   certificate is replaced, add the new one's user first and remove the old one only when it is revoked
 *   or expired (removing it kicks the connection, which then reconnects with the new files);
 * - `include` paths are relative to the including file (a leading "/" is not honoured).
 */
import { writeAtomically } from './credential-files.js';
import { EVENT_STREAM, EVENT_SUBJECT_PREFIX } from './events.js';
import { describeIdentity, type Identity } from './identity.js';
import { inspectCertificate, natsUserOf } from './pki.js';
import type { TlsFiles } from './tls.js';

/** A NATS user: who (a certificate's subject DN, or a URI SAN for identity-wide users) and as what. */
export interface NatsPrincipal {
  /** Subject DN as NATS prints it ({@link natsUserOf}), or a SPIFFE URI to admit every certificate of an identity. */
  readonly user: string;
  /** The identity the certificate names; its kind decides the permissions. */
  readonly identity: Identity;
  /** Overrides the permissions of the identity's kind (tests, special cases). */
  readonly permissions?: NatsPermissions;
}

/** Subjects a user may publish to and subscribe to; everything else is denied. */
export interface NatsPermissions {
  readonly publish: readonly string[];
  readonly subscribe: readonly string[];
}

/** Everything: services are trusted infrastructure (KV buckets, stream and consumer management). */
export const FULL_ACCESS: NatsPermissions = { publish: ['>'], subscribe: ['>'] };

/** JetStream account info: `jetstreamManager()` asks for it when it opens (connectNats does). */
const JS_ACCOUNT_INFO = '$JS.API.INFO';

/**
 * Permissions of an identity kind:
 * - service: everything;
 * - host: publish its own events (`cowherd.events.<kind>.<verb>.<host>`) and ask JetStream for account
 *   info; subscribe to reply inboxes (publish acks) and certificate revocations; nothing else (no KV, no
 *   other host's subjects, no stream or consumer management);
 * - admin: read-only following of the event stream: core subscription to `cowherd.events.>`, stream info
 *   and reading stored events by sequence (`$JS.API.STREAM.MSG.GET.COWHERD_EVENTS`). No consumers: nats
 *   2.9 cannot restrict CONSUMER.CREATE / MSG.NEXT / DELETE to the admin's own consumers (a consumer name
 *   is one subject token, no prefix wildcards), and those would let an admin alter, drain or delete the
 *   services' durable consumers.
 */
export function permissionsFor(identity: Identity): NatsPermissions {
  switch (identity.kind) {
    case 'service':
      return FULL_ACCESS;
    case 'host':
      return {
        publish: [`${EVENT_SUBJECT_PREFIX}.*.*.${identity.name}`, JS_ACCOUNT_INFO],
        subscribe: [`${inboxPrefixFor(identity)}.>`, `${EVENT_SUBJECT_PREFIX}.certificate.revoked.>`],
      };
    case 'admin':
      return {
        publish: [JS_ACCOUNT_INFO, `$JS.API.STREAM.INFO.${EVENT_STREAM}`, `$JS.API.STREAM.MSG.GET.${EVENT_STREAM}`],
        subscribe: [`${inboxPrefixFor(identity)}.>`, `${EVENT_SUBJECT_PREFIX}.>`],
      };
  }
}

/**
 * A per-identity inbox prefix (`_INBOX_host_kvm-01`; dots in names become "_", which names never contain,
 * so no prefix is another's prefix). connectNats uses it as the connection's `inboxPrefix`, and hosts and
 * admins may subscribe only below their own, so nobody reads replies meant for someone else.
 */
export function inboxPrefixFor(identity: Identity): string {
  return `_INBOX_${identity.kind}_${identity.name.replace(/\./g, '_')}`;
}

/** The principal of one certificate (user = its subject DN); throws when it names no cowherd identity. */
export function certificatePrincipal(certificatePem: string, permissions?: NatsPermissions): NatsPrincipal {
  const identity = inspectCertificate(certificatePem).identity;
  if (identity === undefined) throw new Error('certificate names no cowherd identity');
  return { user: natsUserOf(certificatePem), identity, ...(permissions === undefined ? {} : { permissions }) };
}

/** A principal that admits every certificate of `identity` by its URI SAN (bootstrap; not revocable by serial). */
export function identityPrincipal(identity: Identity, permissions?: NatsPermissions): NatsPrincipal {
  return { user: identity.uri, identity, ...(permissions === undefined ? {} : { permissions }) };
}

/** A user no certificate maps to: keeps authorization on when the allow-list is otherwise empty. */
export const NOBODY = 'cowherd:no-certificate-maps-to-this-user';

/**
 * The `users = [...]` entries, one per line, in NATS config syntax. Duplicate users keep their first
 * entry (nats-server refuses a config with duplicates). Never renders an empty list (see {@link NOBODY}).
 */
export function renderNatsUsers(principals: readonly NatsPrincipal[]): string {
  const seen = new Set<string>();
  const lines: string[] = [];
  for (const principal of principals) {
    if (seen.has(principal.user)) continue;
    seen.add(principal.user);
    const permissions = principal.permissions ?? permissionsFor(principal.identity);
    lines.push(`    # ${describeIdentity(principal.identity)}`);
    lines.push(`    { user: ${quote(principal.user)}, permissions: ${renderPermissions(permissions)} }`);
  }
  if (lines.length === 0) {
    lines.push('    # nobody: an empty list would turn authorization off');
    lines.push(`    { user: ${quote(NOBODY)}, permissions: ${renderPermissions({ publish: [], subscribe: [] })} }`);
  }
  return ['  users = [', ...lines, '  ]', ''].join('\n');
}

/** The whole included file: `authorization { users = [static..., per-certificate...] }`. */
export function renderNatsAuthorization(staticUsers: readonly NatsPrincipal[], principals: readonly NatsPrincipal[]): string {
  return [
    '# Written by cowherd (nats-authorization.ts); applied with a config reload. Do not edit by hand.',
    'authorization {',
    renderNatsUsers([...staticUsers, ...principals]),
    '}',
    '',
  ].join('\n');
}

/** The authorization file of a server that admits every certificate from the CA (no users at all). */
export function renderOpenNatsAuthorization(): string {
  return '# Written by cowherd: no users yet, every certificate signed by the CA is admitted.\n';
}

/** Writes the authorization file atomically (temp file + rename; a reload never reads half of it). */
export async function writeNatsAuthorization(file: string, staticUsers: readonly NatsPrincipal[], principals: readonly NatsPrincipal[]): Promise<void> {
  await writeAtomically(file, renderNatsAuthorization(staticUsers, principals), 0o600);
}

/** Asks nats-server to reload its configuration (SIGHUP, what `nats-server --signal reload=<pid>` sends). */
export function reloadNats(pid: number): void {
  process.kill(pid, 'SIGHUP');
}

/** Options of {@link renderNatsServerConfig}. */
export interface NatsServerConfigOptions {
  /** Client port on 127.0.0.1 (or `host` below). */
  readonly port: number;
  readonly host?: string;
  readonly serverName: string;
  /** JetStream store directory. */
  readonly storeDir: string;
  /** Server certificate, key and the CA that client certificates must chain to. */
  readonly tls: TlsFiles;
  /** TLS handshake timeout in seconds. Default 5. */
  readonly tlsTimeoutSeconds?: number;
  /** The authorization file, RELATIVE to the config file's directory (nats 2.9 joins include paths to it). */
  readonly authorizationInclude: string;
  /** Extra lines appended at the end. */
  readonly extraConfig?: string;
}

/** The main nats-server config: listener, JetStream, mutual TLS with verify_and_map, the authorization include. */
export function renderNatsServerConfig(options: NatsServerConfigOptions): string {
  if (options.authorizationInclude.startsWith('/')) throw new Error('authorizationInclude must be relative to the config file');
  return [
    `listen: ${quote(`${options.host ?? '127.0.0.1'}:${options.port}`)}`,
    `server_name: ${quote(options.serverName)}`,
    `jetstream { store_dir: ${quote(options.storeDir)} }`,
    'tls {',
    `  cert_file: ${quote(options.tls.certificateFile)}`,
    `  key_file: ${quote(options.tls.privateKeyFile)}`,
    `  ca_file: ${quote(options.tls.caFile)}`,
    // Verifies the client certificate against ca_file and maps it to a user (URI SAN or subject DN).
    '  verify_and_map: true',
    `  timeout: ${options.tlsTimeoutSeconds ?? 5}`,
    '}',
    `include ${quote(options.authorizationInclude)}`,
    options.extraConfig ?? '',
    '',
  ].join('\n');
}

/** A double-quoted NATS config string: `\` and `"` escaped; control characters are refused. */
export function quote(value: string): string {
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(value)) throw new Error(`control character in NATS config string ${JSON.stringify(value)}`);
  return `"${value.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`;
}

function renderPermissions(permissions: NatsPermissions): string {
  const list = (subjects: readonly string[]): string => `[${subjects.map(quote).join(', ')}]`;
  // An empty allow list would mean "no restriction": deny everything instead.
  const side = (subjects: readonly string[]): string => (subjects.length === 0 ? `{ deny: [">"] }` : `{ allow: ${list(subjects)} }`);
  return `{ publish: ${side(permissions.publish)}, subscribe: ${side(permissions.subscribe)} }`;
}
