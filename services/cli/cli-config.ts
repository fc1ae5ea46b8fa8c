/**
 * The CLI's environment: where the admin credential bundle and the services are. Flags override these.
 * Defaults come from the local fleet when there is one (its admin bundle, and its fleet.json, which holds
 * the ports it really uses, free ports included), then from the documented default ports on localhost.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { addressVariable, enumVariable, optionalStringVariable, readConfig, urlListVariable, type ConfigOf } from '../common/platform/config.js';
import { DEFAULT_PORTS } from '../common/platform/service-process.js';

const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));

/** The services the CLI talks to, with the flag and variable that set each address. */
export const SERVICE_ADDRESSES = {
  ca: { service: 'certificate-authority', flag: '--ca', variable: 'COWHERD_CA_ADDRESS' },
  inventory: { service: 'inventory', flag: '--inventory', variable: 'COWHERD_INVENTORY_ADDRESS' },
  distribution: { service: 'distribution', flag: '--distribution', variable: 'COWHERD_DISTRIBUTION_ADDRESS' },
  cloning: { service: 'cloning', flag: '--cloning', variable: 'COWHERD_CLONING_ADDRESS' },
} as const;

/** A service key of {@link SERVICE_ADDRESSES}. */
export type ServiceKey = keyof typeof SERVICE_ADDRESSES;

/** The variables the CLI reads (documented in the README's CLI section). */
export function cliVariables(fleet: LocalFleetDefaults) {
  const address = (key: ServiceKey, port: number) =>
    addressVariable(
      SERVICE_ADDRESSES[key].variable,
      `host:port of the ${SERVICE_ADDRESSES[key].service} mTLS port`,
      fleet.addresses[SERVICE_ADDRESSES[key].service] ?? `localhost:${port}`,
    );
  return {
    credentials: optionalStringVariable(
      'COWHERD_CREDENTIALS',
      "directory of the admin credential bundle: cert.pem, key.pem, ca.pem (default: the local fleet's)",
    ),
    caAddress: address('ca', DEFAULT_PORTS['certificate-authority'].grpc),
    inventoryAddress: address('inventory', DEFAULT_PORTS.inventory.grpc),
    distributionAddress: address('distribution', DEFAULT_PORTS.distribution.grpc),
    cloningAddress: address('cloning', DEFAULT_PORTS.cloning.grpc),
    natsUrls: urlListVariable('COWHERD_NATS_URL', 'NATS URLs for `cowherd events` (TLS with the admin credentials)', [fleet.natsUrl ?? 'tls://localhost:4222']),
    output: enumVariable<'table' | 'json'>('COWHERD_OUTPUT', 'default output format', 'table', ['table', 'json']),
    stateDirectory: optionalStringVariable('COWHERD_STATE_DIR', "the local fleet's state directory (default <repo>/.state/fleet)"),
    dynamicPorts: enumVariable<'0' | '1'>('COWHERD_FLEET_DYNAMIC_PORTS', '1: `cowherd fleet up` picks free ports', '0', ['0', '1']),
  };
}

/** The CLI's configuration. */
export type CliConfig = ConfigOf<ReturnType<typeof cliVariables>> & {
  /** The local fleet's state directory, whether or not a fleet ever ran there. */
  readonly fleetDirectory: string;
  /** The credential bundle directory: COWHERD_CREDENTIALS, or the local fleet's admin bundle. */
  readonly credentialsDirectory: string;
};

/** What a local fleet's state directory offers as defaults. */
export interface LocalFleetDefaults {
  readonly directory: string;
  /** Process name -> host:port, from fleet.json. */
  readonly addresses: Readonly<Record<string, string>>;
  readonly natsUrl: string | undefined;
}

/** Reads the CLI's variables from `env`; throws ConfigError naming every bad one. */
export function loadCliConfig(env: Readonly<Record<string, string | undefined>>): CliConfig {
  const fleet = localFleetDefaults(env['COWHERD_STATE_DIR']);
  const config = readConfig(cliVariables(fleet), env);
  return Object.freeze({
    ...config,
    fleetDirectory: fleet.directory,
    credentialsDirectory: resolve(config.credentials ?? join(fleet.directory, 'credentials', 'admin')),
  });
}

/**
 * The local fleet's directory and fleet.json. `npm start` keeps the fleet in `$COWHERD_STATE_DIR/fleet`
 * (default <repo>/.state/fleet) and runs `cowherd fleet up` with COWHERD_STATE_DIR pointing at that
 * subdirectory, so both spellings are accepted.
 */
export function localFleetDefaults(stateDirectory: string | undefined): LocalFleetDefaults {
  let directory = resolve(REPOSITORY, '.state', 'fleet');
  if (stateDirectory !== undefined && stateDirectory !== '') {
    const given = resolve(stateDirectory);
    directory = existsSync(join(given, 'fleet', 'credentials')) || existsSync(join(given, 'fleet', 'fleet.json')) ? join(given, 'fleet') : given;
  }
  const addresses: Record<string, string> = {};
  let natsUrl: string | undefined;
  try {
    const fleet = JSON.parse(readFileSync(join(directory, 'fleet.json'), 'utf8')) as { endpoints?: Array<{ name?: unknown; address?: unknown }> };
    for (const endpoint of fleet.endpoints ?? []) {
      if (typeof endpoint.name !== 'string' || typeof endpoint.address !== 'string') continue;
      if (endpoint.name === 'nats') natsUrl = endpoint.address;
      else addresses[endpoint.name] = endpoint.address;
    }
  } catch {
    // No local fleet here (or an unreadable fleet.json): the documented defaults apply.
  }
  return { directory, addresses, natsUrl };
}
