/**
 * The story of issue 7, end to end, as a new user meets it: the README's start command (`bash scripts/start.sh`)
 * on a fresh state directory starts NATS, the four services and two agents on the private libvirtd, and tells
 * the story: a small bootable master VM (Debian's kernel and a busybox initramfs by direct kernel boot), published
 * as an image, distributed peer-to-peer to the second agent (a real swarm), cloned there three times with
 * `--start`, each with its own hostname that the story reads back from the guests' consoles (issue 14); then a
 * second version published and the clones rebased onto it with a canary and restarted, their lineage before
 * and after; it prints the events it saw and the overview, and keeps the fleet up. The test then checks through
 * the CLI (`--output json`, finding the fleet by COWHERD_STATE_DIR as a user does), virsh and qemu-img what a user
 * would check: the clones exist, run (inventory RUNNING, `virsh domstate` running, the guest says it stays up on
 * its console), and their disks are qcow2 overlays whose backing file is the second host's copy of the image,
 * byte for byte the published disk. Ctrl-C, as a terminal sends it (SIGINT to the whole process group), stops
 * every process cleanly and leaves none behind but the VMs (libvirt's); a second start reuses the state and
 * does not repeat the set-up.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { Resources } from '../harness/index.js';
import { guestKit } from '../harness/guest.js';
import { REPOSITORY } from '../harness/processes.js';
import { StartCommand, type LeftoverProcess, processAlive } from '../harness/start-command.js';

const run = promisify(execFile);
const URI = 'qemu:///system';
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });

interface FleetFile {
  endpoints: Array<{ name: string; address: string; pid: number; host?: string }>;
  hosts: Array<{ host: string; label: string; address: string; imageDirectory: string }>;
}

/** A VM's qemu: libvirt's, it keeps running after the fleet stops (its command line names its disk in the state directory). */
function isGuest(process: LeftoverProcess): boolean {
  return /(^|\/)qemu-system-\S+ /.test(process.command);
}

describe('the local fleet tells the story (README start command, issue 7)', {
  skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false,
  timeout: 420_000,
}, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const image = `story-${suffix}`;
  const clones = [1, 2, 3].map((index) => `${image}-${index}`);
  const master = `${image}-master`;
  let state: string;
  let guestState: string;
  let fleet: FleetFile;
  let first: StartCommand;
  /** The fleet's temp directory (TMPDIR of start.sh and everything it runs). */
  let temporary: string;
  const cliEnvironment: Record<string, string> = {};

  /** The CLI as a user runs it beside the fleet: it finds the fleet (addresses, admin bundle) by COWHERD_STATE_DIR. */
  const json = async <T>(...args: string[]): Promise<T> => {
    const { stdout } = await run(process.execPath, ['--import', 'tsx', 'services/cli/main.ts', ...args, '--output', 'json'], {
      cwd: REPOSITORY,
      env: cliEnvironment,
      timeout: 60_000,
    }).catch((error: { stderr?: string; message: string }) => {
      throw new Error(`cowherd ${args.join(' ')}: ${error.stderr ?? error.message}`);
    });
    return JSON.parse(stdout) as T;
  };

  before(async () => {
    // The guest kit in the repository's state directory, shared with the boot tests (the first build downloads ~70 MB).
    const [kit] = await Promise.all([guestKit(), run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 })]);
    guestState = dirname(dirname(kit.kernel));
    state = await resources.tempDir('cowherd-fleet-');
    temporary = await resources.tempDir('cowherd-fleet-tmp-');
    for (const [key, value] of Object.entries(process.env)) if (value !== undefined && !key.startsWith('COWHERD_')) cliEnvironment[key] = value;
    cliEnvironment['COWHERD_STATE_DIR'] = join(state, 'fleet');
    // Runs before the state directory is removed: no domain and no process is left behind.
    resources.defer(async () => {
      for (const domain of [...clones, master]) {
        await virsh('destroy', domain).catch(() => undefined);
        await virsh('undefine', domain).catch(() => undefined);
      }
    });
  });
  after(() => resources.release());

  /** start.sh telling the story, as a user starts it in a terminal; the guest kit where the boot tests keep it. */
  function startFleet(): StartCommand {
    const command = new StartCommand(state, temporary, ['--story-name', image, '--guest-state-dir', guestState]);
    resources.defer(async () => {
      await command.interrupt();
      command.kill();
    });
    return command;
  }

  it('the first start tells the story: master VM, publish, distribute, three clones with their own hostnames, version 2 and the rebase, the events and the overview', async (t) => {
    const startedAt = Date.now();
    first = startFleet();
    await first.waitFor('fleet is up', 330_000);
    t.diagnostic(`start.sh to "fleet is up", story included: ${((Date.now() - startedAt) / 1000).toFixed(1)} s`);
    fleet = JSON.parse(await readFile(join(state, 'fleet', 'fleet.json'), 'utf8')) as FleetFile;
    const output = first.output;
    const [origin, target] = fleet.hosts.map((host) => host.host);
    assert.equal(fleet.hosts.length, 2);
    assert.equal(target, `${origin}-2`);
    assert.deepEqual(fleet.endpoints.map((endpoint) => endpoint.name).sort(), [
      'agent',
      'agent',
      'certificate-authority',
      'cloning',
      'distribution',
      'inventory',
      'nats',
    ]);

    // What the user sees, in order: the steps as CLI commands, the clones, the events, the overview.
    const steps = [
      '$ cowherd events --follow',
      `1. a small bootable master VM on ${origin}`,
      `defined ${master} in ${URI}, powered off`,
      `$ cowherd images publish --host ${origin} --vm ${master} --image ${image}`,
      `published images/${image} version 1: AVAILABLE`,
      `$ cowherd images distribute ${image} --hosts ${target}`,
      `$ cowherd vms clone --image ${image} --count 3 --hosts ${target} --template '${image}-{index}' --hostname-template '{name}.{host}.local' --start`,
      `$ cowherd vms list --host ${target}`,
      `$ cowherd vms show ${target}/${clones[0]}`,
      'each guest took its hostname from its own seed disk; on their serial consoles',
      ...clones.map((clone) => `   ${clone}: cowherd-guest: hostname ${clone}.${target}.local\n`),
      `6. a second version of ${image}`,
      `$ cowherd images publish --host ${origin} --vm ${master} --image ${image}`,
      `published images/${image} version 2: AVAILABLE`,
      `$ cowherd images versions ${image}`,
      `7. rebase (recompose) the clones onto version 2`,
      `$ cowherd vms rebase --filter 'source_image_version = "images/${image}/versions/1"' --to-version ${image}/versions/2 --canary 1 --restart`,
      'lineage before -> after:',
      ...clones.map(
        (clone) =>
          `   ${clone}: images/${image}/versions/1 -> images/${image}/versions/2 (lineage.previous_image_version images/${image}/versions/1), uuid unchanged`,
      ),
      `$ cowherd vms list --host ${target}`,
      'the restarted guests read the same seed disks again:',
      ...clones.map((clone) => `   ${clone}: cowherd-guest: hostname ${clone}.${target}.local\n`),
      '8. the events `cowherd events --follow` saw during the story',
      'recorded in',
      'overview (inventory):',
      'fleet is up',
    ];
    let position = 0;
    for (const step of steps) {
      const found = output.indexOf(step, position);
      assert.ok(found >= 0, `"${step}" after position ${position} in:\n${output}`);
      position = found;
    }
    assert.match(output, new RegExp(`^${target}\\s+AVAILABLE\\s*$`, 'm'), 'the distribution result table');
    // The versions table: both AVAILABLE, latest on 2, the clones on 1 before the rebase.
    assert.match(output, new RegExp(`^1\\s+AVAILABLE\\s+.*\\s+-\\s+2/2\\s+3\\s+images/${image}/versions/1$`, 'm'), 'version 1 in the versions table');
    assert.match(output, new RegExp(`^2\\s+AVAILABLE\\s+.*\\s+latest\\s+1/1\\s+0\\s+images/${image}/versions/2$`, 'm'), 'version 2 in the versions table');
    for (const clone of clones) {
      assert.match(output, new RegExp(`^${target}/${clone}\\s+DONE\\s+yes\\s*$`, 'm'), `${clone} cloned and started`);
      assert.match(
        output,
        new RegExp(`^\\s+\\S+ \\S+\\s+clone\\.done\\s+${target}\\s+${target}/${clone} from images/${image}, started$`, 'm'),
        `the clone.done event of ${clone}`,
      );
      assert.match(output, new RegExp(`^\\s+${clone}\\s+RUNNING\\s+${image}\\s+yes$`, 'm'), `${clone} RUNNING in the overview`);
      // The rebase's result table (one canary) and its clone.rebased event.
      assert.match(
        output,
        new RegExp(`^${target}/${clone}\\s+MOVED\\s+${image}/versions/1\\s+${image}/versions/2\\s+(yes|no)\\s+yes\\s*$`, 'm'),
        `${clone} rebased and started`,
      );
      assert.match(
        output,
        new RegExp(`^\\s+\\S+ \\S+\\s+clone\\.rebased\\s+${target}\\s+${target}/${clone} ${image}/versions/1 -> ${image}/versions/2, started$`, 'm'),
        `the clone.rebased event of ${clone}`,
      );
    }
    assert.equal(output.match(new RegExp(`^${target}/\\S+\\s+MOVED\\s+\\S+\\s+\\S+\\s+yes\\s`, 'gm'))?.length, 1, 'one canary');
    assert.match(output, new RegExp(`image\\.published\\s+${origin}\\s+images/${image} from ${origin}/${master}`));
    assert.match(output, new RegExp(`image\\.available\\s+${target}\\s+hosts/${target}/images/${image}`));
    assert.match(output, /└─ base replica hosts\/\S+\/images\/\S+ \(AVAILABLE/);
  });

  it('what a user checks: the clones exist, run on version 2, and their disks are overlays of its distributed base', async () => {
    const [origin, target] = fleet.hosts;
    const { hosts } = await json<{ hosts: Array<{ name: string; state: string }> }>('hosts', 'list');
    assert.deepEqual(hosts.map((host) => [host.name, host.state]).sort(), [
      [`hosts/${origin!.host}`, 'STATE_READY'],
      [`hosts/${target!.host}`, 'STATE_READY'],
    ]);

    // The image at its latest version, 2, with both versions' replicas on both hosts (the rebase brought 2 to the target).
    const shown = await json<{
      image: {
        name: string;
        state: string;
        version: string;
        versions: string[];
        originHost: string;
        files: Array<{ path: string; sha256: string; targetDevice?: string }>;
      };
      imageReplicas: Array<{ host: string; state: string; origin?: boolean; path: string; imageVersion: string }>;
    }>('images', 'show', image);
    assert.deepEqual(
      [shown.image.state, shown.image.originHost, shown.image.version, shown.image.versions],
      ['STATE_AVAILABLE', `hosts/${origin!.host}`, '2', ['1', '2']],
    );
    assert.deepEqual(shown.imageReplicas.map((replica) => [replica.host, replica.imageVersion, replica.state, replica.origin ?? false]).sort(), [
      [`hosts/${origin!.host}`, `images/${image}/versions/1`, 'STATE_AVAILABLE', true],
      [`hosts/${origin!.host}`, `images/${image}/versions/2`, 'STATE_AVAILABLE', true],
      [`hosts/${target!.host}`, `images/${image}/versions/1`, 'STATE_AVAILABLE', false],
      [`hosts/${target!.host}`, `images/${image}/versions/2`, 'STATE_AVAILABLE', false],
    ]);
    const disk = shown.image.files.find((file) => file.targetDevice === 'vda');
    assert.ok(disk, JSON.stringify(shown.image.files));
    // Version 2's storage key is `<image>_v2`: its directory on the host.
    const base = join(target!.imageDirectory, 'images', `${image}_v2`, disk.path);

    // Exist and run: in the inventory, in libvirt, and on the guest's console.
    const { virtualMachines } = await json<{
      virtualMachines: Array<{ name: string; domainName: string; state: string; managed?: boolean; sourceImage: string; sourceImageVersion: string }>;
    }>('vms', 'list', '--host', target!.host, '--filter', `source_image = "images/${image}"`);
    assert.deepEqual(
      virtualMachines.map((vm) => [vm.domainName, vm.state, vm.managed ?? false, vm.sourceImageVersion]).sort(),
      clones.map((clone) => [clone, 'STATE_RUNNING', true, `images/${image}/versions/2`]),
    );
    for (const clone of clones) {
      assert.equal((await virsh('domstate', clone)).stdout.trim(), 'running', clone);
      const console = join(target!.imageDirectory, 'clones', clone, 'serial-0.out');
      const deadline = Date.now() + 90_000;
      let text = '';
      while (Date.now() < deadline) {
        text = await readFile(console, 'utf8').catch(() => '');
        if (text.includes('cowherd-guest: staying up') || text.includes('cowherd-guest: no ') || text.includes('failed')) break;
        await new Promise((resolve) => setTimeout(resolve, 500));
      }
      assert.match(
        text,
        /cowherd-guest: marker written\r?\n[\s\S]*cowherd-guest: staying up \(cowherd\.stay=1\)/,
        `${clone} booted and stays up; console:\n${text.slice(-2000)}`,
      );
      assert.equal((await virsh('domstate', clone)).stdout.trim(), 'running', `${clone} still runs after booting`);

      // Overlays of the distributed base: the second host's replica, byte for byte the published disk.
      const vm = await json<{
        virtualMachine: {
          disks: Array<{ path: string; backingChain: Array<{ path: string }> }>;
          lineage: { imageVersion: string; previousImageVersion: string };
        };
        lineage: { imageReplica: { name: string }; image: { name: string } };
      }>('vms', 'show', `${target!.host}/${clone}`);
      assert.equal(vm.lineage.imageReplica.name, `hosts/${target!.host}/images/${image}/versions/2`);
      assert.equal(vm.lineage.image.name, `images/${image}`);
      assert.deepEqual(
        [vm.virtualMachine.lineage.imageVersion, vm.virtualMachine.lineage.previousImageVersion],
        [`images/${image}/versions/2`, `images/${image}/versions/1`],
      );
      const overlay = vm.virtualMachine.disks[0]!.path;
      assert.ok(overlay.startsWith(join(target!.imageDirectory, 'clones', clone) + '/'), overlay);
      const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', overlay])).stdout) as Record<string, unknown>;
      assert.equal(info['format'], 'qcow2');
      assert.equal(info['backing-filename'], base);
      assert.equal(info['backing-filename-format'], 'qcow2');
      assert.equal(vm.virtualMachine.disks[0]!.backingChain[0]?.path, base);
    }
    assert.equal(
      createHash('sha256')
        .update(await readFile(base))
        .digest('hex'),
      disk.sha256,
      'the base is the published disk',
    );
    assert.equal((await stat(base)).mode & 0o222, 0, 'the base is read-only');

    // The master VM stays powered off on the first host, and the first host holds the origin replica.
    const masterVm = await json<{ virtualMachine: { state: string } }>('vms', 'show', `${origin!.host}/${master}`);
    assert.equal(masterVm.virtualMachine.state, 'STATE_SHUT_OFF');
  });

  it('Ctrl-C stops every process; a second start reuses the state and does not repeat the set-up', async (t) => {
    const code = await first.interrupt();
    assert.equal(code, 0, first.output);
    assert.match(first.output, /stopping the fleet\.\.\.\nfleet stopped\n$/);
    for (const endpoint of fleet.endpoints) assert.equal(processAlive(endpoint.pid), false, `${endpoint.name} (pid ${endpoint.pid}) is gone`);
    assert.deepEqual(await first.leftovers(isGuest), [], 'no process of the run is left but the VMs');
    assert.deepEqual(await first.temporaryLeftovers(), [], 'nothing is left in the temp directory');
    // The VMs are libvirt's: they keep running without the fleet's processes, like VMs on a host whose agent stops.
    for (const clone of clones) assert.equal((await virsh('domstate', clone)).stdout.trim(), 'running');

    const startedAt = Date.now();
    const second = startFleet();
    await second.waitFor('fleet is up', 180_000);
    t.diagnostic(`second start to "fleet is up": ${((Date.now() - startedAt) / 1000).toFixed(1)} s`);
    const output = second.output;
    assert.match(output, new RegExp(`the story already ran on .* not repeating the set-up\\.\n  image ${image} `));
    for (const repeated of [/creating the fleet's certificate authority/, /enrolling host/, /\$ cowherd /, /guest kit/, /defined .*-master/])
      assert.doesNotMatch(output, repeated);
    for (const clone of clones) assert.match(output, new RegExp(`^\\s+${clone}\\s+RUNNING\\s+${image}\\s+yes$`, 'm'), `${clone} in the overview`);
    const { virtualMachines } = await json<{ virtualMachines: Array<{ domainName: string; state: string }> }>('vms', 'list', '--host', fleet.hosts[1]!.host);
    assert.deepEqual(
      virtualMachines.map((vm) => [vm.domainName, vm.state]).sort(),
      clones.map((clone) => [clone, 'STATE_RUNNING']),
    );

    assert.equal(await second.interrupt(), 0, second.output);
    assert.match(second.output, /stopping the fleet\.\.\.\nfleet stopped\n$/);
    assert.deepEqual(await second.leftovers(isGuest), [], 'no process of the run is left but the VMs');
    assert.deepEqual(await second.temporaryLeftovers(), [], 'nothing is left in the temp directory');
  });
});
