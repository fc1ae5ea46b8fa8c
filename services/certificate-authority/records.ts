/**
 * What the CA keeps in the `ca` KV bucket: join tokens (secret hashes only), issued certificates, and
 * the revoked serials. Keys: `token.<id>`, `certificate.<serial>`, `revoked.<serial>`,
 * `request.<sha256 of kind and request_id>`.
 */
import type { JetStreamClient } from '@nats-io/jetstream';
import { jsonCodec, KvStore } from '../common/platform/kv.js';

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
