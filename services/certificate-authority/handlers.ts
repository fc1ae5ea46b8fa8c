/** CertificateAuthorityService handlers: request validation and message mapping around CertificateAuthority. */
import { CertificateAuthorityServiceService } from '../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { Certificate, Certificate_State, JoinToken, JoinToken_State, type RevocationReason } from '../gen/cowherd/certauthority/v1/resources.js';
import type { Duration } from '../gen/google/protobuf/duration.js';
import { CowherdError } from '../common/platform/errors.js';
import { enumValueNames, parseFilter, resourceNameField } from '../common/domain/filter.js';
import { parseIdentity } from '../common/platform/identity.js';
import { paginate, type PageTokens } from '../common/platform/pagination.js';
import { CERTIFICATE_NAME, HOST_ID, JOIN_TOKEN_NAME } from '../common/domain/resource-names.js';
import type { CallContext, Handlers } from '../common/platform/rpc.js';
import type { CertificateAuthority } from './certificate-authority.js';
import { certificateState, tokenState, type CertificateRecord, type JoinTokenRecord } from '../common/domain/ca-records.js';

type CaService = typeof CertificateAuthorityServiceService;

/**
 * Handlers of the mTLS port (all RPCs); the enrollment port serves only getCaBundle and enrollHost of these.
 * `beforeIssuedList` runs before each GetIssuedSerialList (the CA records changed bootstrap certificates).
 */
export function certificateAuthorityHandlers(
  ca: CertificateAuthority,
  pageTokens: PageTokens,
  beforeIssuedList: () => Promise<void> = async () => undefined,
): Handlers<CaService> {
  const caller = (context: CallContext) => {
    if (!context.caller) throw CowherdError.unauthenticated('a client certificate is required');
    return context.caller;
  };
  return {
    getCaBundle: async () => ({ caCertificatePem: ca.caCertificatePem, caCertificateSha256: ca.caSha256, trustBundlePem: ca.caCertificatePem }),

    createJoinToken: async (request, context) => {
      const issued = await ca.createJoinToken(request.host, seconds(request.ttl, 'ttl'), request.requestId, caller(context));
      return { ...toJoinToken(issued.record), token: issued.token };
    },
    getJoinToken: async (request) => toJoinToken(await ca.getJoinToken(request.name)),
    listJoinTokens: async (request) => {
      const matches = parseFilter<JoinTokenRecord>(request.filter, {
        state: { read: (record) => tokenState(record), values: enumValueNames(JoinToken_State, 'STATE_') },
        host: resourceNameField((record) => record.host, HOST_ID, '{host} (a host id such as kvm-01)', { prefix: true }),
      });
      const { page, nextPageToken } = paginate(
        (await ca.listJoinTokens()).filter(matches),
        newestFirst(
          (record) => record.createTime,
          (record) => record.id,
        ),
        {
          pageSize: request.pageSize,
          pageToken: request.pageToken,
          query: `joinTokens|${request.filter}`,
          tokens: pageTokens,
        },
      );
      return { joinTokens: page.map(toJoinToken), nextPageToken };
    },
    deleteJoinToken: async (request) => toJoinToken(await ca.deleteJoinToken(request.name)),

    enrollHost: async (request) => {
      if (request.token === '') throw CowherdError.invalidArgument('token', 'is required');
      const { record } = await ca.enrollHost(request.token, request.csrPem);
      return { certificate: toCertificate(record), caCertificatePem: ca.caCertificatePem, renewTime: renewTime(record) };
    },
    renewCertificate: async (request, context) => {
      if (!context.callerCertificate) throw CowherdError.unauthenticated('a client certificate is required');
      const record = await ca.renew(caller(context), context.callerCertificate, request.csrPem);
      return { certificate: toCertificate(record), caCertificatePem: ca.caCertificatePem, renewTime: renewTime(record) };
    },
    issueCertificate: async (request, context) =>
      toCertificate(
        await ca.issue(
          {
            csrPem: request.csrPem,
            identity: request.identity,
            dnsNames: request.dnsNames,
            ttlSeconds: seconds(request.ttl, 'ttl'),
            requestId: request.requestId,
          },
          caller(context),
        ),
      ),
    getCertificate: async (request, context) => {
      const record = await ca.getCertificate(request.name);
      // Another identity's certificate is NOT_FOUND to non-admins: its existence is not theirs to learn.
      if (caller(context).kind !== 'admin' && record.identity !== caller(context).uri) throw CowherdError.notFound(request.name);
      return toCertificate(record);
    },
    listCertificates: async (request) => {
      const matches = parseFilter<CertificateRecord>(request.filter, {
        state: { read: (record) => certificateState(record), values: enumValueNames(Certificate_State, 'STATE_') },
        identity: {
          read: (record) => record.identity,
          prefix: true,
          check: (value) => (parseIdentity(value) ? undefined : 'is not a cowherd identity (spiffe://cowherd/<admin|service|host>/<name>)'),
        },
      });
      const { page, nextPageToken } = paginate(
        (await ca.listCertificates()).filter(matches),
        newestFirst(
          (record) => record.issueTime,
          (record) => record.serialNumber,
        ),
        {
          pageSize: request.pageSize,
          pageToken: request.pageToken,
          query: `certificates|${request.filter}`,
          tokens: pageTokens,
        },
      );
      return { certificates: page.map(toCertificate), nextPageToken };
    },
    revokeCertificate: async (request, context) => toCertificate(await ca.revoke(request.name, request.reason as RevocationReason, caller(context))),
    getRevocationList: async () => {
      const list = await ca.revocationList();
      return { serialNumbers: list.serialNumbers, revision: String(list.revision), updateTime: new Date() };
    },
    getIssuedSerialList: async () => {
      await beforeIssuedList();
      return { serialNumbers: await ca.issuedSerialList(), readTime: new Date() };
    },
  };
}

/** Proto JoinToken from a record (never the secret). */
export function toJoinToken(record: JoinTokenRecord): JoinToken {
  return JoinToken.fromPartial({
    name: JOIN_TOKEN_NAME.format({ joinToken: record.id }),
    host: record.host,
    createTime: new Date(record.createTime),
    expireTime: new Date(record.expireTime),
    state: JoinToken_State[`STATE_${tokenState(record)}`],
    caCertificateSha256: record.caSha256,
    creatorIdentity: record.creator,
    ...(record.useTime === undefined ? {} : { useTime: new Date(record.useTime) }),
    certificate: record.certificate ?? '',
  });
}

/** Proto Certificate from a record. */
export function toCertificate(record: CertificateRecord): Certificate {
  return Certificate.fromPartial({
    name: CERTIFICATE_NAME.format({ certificate: record.serialNumber }),
    serialNumber: record.serialNumber,
    identity: record.identity,
    dnsNames: [...record.dnsNames],
    state: Certificate_State[`STATE_${certificateState(record)}`],
    issueTime: new Date(record.issueTime),
    expireTime: new Date(record.expireTime),
    ...(record.revoked ? { revokeTime: new Date(record.revoked.time), revocationReason: record.revoked.reason } : {}),
    certificatePem: record.certificatePem,
    issuerIdentity: record.issuer,
  });
}

/** When the holder should renew: two thirds into the certificate's life. */
function renewTime(record: CertificateRecord): Date {
  const start = new Date(record.issueTime).getTime();
  return new Date(start + ((new Date(record.expireTime).getTime() - start) * 2) / 3);
}

function seconds(duration: Duration | undefined, field: string): number | undefined {
  if (!duration) return undefined;
  const value = Number(duration.seconds) + duration.nanos / 1e9;
  if (!Number.isFinite(value) || value <= 0) throw CowherdError.invalidArgument(field, 'must be a positive duration');
  return value;
}

/** A sort key that orders newest first, ties broken by id. */
function newestFirst<T>(time: (item: T) => string, id: (item: T) => string): (item: T) => string {
  return (item) => `${String(9_999_999_999_999 - new Date(time(item)).getTime()).padStart(13, '0')}.${id(item)}`;
}
