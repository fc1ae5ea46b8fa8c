/** `cowherd hosts`: join tokens, the host list, one host, settings (the image directory's watermark), draining and removing. */
import { JoinToken, joinToken_StateToJSON } from '../gen/cowherd/certauthority/v1/resources.js';
import { Host, ImageReplica, VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import type { CommandSpec } from './command-line.js';
import type { CliContext } from './cli-context.js';
import { EXIT } from './exit-codes.js';
import { AGENT_NODE_OPTIONS } from '../common/platform/node-options.js';
import {
  bareId,
  hostState,
  hypervisorWord,
  labelText,
  listHosts,
  listReplicas,
  listVirtualMachines,
  replicaState,
  shortVirtualMachineName,
  versionNumberOf,
  virtualMachineState,
} from './fleet-reads.js';
import { enumWord, formatAge, formatBytes, formatTime, keyValues, percent, table } from './output.js';
import { ArgumentReader, toDuration } from './resource-arguments.js';

const HOST_ARGUMENT = { name: 'host', description: 'the host id, like kvm-01 (or hosts/kvm-01)' };

export const HOSTS_COMMAND: CommandSpec<CliContext> = {
  name: 'hosts',
  summary: 'enroll, list, inspect, drain and remove virtualization hosts',
  subcommands: [
    {
      name: 'join-token',
      summary: 'create a single-use join token that lets a new host enroll (the token is shown once)',
      positionals: [{ name: 'host', description: "the new host's id, an RFC 1123 label like kvm-02" }],
      options: [{ name: 'ttl', value: '<duration>', description: 'how long the token stays usable, 1m to 24h (default 1h)' }],
      details:
        'On the new host, start the agent with COWHERD_JOIN_TOKEN=<token> and COWHERD_ENROLL_ADDRESS=<CA host>:7441;\nit makes its key locally and pins the CA by the hash inside the token.',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const host = bareId(args.host(invocation.positionals[0]!));
        const ttl = invocation.string('ttl');
        const token = await context.call<JoinToken>('ca', (cb) =>
          context.certificateAuthority.createJoinToken(
            { host, ttl: ttl === undefined ? undefined : toDuration(args.durationMs(ttl, '--ttl')), requestId: '' },
            cb,
          ),
        );
        if (context.out.format === 'json') context.out.json(JoinToken.toJSON(token));
        else {
          context.out.line(token.token);
          context.out.note(
            `join token ${token.name} for host ${host}, ${enumWord(joinToken_StateToJSON(token.state), 'STATE_')}, expires ${formatTime(token.expireTime)}; single use, shown only now.`,
          );
          context.out.note(
            `on ${host}: COWHERD_HOST_ID=${host} COWHERD_JOIN_TOKEN=<token> COWHERD_ENROLL_ADDRESS=<CA host>:7441 node --import tsx ${AGENT_NODE_OPTIONS.join(' ')} services/agent/main.ts`,
          );
        }
        return EXIT.OK;
      },
    },
    {
      name: 'list',
      summary: 'list the hosts with their state, hypervisor, capacity and last heartbeat',
      options: [{ name: 'filter', value: '<expr>', description: 'AIP-160 filter: state = READY, hypervisor = KVM, draining = true, labels.rack = "r3"' }],
      run: async (invocation, context) => {
        const hosts = await listHosts(context, invocation.string('filter') ?? '');
        if (context.out.format === 'json') {
          context.out.json({ hosts: hosts.map((host) => Host.toJSON(host)) });
          return EXIT.OK;
        }
        if (hosts.length === 0) {
          context.out.note('no hosts yet: `cowherd hosts join-token <host>` makes a token for the first one');
          return EXIT.OK;
        }
        context.out.line(
          table(
            ['host', 'state', 'hypervisor', 'cpus', 'memory free', 'disk free', 'agent', 'heartbeat', 'labels'],
            hosts.map((host) => [
              bareId(host.name),
              hostState(host),
              hypervisorWord(host.hypervisor),
              String(host.cpuCount),
              `${formatBytes(host.memoryFreeBytes)} / ${formatBytes(host.memoryBytes)}`,
              `${formatBytes(host.imageDirectoryFreeBytes)} / ${formatBytes(host.imageDirectoryTotalBytes)}`,
              host.agentVersion || '-',
              formatAge(host.lastHeartbeatTime),
              labelText(host.labels),
            ]),
          ),
        );
        return EXIT.OK;
      },
    },
    {
      name: 'show',
      summary: 'show one host with its image replicas and VMs',
      positionals: [HOST_ARGUMENT],
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).host(invocation.positionals[0]!);
        const host = await context.call<Host>('inventory', (cb) => context.inventory.getHost({ name }, cb));
        const [replicas, vms] = await Promise.all([listReplicas(context, name), listVirtualMachines(context, name)]);
        if (context.out.format === 'json') {
          context.out.json({
            host: Host.toJSON(host),
            imageReplicas: replicas.map((replica) => ImageReplica.toJSON(replica)),
            virtualMachines: vms.map((vm) => VirtualMachine.toJSON(vm)),
          });
          return EXIT.OK;
        }
        context.out.line(
          keyValues([
            ['host', host.name],
            ['hostname', host.hostname || '-'],
            ['state', `${hostState(host)}${host.draining ? ' (draining: no new clones or replicas)' : ''}`],
            ['hypervisor', `${hypervisorWord(host.hypervisor)} (${host.hypervisorDetail || '-'})`],
            ['libvirt', host.libvirtUri || '-'],
            ['agent', `${host.agentEndpoint || '-'} version ${host.agentVersion || '-'}`],
            ['cpus', String(host.cpuCount)],
            ['memory', `${formatBytes(host.memoryFreeBytes)} free of ${formatBytes(host.memoryBytes)}`],
            [
              'image directory',
              `${host.imageDirectory || '-'} (${formatBytes(host.imageDirectoryFreeBytes)} free of ${formatBytes(host.imageDirectoryTotalBytes)})`,
            ],
            ['reflink copies', host.imageDirectoryReflinks ? 'yes (clones may use --disk-backend reflink-copy)' : 'no'],
            [
              'image dir watermark',
              host.imageDirectoryHighWatermarkPercent > 0
                ? `${host.imageDirectoryHighWatermarkPercent}% (\`cowherd images gc\` removes unused replicas above it)`
                : 'off',
            ],
            ['transfer limits', `up ${limit(host.transferLimits?.uploadBytesPerSecond)}, down ${limit(host.transferLimits?.downloadBytesPerSecond)}`],
            ['labels', labelText(host.labels)],
            ['enrolled', formatTime(host.enrollTime)],
            ['last heartbeat', formatTime(host.lastHeartbeatTime)],
          ]),
        );
        context.out.line();
        context.out.line(
          replicas.length === 0
            ? 'images: none'
            : table(
                ['image', 'replica state', 'origin', 'dependent vms', 'version', 'last used'],
                replicas.map((replica) => [
                  bareId(replica.image),
                  replicaState(replica),
                  replica.origin ? 'yes' : 'no',
                  String(replica.dependentVirtualMachines.length),
                  String(versionNumberOf(replica.imageVersion) ?? 1),
                  formatAge(replica.lastUseTime),
                ]),
              ),
        );
        context.out.line();
        context.out.line(
          vms.length === 0
            ? 'vms: none'
            : table(
                ['vm', 'state', 'source', 'managed'],
                vms.map((vm) => [
                  shortVirtualMachineName(vm.name),
                  virtualMachineState(vm),
                  vm.sourceImage || vm.lineage?.sourceVirtualMachine || '-',
                  vm.managed ? 'yes' : 'no',
                ]),
              ),
        );
        return EXIT.OK;
      },
    },
    {
      name: 'update',
      summary: "change a host's settings: the image directory's high watermark for garbage collection",
      positionals: [HOST_ARGUMENT],
      options: [
        {
          name: 'image-dir-watermark',
          value: '<percent>',
          description: "above this use of the image directory's file system (1-99 %), `images gc` removes unused replicas; 0 turns it off",
          required: true,
        },
      ],
      details:
        'Example: cowherd hosts update kvm-01 --image-dir-watermark 80\n' +
        'Garbage collection then removes the least recently used replicas that nothing uses (never an origin, never the last AVAILABLE\n' +
        'copy of a version, never one with clones on it) until use is below the watermark.',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const name = args.host(invocation.positionals[0]!);
        const percent = args.integer(invocation.string('image-dir-watermark')!.replace(/%$/, ''), '--image-dir-watermark', 0, 99);
        const host = await context.call<Host>('inventory', (cb) =>
          context.inventory.updateHost(
            { host: Host.fromPartial({ name, imageDirectoryHighWatermarkPercent: percent }), updateMask: ['image_directory_high_watermark_percent'] },
            cb,
          ),
        );
        if (context.out.format === 'json') context.out.json(Host.toJSON(host));
        else
          context.out.line(
            host.imageDirectoryHighWatermarkPercent > 0
              ? `${host.name}: image directory watermark ${host.imageDirectoryHighWatermarkPercent}% (now ${usedPercent(host)} used)`
              : `${host.name}: no image directory watermark (garbage collection keeps every replica there that its image's policy keeps)`,
          );
        return EXIT.OK;
      },
    },
    {
      name: 'drain',
      summary: 'stop placing new clones and replicas on a host (it keeps its VMs and keeps seeding)',
      positionals: [HOST_ARGUMENT],
      options: [{ name: 'undo', description: 'take the host back into placement' }],
      details: 'Retiring a host: drain it, delete or move its clones (host.drained is published when none are left), then `cowherd hosts remove`.',
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).host(invocation.positionals[0]!);
        const draining = !invocation.flag('undo');
        const host = await context.call<Host>('inventory', (cb) =>
          context.inventory.updateHost({ host: Host.fromPartial({ name, draining }), updateMask: ['draining'] }, cb),
        );
        if (context.out.format === 'json') context.out.json(Host.toJSON(host));
        else
          context.out.line(
            draining
              ? `${host.name} is draining (${hostState(host)}): no new clones or replicas go there; its VMs stay`
              : `${host.name} takes new clones and replicas again (${hostState(host)})`,
          );
        return EXIT.OK;
      },
    },
    {
      name: 'remove',
      summary: 'remove a host from the fleet and revoke its certificates (files and domains on it stay)',
      positionals: [HOST_ARGUMENT],
      options: [{ name: 'force', description: "remove even while cowherd-managed VMs or an image's last available copy are on it" }],
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).host(invocation.positionals[0]!);
        await context.call('inventory', (cb) => context.inventory.deleteHost({ name, force: invocation.flag('force') }, cb));
        if (context.out.format === 'json') context.out.json({ name, removed: true });
        else context.out.line(`removed ${name}; its certificates are revoked, so its agent can no longer act (it re-joins only with a new join token)`);
        return EXIT.OK;
      },
    },
  ],
};

function limit(value: string | undefined): string {
  return Number(value ?? 0) > 0 ? `${formatBytes(value)}/s` : 'unlimited';
}

/** How full the image directory's file system is, like `63%`. */
function usedPercent(host: Host): string {
  const total = Number(host.imageDirectoryTotalBytes);
  return percent(total - Number(host.imageDirectoryFreeBytes), total);
}
