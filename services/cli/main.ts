#!/usr/bin/env -S node --import tsx
/**
 * `cowherd`, the operator's command line: hosts, images, VMs, events and the overview over mTLS with an
 * admin credential bundle, and `cowherd fleet up` for the local fleet. Wiring only: parse, load config,
 * run the command, map what went wrong to a message and an exit code (exit-codes.ts).
 */
import { ConfigError } from '../common/platform/config.js';
import { commandWords, parseCommandLine, renderCommandList, renderHelp, usageLine, UsageError, type CommandSpec, type OptionSpec } from './command-line.js';
import { loadCliConfig, type ServiceKey } from './cli-config.js';
import { CliContext, type GlobalSettings } from './cli-context.js';
import { EVENTS_COMMAND } from './events-command.js';
import { CliError, EXIT } from './exit-codes.js';
import { FLEET_COMMAND } from './fleet-command.js';
import { HOSTS_COMMAND } from './hosts-commands.js';
import { IMAGES_COMMAND } from './images-commands.js';
import { processOutput } from './output.js';
import { OPERATIONS_COMMAND } from './operations-command.js';
import { OVERVIEW_COMMAND } from './overview.js';
import { ArgumentReader } from './resource-arguments.js';
import { VMS_COMMAND } from './vms-commands.js';

const DEFAULT_TIMEOUT = '30s';

/** Options every command accepts, before or after its words. */
export const GLOBAL_OPTIONS: readonly OptionSpec[] = [
  {
    name: 'credentials',
    value: '<dir>',
    description: "admin credential bundle: cert.pem, key.pem, ca.pem (env COWHERD_CREDENTIALS; default the local fleet's)",
  },
  { name: 'inventory', value: '<host:port>', description: 'inventory service (env COWHERD_INVENTORY_ADDRESS; default localhost:7442)' },
  { name: 'distribution', value: '<host:port>', description: 'distribution service (env COWHERD_DISTRIBUTION_ADDRESS; default localhost:7443)' },
  { name: 'cloning', value: '<host:port>', description: 'cloning service (env COWHERD_CLONING_ADDRESS; default localhost:7444)' },
  { name: 'ca', value: '<host:port>', description: 'certificate authority (env COWHERD_CA_ADDRESS; default localhost:7440)' },
  { name: 'nats', value: '<url>', description: 'NATS for `events` (env COWHERD_NATS_URL; default tls://localhost:4222)' },
  { name: 'output', value: '<table|json>', description: 'table for people (default), json for scripts (env COWHERD_OUTPUT)' },
  { name: 'timeout', value: '<duration>', description: `deadline of each call, like 10s or 2m (default ${DEFAULT_TIMEOUT})` },
  { name: 'quiet', description: 'no progress or hints on stderr' },
  { name: 'help', description: 'show help for the command' },
];

const ROOT: CommandSpec<CliContext> = {
  name: 'cowherd',
  summary: "The operator's command line for a cowherd fleet: publish master images once, spread them peer-to-peer, clone them copy-on-write.",
  subcommands: [HOSTS_COMMAND, IMAGES_COMMAND, VMS_COMMAND, OPERATIONS_COMMAND, EVENTS_COMMAND, OVERVIEW_COMMAND, FLEET_COMMAND],
  details: [
    "Exit status: 0 ok, 1 failure, 2 usage error or invalid argument, 3 not found, 4 conflicts with the fleet's state,",
    '5 credentials missing or refused, 6 service unreachable or timed out, 7 some clones or hosts failed, 130 interrupted.',
    '',
    'Examples:',
    '  cowherd overview',
    '  cowherd hosts join-token kvm-02 --ttl 2h',
    '  cowherd images publish --host kvm-01 --vm debian-template --image debian-12',
    '  cowherd images distribute debian-12 --hosts kvm-02,kvm-03',
    '  cowherd vms clone --image debian-12 --count 10 --placement image-hosts --start',
    "  cowherd vms list --filter 'state = RUNNING' --output json",
    '  cowherd events --follow --types clone,image.available',
  ].join('\n'),
};

async function main(argv: readonly string[]): Promise<number> {
  const words = argv[0] === 'help' ? [...argv.slice(1), '--help'] : argv;
  let context: CliContext | undefined;
  try {
    const parsed = parseCommandLine(ROOT, GLOBAL_OPTIONS, words);
    if (parsed.kind === 'help') {
      process.stdout.write(renderHelp(parsed.command, GLOBAL_OPTIONS));
      return EXIT.OK;
    }
    const { invocation } = parsed;
    const config = loadCliConfig(process.env);
    const args: ArgumentReader = new ArgumentReader(parsed.command);
    const format = invocation.string('output') ?? config.output;
    if (format !== 'table' && format !== 'json') args.fail(`--output must be table or json, got ${JSON.stringify(format)}`);
    const address = (flag: ServiceKey, configured: string): string => {
      const value = invocation.string(flag) ?? configured;
      if (!/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(value)) args.fail(`--${flag} must be host:port, got ${JSON.stringify(value)}`);
      return value;
    };
    const nats = invocation.string('nats');
    const settings: GlobalSettings = {
      credentialsDirectory: invocation.string('credentials') ?? config.credentialsDirectory,
      addresses: {
        ca: address('ca', config.caAddress),
        inventory: address('inventory', config.inventoryAddress),
        distribution: address('distribution', config.distributionAddress),
        cloning: address('cloning', config.cloningAddress),
      },
      natsUrls:
        nats === undefined
          ? config.natsUrls
          : nats
              .split(',')
              .map((url) => url.trim())
              .filter((url) => url !== ''),
      timeoutMs: args.durationMs(invocation.string('timeout') ?? DEFAULT_TIMEOUT, '--timeout'),
      quiet: invocation.flag('quiet'),
    };
    context = new CliContext(config, settings, processOutput(format, settings.quiet));
    return await parsed.command[parsed.command.length - 1]!.run!(invocation, context);
  } catch (error) {
    if (error instanceof UsageError) {
      const path = error.command;
      // Nothing at all: the whole help. A group without a known command: its commands are the useful answer.
      if (words.length === 0) process.stderr.write(renderHelp(path, GLOBAL_OPTIONS));
      else if (path[path.length - 1]!.subcommands) process.stderr.write(`cowherd: ${error.message}\n${renderCommandList(path)}`);
      else process.stderr.write(`cowherd: ${error.message}\nusage: ${usageLine(path)}\nrun '${commandWords(path)} --help' for more\n`);
      return EXIT.USAGE;
    }
    if (error instanceof CliError) {
      process.stderr.write(`cowherd: ${error.message}\n`);
      return error.exitCode;
    }
    if (error instanceof ConfigError) {
      process.stderr.write(`cowherd: ${error.message}\n`);
      return EXIT.USAGE;
    }
    // Not an expected failure: one line, no stack trace (nothing a caller can act on is in it).
    process.stderr.write(`cowherd: unexpected error: ${(error as Error)?.message ?? String(error)}\n`);
    return EXIT.FAILURE;
  } finally {
    context?.close();
  }
}

/** Exits once stdout and stderr are flushed: on pipes, process.exit would drop what is still queued. */
function exitAfterFlush(code: number): void {
  process.stdout.write('', () => process.stderr.write('', () => process.exit(code)));
}

main(process.argv.slice(2)).then(exitAfterFlush, (error: unknown) => {
  process.stderr.write(`cowherd: ${(error as Error).message}\n`);
  exitAfterFlush(EXIT.FAILURE);
});
