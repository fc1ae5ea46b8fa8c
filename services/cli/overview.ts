/**
 * The fleet overview (the 2011 tool's menu item 4): every host with its state, the images it holds and
 * its VMs with their state and what they were cloned from. Three List calls, whatever the fleet's size.
 */
import { readFileSync } from 'node:fs';
import { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { Host, ImageReplica, VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import { EVERY_HOST, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';
import { call, createClient } from '../common/platform/client.js';
import { identityUri } from '../common/platform/identity.js';
import { readAllPages } from '../common/platform/list-pages.js';
import { mutualTlsChannelCredentialsFromPem, type TlsFiles } from '../common/platform/tls.js';
import type { CommandSpec } from './command-line.js';
import type { CliContext } from './cli-context.js';
import { EXIT } from './exit-codes.js';
import { bareId, hostState, hypervisorWord, listHosts, listReplicas, listVirtualMachines, replicaState, virtualMachineState } from './fleet-reads.js';
import { formatBytes, table } from './output.js';

/** One host with what it holds. */
export interface HostOverview {
  readonly host: Host;
  readonly imageReplicas: readonly ImageReplica[];
  readonly virtualMachines: readonly VirtualMachine[];
}

/** Groups replicas and VMs under their hosts, hosts in name order. */
export function groupByHost(hosts: readonly Host[], replicas: readonly ImageReplica[], vms: readonly VirtualMachine[]): HostOverview[] {
  return hosts.map((host) => ({
    host,
    imageReplicas: replicas.filter((replica) => replica.host === host.name),
    virtualMachines: vms.filter((vm) => vm.host === host.name),
  }));
}

/** The overview as text lines. */
export function renderOverview(overview: readonly HostOverview[]): string[] {
  if (overview.length === 0) return ['no hosts yet'];
  const lines: string[] = [];
  for (const { host, imageReplicas, virtualMachines } of overview) {
    lines.push(
      `${bareId(host.name)}  ${hostState(host)}  ${hypervisorWord(host.hypervisor)}  ${host.cpuCount} CPUs  ${formatBytes(host.memoryFreeBytes)} of ${formatBytes(host.memoryBytes)} free  ${virtualMachines.length} VMs`,
    );
    lines.push(
      `  images: ${imageReplicas.length === 0 ? 'none' : imageReplicas.map((replica) => `${bareId(replica.image)} (${replicaState(replica)}${replica.origin ? ', origin' : ''})`).join(', ')}`,
    );
    if (virtualMachines.length > 0) {
      const rows = virtualMachines.map((vm) => [
        vm.domainName,
        virtualMachineState(vm),
        vm.sourceImage ? bareId(vm.sourceImage) : vm.lineage?.sourceVirtualMachine ? virtualMachineId(vm.lineage.sourceVirtualMachine) : '-',
        vm.managed ? 'yes' : 'no',
      ]);
      for (const line of table(['vm', 'state', 'cloned from', 'managed'], rows).split('\n')) lines.push(`    ${line}`);
    }
  }
  return lines;
}

export const OVERVIEW_COMMAND: CommandSpec<CliContext> = {
  name: 'overview',
  summary: 'every host with its images and VMs',
  run: async (_invocation, context) => {
    const [hosts, replicas, vms] = await Promise.all([listHosts(context), listReplicas(context), listVirtualMachines(context)]);
    const overview = groupByHost(hosts, replicas, vms);
    if (context.out.format === 'json') {
      context.out.json({
        hosts: overview.map((entry) => ({
          host: Host.toJSON(entry.host),
          imageReplicas: entry.imageReplicas.map((replica) => ImageReplica.toJSON(replica)),
          virtualMachines: entry.virtualMachines.map((vm) => VirtualMachine.toJSON(vm)),
        })),
      });
    } else {
      for (const line of renderOverview(overview)) context.out.line(line);
    }
    return EXIT.OK;
  },
};

/** Lines describing every host, read from inventory with the admin credentials (what `fleet up` prints). */
export async function overviewLines(inventoryAddress: string, credentials: TlsFiles, options: { waitForHostsMs?: number } = {}): Promise<string[]> {
  const client = createClient(
    InventoryServiceClient,
    inventoryAddress,
    mutualTlsChannelCredentialsFromPem(
      {
        certificatePem: readFileSync(credentials.certificateFile, 'utf8'),
        privateKeyPem: readFileSync(credentials.privateKeyFile, 'utf8'),
        caPem: readFileSync(credentials.caFile, 'utf8'),
      },
      identityUri('service', 'inventory'),
    ),
    { defaultDeadlineMs: 10_000 },
  );
  try {
    const deadline = Date.now() + (options.waitForHostsMs ?? 0);
    let hosts: Host[] = [];
    do {
      hosts = await readAllPages(async (pageToken) => {
        const page = await call<{ hosts: Host[]; nextPageToken: string }>((cb) => client.listHosts({ pageSize: 1000, pageToken, filter: '' }, cb));
        return { items: page.hosts, nextPageToken: page.nextPageToken };
      });
      if (hosts.length > 0 || Date.now() >= deadline) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    } while (true);
    const replicas = await readAllPages(async (pageToken) => {
      const page = await call<{ imageReplicas: ImageReplica[]; nextPageToken: string }>((cb) =>
        client.listImageReplicas({ parent: EVERY_HOST, pageSize: 1000, pageToken, filter: '' }, cb),
      );
      return { items: page.imageReplicas, nextPageToken: page.nextPageToken };
    });
    const vms = await readAllPages(async (pageToken) => {
      const page = await call<{ virtualMachines: VirtualMachine[]; nextPageToken: string }>((cb) =>
        client.listVirtualMachines({ parent: EVERY_HOST, pageSize: 1000, pageToken, filter: '' }, cb),
      );
      return { items: page.virtualMachines, nextPageToken: page.nextPageToken };
    });
    return renderOverview(groupByHost(hosts, replicas, vms));
  } finally {
    client.close();
  }
}

/** `hosts/a/virtualMachines/b` -> `b`. */
function virtualMachineId(name: string): string {
  return VIRTUAL_MACHINE_NAME.parse(name)?.virtualMachine ?? name;
}
