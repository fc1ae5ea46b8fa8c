/**
 * The README's start command, run as a user runs it: `bash scripts/start.sh --no-story` brings up NATS and
 * every process (two agents, one per local host); each answers health SERVING on both ports; Ctrl-C (SIGINT)
 * stops them all and leaves no process behind; a second start reuses the CA and the NATS data instead of
 * setting up again. The story that start.sh tells by default is story.test.ts's.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { credentials as grpcCredentials } from '@grpc/grpc-js';
import { check } from '../../services/cli/health-check.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/tls.js';
import { Resources } from '../harness/index.js';
import { REPOSITORY } from '../harness/processes.js';

interface FleetFile {
  endpoints: Array<{ name: string; address: string; healthAddress?: string; pid: number; host?: string }>;
  hosts: Array<{ host: string; label: string; imageDirectory: string }>;
  admin: { certificateFile: string; privateKeyFile: string; caFile: string };
}

/** Runs start.sh until "fleet is up", checks it, sends SIGINT, and returns everything it printed. */
async function runFleetOnce(stateDirectory: string, whileUp: (fleet: FleetFile) => Promise<void>): Promise<{ output: string; code: number | null; pids: number[] }> {
  const child = spawn('bash', [join(REPOSITORY, 'scripts/start.sh'), '--no-story'], {
    cwd: REPOSITORY,
    env: { ...process.env, COWHERD_STATE_DIR: stateDirectory, COWHERD_FLEET_DYNAMIC_PORTS: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const deadline = Date.now() + 240_000;
  while (!output.includes('fleet is up')) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGINT');
      await exited;
      throw new Error(`fleet did not come up:\n${output}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const fleet = JSON.parse(await readFile(join(stateDirectory, 'fleet', 'fleet.json'), 'utf8')) as FleetFile;
  try {
    await whileUp(fleet);
  } finally {
    child.kill('SIGINT');
  }
  const code = await exited;
  return { output, code, pids: fleet.endpoints.map((endpoint) => endpoint.pid) };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('the local fleet (README start command)', () => {
  const resources = new Resources();
  after(() => resources.release());

  it('starts NATS and every process healthy on both ports, and stops them all on Ctrl-C', async () => {
    const state = await resources.tempDir('cowherd-fleet-');
    const first = await runFleetOnce(state, async (fleet) => {
      const names = fleet.endpoints.map((endpoint) => endpoint.name).sort();
      assert.deepEqual(names, ['agent', 'agent', 'certificate-authority', 'cloning', 'distribution', 'inventory', 'nats']);
      // Two hosts on this machine's libvirtd, each with its own identity and image directory.
      const [origin, second] = fleet.hosts;
      assert.equal(second?.host, `${origin?.host}-2`);
      assert.deepEqual(fleet.hosts.map((host) => host.imageDirectory), [join(state, 'fleet', 'agent', 'images'), join(state, 'fleet', 'agent-2', 'images')]);
      assert.deepEqual(fleet.endpoints.filter((endpoint) => endpoint.name === 'agent').map((endpoint) => endpoint.host).sort(), [origin!.host, second!.host].sort());
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
    assert.equal(first.code, 0, first.output);
    assert.match(first.output, /creating the fleet's certificate authority/);
    assert.doesNotMatch(first.output, /the story/, '--no-story');
    assert.match(first.output, /fleet stopped/);
    for (const pid of first.pids) assert.equal(alive(pid), false, `pid ${pid} is gone`);
    const keyMode = (await import('node:fs')).statSync(join(state, 'fleet', 'ca', 'ca-key.pem')).mode & 0o777;
    assert.equal(keyMode, 0o600);
    // The CA private key is in no log line of the whole run, nor in what the fleet printed.
    const key = (await readFile(join(state, 'fleet', 'ca', 'ca-key.pem'), 'utf8')).split('\n').filter((line) => line && !line.startsWith('-----')).join('');
    const logDirectory = join(state, 'fleet', 'logs');
    const logs = [first.output, ...(await Promise.all((await readdir(logDirectory)).map((file) => readFile(join(logDirectory, file), 'utf8'))))];
    assert.ok(logs.length >= 7, 'every process wrote a log');
    for (const text of logs) {
      assert.doesNotMatch(text, /PRIVATE KEY/);
      for (const piece of [key.slice(0, 48), key.slice(400, 448), key.slice(-48)]) assert.ok(!text.includes(piece), 'a piece of the CA key is in a log');
    }

    const second = await runFleetOnce(state, async () => undefined);
    assert.equal(second.code, 0, second.output);
    assert.doesNotMatch(second.output, /creating the fleet's certificate authority/, 'the second start reuses the CA');
    for (const pid of second.pids) assert.equal(alive(pid), false);
  });
});
