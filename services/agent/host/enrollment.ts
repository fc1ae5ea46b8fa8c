/**
 * Joining the fleet: the agent turns a join token into its first certificate. The token carries the
 * SHA-256 of the CA certificate, so the agent fetches the CA bundle without trusting anything, checks
 * it against the pin (kubeadm's discovery hash), and only then enrolls over TLS verified against that
 * CA. The key pair is made here; only the CSR leaves the host.
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { ChannelCredentials } from '@grpc/grpc-js';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CertificateAuthorityServiceClient } from '../../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { createClient } from '../../common/platform/client.js';
import { credentialFiles, writeCredentials } from '../../common/platform/credential-files.js';
import { CowherdError } from '../../common/platform/errors.js';
import { identityUri } from '../../common/platform/identity.js';
import type { Logger } from '../../common/platform/logger.js';
import { certificateSha256, createCsr, generateKeyPair, inspectCertificate } from '../../common/platform/pki.js';
import type { TlsFiles } from '../../common/platform/tls.js';
import { JOIN_TOKEN_ID } from '../../common/domain/resource-names.js';

/** Options of {@link ensureEnrolled}. */
export interface EnrollmentOptions {
  /** Where cert.pem, key.pem (0600) and ca.pem are kept. */
  readonly credentialsDirectory: string;
  /** This host's id (`hosts/{host}`); must be the host the token was made for. */
  readonly host: string;
  /** The join token; needed only when there are no valid credentials yet. */
  readonly joinToken: string | undefined;
  /** host:port of the CA's enrollment port. */
  readonly enrollAddress: string;
  /** DNS names for the host certificate (the names services reach the agent by). */
  readonly dnsNames: readonly string[];
  readonly log: Logger;
}

/**
 * Returns the credential files, enrolling first when there are none or they expired. A host that
 * restarts keeps its identity: valid credentials are reused and renewed, not replaced.
 */
export async function ensureEnrolled(options: EnrollmentOptions): Promise<TlsFiles> {
  const files = credentialFiles(options.credentialsDirectory);
  if (existsSync(files.certificateFile) && existsSync(files.privateKeyFile) && existsSync(files.caFile)) {
    const facts = inspectCertificate(await readFile(files.certificateFile, 'utf8'));
    if (facts.notAfter.getTime() > Date.now() + 60_000 && facts.identity?.uri === identityUri('host', options.host)) return files;
    options.log.warn({ identity: facts.identity?.uri, notAfter: facts.notAfter }, 'stored credentials are expired or for another host; enrolling again');
  }
  if (!options.joinToken)
    throw new Error(
      `no valid credentials in ${options.credentialsDirectory} and no join token: ask an admin for one (cowherd hosts join-token ${options.host}) and set COWHERD_JOIN_TOKEN`,
    );
  const [scheme, tokenId = '', secret = '', pinned = '', ...rest] = options.joinToken.split('.');
  if (scheme !== 'cjt1' || !JOIN_TOKEN_ID.test(tokenId) || !/^[A-Za-z0-9_-]{43}$/.test(secret) || !/^[0-9a-f]{64}$/.test(pinned) || rest.length > 0)
    throw new Error('COWHERD_JOIN_TOKEN is not a cowherd join token (cjt1.<id>.<secret>.<ca sha256>)');

  // 1. Fetch the CA bundle without trusting anyone, and pin it.
  const caPem = await fetchCaBundle(options.enrollAddress);
  const actual = certificateSha256(caPem);
  if (actual !== pinned) {
    throw new CowherdError(
      GrpcStatus.FAILED_PRECONDITION,
      `the CA at ${options.enrollAddress} (sha256 ${actual}) is not the one the join token pins (${pinned}); refusing to enroll`,
      { reason: ErrorReason.ERROR_REASON_JOIN_TOKEN_CA_MISMATCH },
    );
  }
  // 2. Enroll over TLS verified against the pinned CA.
  const keys = await generateKeyPair(2048);
  const csrPem = createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity: identityUri('host', options.host), dnsNames: options.dnsNames });
  const client = createClient(CertificateAuthorityServiceClient, options.enrollAddress, ChannelCredentials.createSsl(Buffer.from(caPem)), {
    defaultDeadlineMs: 30_000,
  });
  try {
    const response = await new Promise<{ certificatePem: string; caPem: string }>((resolve, reject) =>
      client.enrollHost({ token: options.joinToken!, csrPem }, (error, result) =>
        error ? reject(error) : resolve({ certificatePem: result.certificate?.certificatePem ?? '', caPem: result.caCertificatePem }),
      ),
    );
    const written = await writeCredentials(options.credentialsDirectory, {
      certificatePem: response.certificatePem,
      privateKeyPem: keys.privateKeyPem,
      caPem: response.caPem,
    });
    options.log.info({ host: options.host, serialNumber: inspectCertificate(response.certificatePem).serialNumber }, 'enrolled');
    return written;
  } finally {
    client.close();
  }
}

/** GetCaBundle on the enrollment port with server verification off: the answer is checked against the pin. */
async function fetchCaBundle(address: string): Promise<string> {
  const insecure = ChannelCredentials.createSsl(null, null, null, { rejectUnauthorized: false, checkServerIdentity: () => undefined });
  const client = createClient(CertificateAuthorityServiceClient, address, insecure, { defaultDeadlineMs: 30_000 });
  try {
    return await new Promise((resolve, reject) => client.getCaBundle({}, (error, response) => (error ? reject(error) : resolve(response.caCertificatePem))));
  } finally {
    client.close();
  }
}
