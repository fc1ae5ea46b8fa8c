/** The cloning process: wiring only. */
import { CloningServiceService } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { openOperations } from '../common/operations.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { CLONING_POLICY } from './access-policy.js';

await runServiceMain({
  name: 'cloning',
  variables: {},
  env: process.env,
  build: async ({ boundary, nats, log }) => {
    const operations = await openOperations(nats.jetstream, log, boundary);
    return {
      services: [adaptService(CloningServiceService, {}, CLONING_POLICY, boundary), operations.service],
      stop: () => operations.manager.stop(),
    };
  },
});
