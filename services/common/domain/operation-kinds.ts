/**
 * Every kind of long-running operation cowherd runs, in one table. The operations bucket is shared by the
 * services, so ListOperations on any of them lists every kind, and a `kind = ...` filter is checked against
 * this table: a kind that does not exist is INVALID_ARGUMENT naming the kinds that do, not an empty page.
 * `test/integration/rpc-contract.test.ts` checks that the table holds exactly the kinds the services define.
 */
export const OPERATION_KIND_NAMES: readonly string[] = [
  'distribution.publish-image',
  'distribution.import-image',
  'distribution.distribute-image',
  'distribution.delete-image',
  'cloning.clone-virtual-machines',
  'cloning.stop-virtual-machine',
  'cloning.rebase-virtual-machines',
];
