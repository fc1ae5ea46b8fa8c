#!/usr/bin/env -S node --import tsx
/**
 * `cowherd`, the operator's command line. Today: `cowherd fleet up`, which starts the local fleet on
 * the embedded default and keeps it running until Ctrl-C.
 */
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startLocalFleet } from './local-fleet.js';
import { overviewLines } from './overview.js';

const USAGE = `usage: cowherd <command>

commands:
  fleet up      start NATS, every service and a local agent on this machine; Ctrl-C stops them
                (state in $COWHERD_STATE_DIR, default <repo>/.state/fleet)

options:
  --help        show this help
`;

async function fleetUp(): Promise<number> {
  const stateDirectory = resolve(process.env['COWHERD_STATE_DIR'] ?? fileURLToPath(new URL('../../.state/fleet', import.meta.url)));
  const dynamicPorts = process.env['COWHERD_FLEET_DYNAMIC_PORTS'] === '1';
  const say = (line: string): void => void process.stdout.write(`${line}\n`);
  say(`cowherd local fleet: state in ${stateDirectory}`);
  const fleet = await startLocalFleet({ stateDirectory, dynamicPorts, say });
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

async function main(argv: readonly string[]): Promise<number> {
  const [command, subcommand] = argv;
  if (command === undefined || command === '--help' || command === 'help') {
    process.stdout.write(USAGE);
    return command === undefined ? 2 : 0;
  }
  if (command === 'fleet' && subcommand === 'up') return fleetUp();
  process.stderr.write(`cowherd: unknown command ${JSON.stringify(argv.join(' '))}\n\n${USAGE}`);
  return 2;
}

/** Exits once stdout and stderr are flushed: on pipes, process.exit would drop what is still queued. */
function exitAfterFlush(code: number): void {
  process.stdout.write('', () => process.stderr.write('', () => process.exit(code)));
}

main(process.argv.slice(2)).then(exitAfterFlush, (error: unknown) => {
  process.stderr.write(`cowherd: ${(error as Error).message}\n`);
  exitAfterFlush(1);
});
