/**
 * The README's start command, run as a user runs it: `bash scripts/start.sh --no-story` brings up NATS and
 * every process (two agents, one per local host); each answers health SERVING on both ports; Ctrl-C, as a
 * terminal sends it (SIGINT to the whole foreground process group at once), stops them all in order (every
 * service drains before NATS goes), exits 0 and leaves no process and no temp file behind; a second start
 * reuses the CA and the NATS data instead of setting up again. The story that start.sh tells by default is story.test.ts's.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { credentials as grpcCredentials } from '@grpc/grpc-js';
import { check } from '../../services/launcher/health-check.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { Resources } from '../harness/index.js';
import { REPOSITORY } from '../harness/processes.js';
import { StartCommand, type LeftoverProcess, processAlive } from '../harness/start-command.js';

const run = promisify(execFile);

interface FleetFile {
  endpoints: Array<{ name: string; address: string; healthAddress?: string; pid: number; host?: string }>;
  hosts: Array<{ host: string; label: string; imageDirectory: string }>;
  admin: { certificateFile: string; privateKeyFile: string; caFile: string };
}

/** What one run of start.sh printed and left behind after a terminal's Ctrl-C. */
interface FleetRun {
  readonly output: string;
  readonly code: number | null;
  readonly pids: number[];
  readonly leftovers: LeftoverProcess[];
  readonly temporaryLeftovers: string[];
}

/**
 * Runs start.sh until "fleet is up", checks it, presses Ctrl-C (SIGINT to the whole process group, as a
 * terminal does), and returns what it printed and what was still there right after it exited.
 */
async function runFleetOnce(resources: Resources, stateDirectory: string, whileUp: (fleet: FleetFile) => Promise<void>): Promise<FleetRun> {
  const command = new StartCommand(stateDirectory, await resources.tempDir('cowherd-fleet-tmp-'), ['--no-story']);
  resources.defer(() => command.kill());
  let fleet: FleetFile;
  let code: number | null;
  try {
    await command.waitFor('fleet is up', 240_000);
    fleet = JSON.parse(await readFile(join(stateDirectory, 'fleet', 'fleet.json'), 'utf8')) as FleetFile;
    await whileUp(fleet);
  } finally {
    code = await command.interrupt();
  }
  return {
    output: command.output,
    code,
    pids: fleet.endpoints.map((endpoint) => endpoint.pid),
    leftovers: await command.leftovers(),
    temporaryLeftovers: await command.temporaryLeftovers(),
  };
}

/** A terminal's Ctrl-C stopped the fleet cleanly: exit 0, the ordered stop logged, every process gone, no temp file left. */
function assertCleanStop(run: FleetRun): void {
  assert.equal(run.code, 0, run.output);
  assert.match(run.output, /stopping the fleet\.\.\.\nfleet stopped\n$/, 'the fleet stopped in order and said so last');
  for (const pid of run.pids) assert.equal(processAlive(pid), false, `pid ${pid} is gone`);
  assert.deepEqual(run.leftovers, [], 'no process of the run is left');
  assert.deepEqual(run.temporaryLeftovers, [], 'nothing is left in the temp directory');
}

const SERVICE_LOGS = ['certificate-authority', 'inventory', 'distribution', 'cloning', 'agent', 'agent-2'];

/**
 * The ordered stop in the logs after `runs` runs: each service drained and logged "stopped" once per run,
 * never cut short by a second signal, and always before NATS began to shut down (it stops last).
 */
async function assertOrderedStops(logDirectory: string, runs: number): Promise<void> {
  const natsShutdowns = (await readFile(join(logDirectory, 'nats.log'), 'utf8'))
    .split('\n')
    .filter((line) => line.includes('[INF] Initiating Shutdown'))
    .map((line) => natsLogTime(line));
  assert.equal(natsShutdowns.length, runs, 'NATS shut down once per run');
  for (const service of SERVICE_LOGS) {
    const lines = (await readFile(join(logDirectory, `${service}.log`), 'utf8'))
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as { msg?: string; time?: string });
    assert.deepEqual(
      lines.filter((line) => line.msg === 'second signal: exiting now' || line.msg === 'unclean stop'),
      [],
      `${service} stopped without a second signal`,
    );
    const stops = lines.filter((line) => line.msg === 'stopped').map((line) => Date.parse(line.time!));
    assert.equal(stops.length, runs, `${service} logged "stopped" once per run`);
    stops.forEach((time, run) =>
      assert.ok(
        time <= natsShutdowns[run]!,
        `${service} stopped (${new Date(time).toISOString()}) before NATS shut down (${new Date(natsShutdowns[run]!).toISOString()}) in run ${run + 1}`,
      ),
    );
  }
}

/** The time of a nats-server log line, `[pid] 2025/01/02 03:04:05.678901 [INF] ...` in local time. */
function natsLogTime(line: string): number {
  const match = /^\[\d+\] (\d{4})\/(\d\d)\/(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{3})/.exec(line);
  assert.ok(match, `a nats-server log line with a time: ${line}`);
  const [year, month, day, hour, minute, second, millisecond] = match.slice(1).map(Number) as [number, number, number, number, number, number, number];
  return new Date(year, month - 1, day, hour, minute, second, millisecond).getTime();
}

describe('the local fleet (README start command)', () => {
  const resources = new Resources();
  // start.sh leaves its private libvirtd running by design (README): started here with the repository's state
  // directory, it is not a leftover of the runs below, whose state directories are thrown away.
  before(() => run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 }));
  after(() => resources.release());

  it('starts NATS and every process healthy on both ports, and stops them all on Ctrl-C', async () => {
    const state = await resources.tempDir('cowherd-fleet-');
    const first = await runFleetOnce(resources, state, async (fleet) => {
      const names = fleet.endpoints.map((endpoint) => endpoint.name).sort();
      assert.deepEqual(names, ['agent', 'agent', 'certificate-authority', 'cloning', 'distribution', 'inventory', 'nats']);
      // Two hosts on this machine's libvirtd, each with its own identity and image directory.
      const [origin, second] = fleet.hosts;
      assert.equal(second?.host, `${origin?.host}-2`);
      assert.deepEqual(
        fleet.hosts.map((host) => host.imageDirectory),
        [join(state, 'fleet', 'agent', 'images'), join(state, 'fleet', 'agent-2', 'images')],
      );
      assert.deepEqual(
        fleet.endpoints
          .filter((endpoint) => endpoint.name === 'agent')
          .map((endpoint) => endpoint.host)
          .sort(),
        [origin!.host, second!.host].sort(),
      );
      const admin = mutualTlsChannelCredentialsFromPem({
        certificatePem: await readFile(fleet.admin.certificateFile, 'utf8'),
        privateKeyPem: await readFile(fleet.admin.privateKeyFile, 'utf8'),
        caPem: await readFile(fleet.admin.caFile, 'utf8'),
      });
      for (const endpoint of fleet.endpoints.filter((item) => item.healthAddress)) {
        assert.equal(await check(endpoint.address, admin), 'SERVING', `${endpoint.name} mTLS`);
        assert.equal(await check(endpoint.healthAddress!, grpcCredentials.createInsecure()), 'SERVING', `${endpoint.name} probe`);
      }
    });
    assertCleanStop(first);
    assert.match(first.output, /creating the fleet's certificate authority/);
    assert.doesNotMatch(first.output, /the story/, '--no-story');
    const logDirectory = join(state, 'fleet', 'logs');
    await assertOrderedStops(logDirectory, 1);
    const keyMode = (await import('node:fs')).statSync(join(state, 'fleet', 'ca', 'ca-key.pem')).mode & 0o777;
    assert.equal(keyMode, 0o600);
    // The CA private key is in no log line of the whole run, nor in what the fleet printed.
    const key = (await readFile(join(state, 'fleet', 'ca', 'ca-key.pem'), 'utf8'))
      .split('\n')
      .filter((line) => line && !line.startsWith('-----'))
      .join('');
    const logs = [first.output, ...(await Promise.all((await readdir(logDirectory)).map((file) => readFile(join(logDirectory, file), 'utf8'))))];
    assert.ok(logs.length >= 7, 'every process wrote a log');
    for (const text of logs) {
      assert.doesNotMatch(text, /PRIVATE KEY/);
      for (const piece of [key.slice(0, 48), key.slice(400, 448), key.slice(-48)]) assert.ok(!text.includes(piece), 'a piece of the CA key is in a log');
    }

    const second = await runFleetOnce(resources, state, async () => undefined);
    assertCleanStop(second);
    assert.doesNotMatch(second.output, /creating the fleet's certificate authority/, 'the second start reuses the CA');
    await assertOrderedStops(logDirectory, 2);
  });
});
