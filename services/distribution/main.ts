/** The distribution process: wiring only. */
import { DistributionServiceService } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { OperationsService } from '../gen/google/longrunning/operations.js';
import { OperationManager, OPERATIONS_POLICY, operationsHandlers } from '../common/operations.js';
import { PageTokens } from '../common/pagination.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { DISTRIBUTION_POLICY } from './access-policy.js';

await runServiceMain({
  name: 'distribution',
  variables: {},
  env: process.env,
  build: async ({ boundary, nats, log }) => {
    const operations = await OperationManager.open({ js: nats.jetstream, log, pageTokens: await PageTokens.open(nats.jetstream) });
    operations.resumeOrphans();
    return {
      services: [
        adaptService(DistributionServiceService, {}, DISTRIBUTION_POLICY, boundary),
        adaptService(OperationsService, operationsHandlers(operations), OPERATIONS_POLICY, boundary),
      ],
      stop: () => operations.stop(),
    };
  },
});
