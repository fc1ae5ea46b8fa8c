/**
 * NATS faults: one node of the three killed (SIGKILL) and started again after 5 s, and the whole cluster
 * stopped and started again (5 s down), each while a distribution and a clone batch run.
 */
import { ORIGIN, RECEIVERS } from './fleet.js';
import { sleep, type FaultRow } from './row.js';

/** How long NATS stays down. */
const DOWN_MS = 5_000;

export const NATS_FAULTS: readonly FaultRow[] = [
  {
    fault: 'nats-node-restart',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    inject: async (context) => {
      await context.midTransfer();
      // Not always the same node: the run's index picks it, so repeated runs hit leaders and followers.
      const node = context.fleet.nats.nodes[context.state.rowIndex % 3]!;
      context.note(`SIGKILL ${node.name}`);
      await node.kill();
      await sleep(DOWN_MS);
      await node.start();
      context.note(`${node.name} started again`);
      return Date.now();
    },
  },
  {
    fault: 'nats-cluster-restart',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    inject: async (context) => {
      await context.midTransfer();
      context.note('stopping all three NATS servers');
      await context.fleet.nats.restartAll(DOWN_MS);
      context.note('all three NATS servers started again');
      return Date.now();
    },
  },
];
