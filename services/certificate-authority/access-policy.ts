/** Who may call each CertificateAuthorityService RPC. Deny by default: every RPC is listed. */
import type { CertificateAuthorityServiceService } from '../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import type { AccessPolicy } from '../common/platform/rpc.js';

export const CERTIFICATE_AUTHORITY_POLICY: AccessPolicy<typeof CertificateAuthorityServiceService> = {
  // The CA bundle is public; enrollment is authenticated by the join token, not by a certificate.
  getCaBundle: { allow: 'anyone' },
  enrollHost: { allow: 'anyone' },
  createJoinToken: { allow: ['admin'] },
  getJoinToken: { allow: ['admin'] },
  listJoinTokens: { allow: ['admin'] },
  deleteJoinToken: { allow: ['admin'] },
  // Every identity renews its own certificate and reads the revocation list.
  renewCertificate: { allow: ['admin', 'service', 'host'], actsForHost: 'caller' },
  getRevocationList: { allow: ['admin', 'service', 'host'], actsForHost: 'caller' },
  // Every server, agents included, admits only issued serials and so reads this list.
  getIssuedSerialList: { allow: ['admin', 'service', 'host'], actsForHost: 'caller' },
  issueCertificate: { allow: ['admin'] },
  revokeCertificate: { allow: ['admin'] },
  getCertificate: { allow: ['admin', 'service'] },
  listCertificates: { allow: ['admin', 'service'] },
};

/** The enrollment port (no client certificates): only the CA bundle and enrollment, nothing else. */
export const ENROLLMENT_POLICY: AccessPolicy<typeof CertificateAuthorityServiceService> = {
  ...Object.fromEntries(Object.keys(CERTIFICATE_AUTHORITY_POLICY).map((method) => [method, { allow: [] }])),
  getCaBundle: { allow: 'anyone' },
  enrollHost: { allow: 'anyone' },
} as AccessPolicy<typeof CertificateAuthorityServiceService>;
