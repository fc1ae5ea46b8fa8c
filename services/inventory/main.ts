/** The inventory process: wiring only. */
import { InventoryServiceService } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { adaptService } from '../common/rpc.js';
import { runServiceMain } from '../common/service-process.js';
import { INVENTORY_POLICY } from './access-policy.js';

await runServiceMain({
  name: 'inventory',
  variables: {},
  env: process.env,
  build: async ({ boundary }) => ({
    services: [adaptService(InventoryServiceService, {}, INVENTORY_POLICY, boundary)],
  }),
});
