/** Small file helpers shared by the agent's image modules (export, swarm, replicas). */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
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

/**
 * SHA-256 of the whole file (streamed), then fsync; `onBytes` gets each chunk's length. `checkAbort` runs before
 * the file is opened and before each chunk, and throws to stop: it is called rather than a signal handed to the
 * stream, because an aborted stream errors outside the loop that reads it.
 */
export async function hashAndSync(file: string, checkAbort: () => void, onBytes: (bytes: number) => void): Promise<string> {
  checkAbort();
  const handle = await open(file, 'r');
  try {
    const hash = createHash('sha256');
    for await (const chunk of createReadStream('', { fd: handle, autoClose: false, highWaterMark: 1024 * 1024 }) as AsyncIterable<Buffer>) {
      checkAbort();
      hash.update(chunk);
      onBytes(chunk.length);
    }
    await handle.sync();
    return hash.digest('hex');
  } finally {
    await handle.close();
  }
}
