/**
 * What the CA keeps in the `ca` KV bucket: join tokens (secret hashes only), issued certificates, and
 * the revoked serials. Keys: `token.<id>`, `certificate.<serial>`, `revoked.<serial>`,
 * `request.<sha256 of kind and request_id>`. Shared by the certificate-authority service, which writes them,
 * and the NATS sidecar of Kubernetes (deploy/nats), which reads the certificates to keep NATS's users: both run
 * {@link natsUsers}, so a NATS server admits the same certificates whichever of them manages it.
 */
import { readFile } from 'node:fs/promises';
import type { JetStreamClient } from '@nats-io/jetstream';
import type { Identity } from '../platform/identity.js';
import { jsonCodec, KvStore } from '../platform/kv.js';
import type { Logger } from '../platform/logger.js';
import { certificatePrincipal, identityPrincipal, reloadNats, writeNatsAuthorization, type NatsPrincipal } from '../platform/nats-authorization.js';
import { CERTIFICATE_NAME } from './resource-names.js';

/** A join token as stored. */
export interface JoinTokenRecord {
  readonly id: string;
  readonly host: string;
  /** SHA-256 of the secret part, hex. The secret itself is never stored. */
  readonly secretSha256: string;
  readonly caSha256: string;
  readonly createTime: string;
  readonly expireTime: string;
  readonly state: 'PENDING' | 'USED' | 'REVOKED';
  readonly creator: string;
  readonly useTime?: string;
  /** certificates/<serial> it produced. */
  readonly certificate?: string;
}

/** An issued certificate as stored. */
export interface CertificateRecord {
  readonly serialNumber: string;
  readonly identity: string;
  readonly dnsNames: readonly string[];
  readonly issueTime: string;
  readonly expireTime: string;
  readonly revoked?: { readonly time: string; readonly reason: number };
  readonly certificatePem: string;
  readonly issuer: string;
}

/** A revoked serial, kept until the certificate would have expired. */
export interface RevokedRecord {
  readonly expireTime: string;
}

/** A request_id seen before: what it made, and a fingerprint of the request. */
export interface RequestRecord {
  readonly resource: string;
  readonly fingerprint: string;
}

/** The CA's buckets, typed. */
export interface CaRecords {
  readonly tokens: KvStore<JoinTokenRecord>;
  readonly certificates: KvStore<CertificateRecord>;
  readonly revoked: KvStore<RevokedRecord>;
  readonly requests: KvStore<RequestRecord>;
}

/** Opens (creating if needed) the CA's bucket with one typed view per key prefix. */
export async function openCaRecords(js: JetStreamClient): Promise<CaRecords> {
  // One bucket, several value types: each view only ever reads its own key prefix.
  return {
    tokens: await KvStore.open(js, 'ca', jsonCodec<JoinTokenRecord>()),
    certificates: await KvStore.open(js, 'ca', jsonCodec<CertificateRecord>()),
    revoked: await KvStore.open(js, 'ca', jsonCodec<RevokedRecord>()),
    requests: await KvStore.open(js, 'ca', jsonCodec<RequestRecord>()),
  };
}

/** State of a token at `now`. */
export function tokenState(record: JoinTokenRecord, now = Date.now()): 'PENDING' | 'USED' | 'EXPIRED' | 'REVOKED' {
  if (record.state === 'PENDING' && tokenExpired(record, now)) return 'EXPIRED';
  return record.state;
}

/** True once the token's TTL has run out, whatever its stored state. */
export function tokenExpired(record: JoinTokenRecord, now = Date.now()): boolean {
  return new Date(record.expireTime).getTime() <= now;
}

/** State of a certificate at `now`. */
export function certificateState(record: CertificateRecord, now = Date.now()): 'ACTIVE' | 'REVOKED' | 'EXPIRED' {
  if (record.revoked) return 'REVOKED';
  return new Date(record.expireTime).getTime() <= now ? 'EXPIRED' : 'ACTIVE';
}

/** How the NATS users are kept: where the NATS server's authorization file is, and where the records come from. */
export interface NatsUsersOptions {
  /** The authorization file the server includes. */
  readonly authorizationFile: string;
  /** nats-server's pid file, for the reload signal. */
  readonly pidFile: string;
  /** Identities admitted by URI SAN whatever their serial (the bootstrap services). */
  readonly staticIdentities: readonly Identity[];
  readonly listCertificates: () => Promise<readonly CertificateRecord[]>;
  readonly log: Logger;
}

/** NATS's users kept equal to the certificate records; `issued` and `revoked` re-sync, as a CA listener. */
export interface NatsUsers {
  /** Rewrites the authorization file from the records and reloads nats-server; serialized, so calls never overlap. */
  sync(): Promise<void>;
  issued(): Promise<void>;
  revoked(): Promise<void>;
}

/** Reload settles in a few milliseconds (measured 3-9 ms); wait this long before answering the caller. */
const RELOAD_SETTLE_MS = 150;

/**
 * Keeps NATS's allow-list equal to the CA's records: one NATS user per ACTIVE certificate (its subject DN,
 * which carries the serial), permissions by identity kind, plus static identity-level users for bootstrap
 * infrastructure. After every issue and revoke (and every 30 s, for expiries and other replicas) the CA, or
 * the sidecar on a change of a `certificate.*` record, rewrites the authorization file and reloads nats-server,
 * so a revoked certificate is refused by NATS within a second of RevokeCertificate returning, and an issued one
 * is admitted before it returns.
 */
export function natsUsers(options: NatsUsersOptions): NatsUsers {
  let queue: Promise<void> = Promise.resolve();
  const sync = (): Promise<void> => {
    const next = queue.then(async () => {
      const active = (await options.listCertificates()).filter((record) => certificateState(record) === 'ACTIVE');
      const principals: NatsPrincipal[] = [];
      for (const record of active) {
        try {
          principals.push(certificatePrincipal(record.certificatePem));
        } catch (error) {
          options.log.warn({ err: error, certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }) }, 'certificate left out of NATS users');
        }
      }
      await writeNatsAuthorization(
        options.authorizationFile,
        options.staticIdentities.map((identity) => identityPrincipal(identity)),
        principals,
      );
      reloadNats(Number((await readFile(options.pidFile, 'utf8')).trim()));
      await new Promise((resolve) => setTimeout(resolve, RELOAD_SETTLE_MS));
      options.log.debug({ users: principals.length + options.staticIdentities.length }, 'NATS users synced');
    });
    queue = next.catch((error: unknown) => options.log.error({ err: error }, 'NATS users sync failed'));
    return next;
  };
  return { sync, issued: () => sync(), revoked: () => sync() };
}
