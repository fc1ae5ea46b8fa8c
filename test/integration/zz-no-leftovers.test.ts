/**
 * Runs last (files run in name order, one at a time): the suite's teardown left no process and no temp
 * directory behind. The private libvirtd that scripts/test.sh starts is not a leftover: it stops it.
 */
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { test } from 'node:test';

test('no test process or temp directory is left behind', async () => {
  // Give processes stopped by the last clean-ups a moment to be reaped.
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  const leftovers: string[] = [];
  const marker = new RegExp(`${tmpdir()}/cowherd-`);
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const commandLine = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    // Test processes name a test temp directory in their arguments or their environment (credentials, data);
    // a fleet a developer runs beside the tests does not.
    const environment = await readFile(`/proc/${pid}/environ`, 'utf8').catch(() => '');
    if (marker.test(commandLine) || marker.test(environment)) {
      leftovers.push(`${pid}: ${commandLine.replace(/\0/g, ' ').slice(0, 160)}`);
    }
  }
  assert.deepEqual(leftovers, [], 'processes left running');
  const directories = (await readdir(tmpdir())).filter((name) => /^cowherd-(test|nats|ca|agent|e2e|fleet|host|bench)-/.test(name));
  assert.deepEqual(directories, [], 'temp directories left behind');
});
