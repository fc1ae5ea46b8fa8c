/**
 * Storage faults: a receiver's disk filling up (the `small` host's image directory is a small tmpfs with room
 * for the image; once the transfer runs, a file fills the rest), and a replica damaged while its agent runs (a few bytes overwritten in its disk file), once
 * on a host where no VM uses it and once on a host where clones use it as their base.
 *
 * The damage rows reuse an image that every receiver already holds (the newest row that left it so, or one
 * the runner prepares), then ask for it again: a DistributeImage to the damaged host and a clone batch on it.
 * What must hold besides the common invariants: no clone of the row sits on the damaged bytes, the damaged
 * file itself is never rewritten while clones use it (its damaged SHA-256 becomes the base's baseline), and a
 * replica that is AVAILABLE again after the damage published a new image.available (a new occurrence).
 */
import { randomBytes } from 'node:crypto';
import { open, rm, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { runCommand } from '../../services/common/platform/child-process.js';
import { call } from '../../services/common/platform/client.js';
import { ImageReplica_State, type Image, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { ORIGIN, SMALL } from './fleet.js';
import { sha256, type FaultRow, type RowContext } from './row.js';
import { HOST_IMAGE_NAME, IMAGE_NAME } from '../../services/common/domain/resource-names.js';

/** The file that fills the small host's disk (removed after the row). */
const FILLER = 'cowherd-faults-filler';

/** Overwrites a few bytes in the middle of the host's copy of the image's first disk; returns the file. */
async function damage(context: RowContext, host: string): Promise<string> {
  const { inventory } = context.fleet.clients;
  const replica = await call<ImageReplica>((cb) => inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host, image: context.image }) }, cb));
  const image = await call<Image>((cb) => inventory.getImage({ name: IMAGE_NAME.format({ image: context.image }), view: 0 }, cb));
  const disk = image.files.find((file) => file.targetDevice !== '') ?? image.files[0]!;
  const file = join(replica.path, disk.path);
  const handle = await open(file, 'r+');
  try {
    const size = (await handle.stat()).size;
    await handle.write(randomBytes(23), 0, 23, Math.floor(size / 2));
  } finally {
    await handle.close();
  }
  context.note(`overwrote 23 bytes in the middle of ${file} (${replica.dependentVirtualMachines.length} dependent VMs in inventory)`);
  return file;
}

/** One image.available for `host` when its replica is AVAILABLE again after the damage, none otherwise. */
function availableAgain(host: string) {
  return (final: ReadonlyMap<string, ImageReplica>): Map<string, number> =>
    new Map([[host, final.get(host)?.state === ImageReplica_State.STATE_AVAILABLE ? 1 : 0]]);
}

export const STORAGE_FAULTS: readonly FaultRow[] = [
  {
    fault: 'receiver-disk-full',
    mustSucceed: false,
    distributeTo: ['recv1', 'recv2', SMALL],
    cloneHosts: [ORIGIN, 'recv1'],
    inject: async (context) => {
      // The disk has room for the image when the transfer starts (the agent checks that first); it fills up
      // under the transfer, as when something else on the host writes.
      await context.midTransfer([SMALL]);
      const filler = join(context.fleet.agents.get(SMALL)!.imageDirectory, FILLER);
      await runCommand('dd', ['if=/dev/zero', `of=${filler}`, 'bs=1M', 'status=none']).catch(() => undefined);
      const facts = await statfs(context.fleet.agents.get(SMALL)!.imageDirectory);
      context.note(`${SMALL}'s image directory filled up (${facts.bavail * facts.bsize} bytes free)`);
      return Date.now();
    },
    after: async (context) => {
      await rm(join(context.fleet.agents.get(SMALL)!.imageDirectory, FILLER), { force: true });
    },
  },
  {
    fault: 'replica-damage-no-dependents',
    mustSucceed: false,
    distributeTo: ['recv2', 'recv3'],
    cloneHosts: ['recv2', 'recv3'],
    reuseImage: (state) => state.lastImage,
    before: async (context) => {
      await damage(context, 'recv2');
    },
    inject: async () => Date.now(),
    expectedAvailable: availableAgain('recv2'),
  },
  {
    fault: 'replica-damage-with-dependents',
    mustSucceed: false,
    distributeTo: ['recv1'],
    cloneHosts: ['recv1', 'recv3'],
    reuseImage: (state) => state.lastImage,
    before: async (context) => {
      const file = await damage(context, 'recv1');
      // The damage is the suite's own: from now on the file must stay exactly as damaged (never rewritten under its clones).
      context.state.bases.set(file, await sha256(file));
    },
    inject: async () => Date.now(),
    expectedAvailable: availableAgain('recv1'),
  },
];
