/** The fleet overview (the 2011 tool's menu item 4): every host with its state and its VMs. */
import { readFileSync } from 'node:fs';
import { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { host_StateToJSON, virtualMachine_StateToJSON, type Host, type VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import { hypervisorToJSON } from '../gen/cowherd/common/v1/types.js';
import { call, createClient } from '../common/client.js';
import { mutualTlsChannelCredentialsFromPem, type TlsFiles } from '../common/tls.js';


/** Lines describing every host and VM, read from inventory with the admin credentials. */
export async function overviewLines(inventoryAddress: string, credentials: TlsFiles, options: { waitForHostsMs?: number } = {}): Promise<string[]> {
  const client = createClient(InventoryServiceClient, inventoryAddress, mutualTlsChannelCredentialsFromPem({
    certificatePem: readFileSync(credentials.certificateFile, 'utf8'),
    privateKeyPem: readFileSync(credentials.privateKeyFile, 'utf8'),
    caPem: readFileSync(credentials.caFile, 'utf8'),
  }), { defaultDeadlineMs: 10_000 });
  try {
    const deadline = Date.now() + (options.waitForHostsMs ?? 0);
    let hosts: Host[] = [];
    do {
      hosts = (await call<{ hosts: Host[] }>((cb) => client.listHosts({ pageSize: 1000, pageToken: '', filter: '' }, cb))).hosts;
      if (hosts.length > 0 || Date.now() >= deadline) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    } while (true);
    const lines: string[] = [];
    for (const host of hosts) {
      const vms: VirtualMachine[] = [];
      let pageToken = '';
      do {
        const page = await call<{ virtualMachines: VirtualMachine[]; nextPageToken: string }>((cb) => client.listVirtualMachines({ parent: host.name, pageSize: 1000, pageToken, filter: '' }, cb));
        vms.push(...page.virtualMachines);
        pageToken = page.nextPageToken;
      } while (pageToken !== '');
      lines.push(`${host.name}  ${host_StateToJSON(host.state).replace('STATE_', '')}  ${hypervisorToJSON(host.hypervisor).replace('HYPERVISOR_', '')} (${host.hypervisorDetail})  ${host.cpuCount} CPUs  ${vms.length} VMs`);
      for (const vm of vms) lines.push(`  ${vm.domainName.padEnd(32)} ${virtualMachine_StateToJSON(vm.state).replace('STATE_', '').padEnd(10)} ${vm.disks.length} disk(s)${vm.sourceImage ? `  from ${vm.sourceImage}` : ''}`);
    }
    return lines;
  } finally {
    client.close();
  }
}
