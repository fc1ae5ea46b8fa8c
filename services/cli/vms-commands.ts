/** `cowherd vms`: clone, list across the fleet, show with lineage, rebase onto another image version, start, stop, delete. */
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import {
  cloneResult_StateToJSON,
  CloneVirtualMachinesRequest_Delivery,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
  RebaseVirtualMachinesResponse,
  type CloneVirtualMachinesRequest,
  type RebaseVirtualMachinesRequest,
  type Placement,
} from '../gen/cowherd/cloning/v1/cloning_service.js';
import { DiskBackend, diskFormatToJSON } from '../gen/cowherd/common/v1/types.js';
import { Host, Image, ImageReplica, ImageView, VirtualMachine, type GuestConfiguration } from '../gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../gen/google/longrunning/operations.js';
import type { CommandSpec, Invocation } from './command-line.js';
import { EVERY_HOST, parseImageReference } from '../common/domain/resource-names.js';
import type { CliContext } from './cli-context.js';
import { CliError, EXIT, explain, readStatus } from './exit-codes.js';
import {
  bareId,
  hostState,
  hypervisorWord,
  imageState,
  listVirtualMachines,
  replicaState,
  shortVirtualMachineName,
  versionNumberOf,
  versionOf,
  virtualMachineState,
} from './fleet-reads.js';
import { CLONE_OPERATION, REBASE_OPERATION, STOP_OPERATION } from './operation-kinds.js';
import { followOperation, OPERATION_OPTIONS, printStarted } from './operation-wait.js';
import { enumWord, formatBytes, formatTime, keyValues, table } from './output.js';
import { ArgumentReader, diskBackendWord, toDuration } from './resource-arguments.js';

const VM_ARGUMENT = { name: 'vm', description: 'the VM as <host>/<vm>, like kvm-01/web-1 (or hosts/kvm-01/virtualMachines/web-1)' };

export const VMS_COMMAND: CommandSpec<CliContext> = {
  name: 'vms',
  summary: 'clone VMs copy-on-write, list them across the fleet, show their lineage, start, stop, delete',
  subcommands: [
    {
      name: 'clone',
      summary: 'make N copy-on-write clones of an image or of a powered-off VM',
      options: [
        {
          name: 'image',
          value: '<image>',
          description: 'clone this image: debian-12 (its latest version), debian-12/versions/3 or debian-12/versions/stable (one of --image and --source-vm)',
        },
        { name: 'source-vm', value: '<host>/<vm>', description: 'clone this powered-off VM (on its own host unless --hosts)' },
        { name: 'count', value: '<n>', description: 'how many clones, 1 to 1000 (default 1)' },
        { name: 'template', value: '<name>', description: 'clone names with {source}, {index}, {random}, {host}; default {source}-{random}' },
        { name: 'start', description: 'start each clone once it is defined' },
        { name: 'hosts', value: '<h1,h2>', description: 'place the clones on these hosts, round robin (the image is distributed where missing)' },
        {
          name: 'stream',
          description:
            'where a host lacks the image, make (and start) its clones as soon as the image starts arriving instead of after it is all there (needs --image)',
        },
        {
          name: 'placement',
          value: '<hosts|image-hosts>',
          description: 'image-hosts: spread over the hosts that already hold the image (default for --image without --hosts)',
        },
        { name: 'max-per-host', value: '<n>', description: 'at most this many clones of the request on one host' },
        {
          name: 'hostname-template',
          value: '<t>',
          description: "each guest's hostname (cloud-init seed disk) with {name}, {index}, {host}, {uuid}; default {name}",
        },
        { name: 'ssh-key-file', value: '<f1,f2>', description: 'authorized SSH keys for the guests (public key or authorized_keys files)' },
        { name: 'user-data-file', value: '<file>', description: 'cloud-init user-data (#cloud-config, #! script or MIME multipart); {name} etc. substituted' },
        { name: 'network-config-file', value: '<file>', description: 'cloud-init network-config version 2; {name} etc. substituted' },
        { name: 'cloud-init', description: 'give each clone a seed disk even without the options above (hostname = clone name, new instance-id)' },
        {
          name: 'data-disk',
          value: '<size>',
          description: 'give each clone an empty persistent data disk of this size (like 10G; binary units, at most 16T); a rebase keeps it',
        },
        {
          name: 'disk-backend',
          value: '<reflink-copy|qcow2-overlay|vhd-differencing>',
          description: "how each clone's disks are made from the base (default: the image's default, else qcow2-overlay on KVM, vhd-differencing on Xen)",
        },
        ...OPERATION_OPTIONS,
      ],
      details:
        'Exit status 7 when some clones failed (each is listed with its error). With any of --hostname-template, --ssh-key-file, ' +
        '--user-data-file, --network-config-file or --cloud-init, each clone gets its own cloud-init NoCloud seed disk (label cidata): ' +
        'instance-id = the clone UUID, so cloud-init gives it new SSH host keys. The files are sent once and never stored (only a digest).\n' +
        'Each clone records the exact image version it came from (`vms show`); --data-disk adds a second disk that `vms rebase` keeps.\n' +
        'With --stream, clones on hosts that lack the image are made while it arrives: they show `streaming 37%` (how much of their\n' +
        'base has arrived; guest reads of missing parts wait for them) and are done once the image is verified there. If the image\n' +
        'cannot be brought to a host, its streaming clones are deleted and listed as failed. Hosts that hold the image clone as usual.\n' +
        '--disk-backend reflink-copy makes each disk a reflink copy of the base (btrfs, or xfs made with reflink=1: `hosts show` says\n' +
        "whether a host's image directory can): no backing chain, the guest's I/O is a plain file's, and the clone does not depend on\n" +
        'its image (the version or replica can be deleted under it). Only hosts that can reflink take such clones; not with --stream.',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const request = cloneRequest(invocation, args);
        const guestConfiguration = await guestConfigurationFromFlags(invocation, args);
        if (guestConfiguration) request.guestConfiguration = guestConfiguration;
        const started = await context.call<Operation>('cloning', (cb) => context.cloning.cloneVirtualMachines(request, cb));
        if (invocation.flag('no-wait')) return printStarted(context, started, CLONE_OPERATION);
        const source = request.source?.value ?? '';
        context.out.note(`cloning ${source} ×${request.count} (${started.name})`);
        const response = await followOperation(context, started, CLONE_OPERATION);
        return printCloneResult(context, response);
      },
    },
    {
      name: 'list',
      summary: 'list VMs on every host (or one) with state, size and what they were cloned from',
      options: [
        { name: 'host', value: '<host>', description: "only this host's VMs" },
        {
          name: 'filter',
          value: '<expr>',
          description:
            'AIP-160 filter: state = RUNNING, source_image = "images/debian-12", source_image_version = "images/debian-12/versions/2", managed = true, domain_name = "web-*"',
        },
      ],
      run: async (invocation, context) => {
        const host = invocation.string('host');
        const parent = host === undefined ? EVERY_HOST : new ArgumentReader(invocation.command).host(host, '--host');
        const vms = await listVirtualMachines(context, parent, invocation.string('filter') ?? '');
        if (context.out.format === 'json') {
          context.out.json({ virtualMachines: vms.map((vm) => VirtualMachine.toJSON(vm)) });
          return EXIT.OK;
        }
        if (vms.length === 0) {
          context.out.note(`no VMs${host === undefined ? '' : ` on ${parent}`}${invocation.string('filter') ? ' match the filter' : ''}`);
          return EXIT.OK;
        }
        context.out.line(
          table(
            ['vm', 'state', 'vcpus', 'memory', 'disks', 'source', 'version', 'managed'],
            vms.map((vm) => [
              shortVirtualMachineName(vm.name),
              virtualMachineState(vm),
              String(vm.vcpuCount),
              formatBytes(vm.memoryBytes),
              String(vm.disks.length),
              vm.sourceImage || (vm.lineage?.sourceVirtualMachine ? shortVirtualMachineName(vm.lineage.sourceVirtualMachine) : '-'),
              imageVersionText(vm),
              vm.managed ? 'yes' : 'no',
            ]),
          ),
        );
        return EXIT.OK;
      },
    },
    {
      name: 'show',
      summary: 'show one VM with its disks and lineage: VM -> overlay -> base image replica -> image -> host',
      positionals: [VM_ARGUMENT],
      run: async (invocation, context) => showVirtualMachine(context, new ArgumentReader(invocation.command).virtualMachine(invocation.positionals[0]!)),
    },
    {
      name: 'rebase',
      summary: 'move clones onto another version of their image (recompose): fresh system disks, data disks and identity kept',
      options: [
        {
          name: 'to-version',
          value: '<image>[/versions/<v>]',
          description: 'the target: debian-12 (its latest version), debian-12/versions/3 or debian-12/versions/stable',
          required: true,
        },
        {
          name: 'filter',
          value: '<expr>',
          description: 'AIP-160 filter over the VMs, like source_image_version = "images/debian-12/versions/2" (only clones of the target\'s image are moved)',
        },
        { name: 'all', description: "every clone of the target's image (instead of --filter)" },
        { name: 'host', value: '<host>', description: "only this host's clones (default every host)" },
        { name: 'canary', value: '<n>', description: 'how many clones move first, alone; the rest only if they all succeed (1 to 100, default 1)' },
        { name: 'max-per-host', value: '<n>', description: 'at most this many clones of one host move at a time (1 to 100, default 4)' },
        { name: 'restart', description: 'start each clone again after its move (running clones are shut down for it either way)' },
        { name: 'new-instance-id', description: "give each clone a new cloud-init instance-id, so that the guest's first-boot steps run again" },
        { name: 'shutdown-timeout', value: '<duration>', description: 'how long each running guest may take to shut down (default 2m, at most 1h)' },
        ...OPERATION_OPTIONS,
      ],
      details:
        "Each selected clone's system disk becomes a fresh copy-on-write overlay on the target version: what the guest changed there is\n" +
        'discarded; its persistent data disk (`vms clone --data-disk`), name, UUID, MAC addresses and guest configuration are kept.\n' +
        'The target is distributed to the hosts that need it first. Moving back is the same command with the previous version\n' +
        '(`vms show` prints it). The old version stays until `cowherd images gc` finds nothing uses it.\n' +
        'Exit status 7 when some clones failed (each is listed; it stays on its previous version).\n' +
        'Examples:\n' +
        '  cowherd vms rebase --filter \'source_image_version = "images/debian-12/versions/2"\' --to-version debian-12/versions/3 --canary 2 --restart\n' +
        '  cowherd vms rebase --all --to-version debian-12/versions/stable --host kvm-01 --max-per-host 2',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const request = rebaseRequest(invocation, args);
        const started = await context.call<Operation>('cloning', (cb) => context.cloning.rebaseVirtualMachines(request, cb));
        if (invocation.flag('no-wait')) return printStarted(context, started, REBASE_OPERATION);
        context.out.note(
          `rebasing ${request.filter ? `the clones where ${request.filter}` : `every clone of ${parseImageReference(request.targetImageVersion)!.id}`}${request.parent === EVERY_HOST ? '' : ` on ${bareId(request.parent)}`} onto ${bareId(request.targetImageVersion)} (${started.name})`,
        );
        const response = await followOperation(context, started, REBASE_OPERATION);
        return printRebaseResult(context, response);
      },
    },
    {
      name: 'start',
      summary: 'start a powered-off VM (or resume a paused one)',
      positionals: [VM_ARGUMENT],
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).virtualMachine(invocation.positionals[0]!);
        const vm = await context.call<VirtualMachine>('cloning', (cb) => context.cloning.startVirtualMachine({ name }, cb));
        if (context.out.format === 'json') context.out.json(VirtualMachine.toJSON(vm));
        else context.out.line(`${shortVirtualMachineName(vm.name)} is ${virtualMachineState(vm)}`);
        return EXIT.OK;
      },
    },
    {
      name: 'stop',
      summary: 'power a VM off: a graceful ACPI shutdown, or at once with --force',
      positionals: [VM_ARGUMENT],
      options: [
        { name: 'force', description: 'destroy the domain at once (like pulling the plug)' },
        { name: 'shutdown-timeout', value: '<duration>', description: 'how long a graceful shutdown may take (default 2m, at most 1h)' },
        ...OPERATION_OPTIONS,
      ],
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const name = args.virtualMachine(invocation.positionals[0]!);
        const timeout = invocation.string('shutdown-timeout');
        const ms = timeout === undefined ? undefined : args.durationMs(timeout, '--shutdown-timeout');
        const started = await context.call<Operation>('cloning', (cb) =>
          context.cloning.stopVirtualMachine(
            {
              name,
              force: invocation.flag('force'),
              timeout: ms === undefined ? undefined : { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 },
              requestId: invocation.string('request-id') ?? randomUUID(),
            },
            cb,
          ),
        );
        if (invocation.flag('no-wait')) return printStarted(context, started, STOP_OPERATION);
        const vm = await followOperation(context, started, STOP_OPERATION);
        if (context.out.format === 'json') context.out.json(VirtualMachine.toJSON(vm));
        else context.out.line(`${shortVirtualMachineName(vm.name)} is ${virtualMachineState(vm)}`);
        return EXIT.OK;
      },
    },
    {
      name: 'delete',
      summary: 'undefine a cowherd clone and remove its copy-on-write disks (nothing else)',
      positionals: [VM_ARGUMENT],
      options: [{ name: 'force', description: 'also a running VM (destroyed first), or an unmanaged one (only its definition; no file is removed)' }],
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).virtualMachine(invocation.positionals[0]!);
        await context.call('cloning', (cb) => context.cloning.deleteVirtualMachine({ name, force: invocation.flag('force') }, cb));
        if (context.out.format === 'json') context.out.json({ name, deleted: true });
        else context.out.line(`deleted ${shortVirtualMachineName(name)}`);
        return EXIT.OK;
      },
    },
  ],
};

/** The guest configuration from the --hostname-template, --*-file and --cloud-init flags; undefined when none is given. */
export async function guestConfigurationFromFlags(invocation: Invocation, args: ArgumentReader): Promise<GuestConfiguration | undefined> {
  const hostnameTemplate = invocation.string('hostname-template');
  const keyFiles = invocation.list('ssh-key-file');
  const userDataFile = invocation.string('user-data-file');
  const networkConfigFile = invocation.string('network-config-file');
  if (
    hostnameTemplate === undefined &&
    keyFiles.length === 0 &&
    userDataFile === undefined &&
    networkConfigFile === undefined &&
    !invocation.flag('cloud-init')
  )
    return undefined;
  const read = async (path: string, flag: string): Promise<string> => {
    try {
      return await readFile(path, 'utf8');
    } catch (error) {
      return args.fail(`${flag} ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
    }
  };
  const sshAuthorizedKeys: string[] = [];
  for (const file of keyFiles) {
    // A public key file or an authorized_keys file: one key a line, comments and blank lines skipped.
    for (const line of (await read(file, '--ssh-key-file')).split(/\r?\n/))
      if (line.trim() !== '' && !line.trim().startsWith('#')) sshAuthorizedKeys.push(line.trim());
  }
  return {
    hostnameTemplate: hostnameTemplate ?? '',
    sshAuthorizedKeys,
    userData: userDataFile === undefined ? '' : await read(userDataFile, '--user-data-file'),
    networkConfig: networkConfigFile === undefined ? '' : await read(networkConfigFile, '--network-config-file'),
  };
}

/** The CloneVirtualMachines request from the flags; a usage error for contradictory ones. */
export function cloneRequest(invocation: Invocation, args: ArgumentReader): CloneVirtualMachinesRequest {
  const image = invocation.string('image');
  const sourceVm = invocation.string('source-vm');
  if ((image === undefined) === (sourceVm === undefined)) args.fail('give exactly one of --image <id> and --source-vm <host>/<vm>');
  const source =
    image !== undefined
      ? { $case: 'image' as const, value: args.imageOrVersion(image, '--image') }
      : { $case: 'virtualMachine' as const, value: args.virtualMachine(sourceVm!, '--source-vm') };
  const count = args.integer(invocation.string('count') ?? '1', '--count', 1, 1000);
  const maxPerHostRaw = invocation.string('max-per-host');
  const maxClonesPerHost = maxPerHostRaw === undefined ? 0 : args.integer(maxPerHostRaw, '--max-per-host', 1, 1000);
  const strategyName = invocation.string('placement');
  const hosts = invocation.list('hosts');
  let placement: Placement | undefined;
  if (strategyName !== undefined && strategyName !== 'hosts' && strategyName !== 'image-hosts')
    args.fail(`--placement must be hosts or image-hosts, got ${JSON.stringify(strategyName)}`);
  if (strategyName === 'image-hosts') {
    if (hosts.length > 0) args.fail('--placement image-hosts chooses the hosts itself: leave out --hosts');
    if (source.$case !== 'image') args.fail('--placement image-hosts needs --image');
    placement = { strategy: Placement_Strategy.STRATEGY_WHERE_IMAGE_IS, hosts: [], maxClonesPerHost };
  } else if (hosts.length > 0) {
    placement = { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: args.hosts(hosts), maxClonesPerHost };
  } else if (strategyName === 'hosts') {
    args.fail('--placement hosts needs --hosts <h1,h2>');
  } else if (maxClonesPerHost > 0) {
    placement =
      source.$case === 'image'
        ? { strategy: Placement_Strategy.STRATEGY_WHERE_IMAGE_IS, hosts: [], maxClonesPerHost }
        : args.fail('--max-per-host needs --hosts or an image source');
  }
  const dataDisk = invocation.string('data-disk');
  // The server refuses it too (INVALID_ARGUMENT naming `delivery`); said here before any call.
  if (invocation.flag('stream') && source.$case !== 'image')
    args.fail("--stream needs --image: a VM's clones are made on its own host, where nothing has to arrive");
  const diskBackendFlag = invocation.string('disk-backend');
  const diskBackend = diskBackendFlag === undefined ? DiskBackend.DISK_BACKEND_UNSPECIFIED : args.diskBackend(diskBackendFlag, '--disk-backend');
  // The server refuses it too (INVALID_ARGUMENT naming `disk_backend`); said here before any call.
  if (invocation.flag('stream') && diskBackend === DiskBackend.DISK_BACKEND_REFLINK_COPY)
    args.fail("--stream cannot make reflink copies: a reflink copy needs the image's complete files (use --disk-backend qcow2-overlay to stream)");
  return {
    dataDiskBytes: dataDisk === undefined ? '0' : String(args.bytes(dataDisk, '--data-disk', 1024 * 1024, 16 * 2 ** 40)),
    guestConfiguration: undefined,
    source,
    placement,
    delivery: invocation.flag('stream') ? CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM : CloneVirtualMachinesRequest_Delivery.DELIVERY_UNSPECIFIED,
    diskBackend,
    count,
    nameTemplate: invocation.string('template') ?? '',
    start: invocation.flag('start'),
    requestId: invocation.string('request-id') ?? randomUUID(),
  };
}

/** The RebaseVirtualMachines request from the flags; a usage error for contradictory ones. */
export function rebaseRequest(invocation: Invocation, args: ArgumentReader): RebaseVirtualMachinesRequest {
  const targetImageVersion = args.imageOrVersion(invocation.string('to-version')!, '--to-version');
  const filter = invocation.string('filter');
  if (filter !== undefined && invocation.flag('all')) args.fail('give either --filter or --all, not both');
  // An empty filter moves every clone of the image: say so with --all rather than by leaving --filter out.
  if ((filter === undefined || filter.trim() === '') && !invocation.flag('all'))
    args.fail(`which clones? give --filter '<expr>' (like source_image_version = "images/<image>/versions/<n>") or --all`);
  const host = invocation.string('host');
  const count = (flag: string): number => {
    const raw = invocation.string(flag);
    return raw === undefined ? 0 : args.integer(raw, `--${flag}`, 1, 100);
  };
  const timeout = invocation.string('shutdown-timeout');
  const timeoutMs = timeout === undefined ? undefined : args.durationMs(timeout, '--shutdown-timeout');
  if (timeoutMs !== undefined && timeoutMs > 3_600_000) args.fail(`--shutdown-timeout must be at most 1h, got ${JSON.stringify(timeout)}`);
  return {
    parent: host === undefined ? EVERY_HOST : args.host(host, '--host'),
    filter: filter?.trim() ?? '',
    targetImageVersion,
    canaryCount: count('canary'),
    maxPerHost: count('max-per-host'),
    restart: invocation.flag('restart'),
    newInstanceId: invocation.flag('new-instance-id'),
    shutdownTimeout: timeoutMs === undefined ? undefined : toDuration(timeoutMs),
    requestId: invocation.string('request-id') ?? randomUUID(),
  };
}

/** The per-clone result table of a rebase; exit 7 when some clones failed. */
function printRebaseResult(context: CliContext, response: RebaseVirtualMachinesResponse): number {
  const failed = response.results.filter((result) => result.status !== undefined && result.status.code !== 0);
  if (context.out.format === 'json') context.out.json(RebaseVirtualMachinesResponse.toJSON(response));
  else {
    const rows = response.results.map((result) => {
      const error = result.status !== undefined && result.status.code !== 0;
      return [
        shortVirtualMachineName(result.virtualMachine),
        error ? 'FAILED' : result.previousImageVersion === result.imageVersion ? 'ALREADY' : 'MOVED',
        bareId(result.previousImageVersion) || '-',
        bareId(result.imageVersion) || '-',
        result.canary ? 'yes' : 'no',
        result.restarted ? 'yes' : 'no',
        error ? explain(readStatus(result.status!), context.target('cloning')).split('\n')[0]! : '',
      ];
    });
    const headers = ['vm', 'result', 'from', 'to', 'canary', 'started', 'error'];
    context.out.line(
      failed.length > 0
        ? table(headers, rows)
        : table(
            headers.slice(0, 6),
            rows.map((row) => row.slice(0, 6)),
          ),
    );
    context.out.note(`${response.results.length - failed.length} clone(s) on the target, ${failed.length} failed (they stay on their previous version)`);
  }
  return failed.length > 0 ? EXIT.PARTIAL : EXIT.OK;
}

function printCloneResult(context: CliContext, response: CloneVirtualMachinesResponse): number {
  const failed = response.clones.filter((clone) => cloneResult_StateToJSON(clone.state) !== 'STATE_DONE');
  if (context.out.format === 'json') context.out.json(CloneVirtualMachinesResponse.toJSON(response));
  else {
    const rows = response.clones.map((clone) => [
      clone.virtualMachine ? shortVirtualMachineName(clone.virtualMachine) : `${bareId(clone.host)}/${clone.domainName}`,
      enumWord(cloneResult_StateToJSON(clone.state), 'STATE_'),
      clone.started ? 'yes' : 'no',
      clone.error ? explain(readStatus(clone.error), context.target('cloning')).split('\n')[0]! : '',
    ]);
    context.out.line(
      failed.length > 0
        ? table(['vm', 'state', 'started', 'error'], rows)
        : table(
            ['vm', 'state', 'started'],
            rows.map((row) => row.slice(0, 3)),
          ),
    );
    const streamed = response.clones.filter((clone) => clone.baseProgress !== undefined && cloneResult_StateToJSON(clone.state) === 'STATE_DONE').length;
    context.out.note(
      `${response.clones.length - failed.length} clone(s) made${streamed > 0 ? ` (${streamed} streamed while the image arrived)` : ''}, ${failed.length} failed`,
    );
  }
  return failed.length > 0 ? EXIT.PARTIAL : EXIT.OK;
}

/** The version number a clone stands on, `-` for VMs not cloned from an image. */
function imageVersionText(vm: VirtualMachine): string {
  const name = vm.sourceImageVersion || vm.lineage?.imageVersion || '';
  return name ? String(versionNumberOf(name) ?? '?') : '-';
}

/** Reads a related resource for the lineage; undefined when it is gone. */
async function optional<T>(read: () => Promise<T>): Promise<T | undefined> {
  try {
    return await read();
  } catch (error) {
    if (error instanceof CliError && error.exitCode === EXIT.NOT_FOUND) return undefined;
    throw error;
  }
}

async function showVirtualMachine(context: CliContext, name: string): Promise<number> {
  const vm = await context.call<VirtualMachine>('inventory', (cb) => context.inventory.getVirtualMachine({ name }, cb));
  const lineage = vm.lineage;
  const [host, replica, image, sourceVm] = await Promise.all([
    optional(() => context.call<Host>('inventory', (cb) => context.inventory.getHost({ name: vm.host }, cb))),
    lineage?.replica
      ? optional(() => context.call<ImageReplica>('inventory', (cb) => context.inventory.getImageReplica({ name: lineage.replica }, cb)))
      : Promise.resolve(undefined),
    lineage?.image
      ? optional(() => context.call<Image>('inventory', (cb) => context.inventory.getImage({ name: lineage.image, view: ImageView.IMAGE_VIEW_BASIC }, cb)))
      : Promise.resolve(undefined),
    lineage?.sourceVirtualMachine
      ? optional(() => context.call<VirtualMachine>('inventory', (cb) => context.inventory.getVirtualMachine({ name: lineage.sourceVirtualMachine }, cb)))
      : Promise.resolve(undefined),
  ]);
  const versionName = vm.sourceImageVersion || lineage?.imageVersion || '';
  const latest = image ? versionOf(image) : undefined;
  if (context.out.format === 'json') {
    context.out.json({
      virtualMachine: VirtualMachine.toJSON(vm),
      lineage: {
        overlays: lineage?.overlays ?? [],
        imageReplica: replica ? ImageReplica.toJSON(replica) : null,
        image: image ? Image.toJSON(image) : null,
        sourceVirtualMachine: sourceVm ? VirtualMachine.toJSON(sourceVm) : null,
        host: host ? Host.toJSON(host) : null,
      },
    });
    return EXIT.OK;
  }
  context.out.line(
    keyValues([
      ['vm', vm.name],
      ['domain', `${vm.domainName} (uuid ${vm.uuid || '-'})`],
      ['state', virtualMachineState(vm)],
      ['size', `${vm.vcpuCount} vCPU, ${formatBytes(vm.memoryBytes)} memory`],
      ['managed', vm.managed ? 'yes (a cowherd clone)' : 'no (not created by cowherd)'],
      ['cloned from', vm.sourceImage || (lineage?.sourceVirtualMachine ? shortVirtualMachineName(lineage.sourceVirtualMachine) : '-')],
      ...(versionName
        ? ([
            [
              'image version',
              `${versionName}${image && latest !== undefined && latest !== versionNumberOf(versionName) ? ` (the image's latest is ${latest})` : ''}`,
            ],
          ] as const)
        : []),
      ...(lineage?.previousImageVersion
        ? ([
            [
              'previous version',
              `${lineage.previousImageVersion} (\`cowherd vms rebase --host ${bareId(vm.host)} --filter 'domain_name = "${vm.domainName}"' --to-version ${bareId(lineage.previousImageVersion)}\` moves it back)`,
            ],
          ] as const)
        : []),
      ...(vm.managed
        ? ([
            [
              'disk backend',
              lineage?.diskBackend === DiskBackend.DISK_BACKEND_REFLINK_COPY
                ? 'reflink-copy (full copies sharing blocks with the base: it depends on no image file)'
                : diskBackendWord(lineage?.diskBackend ?? DiskBackend.DISK_BACKEND_UNSPECIFIED, "the host's standard"),
            ],
          ] as const)
        : []),
      ['guest identity', vm.guestConfigurationDigest ? `cloud-init seed, configuration sha256:${vm.guestConfigurationDigest.slice(0, 16)}` : '-'],
      ['dependents', vm.dependentVirtualMachines.length > 0 ? vm.dependentVirtualMachines.map(shortVirtualMachineName).join(', ') : '-'],
      ['created', formatTime(vm.createTime)],
    ]),
  );
  context.out.line();
  context.out.line(
    vm.disks.length === 0
      ? 'disks: none'
      : table(
          ['disk', 'format', 'virtual size', 'allocated', 'path', 'backing'],
          vm.disks.map((disk) => [
            disk.persistent ? `${disk.target} (persistent)` : disk.target,
            enumWord(diskFormatToJSON(disk.format), 'DISK_FORMAT_').toLowerCase(),
            formatBytes(disk.virtualSizeBytes),
            formatBytes(disk.allocatedBytes),
            disk.path,
            disk.backingChain.map((file) => file.path).join(' <- ') || '-',
          ]),
        ),
  );
  context.out.line();
  context.out.line('lineage:');
  // The chain runs through the overlays on the image (system disks); a clone's own files beside them (its
  // persistent data disk, its cloud-init seed) have no base and are named on the VM's line instead.
  const overlays = lineage?.overlays ?? [];
  // A reflink clone's system disks are copies of its base without a chain: they depend on nothing below.
  const reflink = lineage?.diskBackend === DiskBackend.DISK_BACKEND_REFLINK_COPY;
  const own = overlays.filter((overlay) => !vm.disks.some((disk) => disk.path === overlay && disk.backingChain.length > 0));
  const ownText = own.map((path) => {
    const disk = vm.disks.find((candidate) => candidate.path === path);
    const file = path.slice(path.lastIndexOf('/') + 1);
    // The agent writes the seed as clones/<name>/cidata.iso (services/agent/README.md).
    return `${file} ${disk?.persistent ? 'persistent' : file === 'cidata.iso' ? 'cloud-init seed' : reflink ? 'reflink copy' : 'without a base'}`;
  });
  const tree: string[] = [`${vm.domainName} (VM, ${virtualMachineState(vm)}${ownText.length > 0 ? `; beside its overlay: ${ownText.join(', ')}` : ''})`];
  for (const overlay of overlays) if (!own.includes(overlay)) tree.push(`overlay ${overlay}`);
  if (lineage?.replica)
    tree.push(
      replica
        ? `${reflink ? 'copied from replica' : 'base replica'} ${replica.name} (${replicaState(replica)}, ${replica.path})`
        : `${reflink ? 'copied from replica' : 'base replica'} ${lineage.replica} (gone from the inventory)`,
    );
  if (lineage?.image)
    tree.push(
      image
        ? `image ${image.name}${versionName ? ` version ${versionNumberOf(versionName) ?? '?'}` : ''} (${imageState(image)}, ${formatBytes(image.torrent?.totalBytes)}, origin ${image.originHost})`
        : `image ${lineage.image} (gone from the catalog)`,
    );
  if (lineage?.sourceVirtualMachine)
    tree.push(
      sourceVm
        ? `source VM ${shortVirtualMachineName(sourceVm.name)} (${virtualMachineState(sourceVm)})`
        : `source VM ${shortVirtualMachineName(lineage.sourceVirtualMachine)} (gone)`,
    );
  tree.push(host ? `host ${host.name} (${hostState(host)}, ${hypervisorWord(host.hypervisor)})` : `host ${vm.host} (gone)`);
  if (!lineage) tree.splice(1, 0, 'not a cowherd clone: no lineage recorded');
  tree.forEach((entry, depth) => context.out.line(depth === 0 ? `  ${entry}` : `  ${'   '.repeat(depth - 1)}└─ ${entry}`));
  return EXIT.OK;
}
