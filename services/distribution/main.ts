/** The distribution process: wiring only. */
import { DistributionServiceService } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { openOperations } from '../common/operations.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { DISTRIBUTION_POLICY } from './access-policy.js';

await runServiceMain({
  name: 'distribution',
  variables: {},
  env: process.env,
  build: async ({ boundary, nats, log }) => {
    const operations = await openOperations(nats.jetstream, log, boundary);
    return {
      services: [adaptService(DistributionServiceService, {}, DISTRIBUTION_POLICY, boundary), operations.service],
      stop: () => operations.manager.stop(),
    };
  },
});
