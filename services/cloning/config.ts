/** The cloning service's own variables (besides the common server ones). */
import { addressVariable } from '../common/config.js';
import { DEFAULT_PORTS } from '../common/service-process.js';

export const CLONING_VARIABLES = {
  inventoryAddress: addressVariable('COWHERD_INVENTORY_ADDRESS', 'host:port of the inventory mTLS port', `localhost:${DEFAULT_PORTS.inventory.grpc}`),
  distributionAddress: addressVariable('COWHERD_DISTRIBUTION_ADDRESS', 'host:port of the distribution mTLS port (images a chosen host lacks are distributed to it first)', `localhost:${DEFAULT_PORTS.distribution.grpc}`),
};
