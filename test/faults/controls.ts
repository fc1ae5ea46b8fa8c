/**
 * Negative controls: rows in which the suite itself breaks one invariant while the work runs, so that each
 * check is seen to fail (a check that cannot fail proves nothing). They run only when asked
 * (`COWHERD_FAULTS=controls`, or a control's name) and pass when their row does NOT survive.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { JetStreamEventPublisher } from '../../services/common/platform/events.js';
import { CLONE_DONE } from '../../services/common/domain/event-types.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { ORIGIN, RECEIVERS } from './fleet.js';
import { sha256, sleep, type FaultRow, type RowContext } from './row.js';
import { HOST_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

/** Waits until `count` domains of the row exist in libvirt (the batch is under way). */
async function clonesDefined(context: RowContext, count: number): Promise<void> {
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    const names = (await context.fleet.virsh('list', '--all', '--name')).split('\n').filter((name) => name.trim().startsWith(context.prefix));
    if (names.length >= count) return;
    await sleep(500);
  }
}

/** The work takes ~25 s after a control's fault; 60 s is enough for a fleet with nothing broken to satisfy every check. */
const common = { mustSucceed: true, control: true, boundSeconds: 60, distributeTo: RECEIVERS, cloneHosts: [ORIGIN, 'recv1'] } as const;

export const CONTROLS: readonly FaultRow[] = [
  {
    ...common,
    fault: 'control-duplicate-event',
    inject: async (context) => {
      await clonesDefined(context, 1);
      await sleep(3_000);
      // A second clone.done for clone 1 (on origin) under a new id: a repeat the stream cannot drop.
      const publisher = new JetStreamEventPublisher(context.fleet.reader.jetstream, createLogger({ service: 'faults', level: 'silent' }));
      const domainName = `${context.prefix}1`;
      await publisher.publish(
        CLONE_DONE,
        {
          virtualMachine: VIRTUAL_MACHINE_NAME.format({ host: ORIGIN, virtualMachine: domainName }),
          host: HOST_NAME.format({ host: ORIGIN }),
          domainName,
          uuid: randomUUID(),
          image: IMAGE_NAME.format({ image: context.image }),
          sourceVirtualMachine: '',
          overlays: [],
          started: false,
        } as never,
        { host: ORIGIN, id: `control/${randomUUID()}` },
      );
      context.note(`control: published a second clone.done for ${domainName}`);
      return Date.now();
    },
  },
  {
    ...common,
    fault: 'control-extra-domain',
    inject: async (context) => {
      await clonesDefined(context, 1);
      const name = `${context.prefix}999`;
      const directory = context.fleet.agents.get(ORIGIN)!.imageDirectory;
      const xml = join(directory, `${name}.xml`);
      await writeFile(
        xml,
        `<domain type='qemu'><name>${name}</name><memory unit='MiB'>32</memory><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>`,
      );
      await context.fleet.virsh('define', xml);
      context.note(`control: defined ${name} in libvirt beside the batch`);
      return Date.now();
    },
  },
  {
    ...common,
    fault: 'control-operation-stuck',
    inject: async (context) => {
      await context.midTransfer();
      // distribution stays down through the check: its operations cannot be read, let alone end.
      await context.fleet.distribution.kill();
      context.note('control: distribution killed and left down until the row is checked');
      return Date.now();
    },
    after: async (context) => {
      await context.fleet.distribution.start();
    },
  },
  {
    ...common,
    fault: 'control-base-rewritten',
    inject: async (context) => {
      await clonesDefined(context, 5);
      // A base an earlier row's clones use (this control runs last), else the origin replica of this image.
      const base = [...context.state.bases.keys()][0] ?? join(context.fleet.agents.get(ORIGIN)!.imageDirectory, 'images', context.image, 'vda.qcow2');
      const before = await sha256(base).catch(() => 'missing');
      const handle = await open(base, 'r+');
      try {
        await handle.write(randomBytes(23), 0, 23, 4096 * 7);
      } finally {
        await handle.close();
      }
      context.note(`control: rewrote 23 bytes of the base ${base} (was ${before.slice(0, 12)})`);
      return Date.now();
    },
  },
];
