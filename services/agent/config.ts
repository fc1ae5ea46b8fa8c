/** The agent's own variables (besides the common server ones, whose TLS files it fills in after enrolling). */
import { resolve } from 'node:path';
import {
  addressVariable,
  enumVariable,
  integerVariable,
  optionalStringVariable,
  pathVariable,
  readConfig,
  stringVariable,
  type ConfigOf,
  type Variable,
} from '../common/platform/config.js';
import { DEFAULT_PORTS } from '../common/platform/service-process.js';
import { defaultHostId, HOST_ID, isReservedHostId } from '../common/domain/resource-names.js';
import { eventOutboxDirectory, importDirectory } from './image-directory/index.js';

/** An optional host:port whose default depends on other variables (filled in by loadAgentConfig). */
function optionalAddressVariable(name: string, description: string, defaultText: string): Variable<string | undefined> {
  const address = addressVariable(name, description);
  return { name, description, defaultText, parse: (raw) => (raw === undefined ? undefined : address.parse(raw)) };
}

export const AGENT_VARIABLES = {
  host: {
    ...stringVariable('COWHERD_HOST_ID', 'this host id (hosts/{host}); must match the join token', defaultHostId()),
    parse: (raw: string | undefined) => {
      const value = raw ?? defaultHostId();
      if (!HOST_ID.test(value)) throw new Error(`must be an RFC 1123 label, got ${JSON.stringify(value)}`);
      if (isReservedHostId(value)) throw new Error(`${JSON.stringify(value)} is reserved for a cowherd service or NATS; choose another host id`);
      return value;
    },
  },
  credentialsDirectory: pathVariable(
    'COWHERD_CREDENTIALS_DIR',
    'where the host key (0600), certificate and CA certificate are kept',
    '/var/lib/cowherd/credentials',
  ),
  joinToken: optionalStringVariable('COWHERD_JOIN_TOKEN', 'single-use join token from an admin; needed only for the first start'),
  enrollAddress: addressVariable('COWHERD_ENROLL_ADDRESS', 'host:port of the certificate authority enrollment port', 'localhost:7441'),
  libvirtUri: {
    ...stringVariable('COWHERD_LIBVIRT_URI', 'libvirt connection URI the agent drives (virsh -c)', 'qemu:///system'),
    parse: (raw: string | undefined) => {
      const value = raw ?? 'qemu:///system';
      if (!/^[a-z][a-z0-9+.-]*:\/\/\S*$/i.test(value)) throw new Error(`must be a libvirt URI such as qemu:///system, got ${JSON.stringify(value)}`);
      return value;
    },
  },
  imageDirectory: pathVariable(
    'COWHERD_IMAGE_DIR',
    'directory for image replicas (images/) and clone overlays (clones/); created if missing',
    '/var/lib/cowherd/images',
  ),
  inventoryAddress: addressVariable('COWHERD_INVENTORY_ADDRESS', 'host:port of the inventory mTLS port', `localhost:${DEFAULT_PORTS.inventory.grpc}`),
  domainScope: enumVariable(
    'COWHERD_DOMAIN_SCOPE',
    "which libvirt domains are this host's: all, or image-directory (only domains with a disk in COWHERD_IMAGE_DIR, for agents sharing one libvirtd)",
    'all',
    ['all', 'image-directory'] as const,
  ),
  torrentPort: integerVariable('COWHERD_TORRENT_PORT', 'BitTorrent peer port (TCP) for image transfers; 0: any free port', 7446, 0, 65535),
  scrubMibPerSecond: integerVariable(
    'COWHERD_SCRUB_MIB_PER_SECOND',
    'rate (MiB/s) at which the background scrub re-reads verified replicas to find damage; 0: no scrub',
    32,
    0,
    100_000,
  ),
  scrubIntervalSeconds: integerVariable('COWHERD_SCRUB_INTERVAL_SECONDS', 'pause between two scrub passes over every replica', 3600, 1, 30 * 86_400),
  streamIdleExitMs: integerVariable(
    'COWHERD_STREAM_IDLE_EXIT_MS',
    'the streaming server (streaming clones) exits after this long with no guest and no agent connected',
    10_000,
    100,
    86_400_000,
  ),
  streamMaxStallMs: integerVariable(
    'COWHERD_STREAM_MAX_STALL_MS',
    "a streaming clone's disk read that waits longer than this for its bytes fails (EIO), as a disk that stopped answering",
    900_000,
    1000,
    86_400_000,
  ),
  streamProfileWindowMs: integerVariable(
    'COWHERD_STREAM_PROFILE_WINDOW_MS',
    "how long after a streamed replica's first read the reads are recorded as the image version's read profile",
    60_000,
    1000,
    3_600_000,
  ),
  webSeedAddress: addressVariable(
    'COWHERD_WEB_SEED_ADDRESS',
    'host:port of the HTTP web seed (BEP 19) that serves origin replicas to the swarm; port 0: any free port',
    '0.0.0.0:7447',
  ),
  eventOutboxDirectory: {
    ...optionalStringVariable(
      'COWHERD_EVENT_OUTBOX_DIR',
      'directory where events wait (one fsynced file each) until JetStream acknowledges them; on the same file system as the images, so an event is kept with the change it reports',
    ),
    defaultText: '<COWHERD_IMAGE_DIR>/event-outbox',
    parse: (raw: string | undefined) => (raw === undefined || raw === '' ? undefined : resolve(raw)),
  },
  importDirectory: {
    ...optionalStringVariable(
      'COWHERD_IMPORT_DIR',
      'the only directory ImportImage reads local disk files from (paths in requests are relative to it); keep it root-owned and not world-writable',
    ),
    defaultText: '<COWHERD_IMAGE_DIR>/import',
    parse: (raw: string | undefined) => (raw === undefined || raw === '' ? undefined : resolve(raw)),
  },
  importMaxGib: integerVariable('COWHERD_IMPORT_MAX_GIB', 'the largest download ImportImage takes (and the default of url.max_bytes), in GiB', 64, 1, 65_536),
  importStallSeconds: integerVariable('COWHERD_IMPORT_STALL_SECONDS', 'an ImportImage download that receives nothing for this long fails', 60, 1, 86_400),
  importTimeoutSeconds: integerVariable('COWHERD_IMPORT_TIMEOUT_SECONDS', 'an ImportImage download that takes longer than this fails', 21_600, 1, 7 * 86_400),
  advertiseAddress: optionalAddressVariable(
    'COWHERD_ADVERTISE_ADDRESS',
    "host:port at which services reach this agent's gRPC port",
    `<host id>:<port of COWHERD_LISTEN_ADDRESS, ${DEFAULT_PORTS.agent.grpc}>`,
  ),
};

/** The agent's configuration. */
export type AgentConfig = Omit<ConfigOf<typeof AGENT_VARIABLES>, 'advertiseAddress' | 'eventOutboxDirectory' | 'importDirectory'> & {
  readonly advertiseAddress: string;
  readonly eventOutboxDirectory: string;
  readonly importDirectory: string;
};

/** Reads the agent's variables; throws ConfigError listing every bad one. */
export function loadAgentConfig(env: Readonly<Record<string, string | undefined>>): AgentConfig {
  const config = readConfig(AGENT_VARIABLES, env);
  // The default port follows the listen address, so that one variable moves both (port 0 cannot be advertised).
  const listenPort = /:(\d{1,5})$/.exec(env['COWHERD_LISTEN_ADDRESS'] ?? '')?.[1];
  const port = listenPort !== undefined && listenPort !== '0' ? listenPort : String(DEFAULT_PORTS.agent.grpc);
  return Object.freeze({
    ...config,
    advertiseAddress: config.advertiseAddress ?? `${config.host}:${port}`,
    eventOutboxDirectory: config.eventOutboxDirectory ?? eventOutboxDirectory(config.imageDirectory),
    importDirectory: config.importDirectory ?? importDirectory(config.imageDirectory),
  });
}
