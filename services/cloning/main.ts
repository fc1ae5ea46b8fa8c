/** The cloning process: wiring only. */
import { CloningServiceService } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { createClient } from '../common/platform/client.js';
import { openOperations } from '../common/domain/operations.js';
import { adaptService } from '../common/platform/rpc.js';
import { runServiceMain } from '../common/platform/service-process.js';
import { identityUri } from '../common/platform/identity.js';
import { CLONING_POLICY } from './access-policy.js';
import { createAgentPort } from './agents.js';
import { cloneOperationKind, ImageVersionPins } from './clone-operation.js';
import { CLONING_VARIABLES, imageWaitDeadlines } from './config.js';
import { cloningHandlers } from './handlers.js';
import { GuestSecrets } from './guest-secrets.js';
import { createInventoryFleetView } from './inventory-view.js';
import { distributionImageDelivery } from './image-delivery.js';
import { stopOperationKind } from './power.js';
import { rebaseOperationKind } from './rebase-operation.js';

await runServiceMain({
  name: 'cloning',
  variables: CLONING_VARIABLES,
  env: process.env,
  build: async ({ config, boundary, nats, log, clientCredentials, events }) => {
    const inventory = createClient(InventoryServiceClient, config.inventoryAddress, clientCredentials(identityUri('service', 'inventory')), {
      defaultDeadlineMs: 15_000,
    });
    const fleet = createInventoryFleetView(inventory);
    const agents = createAgentPort({ credentials: clientCredentials });
    const imageDelivery = distributionImageDelivery(config.distributionAddress, clientCredentials(identityUri('service', 'distribution')), {
      deadlines: imageWaitDeadlines(config),
    });
    const guestSecrets = new GuestSecrets();
    const versionPins = new ImageVersionPins();
    const kind = cloneOperationKind({ fleet, agents, events, imageDelivery, guestSecrets, versionPins });
    const stopKind = stopOperationKind({ fleet, agents });
    const rebaseKind = rebaseOperationKind({ fleet, agents, imageDelivery });
    const operations = await openOperations(nats.jetstream, log, boundary, [kind as never, stopKind as never, rebaseKind as never]);
    const requestIdUsed = async (requestId: string, kindName = kind.kind) => (await operations.manager.findByRequestId(kindName, requestId)) !== undefined;
    return {
      services: [
        adaptService(
          CloningServiceService,
          cloningHandlers({
            fleet,
            operations: operations.manager,
            kind,
            requestIdUsed,
            agents,
            stopKind,
            guestSecrets,
            versionPins,
            rebase: { kind: rebaseKind, fleet },
          }),
          CLONING_POLICY,
          boundary,
        ),
        operations.service,
      ],
      stop: async () => {
        await operations.manager.stop();
        agents.close();
        imageDelivery.close();
        inventory.close();
      },
    };
  },
});
