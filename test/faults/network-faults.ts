/**
 * Network fault: one agent cut off for 60 s, its process alive. The agent runs in its own network namespace
 * (bench/testbed.ts); iptables in that namespace drops everything in and out of its only link, then the rules
 * are removed. Only the test bed's 198.18.0.0/15 addresses are involved.
 */
import { call } from '../../services/common/platform/client.js';
import { unpack } from '../../services/common/domain/operations.js';
import { DistributeImageMetadata } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Host, Host_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { ORIGIN, RECEIVERS } from './fleet.js';

import { sleep, type FaultRow } from './row.js';
import { HOST_NAME } from '../../services/common/domain/resource-names.js';

export const CUT_SECONDS = 60;

export const NETWORK_FAULTS: readonly FaultRow[] = [
  {
    fault: 'agent-network-cut',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    inject: async (context) => {
      const host = 'recv1';
      await context.midTransfer([host]);
      const rules = [
        ['INPUT', '-i', 'eth0', '-j', 'DROP'],
        ['OUTPUT', '-o', 'eth0', '-j', 'DROP'],
      ];
      for (const rule of rules) await context.fleet.bed.exec(host, 'iptables', ['-w', '-I', ...rule]);
      const cutAt = Date.now();
      context.note(`${host} cut off (agent pid ${context.fleet.agents.get(host)!.daemon?.pid} alive) for ${CUT_SECONDS} s`);
      // While it is cut off: inventory must turn it UNREACHABLE (three missed heartbeats), and the DistributeImage
      // that waits for it must say so in its metadata at once (rate and ETA cleared), not show its last rate.
      let unreachableAt: number | undefined;
      let shownAt: number | undefined;
      const distribute =
        context.operations.find((operation) => operation.on === 'distribution' && operation !== context.operations[0]) ?? context.operations[1];
      try {
        while (Date.now() - cutAt < CUT_SECONDS * 1000) {
          const record = await call<Host>((cb) => context.fleet.clients.inventory.getHost({ name: HOST_NAME.format({ host }) }, cb)).catch(() => undefined);
          if (unreachableAt === undefined && record?.state === Host_State.STATE_UNREACHABLE) unreachableAt = Date.now();
          if (shownAt === undefined && distribute) {
            const answer = await context.getOperation(distribute.name, 'distribution');
            try {
              const transfer =
                answer && !answer.done
                  ? unpack(DistributeImageMetadata, answer.metadata).transfers.find((candidate) => candidate.host === HOST_NAME.format({ host }))
                  : undefined;
              if (transfer?.hostUnreachable) shownAt = Date.now();
            } catch {
              // Not readable: not shown.
            }
          }
          await sleep(1_000);
        }
      } finally {
        for (const rule of rules) await context.fleet.bed.exec(host, 'iptables', ['-w', '-D', ...rule]);
      }
      context.note(
        `${host} reconnected; UNREACHABLE in inventory ${unreachableAt === undefined ? 'never' : `after ${((unreachableAt - cutAt) / 1000).toFixed(0)} s`}, in the DistributeImage metadata ${shownAt === undefined ? 'never' : `after ${((shownAt - cutAt) / 1000).toFixed(0)} s`}`,
      );
      if (unreachableAt === undefined) context.fail(`${host} was cut off for ${CUT_SECONDS} s and inventory never showed it UNREACHABLE`);
      else if (shownAt === undefined) context.fail(`${host} was UNREACHABLE but the DistributeImage metadata never said so`);
      return Date.now();
    },
  },
];
