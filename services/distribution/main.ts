/** The distribution process: wiring only. */
import { DistributionServiceService } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { Image, ImageHead, ImageReplica } from '../gen/cowherd/inventory/v1/resources.js';
import { IMAGE_HEADS_BUCKET } from '../common/domain/image-versions.js';
import { AgentClients } from '../common/domain/agent-clients.js';
import { createClient } from '../common/platform/client.js';
import { hostname } from 'node:os';
import { KvStore, protoCodec } from '../common/platform/kv.js';
import { openOperations } from '../common/domain/operations.js';
import { adaptService } from '../common/platform/rpc.js';
import { runServiceMain } from '../common/platform/service-process.js';
import { identityUri } from '../common/platform/identity.js';
import { DISTRIBUTION_POLICY } from './access-policy.js';
import { DISTRIBUTION_VARIABLES, distributeDeadlines } from './config.js';
import { deleteImageOperationKind } from './deletion.js';
import { distributionHandlers } from './handlers.js';
import { inventoryReader } from './inventory-reader.js';
import { publishOperationKind } from './publish.js';
import { importOperationKind } from './import.js';
import { natsTrackerRelay, startTracker } from './tracker.js';
import { distributeOperationKind, followReplicaEvents } from './distribute.js';
import { startGarbageTimer } from './garbage.js';

/** The tracker's host for the default announce URL: the listen host, or this machine's name for a wildcard. */
function announceHost(address: string): string {
  const host = address.slice(0, address.lastIndexOf(':')).replace(/^\[(.*)\]$/, '$1');
  return host === '0.0.0.0' || host === '::' ? hostname() : host;
}

await runServiceMain({
  name: 'distribution',
  variables: DISTRIBUTION_VARIABLES,
  env: process.env,
  build: async ({ config, boundary, nats, log, clientCredentials, events }) => {
    const inventoryClient = createClient(InventoryServiceClient, config.inventoryAddress, clientCredentials(identityUri('service', 'inventory')), {
      defaultDeadlineMs: 15_000,
    });
    const agents = new AgentClients(clientCredentials);
    const tracker = await startTracker({
      address: config.trackerAddress,
      images: await KvStore.open(nats.jetstream, 'images', protoCodec(Image)),
      log: log.child({ component: 'tracker' }),
      relay: natsTrackerRelay(nats.connection),
    });
    const trackerAnnounceUrl = config.trackerAnnounceUrl ?? tracker.announceUrl(announceHost(config.trackerAddress));
    const deps = {
      trackerAnnounceUrl,
      exportStallMs: config.stallSeconds * 1000,
      images: await KvStore.open(nats.jetstream, 'images', protoCodec(Image)),
      heads: await KvStore.open(nats.jetstream, IMAGE_HEADS_BUCKET, protoCodec(ImageHead)),
      replicas: await KvStore.open(nats.jetstream, 'replicas', protoCodec(ImageReplica)),
      inventory: inventoryReader(inventoryClient),
      agents,
      events,
      deadlines: distributeDeadlines(config),
      hostCheckIntervalMs: config.hostCheckSeconds * 1000,
      defaultKeepVersions: config.keepImageVersions,
    };
    const publish = publishOperationKind(deps);
    const importImage = importOperationKind(deps);
    const deleteImage = deleteImageOperationKind(deps);
    const distribute = distributeOperationKind(deps);
    const operations = await openOperations(nats.jetstream, log, boundary, [publish as never, importImage as never, deleteImage as never, distribute as never]);
    const replicaEvents = await followReplicaEvents(nats.jetstream, nats.manager, deps, log.child({ component: 'replica-events' }));
    const garbage = startGarbageTimer(deps, config.garbageIntervalSeconds * 1000, log.child({ component: 'garbage' }));
    log.info({ trackerAnnounceUrl }, 'agents announce to this tracker URL');
    return {
      services: [
        adaptService(
          DistributionServiceService,
          distributionHandlers({ deps, operations: operations.manager, publish, importImage, deleteImage, distribute }),
          DISTRIBUTION_POLICY,
          boundary,
        ),
        operations.service,
      ],
      stop: async () => {
        garbage.stop();
        await tracker.stop();
        await replicaEvents.stop();
        await operations.manager.stop();
        agents.close();
        inventoryClient.close();
      },
    };
  },
});
