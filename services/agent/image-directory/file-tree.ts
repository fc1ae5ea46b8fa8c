/** Small file helpers shared by the agent's image modules (export, swarm, replicas). */
import { chmod, lstat, open, rm } from 'node:fs/promises';

/** True when something (file, directory, link) is at `path`; other errors than ENOENT are thrown. */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw error;
  }
}

/**
 * rm -rf that also works on the read-only image directories cowherd makes (0555): the directory is made
 * writable first so its entries can be unlinked without root.
 */
export async function removeTree(directory: string): Promise<void> {
  await chmod(directory, 0o700).catch(() => undefined);
  await rm(directory, { recursive: true, force: true });
}

/** fsync of a directory, so that a rename or a new entry in it survives a crash. */
export async function fsyncDirectory(directory: string): Promise<void> {
  const handle = await open(directory, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
