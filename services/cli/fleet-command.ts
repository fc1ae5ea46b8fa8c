/** `cowherd fleet up`: the local fleet on the embedded default, kept running until Ctrl-C (what `npm start` runs). */
import { resolve } from 'node:path';
import type { CommandSpec } from './command-line.js';
import type { CliConfig } from './cli-config.js';
import type { CliContext } from './cli-context.js';
import { startLocalFleet } from './local-fleet.js';
import { overviewLines } from './overview.js';

export const FLEET_COMMAND: CommandSpec<CliContext> = {
  name: 'fleet',
  summary: 'run a whole fleet on this machine',
  subcommands: [
    {
      name: 'up',
      summary: 'start NATS, every service and a local agent on this machine; Ctrl-C stops them',
      details: 'State (CA, credentials, NATS data, logs, fleet.json) is kept in $COWHERD_STATE_DIR (default <repo>/.state/fleet);\na second start reuses it. COWHERD_FLEET_DYNAMIC_PORTS=1 picks free ports instead of the defaults.',
      run: async (_invocation, context) => fleetUp(context.config),
    },
  ],
};

async function fleetUp(config: CliConfig): Promise<number> {
  const stateDirectory = resolve(config.stateDirectory ?? config.fleetDirectory);
  const say = (line: string): void => void process.stdout.write(`${line}\n`);
  say(`cowherd local fleet: state in ${stateDirectory}`);
  const fleet = await startLocalFleet({ stateDirectory, dynamicPorts: config.dynamicPorts === '1', say });
  say('');
  say('health            mTLS port      probe port');
  for (const report of fleet.health) say(`${report.name.padEnd(17)} ${report.mtls.padEnd(14)} ${report.probe}`);
  const healthy = fleet.health.every((report) => report.mtls === 'SERVING' && report.probe === 'SERVING');
  if (!healthy) {
    say('some processes are not healthy: see the logs in ' + resolve(stateDirectory, 'logs'));
    await fleet.stop();
    return 1;
  }
  say('');
  say('overview (inventory):');
  const inventory = fleet.endpoints.find((endpoint) => endpoint.name === 'inventory')!;
  for (const line of await overviewLines(inventory.address, fleet.adminCredentials, { waitForHostsMs: 15_000 }).catch((error: Error) => [`(inventory did not answer: ${error.message})`])) say(`  ${line}`);
  say('');
  say(`admin credentials: ${fleet.adminCredentials.certificateFile} (key ${fleet.adminCredentials.privateKeyFile}, CA ${fleet.adminCredentials.caFile})`);
  say(`endpoints and pids: ${resolve(stateDirectory, 'fleet.json')}; logs: ${resolve(stateDirectory, 'logs')}`);
  say('explore it with the CLI in another terminal: npm run cowherd -- overview (or hosts list, images list, vms list, events --follow)');
  say('fleet is up; press Ctrl-C to stop it');
  await new Promise<void>((done) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      say('stopping the fleet...');
      done();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  await fleet.stop();
  say('fleet stopped');
  return 0;
}
