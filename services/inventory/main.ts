/** The inventory process: wiring only. */
import { InventoryServiceService } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { integerVariable } from '../common/platform/config.js';
import { PageTokens } from '../common/platform/pagination.js';
import { adaptService } from '../common/platform/rpc.js';
import { runServiceMain } from '../common/platform/service-process.js';
import { INVENTORY_POLICY } from './access-policy.js';
import { inventoryHandlers } from './handlers.js';
import { Inventory } from './inventory.js';

await runServiceMain({
  name: 'inventory',
  variables: {
    heartbeatSeconds: integerVariable('COWHERD_HEARTBEAT_SECONDS', 'heartbeat interval agents are told to use', 10, 1, 3600),
    missedHeartbeats: integerVariable('COWHERD_MISSED_HEARTBEATS', 'missed heartbeat intervals before a host is UNREACHABLE', 3, 2, 100),
  },
  env: process.env,
  build: async ({ config, boundary, nats, events, log }) => {
    const inventory = await Inventory.open(nats.jetstream, events, log, { intervalSeconds: config.heartbeatSeconds, missedIntervals: config.missedHeartbeats });
    inventory.startMonitor();
    const quietMethods = new Set(['/cowherd.inventory.v1.InventoryService/Heartbeat']);
    return {
      services: [
        adaptService(InventoryServiceService, inventoryHandlers(inventory, await PageTokens.open(nats.jetstream)), INVENTORY_POLICY, {
          ...boundary,
          quietMethods,
        }),
      ],
      stop: async () => inventory.stop(),
    };
  },
});
