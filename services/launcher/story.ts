/**
 * The local fleet's story: what the 2011 tool did, told on a fresh local fleet through cowherd's public API
 * with the operator's admin credentials, every step printed as the CLI command that does it (the same
 * command works in another terminal). The caller (the CLI's `fleet up`) gives the story a {@link StoryFleet}:
 * its commands run in-process and a few reads of inventory, so that the launcher imports nothing of the CLI.
 *
 *  1. a small bootable master VM on the first host: Debian's kernel and a busybox initramfs by direct kernel
 *     boot (scripts/guest-kernel.sh, cached; `cowherd.stay=1` keeps the guest running after it wrote its
 *     marker) and a 64 MiB qcow2 disk under the first agent's image directory (`vms/`), defined powered off;
 *  2. `cowherd images publish` makes the image from it;
 *  3. `cowherd images distribute` spreads it to the second host (BitTorrent swarm, SHA-256 verified);
 *  4. `cowherd vms clone --start --hostname-template ...` makes N copy-on-write clones of it on the second host,
 *     each with its own cloud-init seed disk (its own hostname and instance-id), and starts them;
 *  5. waits until inventory reports them RUNNING, lists them, shows one's lineage, and reads from each clone's
 *     serial console the hostname its guest took from its seed disk (`cowherd-guest: hostname ...`);
 *  6. publishes the master VM again onto the same image id: version 2 (`cowherd images versions`);
 *  7. `cowherd vms rebase --canary 1 --restart` moves the clones from version 1 onto version 2 (recompose: fresh
 *     system disks, same name, UUID and identity), prints each clone's lineage before and after, and reads
 *     the hostname again from the restarted guests;
 *  8. prints the events that `cowherd events --follow` (started before step 1) saw.
 *
 * Idempotent: a finished story is recorded in `<state>/story.json`, and a later start with the same story
 * name only says so (the set-up is not repeated, whatever happened to the VMs since). A story that did not
 * finish (Ctrl-C, a failure) runs again on the next start and skips what exists: the master VM, the image,
 * the replica on the second host, clones by name, the second version, clones already on it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  Host_State,
  Image_State,
  VirtualMachine_State,
  virtualMachine_StateToJSON,
  type Host,
  type Image,
  type VirtualMachine,
} from '../gen/cowherd/inventory/v1/resources.js';
import { runCommand } from '../common/platform/child-process.js';
import { writeAtomically } from '../common/platform/credential-files.js';
import { HOST_NAME, IMAGE_ID, IMAGE_NAME, imageVersionName, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';
import type { LocalHost } from './local-fleet.js';

const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));
/** The story's default name: the image id; the master VM is `<name>-master`, the clones `<name>-<n>`. */
export const DEFAULT_STORY_NAME = 'tiny-linux';
/** How many clones the story makes. */
export const STORY_CLONES = 3;
/** Each clone's hostname (its cloud-init seed disk): its name and its host's, so that a console shows whose it is. */
export const STORY_HOSTNAME_TEMPLATE = '{name}.{host}.local';
/** The line the guest's /init prints once it read its seed disk (scripts/guest-kernel.sh). */
const HOSTNAME_LINE = /^cowherd-guest: hostname (\S+)\s*$/m;
const MASTER_DISK_MIB = 64;
const MASTER_MEMORY_MIB = 128;

/**
 * What the story needs of the fleet, from its caller (the CLI's `fleet up`), all with the operator's admin
 * credentials: the CLI's commands and a few reads of inventory.
 */
export interface StoryFleet {
  /** Runs `cowherd <words>` in-process, as typed, its output on stdout; rejects with the CLI's own message when it fails. */
  cowherd(words: readonly string[]): Promise<void>;
  /** `hosts/{host}`; rejects when inventory does not have it or does not answer. */
  getHost(name: string): Promise<Host>;
  /** `images/{image}` (basic view); undefined when inventory does not have it, rejects on any other failure. */
  findImage(name: string): Promise<Image | undefined>;
  /** `hosts/{host}/virtualMachines/{virtualMachine}`; rejects when inventory does not have it or does not answer. */
  getVirtualMachine(name: string): Promise<VirtualMachine>;
  /** Every VM under `parent` (`hosts/{host}`) matching the AIP-160 `filter`, every page read. */
  listVirtualMachines(parent: string, filter?: string): Promise<VirtualMachine[]>;
  /**
   * The command line (program first) of `cowherd events --follow --output table` for this fleet's NATS with the
   * admin bundle, which the story runs as a child process, as an operator would in a second terminal.
   */
  readonly followEventsCommand: readonly string[];
}

/** What `<state>/story.json` records once the story finished. */
export interface StoryRecord {
  /** `images/<name>`. */
  readonly image: string;
  /** `hosts/<first>/virtualMachines/<name>-master`. */
  readonly masterVirtualMachine: string;
  /** The first host (origin) and the second (where the clones are). */
  readonly hosts: readonly string[];
  /** The clones' resource names. */
  readonly clones: readonly string[];
  readonly finishedAt: string;
}

/** Options of {@link runStory}. */
export interface StoryOptions {
  /** The fleet through the CLI, with the admin bundle. */
  readonly fleet: StoryFleet;
  /** The fleet's two hosts, the origin first. */
  readonly hosts: readonly LocalHost[];
  /** Where story.json is kept: the fleet's state directory. */
  readonly stateDirectory: string;
  /** The state directory scripts/guest-kernel.sh caches the guest kit in (`<dir>/guest`). */
  readonly guestStateDirectory: string;
  readonly libvirtUri: string;
  /** The image id; default {@link DEFAULT_STORY_NAME}. */
  readonly name?: string;
  /** Lines for the operator (stdout). */
  readonly say: (line: string) => void;
  /** Aborted on Ctrl-C: the story stops at the next step, and stops what it started. */
  readonly signal: AbortSignal;
}

/** Thrown when the story stops because of Ctrl-C. */
export class StoryInterrupted extends Error {
  override readonly name = 'StoryInterrupted';
}

/** Checks a story name: it is an image id, and `<name>-master` and `<name>-<n>` must be VM names. */
export function checkStoryName(name: string): string | undefined {
  if (!IMAGE_ID.test(name) || name.length > 50)
    return `the story name must be an image id of at most 50 characters ([a-z0-9-], starting and ending with a letter or digit), got ${JSON.stringify(name)}`;
  return undefined;
}

/** Runs the story, or says that it already ran; returns what story.json records. */
export async function runStory(options: StoryOptions): Promise<{ readonly ran: boolean; readonly record: StoryRecord }> {
  const { fleet, say, signal } = options;
  const name = options.name ?? DEFAULT_STORY_NAME;
  const problem = checkStoryName(name);
  if (problem) throw new Error(problem);
  const [origin, target] = options.hosts;
  if (!origin || !target) throw new Error("the story needs the local fleet's two hosts");
  const masterName = `${name}-master`;
  const cloneNames = Array.from({ length: STORY_CLONES }, (_, index) => `${name}-${index + 1}`);
  const recordFile = join(options.stateDirectory, 'story.json');
  const image = IMAGE_NAME.format({ image: name });
  const masterVm = VIRTUAL_MACHINE_NAME.format({ host: origin.host, virtualMachine: masterName });
  const record: StoryRecord = {
    image,
    masterVirtualMachine: masterVm,
    hosts: [HOST_NAME.format({ host: origin.host }), HOST_NAME.format({ host: target.host })],
    clones: cloneNames.map((clone) => VIRTUAL_MACHINE_NAME.format({ host: target.host, virtualMachine: clone })),
    finishedAt: '',
  };

  const previous = await readRecord(recordFile);
  if (previous?.image === record.image) {
    say(`the story already ran on ${previous.finishedAt.replace('T', ' ').replace(/\.\d+Z$/, ' UTC')} (${recordFile}): not repeating the set-up.`);
    say(
      `  image ${name} (published from ${shortName(previous.masterVirtualMachine)}, on ${previous.hosts.map((host) => HOST_NAME.parse(host)?.host ?? host).join(' and ')}), clones ${previous.clones.map(shortName).join(', ')}`,
    );
    return { ran: false, record: previous };
  }

  const startedAt = Date.now();
  const checkpoint = (): void => {
    if (signal.aborted) throw new StoryInterrupted('interrupted');
  };
  /** Runs `cowherd <words>` in-process, as typed; a failure stops the story with the CLI's own message. */
  const cowherd = async (...words: string[]): Promise<void> => {
    checkpoint();
    say(`$ cowherd ${words.map(shellWord).join(' ')}`);
    await fleet.cowherd(words);
  };
  const virsh = (...args: string[]): Promise<string> =>
    runCommand('virsh', ['-c', options.libvirtUri, ...args], { timeoutMs: 60_000, signal, env: { LC_ALL: 'C' } });

  say(`the story: the 2011 tool's run on this fleet, through cowherd's API with your admin credentials. Each step is the CLI command`);
  say(`that does it; type the same commands in another terminal (\`npm run cowherd -- <command>\`).`);
  say('');
  const follower = await startEventFollower(options);
  try {
    // Both hosts must be READY: the agents enrolled a moment ago and report within seconds.
    await waitFor(signal, 60_000, `hosts ${origin.host} and ${target.host} READY`, async () => {
      const hosts = await Promise.all([origin, target].map((host) => fleet.getHost(HOST_NAME.format({ host: host.host })).catch(() => undefined)));
      return hosts.every((host) => host?.state === Host_State.STATE_READY) ? true : undefined;
    });

    let existing = await fleet.findImage(image);
    if (existing?.state === Image_State.STATE_PUBLISHING) {
      // A publish that an earlier start began (and Ctrl-C left to the fleet) goes on: wait for its end.
      say(`${image} is being published (an earlier start began it): waiting for it`);
      existing = await waitFor(signal, 180_000, `${image} to be published`, async () => {
        const found = await fleet.findImage(image);
        return found?.state === Image_State.STATE_PUBLISHING ? undefined : found;
      });
    }
    if (existing && existing.state !== Image_State.STATE_AVAILABLE) {
      throw new Error(
        `${image} exists but is not AVAILABLE (${Image_State[existing.state]}); \`cowherd images delete ${name}\` removes it, or start with --story-name <another>`,
      );
    }
    if (existing) {
      say(`1-2. ${image} is already published (origin ${existing.originHost}): skipping the master VM and the publish`);
    } else {
      // 1. The master VM.
      say(`1. a small bootable master VM on ${origin.host}: Debian's kernel by direct kernel boot, a busybox initramfs, a ${MASTER_DISK_MIB} MiB qcow2 disk`);
      const defined = await virsh('domstate', masterName).then(
        () => true,
        () => false,
      );
      if (defined) {
        const disks = await virsh('domblklist', masterName, '--details');
        if (!disks.includes(join(origin.imageDirectory, 'vms'))) {
          throw new Error(
            `libvirt already has a domain named ${masterName} whose disk is not under ${join(origin.imageDirectory, 'vms')} (another fleet's?); start with --story-name <another name>`,
          );
        }
        say(`   ${masterName} is already defined: using it`);
      } else {
        const kit = await guestKit(options);
        const vmDirectory = join(origin.imageDirectory, 'vms');
        await mkdir(vmDirectory, { recursive: true });
        const disk = join(vmDirectory, `${masterName}.qcow2`);
        if (!existsSync(disk)) await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', disk, `${MASTER_DISK_MIB}M`], { signal });
        const xmlFile = join(vmDirectory, `${masterName}.xml`);
        await writeFile(
          xmlFile,
          masterDomainXml({
            name: masterName,
            kernel: kit.kernel,
            initrd: kit.initrd,
            disk,
            console: join(vmDirectory, `${masterName}.console.log`),
            marker: name,
          }),
        );
        checkpoint();
        await virsh('define', xmlFile);
        say(`   kernel ${kit.version} (${kit.kernel}), initramfs ${kit.initrd}`);
        say(`   disk ${disk}; kernel command line "${KERNEL_COMMAND_LINE} marker=${name}"`);
        say(`   defined ${masterName} in ${options.libvirtUri}, powered off (its disk is under ${origin.host}'s image directory, so that agent owns it)`);
      }
      const seen = await waitFor(signal, 30_000, `${masterVm} in the inventory`, async () => {
        const vm = await fleet.getVirtualMachine(masterVm).catch(() => undefined);
        return vm?.state === VirtualMachine_State.STATE_SHUT_OFF ? vm : undefined;
      });
      say(`   the agent reported it: ${shortName(seen.name)} ${virtualMachineState(seen)}`);
      say('');

      // 2. Publish.
      say(`2. publish it as the image ${name}: the disk flattened, the kernel and initramfs copied, the domain XML sanitized, all hashed`);
      await cowherd(
        'images',
        'publish',
        '--host',
        origin.host,
        '--vm',
        masterName,
        '--image',
        name,
        '--description',
        "the local fleet's story: Debian kernel + busybox, direct kernel boot",
        '--label',
        'story=local-fleet',
      );
    }
    say('');

    // 3. Distribute (a host that already holds it counts as done at once).
    say(`3. spread it peer-to-peer to ${target.host} (private torrent; ${origin.host} seeds, every file is SHA-256 verified on arrival)`);
    await cowherd('images', 'distribute', name, '--hosts', target.host);
    say('');

    // 4. Clone with autostart, each with its own identity.
    const targetHost = HOST_NAME.format({ host: target.host });
    const present = new Set((await fleet.listVirtualMachines(targetHost)).map((vm) => vm.domainName));
    const missing = cloneNames.filter((clone) => !present.has(clone));
    say(`4. ${STORY_CLONES} copy-on-write clones on ${target.host}, started as soon as they are defined, each with its own cloud-init`);
    say(`   seed disk: hostname from the template, instance-id = the clone's UUID (so a real guest makes new SSH host keys)`);
    const identity = ['--hostname-template', STORY_HOSTNAME_TEMPLATE];
    if (missing.length === 0) say(`   ${cloneNames.join(', ')} exist already: not cloning again`);
    else if (missing.length === cloneNames.length)
      await cowherd(
        'vms',
        'clone',
        '--image',
        name,
        '--count',
        String(STORY_CLONES),
        '--hosts',
        target.host,
        '--template',
        `${name}-{index}`,
        ...identity,
        '--start',
      );
    else for (const clone of missing) await cowherd('vms', 'clone', '--image', name, '--hosts', target.host, '--template', clone, ...identity, '--start');
    say('');

    // 5. They run.
    say(`5. the clones boot (TCG, a few seconds each); inventory reports them as their agent sees them`);
    await waitFor(signal, 90_000, `${cloneNames.join(', ')} RUNNING`, async () => {
      const vms = await fleet.listVirtualMachines(targetHost, `source_image = "${image}"`);
      return cloneNames.every((clone) => vms.some((vm) => vm.domainName === clone && vm.state === VirtualMachine_State.STATE_RUNNING)) ? true : undefined;
    });
    await cowherd('vms', 'list', '--host', target.host, '--filter', `source_image = "${image}"`);
    say('');
    await cowherd('vms', 'show', `${target.host}/${cloneNames[0]}`);
    say('');
    const consoleOf = (clone: string): string => join(target.imageDirectory, 'clones', clone, 'serial-0.out');
    say(
      `   each guest took its hostname from its own seed disk; on their serial consoles (${join(target.imageDirectory, 'clones', '<clone>', 'serial-0.out')}):`,
    );
    for (const clone of cloneNames) {
      const text = await waitForHostnameLine(signal, consoleOf(clone));
      say(`   ${clone}: cowherd-guest: hostname ${HOSTNAME_LINE.exec(text)?.[1] ?? '(none: the guest printed no hostname line)'}`);
    }
    say('');

    // 6. A second version of the image: the master VM published again onto the same id.
    const versionOne = imageVersionName(name, 1);
    let head = await fleet.findImage(image);
    const latest = Number(head?.version ?? 0) || 1;
    say(`6. a second version of ${name}: the master VM published again onto the same image id (clones stay on their version until moved)`);
    if (latest >= 2) say(`   ${name} has version ${latest} already: not publishing again`);
    else
      await cowherd(
        'images',
        'publish',
        '--host',
        origin.host,
        '--vm',
        masterName,
        '--image',
        name,
        '--description',
        "the local fleet's story, version 2: the same master, published again",
        '--label',
        'story=local-fleet',
      );
    head = await fleet.findImage(image);
    const targetVersion = Number(head?.version ?? 0) || 1;
    const versionTwo = imageVersionName(name, targetVersion);
    await cowherd('images', 'versions', name);
    say('');

    // 7. Recompose: the clones onto the new version, a canary first, started again.
    say(`7. rebase (recompose) the clones onto version ${targetVersion}: one canary first, then the rest; each is shut down, gets a fresh`);
    say(`   system disk on version ${targetVersion} (name, UUID, MAC and cloud-init identity kept) and is started again`);
    const before = new Map((await fleet.listVirtualMachines(targetHost, `source_image = "${image}"`)).map((vm) => [vm.domainName, vm]));
    const onOld = cloneNames.filter((clone) => (before.get(clone)?.sourceImageVersion || versionOne) !== versionTwo);
    if (onOld.length === 0) say(`   ${cloneNames.join(', ')} are on ${versionTwo} already: not rebasing again`);
    else {
      // Normally all on version 1; after an interrupted run, every clone of the image (those on the target count as done).
      const from = [...new Set(onOld.map((clone) => before.get(clone)?.sourceImageVersion || versionOne))];
      await cowherd(
        'vms',
        'rebase',
        '--filter',
        from.length === 1 ? `source_image_version = "${from[0]}"` : `source_image = "${image}"`,
        '--to-version',
        `${name}/versions/${targetVersion}`,
        '--canary',
        '1',
        '--restart',
      );
    }
    const after = await waitFor(signal, 120_000, `${cloneNames.join(', ')} RUNNING on ${versionTwo}`, async () => {
      const vms = await fleet.listVirtualMachines(targetHost, `source_image = "${image}"`);
      const moved = cloneNames.map((clone) => vms.find((vm) => vm.domainName === clone));
      return moved.every((vm) => vm?.state === VirtualMachine_State.STATE_RUNNING && vm.sourceImageVersion === versionTwo) ? moved : undefined;
    });
    say('   lineage before -> after:');
    for (const vm of after) {
      const previous = before.get(vm!.domainName);
      say(
        `   ${vm!.domainName}: ${previous?.sourceImageVersion || versionOne} -> ${vm!.sourceImageVersion} (lineage.previous_image_version ${vm!.lineage?.previousImageVersion || '-'}), uuid ${vm!.uuid === previous?.uuid ? 'unchanged' : `${previous?.uuid ?? '?'} -> ${vm!.uuid}`}`,
      );
    }
    await cowherd('vms', 'list', '--host', target.host, '--filter', `source_image = "${image}"`);
    say('');
    say('   the restarted guests read the same seed disks again:');
    for (const clone of cloneNames) {
      const text = await waitForHostnameLine(signal, consoleOf(clone));
      say(`   ${clone}: cowherd-guest: hostname ${HOSTNAME_LINE.exec(text)?.[1] ?? '(none: the guest printed no hostname line)'}`);
    }
    say('');

    // 8. The events.
    const finished = { ...record, finishedAt: new Date().toISOString() };
    await writeAtomically(recordFile, `${JSON.stringify(finished, null, 2)}\n`, 0o644);
    await follower.finish(say);
    say('');
    say(`the story took ${((Date.now() - startedAt) / 1000).toFixed(1)} s; recorded in ${recordFile} (the next start does not repeat it)`);
    return { ran: true, record: finished };
  } catch (error) {
    if (signal.aborted) throw new StoryInterrupted('interrupted', { cause: error });
    throw error;
  } finally {
    follower.stop();
  }
}

/**
 * Waits (up to 90 s) until a running clone's serial console shows its hostname line, or the guest said it stays
 * up or failed; returns the console's text. qemu truncates the file when the guest starts, so after a restart
 * the line is the new boot's.
 */
async function waitForHostnameLine(signal: AbortSignal, file: string): Promise<string> {
  const deadline = Date.now() + 90_000;
  let text = '';
  for (;;) {
    if (signal.aborted) throw new StoryInterrupted('interrupted');
    text = await readFile(file, 'utf8').catch(() => '');
    if (HOSTNAME_LINE.test(text) || text.includes('cowherd-guest: staying up') || /cowherd-guest: (no |cannot|writing)/.test(text)) return text;
    if (Date.now() > deadline) return text;
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

/** The kernel command line of the master VM, before its `marker=`. */
const KERNEL_COMMAND_LINE = 'console=ttyS0 quiet panic=-1 cowherd.stay=1';

/** The master VM: direct kernel boot, one virtio qcow2 disk, the serial console in a file, no network. */
export function masterDomainXml(vm: { name: string; kernel: string; initrd: string; disk: string; console: string; marker: string }): string {
  return guestDomainXml({
    ...vm,
    title: "the local fleet's master VM (cowherd fleet up)",
    memoryMib: MASTER_MEMORY_MIB,
    commandLine: `${KERNEL_COMMAND_LINE} marker=${vm.marker}`,
  });
}

/**
 * A domain for the small test guest (guest kit kernel + initrd): direct kernel boot, one virtio qcow2 disk,
 * the serial console in a file, no network, destroyed when it powers off. Also used by clone-boot.test.ts.
 */
export function guestDomainXml(guest: {
  name: string;
  title?: string;
  memoryMib: number;
  kernel: string;
  initrd: string;
  commandLine: string;
  disk: string;
  console: string;
}): string {
  return `<domain type='qemu'>
  <name>${guest.name}</name>
  <uuid>${randomUUID()}</uuid>
${guest.title ? `  <title>${guest.title}</title>\n` : ''}  <memory unit='MiB'>${guest.memoryMib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${guest.kernel}</kernel>
    <initrd>${guest.initrd}</initrd>
    <cmdline>${guest.commandLine}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${guest.disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='${guest.console}'/><target port='0'/></serial>
    <console type='file'><source path='${guest.console}'/><target type='serial' port='0'/></console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

async function readRecord(file: string): Promise<StoryRecord | undefined> {
  try {
    const value = JSON.parse(await readFile(file, 'utf8')) as Partial<StoryRecord>;
    if (
      typeof value.image !== 'string' ||
      typeof value.finishedAt !== 'string' ||
      !Array.isArray(value.clones) ||
      !Array.isArray(value.hosts) ||
      typeof value.masterVirtualMachine !== 'string'
    )
      return undefined;
    return value as StoryRecord;
  } catch {
    return undefined;
  }
}

/** Polls `probe` every 300 ms until it gives a value; throws after `timeoutMs` or when aborted. */
async function waitFor<T>(signal: AbortSignal, timeoutMs: number, what: string, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (signal.aborted) throw new StoryInterrupted('interrupted');
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}; the logs are in the state directory's logs/`);
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

/** The guest kit's files, built by scripts/guest-kernel.sh (cached; the first build downloads ~70 MB). */
async function guestKit(options: StoryOptions): Promise<{ kernel: string; initrd: string; version: string }> {
  const cached = existsSync(join(options.guestStateDirectory, 'guest', 'kit.stamp'));
  options.say(
    cached
      ? '   the guest kit (scripts/guest-kernel.sh, cached)'
      : `   building the guest kit (scripts/guest-kernel.sh: downloads Debian's kernel package once, ~70 MB, into ${join(options.guestStateDirectory, 'guest')})`,
  );
  const child = spawn('bash', [join(REPOSITORY, 'scripts', 'guest-kernel.sh')], {
    cwd: REPOSITORY,
    env: { ...process.env, COWHERD_STATE_DIR: options.guestStateDirectory, LC_ALL: 'C' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const stop = (): void => void child.kill('SIGTERM');
  options.signal.addEventListener('abort', stop, { once: true });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
    let newline: number;
    while ((newline = stderr.indexOf('\n')) >= 0) {
      options.say(`   ${stderr.slice(0, newline)}`);
      stderr = stderr.slice(newline + 1);
    }
  });
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  options.signal.removeEventListener('abort', stop);
  if (options.signal.aborted) throw new StoryInterrupted('interrupted');
  if (code !== 0) throw new Error(`scripts/guest-kernel.sh failed (exit ${code}); its output is above`);
  const value = (key: string): string => {
    const found = new RegExp(`^${key}=(.*)$`, 'm').exec(stdout)?.[1];
    if (!found) throw new Error(`scripts/guest-kernel.sh printed no ${key}`);
    return found;
  };
  return { kernel: value('COWHERD_GUEST_KERNEL'), initrd: value('COWHERD_GUEST_INITRD'), version: value('COWHERD_GUEST_VERSION') };
}

/** `cowherd events --follow` in the background for the story's length. */
interface EventFollower {
  /** Stops it and prints what it saw (transfer progress counted, not listed). */
  finish(say: (line: string) => void): Promise<void>;
  /** Stops it without printing (idempotent). */
  stop(): void;
}

/**
 * Starts `cowherd events --follow` as a child process, as an operator would in a second terminal, with the
 * admin bundle: it subscribes to `cowherd.events.>` on NATS. Resolves once it follows (or gave up after
 * 20 s: the story goes on without it).
 */
async function startEventFollower(options: StoryOptions): Promise<EventFollower> {
  const [program, ...args] = options.fleet.followEventsCommand;
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) if (value !== undefined && !key.startsWith('COWHERD_')) env[key] = value;
  options.say('$ cowherd events --follow        (in the background: every event the fleet publishes while the story runs)');
  const child: ChildProcess = spawn(program!, args, {
    cwd: REPOSITORY,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  let errors = '';
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (errors += chunk.toString()));
  const closed = new Promise<void>((resolve) => child.on('close', () => resolve()));
  const deadline = Date.now() + 20_000;
  while (!errors.includes('following') && child.exitCode === null && child.signalCode === null && Date.now() < deadline && !options.signal.aborted) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const following = errors.includes('following');
  if (!following) options.say(`   (the event follower did not start: ${errors.trim().split('\n').pop() ?? 'no output'}; the story goes on without it)`);
  let stopped = false;
  const stop = (): void => {
    if (stopped) return;
    stopped = true;
    child.kill('SIGINT');
    setTimeout(() => child.kill('SIGKILL'), 10_000).unref();
  };
  return {
    stop,
    finish: async (say) => {
      // A moment for the last events (the clones' state reports) to arrive.
      await new Promise((resolve) => setTimeout(resolve, 1_000));
      stop();
      await closed;
      if (!following) return;
      const lines = output.split('\n').filter((line) => line.trim() !== '');
      const progress = lines.filter((line) => /\simage\.transfer_progress\s/.test(line));
      say(
        `8. the events \`cowherd events --follow\` saw during the story (${lines.length}${progress.length > 0 ? `; ${progress.length} image.transfer_progress events not shown` : ''}):`,
      );
      for (const line of lines) if (!progress.includes(line)) say(`   ${line}`);
    },
  };
}

/** RUNNING, SHUT_OFF, ... */
function virtualMachineState(vm: VirtualMachine): string {
  return virtualMachine_StateToJSON(vm.state).replace(/^STATE_/, '');
}

/** `hosts/a/virtualMachines/b` -> `a/b`. */
function shortName(name: string): string {
  const ids = VIRTUAL_MACHINE_NAME.parse(name);
  return ids ? `${ids.host}/${ids.virtualMachine}` : name;
}

/** A word as a shell would need it quoted. */
function shellWord(word: string): string {
  return /^[A-Za-z0-9_./:=,@%+-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}
