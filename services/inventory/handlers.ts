/** InventoryService handlers: validation and message mapping around Inventory and its indexes. */
import { InventoryServiceService } from '../gen/cowherd/inventory/v1/inventory_service.js';
import {
  Host,
  Host_State,
  Image,
  Image_State,
  ImageReplica,
  ImageReplica_State,
  ImageView,
  VirtualMachine,
  VirtualMachine_State,
  VirtualMachineChange_Type,
} from '../gen/cowherd/inventory/v1/resources.js';
import { DiskBackend, Hypervisor } from '../gen/cowherd/common/v1/types.js';
import { CowherdError } from '../common/platform/errors.js';
import { booleanField, enumField, hostNameField, imageNameField, imageVersionNameField, parseFilter } from '../common/domain/filter.js';
import { findImageVersion, imageVersionRecord, imageViewOf, numberedRecords } from '../common/domain/image-versions.js';
import { pageSizeOf, paginateSorted, type PageTokens } from '../common/platform/pagination.js';
import { EVERY_HOST, HOST_IMAGE_NAME, hostOf, IMAGE_ID, imageVersionNameOfKey, parseImageReference } from '../common/domain/resource-names.js';
import type { Handlers } from '../common/platform/rpc.js';
import { hostIdOf, parseVmName, vmKey, vmNamePrefix, type Inventory } from './inventory.js';

type InventoryService = typeof InventoryServiceService;

/** The handlers of InventoryService. */
export function inventoryHandlers(inventory: Inventory, pageTokens: PageTokens): Handlers<InventoryService> {
  /** The key prefix of a parent's records in the `<host>.<id>` buckets (replicas). */
  const hostParent = (parent: string): string => {
    if (parent === EVERY_HOST) return '';
    return `${hostIdOf(parent, 'parent')}.`;
  };
  /** The name prefix of a parent's VMs (the VM index is ordered by name). */
  const vmParent = (parent: string): string => vmNamePrefix(parent === EVERY_HOST ? undefined : hostIdOf(parent, 'parent'));
  /**
   * NOT_FOUND for a parent host that is not registered, as the proto says: an empty page would tell the
   * caller that a mistyped host has no VMs. Called after every other check, so bad input stays
   * INVALID_ARGUMENT whatever the host.
   */
  const requireParent = async (parent: string): Promise<void> => {
    if (parent !== EVERY_HOST) await inventory.requireHost(hostIdOf(parent, 'parent'));
  };
  return {
    registerHost: async (request) => {
      if (!request.host) throw CowherdError.invalidArgument('host', 'is required');
      return inventory.registerHost(request.host);
    },
    heartbeat: async (request) => {
      const host = await inventory.recordHeartbeat(hostIdOf(request.host, 'host'), request);
      return { heartbeatInterval: { seconds: String(inventory.heartbeat.intervalSeconds), nanos: 0 }, transferLimits: host.transferLimits };
    },
    reportVirtualMachines: async (request) => {
      const host = hostIdOf(request.parent, 'parent');
      const result = await inventory.reportVirtualMachines(host, request.virtualMachines, request.fullSnapshot, request.removedVirtualMachines);
      return { changedCount: result.changed, removedCount: result.removed, revision: '0' };
    },

    getHost: async (request) => {
      const host = inventory.hosts.get(hostIdOf(request.name, 'name'));
      if (!host) throw CowherdError.notFound(request.name);
      return host.value;
    },
    listHosts: async (request) => {
      const matches = parseFilter<Host>(request.filter, {
        state: enumField(Host_State, 'STATE_', (host) => host.state),
        hypervisor: enumField(Hypervisor, 'HYPERVISOR_', (host) => host.hypervisor),
        draining: booleanField((host) => host.draining),
        'labels.*': { read: (host, key) => host.labels[key] ?? [] },
      });
      const all = inventory.hosts
        .valuesWithPrefix('')
        .map((entry) => entry.value)
        .filter(matches);
      const { page, nextPageToken } = paginateSorted(all, (host) => host.name, {
        pageSize: request.pageSize,
        pageToken: request.pageToken,
        query: `hosts|${request.filter}`,
        tokens: pageTokens,
      });
      return { hosts: page, nextPageToken };
    },
    updateHost: async (request) => {
      if (!request.host) throw CowherdError.invalidArgument('host', 'is required');
      const id = hostIdOf(request.host.name, 'host.name');
      const paths: string[] = request.updateMask ?? [];
      if (paths.length === 0 || paths.includes('*'))
        throw CowherdError.invalidArgument(
          'update_mask',
          'must name the fields to change (labels, transfer_limits, draining, image_directory_high_watermark_percent)',
        );
      const allowed = new Set([
        'labels',
        'transfer_limits',
        'transfer_limits.upload_bytes_per_second',
        'transfer_limits.download_bytes_per_second',
        'draining',
        'image_directory_high_watermark_percent',
      ]);
      const bad = paths.find((path) => !allowed.has(path));
      if (bad !== undefined) throw CowherdError.invalidArgument('update_mask', `cannot update ${bad}; updatable: ${[...allowed].join(', ')}`);
      for (const [key, value] of Object.entries(request.host.labels)) {
        if (!/^[a-z][a-z0-9_-]{0,62}$/.test(key) || value.length > 63)
          throw CowherdError.invalidArgument(`host.labels[${key}]`, 'keys are [a-z][a-z0-9_-]{0,62}, values at most 63 characters');
      }
      const limits = request.host.transferLimits;
      for (const [field, value] of [
        ['upload_bytes_per_second', limits?.uploadBytesPerSecond],
        ['download_bytes_per_second', limits?.downloadBytesPerSecond],
      ] as const) {
        if (value !== undefined && Number(value) < 0)
          throw CowherdError.invalidArgument(`host.transfer_limits.${field}`, 'must not be negative (0 means unlimited)');
      }
      const watermark = request.host.imageDirectoryHighWatermarkPercent;
      if (paths.includes('image_directory_high_watermark_percent') && !(Number.isInteger(watermark) && watermark >= 0 && watermark <= 99))
        throw CowherdError.invalidArgument('host.image_directory_high_watermark_percent', 'must be 1 to 99 (percent of the file system), or 0 for none');
      const updated = await inventory.hosts.write(id, (current) => {
        if (!current) throw CowherdError.notFound(request.host!.name);
        const next: Host = {
          ...current,
          transferLimits: { uploadBytesPerSecond: '0', downloadBytesPerSecond: '0', ...current.transferLimits },
          updateTime: new Date(),
        };
        if (paths.includes('labels')) next.labels = { ...request.host!.labels };
        if (paths.includes('transfer_limits') || paths.includes('transfer_limits.upload_bytes_per_second'))
          next.transferLimits!.uploadBytesPerSecond = limits?.uploadBytesPerSecond ?? '0';
        if (paths.includes('transfer_limits') || paths.includes('transfer_limits.download_bytes_per_second'))
          next.transferLimits!.downloadBytesPerSecond = limits?.downloadBytesPerSecond ?? '0';
        if (paths.includes('image_directory_high_watermark_percent')) next.imageDirectoryHighWatermarkPercent = watermark;
        if (paths.includes('draining')) {
          next.draining = request.host!.draining;
          if (current.state !== Host_State.STATE_UNREACHABLE) next.state = next.draining ? Host_State.STATE_DRAINING : Host_State.STATE_READY;
        }
        return next;
      });
      return updated!;
    },
    deleteHost: async (request) => {
      await inventory.deleteHost(hostIdOf(request.name, 'name'), request.force);
      return {};
    },

    getImage: async (request) => {
      const reference = parseImageReference(request.name);
      if (!reference) throw CowherdError.invalidArgument('name', 'must be images/{image} or images/{image}/versions/{version} (a number or an alias)');
      const records = inventory.imageRecords(reference.id);
      const head = inventory.imageHead(reference.id);
      // `images/{image}` is the image view; `.../versions/{number|alias}` one version's record, named by number.
      const image = request.name.includes('/versions/') ? findImageVersion(records, head, reference) : imageViewOf(records, head);
      if (!image) throw CowherdError.notFound(request.name);
      return viewOf(image, request.view === ImageView.IMAGE_VIEW_UNSPECIFIED ? ImageView.IMAGE_VIEW_FULL : request.view);
    },
    listImages: async (request) => {
      const matches = parseFilter<Image>(request.filter, {
        state: enumField(Image_State, 'STATE_', (image) => image.state),
        hypervisor: enumField(Hypervisor, 'HYPERVISOR_', (image) => image.hypervisor),
        origin_host: hostNameField((image) => image.originHost),
        'labels.*': { read: (image, key) => image.labels[key] ?? [] },
      });
      // One entry per image (its view), never one per version; filters apply to the view.
      const all = [...inventory.imageRecordsById()]
        .map(([id, records]) => imageViewOf(records, inventory.imageHead(id)))
        .filter((image): image is Image => image !== undefined && matches(image))
        .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
      const { page, nextPageToken } = paginateSorted(all, (image) => image.name, {
        pageSize: request.pageSize,
        pageToken: request.pageToken,
        query: `images|${request.filter}|${request.view}`,
        tokens: pageTokens,
      });
      return {
        images: page.map((image) => viewOf(image, request.view === ImageView.IMAGE_VIEW_UNSPECIFIED ? ImageView.IMAGE_VIEW_BASIC : request.view)),
        nextPageToken,
      };
    },
    listImageVersions: async (request) => {
      const [collection, id, ...rest] = request.parent.split('/');
      if (collection !== 'images' || id === undefined || !IMAGE_ID.test(id) || rest.length > 0)
        throw CowherdError.invalidArgument('parent', 'must be images/{image}');
      const versions = numberedRecords(inventory.imageRecords(id));
      // Paged by the version number, zero-padded so that the token's order is the numbers' (9 before 10).
      const { page, nextPageToken } = paginateSorted(versions, (entry) => String(entry.version).padStart(9, '0'), {
        pageSize: request.pageSize,
        pageToken: request.pageToken,
        query: `image-versions|${request.parent}|${request.view}`,
        tokens: pageTokens,
      });
      if (versions.length === 0) throw CowherdError.notFound(request.parent);
      const view = request.view === ImageView.IMAGE_VIEW_UNSPECIFIED ? ImageView.IMAGE_VIEW_BASIC : request.view;
      // default_disk_backend is the image's setting, on every version's record.
      const defaultDiskBackend = inventory.imageHead(id)?.defaultDiskBackend ?? 0;
      return { versions: page.map((entry) => viewOf({ ...imageVersionRecord(entry.record), defaultDiskBackend }, view)), nextPageToken };
    },
    getImageReplica: async (request) => {
      const parsed = HOST_IMAGE_NAME.parse(request.name);
      if (!parsed) throw CowherdError.invalidArgument('name', 'must be hosts/{host}/images/{image} or hosts/{host}/images/{image}/versions/{number}');
      const replica = inventory.replicas.get(`${parsed.host}.${parsed.image}`);
      if (!replica) throw CowherdError.notFound(request.name);
      return withDependents(inventory, [replica.value])[0]!;
    },
    listImageReplicas: async (request) => {
      const matches = parseFilter<ImageReplica>(request.filter, {
        image: imageNameField((replica) => replica.image),
        image_version: imageVersionNameField(replicaVersionOf),
        state: enumField(ImageReplica_State, 'STATE_', (replica) => replica.state),
      });
      const prefix = hostParent(request.parent);
      const all = inventory.replicas
        .valuesWithPrefix(prefix)
        .map((entry) => entry.value)
        .filter(matches);
      const { page, nextPageToken } = paginateSorted(all, (replica) => replica.name, {
        pageSize: request.pageSize,
        pageToken: request.pageToken,
        query: `replicas|${request.parent}|${request.filter}`,
        tokens: pageTokens,
      });
      await requireParent(request.parent);
      return { imageReplicas: withDependents(inventory, page), nextPageToken };
    },

    getVirtualMachine: async (request) => {
      const parsed = parseVmName(request.name);
      if (!parsed) throw CowherdError.invalidArgument('name', 'must be hosts/{host}/virtualMachines/{vm}');
      const vm = inventory.vms.get(vmKey(parsed.host, parsed.vm));
      if (!vm) throw CowherdError.notFound(request.name);
      return vm.value;
    },
    listVirtualMachines: async (request) => {
      const matches = parseFilter<VirtualMachine>(request.filter, {
        state: enumField(VirtualMachine_State, 'STATE_', (vm) => vm.state),
        source_image: imageNameField((vm) => vm.sourceImage, { allowEmpty: true }),
        source_image_version: imageVersionNameField(sourceVersionOf, { allowEmpty: true }),
        'lineage.image_version': imageVersionNameField(sourceVersionOf, { allowEmpty: true }),
        managed: booleanField((vm) => vm.managed),
        domain_name: { read: (vm) => vm.domainName, prefix: true },
      });
      const prefix = vmParent(request.parent);
      // Ordered and paged by resource name, as the index is sorted (not by KV key: a dot in an id is '=' there,
      // which sorts differently). The token names the last VM returned, so VMs added or removed between pages
      // neither repeat nor shift the rest. 'by-name' in the query: tokens of the key-paged lists are refused.
      const query = `vms-by-name|${request.parent}|${request.filter}`;
      const after = pageTokens.open(request.pageToken, query);
      await requireParent(request.parent);
      const { entries, more } = inventory.vms.page(prefix, after, pageSizeOf(request.pageSize), matches);
      return {
        virtualMachines: entries.map((entry) => entry.value),
        nextPageToken: more && entries.length > 0 ? pageTokens.seal(entries.at(-1)!.order, query) : '',
      };
    },
    watchVirtualMachines: async (request, context, send) => {
      const prefix = vmParent(request.parent);
      const keyPrefix = hostParent(request.parent);
      await requireParent(request.parent);
      const queue: Array<() => Promise<void>> = [];
      let wake: (() => void) | undefined;
      const unsubscribe = inventory.vms.subscribe((change) => {
        if (!change.key.startsWith(keyPrefix)) return;
        const type =
          change.value === undefined
            ? VirtualMachineChange_Type.TYPE_REMOVED
            : change.previous === undefined
              ? VirtualMachineChange_Type.TYPE_ADDED
              : VirtualMachineChange_Type.TYPE_MODIFIED;
        const virtualMachine = change.value ?? change.previous;
        queue.push(() => send({ type, virtualMachine, revision: String(change.revision) }));
        wake?.();
      });
      try {
        if (request.sendInitialState) {
          for (const entry of inventory.vms.valuesWithPrefix(prefix)) {
            await send({
              type: VirtualMachineChange_Type.TYPE_ADDED,
              virtualMachine: entry.value,
              revision: String(inventory.vms.get(entry.key)?.revision ?? 0),
            });
          }
          await send({ type: VirtualMachineChange_Type.TYPE_SYNCED, virtualMachine: undefined, revision: '0' });
        }
        while (!context.signal.aborted) {
          const next = queue.shift();
          if (next) {
            await next();
            continue;
          }
          await new Promise<void>((resolve) => {
            wake = resolve;
            context.signal.addEventListener('abort', () => resolve(), { once: true });
          });
          wake = undefined;
        }
      } finally {
        unsubscribe();
      }
    },
  };
}

/**
 * The version a VM stands on: its recorded version, else (a clone made before versions existed) its source
 * image, whose only version then was 1. Empty for VMs not cloned from an image.
 */
function sourceVersionOf(vm: VirtualMachine): string {
  return vm.sourceImageVersion || vm.lineage?.imageVersion || vm.sourceImage;
}

/** The version a replica holds, from its name (the storage key is its identity), else as recorded. */
function replicaVersionOf(replica: ImageReplica): string {
  const key = HOST_IMAGE_NAME.parse(replica.name)?.image;
  return key === undefined ? replica.imageVersion : imageVersionNameOfKey(key);
}

/** BASIC leaves out the large torrent metainfo and the read profile. */
function viewOf(image: Image, view: ImageView): Image {
  if (view !== ImageView.IMAGE_VIEW_BASIC) return image;
  return { ...image, readProfile: undefined, ...(image.torrent ? { torrent: { ...image.torrent, metainfo: Buffer.alloc(0) } } : {}) };
}

/**
 * Replicas with dependent_virtual_machines filled in from the VMs' lineage (VirtualMachine.lineage.replica),
 * as GetVirtualMachine shows it. The replica records are written by distribution and the agents, which never
 * list the clones, so the stored field stays empty: `images show` and `hosts show` printed 0 dependents for
 * replicas that dozens of clones use. One pass over the VMs of each host the replicas are on. A reflink copy
 * (lineage.disk_backend REFLINK_COPY) names the replica it was copied from but does not depend on it: not counted.
 */
function withDependents(inventory: Inventory, replicas: readonly ImageReplica[]): ImageReplica[] {
  const byReplica = new Map<string, string[]>();
  const hosts = new Set(replicas.map((replica) => hostOf(replica.name)).filter((host): host is string => host !== undefined));
  for (const host of hosts) {
    for (const { value: vm } of inventory.vms.valuesWithPrefix(vmNamePrefix(host))) {
      const replica = vm.lineage?.replica;
      if (!replica || vm.lineage?.diskBackend === DiskBackend.DISK_BACKEND_REFLINK_COPY) continue;
      const dependents = byReplica.get(replica) ?? [];
      dependents.push(vm.name);
      byReplica.set(replica, dependents);
    }
  }
  return replicas.map((replica) => ({
    ...replica,
    // Replicas recorded before versions existed hold version 1; the field is always numbered.
    imageVersion: replica.imageVersion || replicaVersionOf(replica),
    dependentVirtualMachines: [...new Set([...replica.dependentVirtualMachines, ...(byReplica.get(replica.name) ?? [])])].sort(),
  }));
}
