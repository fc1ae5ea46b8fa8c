/**
 * `cowherd fleet up`: the local fleet on the embedded default, then the story on its first start, kept
 * running until Ctrl-C (what `npm start` runs). Both live in the launcher (services/launcher); the story runs
 * this CLI's own commands through the {@link StoryFleet} made here.
 */
import { dirname, resolve } from 'node:path';
import { isatty } from 'node:tty';
import { fileURLToPath } from 'node:url';
import { ImageView, type Host, type Image, type VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import {
  checkStoryName,
  DEFAULT_STORY_NAME,
  runStory,
  startLocalFleet,
  STORY_CLONES,
  StoryInterrupted,
  type LocalFleet,
  type StoryFleet,
} from '../launcher/index.js';
import { parseCommandLine, type CommandSpec } from './command-line.js';
import { localFleetDefaults, type CliConfig } from './cli-config.js';
import { CliContext } from './cli-context.js';
import { CliError, EXIT } from './exit-codes.js';
import { listVirtualMachines } from './fleet-reads.js';
import { IMAGES_COMMAND } from './images-commands.js';
import { processOutput } from './output.js';
import { overviewLines } from './overview.js';
import { ArgumentReader } from './resource-arguments.js';
import { VMS_COMMAND } from './vms-commands.js';

/** This CLI's entry point, which the story's event follower runs as a child process. */
const CLI_MAIN = fileURLToPath(new URL('./main.ts', import.meta.url));
/** The CLI commands the story runs, as `cowherd <words>` would. */
const STORY_COMMANDS: CommandSpec<CliContext> = { name: 'cowherd', summary: "the story's commands", subcommands: [IMAGES_COMMAND, VMS_COMMAND] };

export const FLEET_COMMAND: CommandSpec<CliContext> = {
  name: 'fleet',
  summary: 'run a whole fleet on this machine',
  subcommands: [
    {
      name: 'up',
      summary: 'start NATS, every service and two local agents on this machine, tell the story once; Ctrl-C stops them',
      options: [
        { name: 'no-story', description: 'only start the fleet: no master image, publish, distribution or clones' },
        {
          name: 'story-name',
          value: '<name>',
          description: `the story's image id; its master VM is <name>-master, its clones <name>-1..${STORY_CLONES} (default ${DEFAULT_STORY_NAME})`,
        },
        {
          name: 'guest-state-dir',
          value: '<dir>',
          description: "cache the story's guest kit (Debian's kernel, a busybox initramfs) in <dir>/guest (default: the state directory; npm start: .state)",
        },
      ],
      details: [
        "Two hosts on this machine's libvirtd: <hostname> and <hostname>-2. On the first start the story runs: a small bootable",
        `master VM on the first host, published as an image, distributed to the second, cloned there ${STORY_CLONES} times and started;`,
        'then the events it saw and the overview. It is recorded in <state>/story.json: later starts do not repeat it.',
        '',
        'State (CA, credentials, NATS data, logs, fleet.json, story.json) is kept in $COWHERD_STATE_DIR (default <repo>/.state/fleet);',
        'a second start reuses it. COWHERD_FLEET_DYNAMIC_PORTS=1 picks free ports instead of the defaults.',
      ].join('\n'),
      run: async (invocation, context) => {
        const storyName = invocation.string('story-name') ?? DEFAULT_STORY_NAME;
        const problem = checkStoryName(storyName);
        if (problem) new ArgumentReader(invocation.command).fail(`--story-name: ${problem}`);
        const guestStateDirectory = invocation.string('guest-state-dir');
        return fleetUp(context.config, {
          story: !invocation.flag('no-story'),
          storyName,
          ...(guestStateDirectory === undefined ? {} : { guestStateDirectory: resolve(guestStateDirectory) }),
        });
      },
    },
  ],
};

/** What `fleet up` was asked for. */
interface FleetUpOptions {
  readonly story: boolean;
  readonly storyName: string;
  /** Default: the fleet's state directory. */
  readonly guestStateDirectory?: string;
}

/**
 * The signals that stop the fleet: Ctrl-C, `kill`, and the terminal closing when started from one (stdin a
 * terminal; `nohup`, which ignores SIGHUP so that the fleet outlives the terminal, gives it /dev/null).
 */
const STOP_SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM', ...(isatty(0) ? (['SIGHUP'] as const) : [])];

async function fleetUp(config: CliConfig, options: FleetUpOptions): Promise<number> {
  const stateDirectory = resolve(config.stateDirectory ?? config.fleetDirectory);
  const logs = resolve(stateDirectory, 'logs');
  const say = (line: string): void => void process.stdout.write(`${line}\n`);
  // Once the terminal is gone (SIGHUP), writing to it fails (EIO): the stop goes on without its output.
  for (const stream of [process.stdout, process.stderr]) stream.on('error', () => undefined);

  // The fleet's processes run in process groups of their own (services/launcher/local-fleet.ts), so a terminal's Ctrl-C reaches
  // only this process, from the first moment on. During the start it stops what has started; later it stops
  // the story at its next step (an operation it follows keeps running in the fleet's KV and resumes with the
  // fleet), then every process in order.
  const interrupted = new AbortController();
  let requestStop: () => void = () => undefined;
  const stopRequested = new Promise<void>((done) => (requestStop = done));
  const onSignal = (): void => {
    if (!interrupted.signal.aborted) say('stopping the fleet...');
    interrupted.abort();
    requestStop();
  };
  for (const signal of STOP_SIGNALS) process.on(signal, onSignal);
  try {
    say(`cowherd local fleet: state in ${stateDirectory}`);
    let fleet: LocalFleet;
    try {
      fleet = await startLocalFleet({ stateDirectory, dynamicPorts: config.dynamicPorts === '1', say, signal: interrupted.signal });
    } catch (error) {
      if (!interrupted.signal.aborted) throw error;
      say('fleet stopped before it was up');
      return EXIT.INTERRUPTED;
    }
    say('');
    say('health            mTLS port      probe port');
    for (const report of fleet.health) say(`${report.name.padEnd(17)} ${report.mtls.padEnd(14)} ${report.probe}`);
    const healthy = fleet.health.every((report) => report.mtls === 'SERVING' && report.probe === 'SERVING');
    if (!healthy) {
      say(`some processes are not healthy: see the logs in ${logs}`);
      await fleet.stop();
      return EXIT.FAILURE;
    }

    if (options.story && !interrupted.signal.aborted) {
      say('');
      await tellStory(config, fleet, stateDirectory, options, say, interrupted.signal);
    }
    if (!interrupted.signal.aborted) {
      say('');
      say('overview (inventory):');
      const inventory = fleet.endpoints.find((endpoint) => endpoint.name === 'inventory')!;
      for (const line of await overviewLines(inventory.address, fleet.adminCredentials, { waitForHostsMs: 15_000 }).catch((error: Error) => [
        `(inventory did not answer: ${error.message})`,
      ]))
        say(`  ${line}`);
      say('');
      say(`admin credentials: ${fleet.adminCredentials.certificateFile} (key ${fleet.adminCredentials.privateKeyFile}, CA ${fleet.adminCredentials.caFile})`);
      say(`endpoints and pids: ${resolve(stateDirectory, 'fleet.json')}; logs: ${logs}`);
      for (const line of exploreHints(stateDirectory, fleet, options)) say(line);
      say('fleet is up; press Ctrl-C to stop it');
    }
    await stopRequested;
    const unclean = await fleet.stop();
    if (unclean.length > 0) {
      // A process that did not drain (killed after its grace time, or failed while stopping) is not a clean stop.
      say(`fleet stopped, not cleanly: ${unclean.join(', ')} (see the logs in ${logs})`);
      return EXIT.FAILURE;
    }
    say('fleet stopped');
    return EXIT.OK;
  } finally {
    for (const signal of STOP_SIGNALS) process.off(signal, onSignal);
  }
}

/** Runs the story with a CLI context on this fleet; a failure is reported and leaves the fleet running. */
async function tellStory(
  config: CliConfig,
  fleet: LocalFleet,
  stateDirectory: string,
  options: FleetUpOptions,
  say: (line: string) => void,
  signal: AbortSignal,
): Promise<void> {
  const address = (service: 'certificate-authority' | 'inventory' | 'distribution' | 'cloning'): string =>
    fleet.endpoints.find((endpoint) => endpoint.name === service)!.address;
  const context = new CliContext(
    config,
    {
      credentialsDirectory: dirname(fleet.adminCredentials.certificateFile),
      addresses: { ca: address('certificate-authority'), inventory: address('inventory'), distribution: address('distribution'), cloning: address('cloning') },
      natsUrls: [fleet.natsUrl],
      timeoutMs: 30_000,
      quiet: false,
    },
    processOutput('table', false),
  );
  try {
    await runStory({
      fleet: storyFleet(context, fleet.natsUrl),
      hosts: fleet.hosts,
      stateDirectory,
      guestStateDirectory: options.guestStateDirectory ?? stateDirectory,
      libvirtUri: fleet.libvirtUri,
      name: options.storyName,
      say,
      signal,
    });
  } catch (error) {
    if (error instanceof StoryInterrupted || signal.aborted) return;
    say('');
    say(`the story failed: ${(error as Error).message}`);
    say(`the fleet keeps running (logs in ${resolve(stateDirectory, 'logs')}); the next start tells the story again and skips what exists`);
  } finally {
    context.close();
  }
}

/** The story's view of the fleet: this CLI's commands run in-process with `context`, and inventory's reads. */
function storyFleet(context: CliContext, natsUrl: string): StoryFleet {
  return {
    cowherd: async (words) => {
      const parsed = parseCommandLine(STORY_COMMANDS, [], words);
      if (parsed.kind !== 'run') throw new Error(`cowherd ${words.join(' ')}: not a command`);
      const code = await parsed.command[parsed.command.length - 1]!.run!(parsed.invocation, context);
      if (code !== EXIT.OK) throw new CliError(`cowherd ${words.join(' ')} exited ${code}`, code);
    },
    getHost: (name) => context.call<Host>('inventory', (cb) => context.inventory.getHost({ name }, cb)),
    findImage: async (name) => {
      try {
        return await context.call<Image>('inventory', (cb) => context.inventory.getImage({ name, view: ImageView.IMAGE_VIEW_BASIC }, cb));
      } catch (error) {
        if (error instanceof CliError && error.exitCode === EXIT.NOT_FOUND) return undefined;
        throw error;
      }
    },
    getVirtualMachine: (name) => context.call<VirtualMachine>('inventory', (cb) => context.inventory.getVirtualMachine({ name }, cb)),
    listVirtualMachines: (parent, filter) => listVirtualMachines(context, parent, filter),
    followEventsCommand: [
      process.execPath,
      '--import',
      'tsx',
      CLI_MAIN,
      'events',
      '--follow',
      '--output',
      'table',
      '--credentials',
      context.settings.credentialsDirectory,
      '--nats',
      natsUrl,
    ],
  };
}

/** What to type next, with COWHERD_STATE_DIR when the CLI would not find this fleet by itself. */
function exploreHints(stateDirectory: string, fleet: LocalFleet, options: FleetUpOptions): string[] {
  const prefix = resolve(localFleetDefaults(undefined).directory) === stateDirectory ? '' : `COWHERD_STATE_DIR=${stateDirectory} `;
  const [first, second] = fleet.hosts;
  const name = options.storyName;
  const row = (command: string, what = ''): string => (what === '' ? `  ${command}` : `  ${command.padEnd(40)} ${what}`);
  const lines = [
    `explore it with the CLI in another terminal: ${prefix}npm run cowherd -- <command>, for example`,
    row('overview', 'every host with its images and VMs'),
    row('hosts list', 'the two local hosts'),
  ];
  if (options.story && first && second) {
    lines.push(
      row(`vms list --filter 'state = RUNNING'`, 'the running clones'),
      row(`vms show ${second.host}/${name}-1`, `a clone's disk: an overlay on ${second.host}'s copy of the image`),
      row(`images show ${name}`, "the image's files and the hosts that hold it"),
      row(`vms stop ${second.host}/${name}-1`, 'a graceful shutdown (ACPI power button); vms start, vms delete'),
      row(`vms clone --image ${name} --count 2 --hosts ${first.host},${second.host} --start`),
    );
  }
  lines.push(row('events --last 50', 'what happened; --follow shows it live'));
  return lines;
}
