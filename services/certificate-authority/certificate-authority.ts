/**
 * The CA's domain logic: join tokens, enrollment, renewal, issuance, revocation. Handlers stay thin and
 * call this. Every state change is a compare-and-set on the `ca` bucket, so replicas can run side by side.
 */
import { createHash, randomBytes, timingSafeEqual, X509Certificate } from 'node:crypto';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../common/platform/errors.js';
import { DNS_NAME, describeIdentity, identityUri, parseIdentity, type Identity } from '../common/platform/identity.js';
import { KvConflictError } from '../common/platform/kv.js';
import type { Logger } from '../common/platform/logger.js';
import { certificateSha256, inspectCertificate, parseCsr, signLeafCertificate, ttlOfValidity, type CertificateAndKey } from '../common/platform/pki.js';
import { CERTIFICATE_NAME, HOST_ID, isReservedHostId, JOIN_TOKEN_ID, JOIN_TOKEN_NAME } from '../common/domain/resource-names.js';
import { RevocationReason } from '../gen/cowherd/certauthority/v1/resources.js';
import type { PeerCertificateFacts } from '../common/platform/rpc.js';
import { tokenExpired, type CaRecords, type CertificateRecord, type JoinTokenRecord } from '../common/domain/ca-records.js';

/** Lifetimes and limits, with their defaults. */
export interface CaPolicy {
  /** Host certificates from EnrollHost. Default 24 h. */
  readonly hostCertificateSeconds: number;
  /** IssueCertificate default. Default 7 days. */
  readonly defaultIssueSeconds: number;
  /** IssueCertificate maximum. Default 90 days. */
  readonly maxIssueSeconds: number;
  /** Join token TTL default. Default 1 h. */
  readonly defaultTokenSeconds: number;
  /** Join token TTL range. Default 60 s to 24 h. */
  readonly minTokenSeconds: number;
  readonly maxTokenSeconds: number;
  /** Smallest RSA key accepted in a CSR. Default 2048. */
  readonly minKeyBits: number;
}

export const DEFAULT_CA_POLICY: CaPolicy = {
  hostCertificateSeconds: 86_400,
  defaultIssueSeconds: 7 * 86_400,
  maxIssueSeconds: 90 * 86_400,
  defaultTokenSeconds: 3_600,
  minTokenSeconds: 60,
  maxTokenSeconds: 86_400,
  minKeyBits: 2048,
};

/** Told about every issued and revoked certificate (NATS authorization, events). */
export interface CertificateListener {
  issued(record: CertificateRecord, context: { joinToken?: string }): Promise<void>;
  revoked(record: CertificateRecord): Promise<void>;
}

/** A join token as returned: the record plus, once, the secret string. */
export interface IssuedJoinToken {
  readonly record: JoinTokenRecord;
  /** `cjt1.<id>.<secret>.<ca sha256>`; empty on a replayed request_id. */
  readonly token: string;
}

/** The secret of a join token string: 32 random bytes, base64url. */
const TOKEN_SECRET = /^[A-Za-z0-9_-]{43}$/;
/** The CA certificate's SHA-256 a join token string pins: 64 lowercase hex digits. */
const TOKEN_CA_SHA256 = /^[0-9a-f]{64}$/;

/** The certificate authority. */
export class CertificateAuthority {
  readonly caSha256: string;

  constructor(
    private readonly ca: CertificateAndKey,
    private readonly records: CaRecords,
    private readonly listener: CertificateListener,
    private readonly log: Logger,
    readonly policy: CaPolicy = DEFAULT_CA_POLICY,
  ) {
    this.caSha256 = certificateSha256(ca.certificatePem);
  }

  /** The CA certificate (public). */
  get caCertificatePem(): string {
    return this.ca.certificatePem;
  }

  /** Creates a single-use join token for `host`; idempotent on request_id (without the secret). */
  async createJoinToken(host: string, ttlSeconds: number | undefined, requestId: string, creator: Identity): Promise<IssuedJoinToken> {
    if (!HOST_ID.test(host)) throw CowherdError.invalidArgument('host', `must be an RFC 1123 label (${HOST_ID.source})`);
    if (isReservedHostId(host))
      throw CowherdError.invalidArgument('host', `${JSON.stringify(host)} is reserved: a host certificate would carry a service's or NATS's DNS name`);
    const ttl = ttlSeconds ?? this.policy.defaultTokenSeconds;
    if (!(ttl >= this.policy.minTokenSeconds && ttl <= this.policy.maxTokenSeconds)) {
      throw CowherdError.invalidArgument('ttl', `must be between ${this.policy.minTokenSeconds} s and ${this.policy.maxTokenSeconds} s`);
    }
    const fingerprint = `${host}|${ttl}`;
    const replay = await this.claimRequest('token', requestId, fingerprint);
    if (replay) {
      const replayed = JOIN_TOKEN_NAME.parse(replay)?.joinToken;
      const existing = replayed === undefined ? undefined : await this.records.tokens.get(`token.${replayed}`);
      if (existing) return { record: existing.value, token: '' };
    }
    const id = randomBytes(8).toString('hex');
    const secret = randomBytes(32).toString('base64url');
    const now = Date.now();
    const record: JoinTokenRecord = {
      id,
      host,
      secretSha256: sha256(secret),
      caSha256: this.caSha256,
      createTime: new Date(now).toISOString(),
      expireTime: new Date(now + ttl * 1000).toISOString(),
      state: 'PENDING',
      creator: creator.uri,
    };
    await this.records.tokens.create(`token.${id}`, record);
    await this.recordRequest('token', requestId, JOIN_TOKEN_NAME.format({ joinToken: id }), fingerprint);
    this.log.info(
      { joinToken: JOIN_TOKEN_NAME.format({ joinToken: id }), host, expireTime: record.expireTime, creator: describeIdentity(creator) },
      'join token created',
    );
    // Re-enrolling a reinstalled host is allowed; say what it will do to the certificates the host holds now.
    const live = (await this.activeCertificatesOf(identityUri('host', host))).map((certificate) =>
      CERTIFICATE_NAME.format({ certificate: certificate.serialNumber }),
    );
    if (live.length > 0)
      this.log.warn(
        { host, joinToken: JOIN_TOKEN_NAME.format({ joinToken: id }), liveCertificates: live },
        'the host already holds live certificates; enrolling with this token revokes them (SUPERSEDED)',
      );
    return { record, token: `cjt1.${id}.${secret}.${this.caSha256}` };
  }

  /** A token record by resource name. */
  async getJoinToken(name: string): Promise<JoinTokenRecord> {
    const id = JOIN_TOKEN_NAME.parse(name)?.joinToken;
    if (!id) throw CowherdError.invalidArgument('name', 'must look like joinTokens/{16 hex digits}');
    const record = await this.records.tokens.get(`token.${id}`);
    if (!record) throw CowherdError.notFound(name);
    return record.value;
  }

  /** Every token record. */
  async listJoinTokens(): Promise<JoinTokenRecord[]> {
    return (await this.records.tokens.list('token.*')).map((entry) => entry.value);
  }

  /** Revokes an unused token; a used one is FAILED_PRECONDITION. */
  async deleteJoinToken(name: string): Promise<JoinTokenRecord> {
    const record = await this.getJoinToken(name);
    const result = await this.records.tokens.mutate(`token.${record.id}`, (current) => {
      if (!current) throw CowherdError.notFound(name);
      if (current.state === 'USED')
        throw CowherdError.failedPrecondition(
          `${name} was used; revoke the certificate it produced (${current.certificate ?? ''}) instead`,
          ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        );
      if (current.state === 'REVOKED' || tokenExpired(current)) return undefined;
      return { ...current, state: 'REVOKED' };
    });
    return result!.value;
  }

  /**
   * Exchanges a PENDING token and a CSR for the host's first certificate. The token is marked USED by
   * compare-and-set, so concurrent calls with one token yield at most one certificate.
   */
  async enrollHost(token: string, csrPem: string): Promise<{ record: CertificateRecord; joinToken: string }> {
    const [version, id, secret, caSha256, extra] = token.split('.');
    if (
      version !== 'cjt1' ||
      id === undefined ||
      !JOIN_TOKEN_ID.test(id) ||
      secret === undefined ||
      !TOKEN_SECRET.test(secret) ||
      caSha256 === undefined ||
      !TOKEN_CA_SHA256.test(caSha256) ||
      extra !== undefined
    ) {
      throw invalidToken('is not a cowherd join token');
    }
    const stored = await this.records.tokens.get(`token.${id}`);
    if (!stored || !safeEqualHex(stored.value.secretSha256, sha256(secret))) throw invalidToken('is not known here');
    if (caSha256 !== this.caSha256) {
      throw CowherdError.failedPrecondition('the token pins another CA certificate than this CA has', ErrorReason.ERROR_REASON_JOIN_TOKEN_CA_MISMATCH);
    }
    if (stored.value.state !== 'PENDING') throw invalidToken(`was already ${stored.value.state === 'USED' ? 'used' : 'revoked'}`);
    if (tokenExpired(stored.value)) throw invalidToken('has expired');

    const host = stored.value.host;
    const identity = identityUri('host', host);
    const csr = this.checkCsr(csrPem, identity, (name) => name === host || name.startsWith(`${host}.`) || name === 'localhost');
    const certificatePem = signLeafCertificate({
      ca: this.ca,
      publicKeyPem: csr.publicKeyPem,
      identity,
      dnsNames: csr.dnsNames,
      ttlSeconds: this.policy.hostCertificateSeconds,
    });
    const record = recordOf(certificatePem, 'spiffe://cowherd/service/certificate-authority');
    try {
      await this.records.tokens.update(
        `token.${id}`,
        { ...stored.value, state: 'USED', useTime: record.issueTime, certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }) },
        stored.revision,
      );
    } catch (error) {
      if (error instanceof KvConflictError) throw invalidToken('was used concurrently');
      throw error;
    }
    await this.records.certificates.create(`certificate.${record.serialNumber}`, record);
    await this.listener.issued(record, { joinToken: JOIN_TOKEN_NAME.format({ joinToken: id }) });
    this.log.info(
      {
        host,
        certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }),
        joinToken: JOIN_TOKEN_NAME.format({ joinToken: id }),
        expireTime: record.expireTime,
      },
      'host enrolled',
    );
    await this.supersede(record);
    return { record, joinToken: JOIN_TOKEN_NAME.format({ joinToken: id }) };
  }

  /**
   * After a (re-)enrollment: revokes every other ACTIVE certificate of the host (reason SUPERSEDED), so
   * that one host id has one live key, the one made on the reinstalled machine. The new certificate is
   * already issued; a revocation that fails is logged and that certificate lapses at its expiry (24 h).
   */
  private async supersede(current: CertificateRecord): Promise<void> {
    const self = parseIdentity('spiffe://cowherd/service/certificate-authority')!;
    for (const old of await this.activeCertificatesOf(current.identity)) {
      if (old.serialNumber === current.serialNumber) continue;
      try {
        await this.revoke(CERTIFICATE_NAME.format({ certificate: old.serialNumber }), RevocationReason.REVOCATION_REASON_SUPERSEDED, self);
      } catch (error) {
        this.log.error(
          {
            err: error,
            certificate: CERTIFICATE_NAME.format({ certificate: old.serialNumber }),
            supersededBy: CERTIFICATE_NAME.format({ certificate: current.serialNumber }),
          },
          'could not revoke a superseded host certificate',
        );
      }
    }
  }

  /** Certificates of `identity` that are neither revoked nor expired. */
  private async activeCertificatesOf(identity: string): Promise<CertificateRecord[]> {
    const now = Date.now();
    return (await this.listCertificates()).filter((record) => record.identity === identity && !record.revoked && new Date(record.expireTime).getTime() > now);
  }

  /** A new certificate for the caller's own identity, same DNS names and lifetime as the one it used. */
  async renew(
    caller: Identity,
    callerCertificate: Pick<PeerCertificateFacts, 'serialNumber' | 'dnsNames' | 'notBefore' | 'notAfter'>,
    csrPem: string,
  ): Promise<CertificateRecord> {
    const allowed = new Set(callerCertificate.dnsNames);
    const csr = this.checkCsr(csrPem, caller.uri, (name) => allowed.has(name));
    const lifetime = Math.max(1, Math.round(ttlOfValidity((callerCertificate.notAfter.getTime() - callerCertificate.notBefore.getTime()) / 1000)));
    const certificatePem = signLeafCertificate({
      ca: this.ca,
      publicKeyPem: csr.publicKeyPem,
      identity: caller.uri,
      dnsNames: csr.dnsNames,
      ttlSeconds: lifetime,
    });
    const record = recordOf(certificatePem, caller.uri);
    await this.records.certificates.create(`certificate.${record.serialNumber}`, record);
    await this.listener.issued(record, {});
    this.log.info(
      {
        identity: describeIdentity(caller),
        certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }),
        replaces: CERTIFICATE_NAME.format({ certificate: callerCertificate.serialNumber }),
      },
      'certificate renewed',
    );
    return record;
  }

  /** Issues a service or admin certificate (never a host one: hosts enroll with tokens). */
  async issue(
    request: { csrPem: string; identity: string; dnsNames: readonly string[]; ttlSeconds: number | undefined; requestId: string },
    issuer: Identity,
  ): Promise<CertificateRecord> {
    const identity = parseIdentity(request.identity);
    if (!identity) throw CowherdError.invalidArgument('identity', 'must be spiffe://cowherd/service/<name> or spiffe://cowherd/admin/<user>');
    if (identity.kind === 'host') throw CowherdError.invalidArgument('identity', 'host certificates are only issued through EnrollHost with a join token');
    request.dnsNames.forEach((name, index) => {
      if (!DNS_NAME.test(name) && name !== 'localhost') throw CowherdError.invalidArgument(`dns_names[${index}]`, 'is not a DNS name');
    });
    const ttl = request.ttlSeconds ?? this.policy.defaultIssueSeconds;
    if (!(ttl >= 60 && ttl <= this.policy.maxIssueSeconds))
      throw CowherdError.invalidArgument('ttl', `must be between 60 s and ${this.policy.maxIssueSeconds} s`);
    const fingerprint = sha256(`${request.csrPem}|${request.identity}|${request.dnsNames.join(',')}|${ttl}`);
    const replay = await this.claimRequest('issue', request.requestId, fingerprint);
    if (replay) return this.getCertificate(replay);
    const allowed = new Set(request.dnsNames);
    const csr = this.checkCsr(request.csrPem, identity.uri, (name) => allowed.has(name));
    const certificatePem = signLeafCertificate({
      ca: this.ca,
      publicKeyPem: csr.publicKeyPem,
      identity: identity.uri,
      dnsNames: request.dnsNames,
      ttlSeconds: ttl,
    });
    const record = recordOf(certificatePem, issuer.uri);
    await this.records.certificates.create(`certificate.${record.serialNumber}`, record);
    await this.recordRequest('issue', request.requestId, CERTIFICATE_NAME.format({ certificate: record.serialNumber }), fingerprint);
    await this.listener.issued(record, {});
    this.log.info(
      { identity: describeIdentity(identity), certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }), issuer: describeIdentity(issuer) },
      'certificate issued',
    );
    return record;
  }

  /** A certificate record by resource name. */
  async getCertificate(name: string): Promise<CertificateRecord> {
    const serial = CERTIFICATE_NAME.parse(name)?.certificate;
    if (!serial) throw CowherdError.invalidArgument('name', 'must look like certificates/{serial in lowercase hex}');
    const record = await this.records.certificates.get(`certificate.${serial}`);
    if (!record) throw CowherdError.notFound(name);
    return record.value;
  }

  /** Every certificate record. */
  async listCertificates(): Promise<CertificateRecord[]> {
    return (await this.records.certificates.list('certificate.*')).map((entry) => entry.value);
  }

  /** Revokes by serial; idempotent; an expired certificate is FAILED_PRECONDITION. */
  async revoke(name: string, reason: number, by: Identity): Promise<CertificateRecord> {
    const record = await this.getCertificate(name);
    if (record.revoked) return record;
    if (new Date(record.expireTime).getTime() <= Date.now())
      throw CowherdError.failedPrecondition(`${name} has expired; nothing to revoke`, ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT);
    const updated = await this.records.certificates.mutate(`certificate.${record.serialNumber}`, (current) =>
      current && !current.revoked ? { ...current, revoked: { time: new Date().toISOString(), reason } } : undefined,
    );
    const revoked = updated!.value;
    await this.records.revoked.put(`revoked.${record.serialNumber}`, { expireTime: record.expireTime });
    await this.listener.revoked(revoked);
    this.log.warn({ certificate: name, identity: record.identity, reason, by: describeIdentity(by) }, 'certificate revoked');
    return revoked;
  }

  /** Serials of every recorded certificate that has not expired yet (revoked ones too). */
  async issuedSerialList(): Promise<string[]> {
    const now = Date.now();
    return (await this.listCertificates())
      .filter((record) => new Date(record.expireTime).getTime() > now)
      .map((record) => record.serialNumber)
      .sort();
  }

  /**
   * Records a certificate signed with this CA's key outside the service (a bootstrap seed: NATS's and the
   * services' first certificates, the local fleet's bootstrap admin), so that servers, which admit only
   * issued serials, accept it and an admin can list and revoke it. Refuses a certificate this CA did not
   * sign and a CA certificate (logged); a serial already recorded is left as it is. True when it recorded one;
   * throws only when the record could not be written.
   */
  async recordBootstrapCertificate(certificatePem: string): Promise<boolean> {
    const certificate = new X509Certificate(certificatePem);
    const authority = new X509Certificate(this.ca.certificatePem);
    const refused = (problem: string): false => {
      this.log.warn(
        { serialNumber: certificate.serialNumber.toLowerCase(), subject: certificate.subject.replace(/\n/g, ', ') },
        `bootstrap certificate left out: ${problem}`,
      );
      return false;
    };
    if (!certificate.checkIssued(authority) || !certificate.verify(authority.publicKey)) return refused('not signed by this CA');
    if (certificate.ca) return refused('a CA certificate, not a leaf');
    const record = recordOf(certificatePem, BOOTSTRAP_ISSUER);
    if (new Date(record.expireTime).getTime() <= Date.now()) return false;
    if (await this.records.certificates.get(`certificate.${record.serialNumber}`)) return false;
    try {
      await this.records.certificates.create(`certificate.${record.serialNumber}`, record);
    } catch (error) {
      if (error instanceof KvConflictError) return false;
      throw error;
    }
    await this.listener.issued(record, {});
    this.log.info(
      { identity: record.identity, certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }), expireTime: record.expireTime },
      'bootstrap certificate recorded',
    );
    return true;
  }

  /** Serials revoked and not yet expired, with the bucket revision of the newest revocation. */
  async revocationList(): Promise<{ serialNumbers: string[]; revision: number }> {
    const now = Date.now();
    const entries = await this.records.revoked.list('revoked.*');
    return {
      serialNumbers: entries
        .filter((entry) => new Date(entry.value.expireTime).getTime() > now)
        .map((entry) => entry.key.slice('revoked.'.length))
        .sort(),
      revision: entries.reduce((max, entry) => Math.max(max, entry.revision), 0),
    };
  }

  /**
   * Checks a CSR: well-formed and self-signed, RSA of at least the minimum size, exactly one URI SAN equal
   * to `identity`, DNS names that `dnsAllowed` accepts, no other SAN.
   */
  private checkCsr(csrPem: string, identity: string, dnsAllowed: (name: string) => boolean): { publicKeyPem: string; dnsNames: readonly string[] } {
    if (csrPem.trim() === '') throw CowherdError.invalidArgument('csr_pem', 'is required', ErrorReason.ERROR_REASON_CSR_INVALID);
    const csr = parseCsr(csrPem);
    if (csr.publicKeyBits < this.policy.minKeyBits)
      throw CowherdError.invalidArgument('csr_pem', `must carry an RSA key of at least ${this.policy.minKeyBits} bits`, ErrorReason.ERROR_REASON_CSR_INVALID);
    const mismatch = (problem: string): CowherdError =>
      new CowherdError(GrpcStatus.PERMISSION_DENIED, `csr_pem ${problem}`, { reason: ErrorReason.ERROR_REASON_CSR_IDENTITY_MISMATCH, field: 'csr_pem' });
    if (csr.uris.length !== 1 || csr.uris[0] !== identity) throw mismatch(`must name exactly ${identity} as its URI SAN, not ${JSON.stringify(csr.uris)}`);
    if (csr.otherNames.length > 0) throw mismatch('may carry only URI and DNS SANs');
    const refused = csr.dnsNames.filter((name) => !dnsAllowed(name));
    if (refused.length > 0) throw mismatch(`asks for DNS names it may not have: ${refused.join(', ')}`);
    return { publicKeyPem: csr.publicKeyPem, dnsNames: csr.dnsNames };
  }

  /** Returns the resource an earlier request with this request_id made, or undefined for a new one. */
  private async claimRequest(kind: string, requestId: string, fingerprint: string): Promise<string | undefined> {
    if (requestId === '') return undefined;
    const existing = await this.records.requests.get(`request.${sha256(`${kind}|${requestId}`)}`);
    if (!existing) return undefined;
    if (existing.value.fingerprint !== fingerprint) {
      throw new CowherdError(GrpcStatus.ALREADY_EXISTS, 'request_id was already used for a different request', {
        reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT,
        field: 'request_id',
      });
    }
    return existing.value.resource;
  }

  private async recordRequest(kind: string, requestId: string, resource: string, fingerprint: string): Promise<void> {
    if (requestId === '') return;
    await this.records.requests.put(`request.${sha256(`${kind}|${requestId}`)}`, { resource, fingerprint });
  }
}

/** issuer_identity of a bootstrap certificate: signed with the CA key before the CA service ran. */
export const BOOTSTRAP_ISSUER = 'bootstrap';

function recordOf(certificatePem: string, issuer: string): CertificateRecord {
  const facts = inspectCertificate(certificatePem);
  return {
    serialNumber: facts.serialNumber,
    identity: facts.identity?.uri ?? '',
    dnsNames: facts.dnsNames,
    issueTime: facts.notBefore.toISOString(),
    expireTime: facts.notAfter.toISOString(),
    certificatePem,
    issuer,
  };
}

function invalidToken(problem: string): CowherdError {
  return CowherdError.unauthenticated(`the join token ${problem}`, ErrorReason.ERROR_REASON_JOIN_TOKEN_INVALID);
}

function sha256(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

function safeEqualHex(a: string, b: string): boolean {
  const left = Buffer.from(a, 'hex');
  const right = Buffer.from(b, 'hex');
  return left.length === right.length && timingSafeEqual(left, right);
}
