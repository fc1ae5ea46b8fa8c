/**
 * What cloning reads from the inventory, behind a small interface so that unit tests use a fake fleet.
 * The real one is inventory-view.ts.
 */
import type { Host, Image, ImageReplica, VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';

/** The fleet as the inventory sees it. */
export interface FleetView {
  /** One virtual machine, `hosts/{host}/virtualMachines/{vm}`; undefined when there is none. */
  getVirtualMachine(name: string): Promise<VirtualMachine | undefined>;
  /**
   * One image of the catalog as a caller names it: `images/{image}` (its latest version) or
   * `images/{image}/versions/{version}` (number or alias); the answer's `version` is the exact version.
   * Undefined when there is none (also for an unknown alias).
   */
  getImage(name: string): Promise<Image | undefined>;
  /** Every host, in any state. */
  listHosts(): Promise<Host[]>;
  /** The AVAILABLE replicas of one exact image version, `images/{image}/versions/{version}` (numbered), on any host. */
  listReplicas(imageVersion: string): Promise<ImageReplica[]>;
  /** Domain name -> virtual machine resource name, for every virtual machine of the fleet. */
  domainNamesInUse(): Promise<ReadonlyMap<string, string>>;
}

/** The fleet as RebaseVirtualMachines reads it: also the virtual machines a filter selects. */
export interface RebaseFleetView extends FleetView {
  /**
   * The virtual machines under `parent` (`hosts/{host}` or `hosts/-`) that an inventory filter selects
   * (ListVirtualMachines' filter); its INVALID_ARGUMENT is relayed naming `filter`.
   */
  listVirtualMachines(parent: string, filter: string): Promise<VirtualMachine[]>;
}
