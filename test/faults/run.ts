/**
 * `npm run test:faults`: cowherd's fault suite. Starts a fleet on real parts (fleet.ts: a three-node NATS
 * JetStream cluster, the four services, five agents in network namespaces on the real libvirtd), then for each
 * fault runs real work, injects the fault while it runs and checks the invariants (row.ts). Prints one JSON
 * line per fault on stdout, then `faults: N passed, N failed`, and exits 1 when any row did not survive.
 * Progress and the reasons behind a failed row go to stderr; every process's log lines to
 * `.state/faults/logs/` (replaced on each run).
 *
 * After those rows, rebase-faults.ts's rows hit a RebaseVirtualMachines of ten clones onto a second image version
 * (agent and cloning service SIGKILLed mid-move).
 *
 * `COWHERD_FAULTS=nats-node-restart,cloning-kill npm run test:faults` runs only those rows (names below; the
 * damage rows need an image on every receiver and run a fault-free baseline row first when no earlier row
 * left one). `COWHERD_FAULTS=controls` runs the negative controls (controls.ts): rows in which the suite breaks an
 * invariant itself and which must therefore NOT survive (`controls: N caught, N missed`). Root only (libvirtd,
 * network namespaces, tmpfs).
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { runCommand } from '../../services/common/platform/child-process.js';
import { call } from '../../services/common/platform/client.js';
import { HOST_NAME } from '../../services/common/domain/resource-names.js';
import { Host_State, type Host } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Resources } from '../harness/index.js';
import { REPOSITORY } from '../harness/processes.js';
import { HOSTS, ORIGIN, RECEIVERS, startFaultFleet, type FaultFleet } from './fleet.js';
import { NATS_FAULTS } from './nats-faults.js';
import { NETWORK_FAULTS } from './network-faults.js';
import { PROCESS_FAULTS } from './process-faults.js';
import { runRow, RECOVERY_BOUND_SECONDS, sleep, type FaultRow, type RowResult, type SuiteState } from './row.js';
import { STORAGE_FAULTS } from './storage-faults.js';
import { CONTROLS } from './controls.js';
import { REBASE_FAULTS, runRebaseRow } from './rebase-faults.js';

/** Every row, in the order they run. */
export const ALL_FAULTS: readonly FaultRow[] = [...NATS_FAULTS, ...PROCESS_FAULTS, ...STORAGE_FAULTS, ...NETWORK_FAULTS];

/** CI's limit for the whole of .ci/run, and the part of it this suite may take and still leave room. */
const CI_LIMIT_MINUTES = 90;
const CI_ROOM_MINUTES = 30;

/** A row without a fault: the work alone, so the damage rows have an image on every receiver with dependents. */
const BASELINE: FaultRow = {
  fault: 'baseline (no fault)',
  mustSucceed: true,
  distributeTo: RECEIVERS,
  cloneHosts: [ORIGIN, 'recv1'],
  inject: async () => Date.now(),
};

async function main(): Promise<number> {
  const started = Date.now();
  if (process.getuid?.() !== 0) {
    process.stderr.write('faults: the fault suite needs root (libvirtd, network namespaces, tmpfs)\n');
    return 2;
  }
  const wanted = (process.env['COWHERD_FAULTS'] ?? '')
    .split(',')
    .map((name) => name.trim())
    .filter(Boolean);
  const known = [...ALL_FAULTS, ...CONTROLS];
  const unknown = wanted.filter((name) => name !== 'controls' && !known.some((row) => row.fault === name) && !REBASE_FAULTS.some((row) => row.fault === name));
  if (unknown.length > 0) {
    process.stderr.write(
      `faults: COWHERD_FAULTS names unknown faults ${unknown.join(', ')}; known: ${[...known, ...REBASE_FAULTS].map((row) => row.fault).join(', ')}, controls\n`,
    );
    return 2;
  }
  const rows = wanted.length === 0 ? ALL_FAULTS : known.filter((row) => wanted.includes(row.fault) || (row.control && wanted.includes('controls')));
  const rebaseRows = wanted.length === 0 ? REBASE_FAULTS : REBASE_FAULTS.filter((row) => wanted.includes(row.fault));
  const logDirectory = join(REPOSITORY, '.state', 'faults', 'logs');
  await rm(logDirectory, { recursive: true, force: true });

  const resources = new Resources();
  let releasing = false;
  const release = async (): Promise<void> => {
    if (releasing) return;
    releasing = true;
    await resources.release().catch((error: unknown) => process.stderr.write(`faults: clean-up: ${(error as Error).message}\n`));
  };
  // `on`, not `once`: execa's exit handler re-raises a signal that no other listener handles any more, which
  // killed the suite in the middle of its clean-up. A second signal while cleaning up is ignored.
  const onSignal = (signal: NodeJS.Signals): void => {
    if (releasing) return;
    process.stderr.write(`faults: ${signal}: cleaning up\n`);
    void release().then(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const results: RowResult[] = [];
  const controls: RowResult[] = [];
  try {
    const fleet = await startFaultFleet(resources, logDirectory);
    fleet.say(
      `fleet up in ${((Date.now() - started) / 1000).toFixed(0)} s; ${rows.length + rebaseRows.length} faults; bound ${RECOVERY_BOUND_SECONDS} s after each fault ends; logs in ${logDirectory}`,
    );
    const state: SuiteState = { bases: new Map(), lastImage: undefined, rowIndex: 0 };
    for (const row of rows) {
      await fleetWhole(fleet);
      if (row.reuseImage && !row.reuseImage(state)) {
        const baseline = await runRow(fleet, state, BASELINE);
        fleet.say(`baseline: ${JSON.stringify(baseline)}`);
        if (!row.reuseImage(state)) fleet.say(`${row.fault}: no image on every receiver after the baseline; the row runs on a fresh image`);
      }
      const rowStarted = Date.now();
      const result = await runRow(fleet, state, row);
      process.stdout.write(`${JSON.stringify(result)}\n`);
      if (row.control) {
        controls.push(result);
        fleet.say(`${row.fault}: ${result.survived ? 'the suite did NOT catch the broken invariant' : 'caught, as it must be'}`);
      } else {
        results.push(result);
      }
      fleet.say(`${row.fault} took ${((Date.now() - rowStarted) / 1000).toFixed(0)} s`);
    }
    // Rows whose work is a rebase (recompose) of clones onto a second version of their image.
    for (const row of rebaseRows) {
      await fleetWhole(fleet);
      const rowStarted = Date.now();
      const result = await runRebaseRow(fleet, state, row);
      process.stdout.write(`${JSON.stringify(result)}\n`);
      results.push(result);
      fleet.say(`${row.fault} took ${((Date.now() - rowStarted) / 1000).toFixed(0)} s`);
    }
  } catch (error) {
    process.stderr.write(`faults: the suite itself failed: ${(error as Error).stack ?? String(error)}\n`);
    await release();
    return 2;
  }
  await release();
  const passed = results.filter((result) => result.survived).length;
  const minutes = (Date.now() - started) / 60_000;
  const fits = minutes <= CI_LIMIT_MINUTES - CI_ROOM_MINUTES;
  process.stdout.write(`faults: ${passed} passed, ${results.length - passed} failed\n`);
  const caught = controls.filter((result) => !result.survived).length;
  if (controls.length > 0) process.stdout.write(`controls: ${caught} caught, ${controls.length - caught} missed\n`);
  process.stderr.write(
    `faults: took ${minutes.toFixed(1)} min; ${fits ? `fits CI's ${CI_LIMIT_MINUTES} minutes with room to spare` : `does NOT fit CI's ${CI_LIMIT_MINUTES} minutes with ${CI_ROOM_MINUTES} to spare`}\n`,
  );
  return passed === results.length && caught === controls.length ? 0 : 1;
}

/** Between rows: every process of the fleet runs and every host is READY again (a row's fault must not leak into the next). */
async function fleetWhole(fleet: FaultFleet): Promise<void> {
  for (const node of fleet.nats.nodes) if (!node.daemon) await node.start();
  for (const service of [fleet.distribution, fleet.cloning]) if (!service.process) await service.start();
  for (const agent of fleet.agents.values()) if (!agent.daemon) await agent.start();
  await runCommand('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'status']).catch(() => fleet.say('libvirtd is not running'));
  // A host the last fault left UNREACHABLE (its heartbeats failed while NATS was down) turns READY with its next
  // heartbeat; the next row's clones would otherwise be refused for it.
  const deadline = Date.now() + 120_000;
  for (const host of HOSTS) {
    for (;;) {
      const state = await call<Host>((cb) => fleet.clients.inventory.getHost({ name: HOST_NAME.format({ host }) }, cb)).then(
        (answer) => answer.state,
        () => undefined,
      );
      if (state === Host_State.STATE_READY) break;
      if (Date.now() > deadline) {
        fleet.say(`${host} is not READY between rows (${state === undefined ? 'no answer' : Host_State[state]})`);
        break;
      }
      await sleep(500);
    }
  }
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    process.stderr.write(`faults: ${(error as Error).stack ?? String(error)}\n`);
    process.exit(2);
  },
);
