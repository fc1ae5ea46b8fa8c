/** What distribution reads from inventory, over gRPC with the service's own identity. */
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import type { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { DiskBackend } from '../gen/cowherd/common/v1/types.js';
import type { Host, VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import { call } from '../common/platform/client.js';
import { readAllPages } from '../common/platform/list-pages.js';

/** undefined for NOT_FOUND, the value otherwise; other errors are thrown. */
async function orUndefined<T>(promise: Promise<T>): Promise<T | undefined> {
  try {
    return await promise;
  } catch (error) {
    if ((error as ServiceError).code === GrpcStatus.NOT_FOUND) return undefined;
    throw error;
  }
}

/** Reads for publish and delete. */
export function inventoryReader(client: InventoryServiceClient) {
  return {
    getVirtualMachine: (name: string): Promise<VirtualMachine | undefined> => orUndefined(call<VirtualMachine>((cb) => client.getVirtualMachine({ name }, cb))),
    getHost: (name: string): Promise<Host | undefined> => orUndefined(call<Host>((cb) => client.getHost({ name }, cb))),
    listHosts: (): Promise<Host[]> =>
      readAllPages(async (pageToken) => {
        const page = await call<{ hosts: Host[]; nextPageToken: string }>((cb) => client.listHosts({ pageSize: 1000, pageToken, filter: '' }, cb));
        return { items: page.hosts, nextPageToken: page.nextPageToken };
      }),
    /**
     * The VMs under `parent` whose source_image is `image` and whose disks depend on it: reflink copies
     * (lineage.disk_backend REFLINK_COPY) are left out, so that a version or replica can be deleted under them.
     */
    dependents: (parent: string, image: string): Promise<VirtualMachine[]> =>
      readAllPages<VirtualMachine>(async (pageToken) => {
        const page = await call<{ virtualMachines: VirtualMachine[]; nextPageToken: string }>((cb) =>
          client.listVirtualMachines({ parent, pageSize: 1000, pageToken, filter: `source_image = ${JSON.stringify(image)}` }, cb),
        ).catch((error: { code?: number }) => {
          // A host that no longer exists (NOT_FOUND as a parent) has no VM records left: no dependents.
          if (error.code === GrpcStatus.NOT_FOUND) return { virtualMachines: [], nextPageToken: '' };
          throw error;
        });
        return { items: page.virtualMachines, nextPageToken: page.nextPageToken };
      }).then((vms) => vms.filter((vm) => vm.lineage?.diskBackend !== DiskBackend.DISK_BACKEND_REFLINK_COPY)),
  };
}
