/**
 * Process faults: SIGKILL of the receiving agent, of the origin agent (during the transfer, and during its
 * CreateClones), of the cloning service and of the distribution service, each in the middle of the work and
 * started again a few seconds later (same identity, data and ports, as a supervisor would restart it); and the two
 * agent kills again with streaming clones (delivery STREAM: recv1's clones are made on its replica while it arrives).
 */
import { ORIGIN, RECEIVERS } from './fleet.js';
import { sleep, type FaultRow, type RowContext } from './row.js';

/** How long a killed process stays down. */
const DOWN_MS = 3_000;

/** SIGKILLs `host`'s agent once `moment` resolves (default: mid-transfer), and starts it again DOWN_MS later. */
async function killAgent(context: RowContext, host: string, moment?: () => Promise<void>): Promise<number> {
  // A receiver is killed while it holds part of the image; the origin while any receiver does.
  await (moment ? moment() : context.midTransfer(host === ORIGIN ? undefined : [host]));
  const agent = context.fleet.agents.get(host)!;
  context.note(`SIGKILL agent ${host} (pid ${agent.daemon?.pid})`);
  await agent.kill();
  await sleep(DOWN_MS);
  await agent.start();
  context.note(`agent ${host} started again`);
  return Date.now();
}

/** Resolves once at least `count` of the row's clones are defined in libvirt (or after 90 s, noted). */
async function clonesInLibvirt(context: RowContext, count: number): Promise<void> {
  const deadline = Date.now() + 90_000;
  for (;;) {
    const domains = (await context.fleet.virsh('list', '--all', '--name')).split('\n').filter((name) => name.trim().startsWith(context.prefix));
    if (domains.length >= count) return context.note(`${domains.length} clone(s) in libvirt`);
    if (Date.now() > deadline) return context.note(`fewer than ${count} clones in libvirt after 90 s (${domains.length}); injecting anyway`);
    await sleep(100);
  }
}

export const PROCESS_FAULTS: readonly FaultRow[] = [
  {
    fault: 'receiver-agent-kill',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    // recv1 receives the image and takes half of the clones once it has it.
    inject: (context) => killAgent(context, 'recv1'),
  },
  {
    fault: 'origin-agent-kill',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    inject: (context) => killAgent(context, ORIGIN),
  },
  {
    fault: 'origin-agent-kill-while-cloning',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    // Killed in the middle of its CreateClones (clones in libvirt, its answer not sent yet): cloning gets no
    // answer, asks again with the same request_id once the agent is back, and every clone is reported DONE.
    inject: (context) =>
      killAgent(context, ORIGIN, async () => {
        const deadline = Date.now() + 60_000;
        for (;;) {
          const domains = (await context.fleet.virsh('list', '--all', '--name')).split('\n').filter((name) => name.trim().startsWith(context.prefix));
          if (domains.length > 0) return context.note(`${domains.length} clone(s) in libvirt`);
          if (Date.now() > deadline) return context.note('no clone appeared in libvirt within 60 s; injecting anyway');
          await sleep(25);
        }
      }),
  },
  {
    fault: 'stream-receiver-agent-kill',
    mustSucceed: true,
    delivery: 'stream',
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    // recv1's clones are defined on its replica while it arrives (STREAMING); its agent dies with the replica
    // incomplete. The restarted agent resumes the fetch; the clones become DONE once the replica is AVAILABLE.
    inject: (context) => killAgent(context, 'recv1', () => clonesInLibvirt(context, 11)),
  },
  {
    fault: 'stream-origin-agent-kill',
    mustSucceed: true,
    delivery: 'stream',
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    // The origin (the only complete copy) dies while recv1's streaming clones wait for the rest of their replica.
    inject: (context) => killAgent(context, ORIGIN, () => clonesInLibvirt(context, 11)),
  },
  {
    fault: 'cloning-kill',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    inject: async (context) => {
      // The batch has made origin's clones and waits for recv1's copy of the image.
      await context.midTransfer();
      context.note(`SIGKILL cloning (pid ${context.fleet.cloning.process?.daemon.pid})`);
      await context.fleet.cloning.kill();
      await sleep(DOWN_MS);
      await context.fleet.cloning.start();
      context.note('cloning started again');
      return Date.now();
    },
  },
  {
    fault: 'distribution-kill',
    mustSucceed: true,
    distributeTo: RECEIVERS,
    cloneHosts: [ORIGIN, 'recv1'],
    inject: async (context) => {
      await context.midTransfer();
      context.note(`SIGKILL distribution (pid ${context.fleet.distribution.process?.daemon.pid})`);
      await context.fleet.distribution.kill();
      await sleep(DOWN_MS);
      await context.fleet.distribution.start();
      context.note('distribution started again');
      return Date.now();
    },
  },
];
