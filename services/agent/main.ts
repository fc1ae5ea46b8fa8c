/** The host agent process: wiring only. Enrolls with a join token on the first start, then serves. */
import { mkdir } from 'node:fs/promises';
import { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { createClient } from '../common/platform/client.js';
import { ConfigError } from '../common/platform/config.js';
import { createLogger } from '../common/platform/logger.js';
import { adaptService } from '../common/platform/rpc.js';
import { runServiceMain } from '../common/platform/service-process.js';
import { identityUri } from '../common/platform/identity.js';
import { AGENT_POLICY } from './access-policy.js';
import { loadAgentConfig, type AgentConfig } from './config.js';
import { CloneEngine } from './clone-engine.js';
import { CloneRebaser } from './clone-rebase.js';
import { agentHandlers } from './handlers.js';
import { StreamedClones } from './streamed-clones.js';
import { VmLifecycle } from './vm-lifecycle.js';
import { Hypervisor } from '../gen/cowherd/common/v1/types.js';
import { createQemuImgDiskInspector, imageDependents, reflinkSupported, scopedLibvirt, VirshLibvirt } from './hypervisor/index.js';
import { createHostFactsSource, createReporter, detectHypervisor, ensureEnrolled, inventoryPort, readSystemFacts } from './host/index.js';
import { defineWorkDirectory, prepareImageDirectory } from './image-directory/index.js';
import { deleteLocalReplica, ImageTransfers } from './swarm/index.js';

/** `host:port` (IPv6 in brackets) split. */
function splitAddress(address: string): { host: string; port: number } {
  const match = /^\[?(.*?)\]?:(\d+)$/.exec(address)!;
  return { host: match[1]!, port: Number(match[2]) };
}

let agent: AgentConfig;
try {
  agent = loadAgentConfig(process.env);
} catch (error) {
  process.stderr.write(`cowherd agent: ${(error as Error).message}\n`);
  process.exit(error instanceof ConfigError ? 2 : 1);
}
const env: Record<string, string | undefined> = { ...process.env };
if (env['COWHERD_TLS_CERT'] === undefined) {
  try {
    const files = await ensureEnrolled({ ...agent, dnsNames: [agent.host, 'localhost'], log: createLogger({ service: 'agent', level: 'info' }) });
    Object.assign(env, { COWHERD_TLS_CERT: files.certificateFile, COWHERD_TLS_KEY: files.privateKeyFile, COWHERD_TLS_CA: files.caFile });
  } catch (error) {
    process.stderr.write(`cowherd agent: cannot join the fleet: ${(error as Error).message}\n`);
    process.exit(1);
  }
}
// The join token is single-use and spent: keep it out of everything that follows.
delete env['COWHERD_JOIN_TOKEN'];

await runServiceMain({
  name: 'agent',
  variables: {},
  env,
  // The agent's events wait on its own disk: NATS is what may be unreachable when a clone is made.
  eventOutboxDirectory: agent.eventOutboxDirectory,
  build: async ({ boundary, log, clientCredentials, events }) => {
    await prepareImageDirectory(agent.imageDirectory);
    // Where admins put disk files for ImportImage: not readable by others, like the image directory's contents.
    await mkdir(agent.importDirectory, { recursive: true, mode: 0o750 });
    const virsh = new VirshLibvirt({
      uri: agent.libvirtUri,
      log: log.child({ component: 'libvirt' }),
      workDirectory: defineWorkDirectory(agent.imageDirectory),
    });
    const libvirt = agent.domainScope === 'image-directory' ? scopedLibvirt(virsh, agent.imageDirectory) : virsh;
    const inventory = createClient(InventoryServiceClient, agent.inventoryAddress, clientCredentials(identityUri('service', 'inventory')));
    const hypervisor = await libvirt.hypervisorFacts().then(
      (facts) => (detectHypervisor(facts, readSystemFacts()).hypervisor === Hypervisor.HYPERVISOR_XEN ? 'xen' : 'kvm'),
      () => 'kvm' as const,
    );
    // The swarm asks which domains use a replica; the hypervisor answers (the rooms do not import each other).
    const dependents = imageDependents(libvirt);
    const transfers = await ImageTransfers.start({
      host: agent.host,
      imageDirectory: agent.imageDirectory,
      hypervisor,
      events,
      log: log.child({ component: 'transfers' }),
      torrentPort: agent.torrentPort,
      webSeedAddress: splitAddress(agent.webSeedAddress),
      advertiseHost: splitAddress(agent.advertiseAddress).host,
      dependents,
      scrubBytesPerSecond: agent.scrubMibPerSecond * 1024 * 1024,
      scrubIntervalMs: agent.scrubIntervalSeconds * 1000,
    });
    const reporter = createReporter({
      host: agent.host,
      inventory: inventoryPort(inventory),
      libvirt,
      disks: createQemuImgDiskInspector({ log: log.child({ component: 'disks' }) }),
      facts: createHostFactsSource({ libvirt, imageDirectory: agent.imageDirectory, advertiseAddress: agent.advertiseAddress, reflinkSupported }),
      log,
      // The inventory's limits (UpdateHost) are the durable ones: every heartbeat applies them.
      onTransferLimits: (limits) => {
        transfers.setLimits({
          uploadBytesPerSecond: Number(limits?.uploadBytesPerSecond ?? 0),
          downloadBytesPerSecond: Number(limits?.downloadBytesPerSecond ?? 0),
        });
      },
    });
    await reporter.start();
    const streamed = new StreamedClones({
      imageDirectory: agent.imageDirectory,
      hypervisor,
      transfers,
      libvirt,
      log: log.child({ component: 'streaming' }),
      events,
      host: agent.host,
      // The streaming server gets no secret of the agent's: only its own settings (services/agent/README.md).
      serverEnvironment: {
        COWHERD_STREAM_IDLE_EXIT_MS: String(agent.streamIdleExitMs),
        COWHERD_STREAM_MAX_STALL_MS: String(agent.streamMaxStallMs),
        COWHERD_STREAM_PROFILE_WINDOW_MS: String(agent.streamProfileWindowMs),
      },
    });
    await streamed.start();
    const clones = new CloneEngine({
      host: agent.host,
      imageDirectory: agent.imageDirectory,
      hypervisor,
      libvirt,
      events,
      log: log.child({ component: 'clones' }),
      replicaBase: (id) => transfers.cloneBase(id),
      onReplicaUsed: (key) => transfers.markUsed(key),
      streamed,
    });
    const rebaser = new CloneRebaser({
      host: agent.host,
      imageDirectory: agent.imageDirectory,
      hypervisor,
      libvirt,
      events,
      log: log.child({ component: 'rebase' }),
      replicaBase: (key) => transfers.rebaseBase(key),
      onReplicaUsed: (key) => transfers.markUsed(key),
    });
    const vms = new VmLifecycle({
      host: agent.host,
      imageDirectory: agent.imageDirectory,
      libvirt,
      log: log.child({ component: 'vms' }),
      beforeStart: (domain) => streamed.beforeStart(domain),
    });
    const replicas = {
      delete: (name: string) =>
        deleteLocalReplica(
          { host: agent.host, imageDirectory: agent.imageDirectory, dependents, log, release: (id, removeFiles) => transfers.release(id, removeFiles) },
          name,
        ),
    };
    return {
      services: [
        adaptService(
          AgentServiceService,
          agentHandlers({
            clones,
            rebaser,
            vms,
            replicas,
            transfers,
            exporter: { libvirt, imageDirectory: agent.imageDirectory, host: agent.host, log: log.child({ component: 'export' }) },
            importer: {
              libvirt,
              imageDirectory: agent.imageDirectory,
              importDirectory: agent.importDirectory,
              host: agent.host,
              hypervisor,
              download: {
                maxBytes: agent.importMaxGib * 1024 ** 3,
                stallMs: agent.importStallSeconds * 1000,
                timeoutMs: agent.importTimeoutSeconds * 1000,
              },
              log: log.child({ component: 'import' }),
            },
          }),
          AGENT_POLICY,
          boundary,
        ),
      ],
      stop: async () => {
        await reporter.stop();
        streamed.stop();
        await transfers.stop();
        inventory.close();
      },
    };
  },
});
