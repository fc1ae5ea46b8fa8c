/** The certificate-authority process: wiring only. */
import { CertificateAuthorityServiceService } from '../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { CERTIFICATE_AUTHORITY_POLICY } from './access-policy.js';

await runServiceMain({
  name: 'certificate-authority',
  variables: {},
  env: process.env,
  build: async ({ boundary }) => ({
    services: [adaptService(CertificateAuthorityServiceService, {}, CERTIFICATE_AUTHORITY_POLICY, boundary)],
  }),
});
