/**
 * What cloning reads from the inventory, behind a small interface so that unit tests use a fake fleet.
 * The real one is inventory-view.ts.
 */
import type { Host, Image, ImageReplica, VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';

/** The fleet as the inventory sees it. */
export interface FleetView {
  /** One virtual machine, `hosts/{host}/virtualMachines/{vm}`; undefined when there is none. */
  getVirtualMachine(name: string): Promise<VirtualMachine | undefined>;
  /** One image of the catalog, `images/{image}`; undefined when there is none. */
  getImage(name: string): Promise<Image | undefined>;
  /** Every host, in any state. */
  listHosts(): Promise<Host[]>;
  /** The AVAILABLE replicas of an image, `images/{image}`, on any host. */
  listReplicas(image: string): Promise<ImageReplica[]>;
  /** Domain name -> virtual machine resource name, for every virtual machine of the fleet. */
  domainNamesInUse(): Promise<ReadonlyMap<string, string>>;
}
