/** The cloning process: wiring only. */
import { CloningServiceService } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { OperationsService } from '../gen/google/longrunning/operations.js';
import { OperationManager, OPERATIONS_POLICY, operationsHandlers } from '../common/operations.js';
import { PageTokens } from '../common/pagination.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { CLONING_POLICY } from './access-policy.js';

await runServiceMain({
  name: 'cloning',
  variables: {},
  env: process.env,
  build: async ({ boundary, nats, log }) => {
    const operations = await OperationManager.open({ js: nats.jetstream, log, pageTokens: await PageTokens.open(nats.jetstream) });
    operations.resumeOrphans();
    return {
      services: [
        adaptService(CloningServiceService, {}, CLONING_POLICY, boundary),
        adaptService(OperationsService, operationsHandlers(operations), OPERATIONS_POLICY, boundary),
      ],
      stop: () => operations.stop(),
    };
  },
});
