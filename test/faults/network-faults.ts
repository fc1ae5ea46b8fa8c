/**
 * Network fault: one agent cut off for 60 s, its process alive. The agent runs in its own network namespace
 * (bench/testbed.ts); iptables in that namespace drops everything in and out of its only link, then the rules
 * are removed. Only the test bed's 198.18.0.0/15 addresses are involved.
 */
import { ORIGIN, RECEIVERS } from './fleet.js';
import { sleep, type FaultRow } from './row.js';

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
      context.note(`${host} cut off (agent pid ${context.fleet.agents.get(host)!.daemon?.pid} alive) for ${CUT_SECONDS} s`);
      try {
        await sleep(CUT_SECONDS * 1000);
      } finally {
        for (const rule of rules) await context.fleet.bed.exec(host, 'iptables', ['-w', '-D', ...rule]);
      }
      context.note(`${host} reconnected`);
      return Date.now();
    },
  },
];
