// The reflink-copy disk backend (services/agent/hypervisor/disk-backends.ts) on real filesystems: an xfs
// (mkfs.xfs -m reflink=1) and a btrfs, each made by this test in a loop-mounted file under a temp directory, and
// /tmp (ext4, which cannot reflink). Clones of raw and qcow2 bases, their independence from the base (written
// copy, base unchanged; base deleted, copy still whole), and the refusals.
//
// The loop mounts need root and mkfs.xfs / mkfs.btrfs (xfsprogs, btrfs-progs: scripts/install.sh); without them
// those parts are skipped and say why. The ext4 refusal runs everywhere.
//
//   node --import tsx --test test/unit/agent-reflink-backend.test.ts
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, open, readdir, readFile, rm, stat, statfs, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { runCommand } from '../../services/common/platform/child-process.js';
import { childDiskFormat, diskBackendFor, REFLINK_COPY_BACKEND, reflinkSupported } from '../../services/agent/hypervisor/disk-backends.js';
import { createHostFactsSource } from '../../services/agent/host/host-facts.js';
import type { Libvirt } from '../../services/agent/hypervisor/index.js';

const MiB = 1024 * 1024;
const EXT4_SUPER_MAGIC = 0xef53;
const isRoot = process.getuid?.() === 0;
const mkfs = { xfs: '/usr/sbin/mkfs.xfs', btrfs: '/usr/sbin/mkfs.btrfs' } as const;

const sha256 = async (file: string): Promise<string> =>
  createHash('sha256')
    .update(await readFile(file))
    .digest('hex');

async function qemuImgInfo(file: string): Promise<{ format: string; 'virtual-size': number; 'backing-filename'?: string }> {
  return JSON.parse(await runCommand('qemu-img', ['info', '--output=json', '-U', file]));
}

/** FAILED_PRECONDITION with the reason every backend gives when the host cannot make the child. */
function refused(pattern: RegExp): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof CowherdError, String(error));
    assert.equal(error.code, GrpcStatus.FAILED_PRECONDITION);
    assert.equal(error.reason, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH);
    assert.match(error.message, pattern);
    return true;
  };
}

/** Whether FIEMAP marks any extent of `file` as shared with another file (filefrag, e2fsprogs). */
async function sharesExtents(file: string): Promise<boolean> {
  return /\bshared\b/.test(await runCommand('filefrag', ['-v', file]));
}

/** Blocks the filesystem under `directory` has in use, in bytes. */
async function usedBytes(directory: string): Promise<number> {
  const stats = await statfs(directory);
  return (stats.blocks - stats.bfree) * stats.bsize;
}

let scratch: string;
before(async () => {
  scratch = await mkdtemp(path.join(tmpdir(), 'cowherd-reflink-'));
});
after(async () => {
  await rm(scratch, { recursive: true, force: true });
});

describe('reflink-copy where the filesystem cannot reflink', () => {
  it('refuses on ext4 before making a file, and reflinkSupported says no', async (t: TestContext) => {
    if ((await statfs(scratch)).type !== EXT4_SUPER_MAGIC) {
      t.skip(`${tmpdir()} is not ext4 here: the refusal needs a filesystem without reflinks`);
      return;
    }
    const base = path.join(scratch, 'base.raw');
    await writeFile(base, randomBytes(MiB));
    assert.equal(await reflinkSupported(scratch), false);
    assert.equal(await reflinkSupported(scratch), false, 'the cached answer');
    assert.deepEqual(
      (await readdir(scratch)).filter((name) => name.startsWith('.cowherd-reflink-probe')),
      [],
      'the probe leaves nothing behind',
    );
    const child = path.join(scratch, 'vda.raw');
    await assert.rejects(REFLINK_COPY_BACKEND.createChild({ target: 'vda', base, format: 'raw' }, child), refused(/cannot make reflink copies/));
    await assert.rejects(stat(child), /ENOENT/);
  });

  it('says so before probing for a base that is not a local file (a streaming base) or not qcow2/raw', async () => {
    await assert.rejects(
      REFLINK_COPY_BACKEND.createChild({ target: 'vda', base: 'nbd+unix:///img.vda?socket=/run/s.sock', format: 'qcow2' }, path.join(scratch, 'x.qcow2')),
      refused(/needs the base as a local file/),
    );
    await assert.rejects(
      REFLINK_COPY_BACKEND.createChild({ target: 'vda', base: path.join(scratch, 'base.vhd'), format: 'vpc' }, path.join(scratch, 'x.vhd')),
      refused(/is a VHD; reflink copies need qcow2 or raw bases/),
    );
    assert.throws(() => REFLINK_COPY_BACKEND.childFormat!('vpc'), refused(/not VHD/));
  });

  it('a probe that cannot run is an error, not an answer', async () => {
    await assert.rejects(reflinkSupported(path.join(scratch, 'missing')), /ENOENT/);
  });

  it("host facts carry the image directory's answer when given the probe, and leave it out otherwise", async (t: TestContext) => {
    if ((await statfs(scratch)).type !== EXT4_SUPER_MAGIC) {
      t.skip(`${tmpdir()} is not ext4 here`);
      return;
    }
    const libvirt = { uri: 'test:///none', hypervisorFacts: async () => Promise.reject(new Error('no libvirt here')) } as unknown as Libvirt;
    const facts = (options: { reflinkSupported?: (directory: string) => Promise<boolean>; imageDirectory?: string }) =>
      createHostFactsSource({
        libvirt,
        imageDirectory: options.imageDirectory ?? scratch,
        advertiseAddress: 'localhost:1',
        version: 'test',
        ...options,
      }).registration();
    assert.equal((await facts({ reflinkSupported })).imageDirectoryReflinks, false);
    assert.equal('imageDirectoryReflinks' in (await facts({})), false, 'no probe, no fact');
    await assert.rejects(facts({ reflinkSupported, imageDirectory: path.join(scratch, 'missing') }), /ENOENT/, 'statfs of a missing directory fails as before');
  });
});

for (const kind of ['xfs', 'btrfs'] as const) {
  const skip = !isRoot ? 'needs root (loop mount)' : !existsSync(mkfs[kind]) ? `needs ${mkfs[kind]} (scripts/install.sh installs it)` : false;

  describe(`reflink-copy on a loop-mounted ${kind}`, { skip }, () => {
    let mountPoint: string;
    let mounted = false;
    let rawBase: string;
    let qcow2Base: string;
    let rawBytes: Buffer;

    before(async () => {
      const image = path.join(scratch, `${kind}.img`);
      mountPoint = path.join(scratch, `${kind}-mnt`);
      await mkdir(mountPoint);
      // 320 MiB: above mkfs.xfs's 300 MiB minimum; sparse on the ext4 underneath.
      await writeFile(image, '');
      await truncate(image, 320 * MiB);
      await runCommand(mkfs[kind], kind === 'xfs' ? ['-q', '-m', 'reflink=1', image] : ['-q', image], { timeoutMs: 60_000 });
      await runCommand('mount', ['-o', 'loop', image, mountPoint], { timeoutMs: 30_000 });
      mounted = true;
      await mkdir(path.join(mountPoint, 'images'));
      await mkdir(path.join(mountPoint, 'clones'));
      rawBytes = randomBytes(64 * MiB);
      rawBase = path.join(mountPoint, 'images', 'base.raw');
      await writeFile(rawBase, rawBytes);
      qcow2Base = path.join(mountPoint, 'images', 'base.qcow2');
      await runCommand('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', rawBase, qcow2Base], { timeoutMs: 60_000 });
      // Bases are read-only on disk, as protectBase leaves them.
      await chmod(rawBase, 0o444);
      await chmod(qcow2Base, 0o444);
    });

    after(async () => {
      if (mounted) {
        // `mount -o loop` set the loop device to detach itself on unmount.
        await runCommand('umount', [mountPoint], { timeoutMs: 30_000 }).catch(() => runCommand('umount', ['-l', mountPoint], { timeoutMs: 30_000 }));
      }
    });

    it('detects reflinks in any directory of the filesystem', async () => {
      assert.equal(await reflinkSupported(path.join(mountPoint, 'clones')), true);
      assert.equal(await reflinkSupported(mountPoint), true);
      assert.deepEqual(
        (await readdir(path.join(mountPoint, 'clones'))).filter((name) => name.startsWith('.cowherd-reflink-probe')),
        [],
      );
    });

    it('clones a raw base: same bytes, shared extents, no chain, writable, base untouched', async (t: TestContext) => {
      const backend = diskBackendFor('kvm', 'reflink-copy');
      assert.equal(backend, REFLINK_COPY_BACKEND);
      assert.deepEqual(childDiskFormat(backend, 'raw'), { extension: 'raw', driver: { name: 'qemu', type: 'raw' } });
      const directory = path.join(mountPoint, 'clones', 'raw-clone');
      await mkdir(directory);
      const child = path.join(directory, `vda.${childDiskFormat(backend, 'raw').extension}`);
      // A base on disk, as a replica is (FICLONE first writes back the source's dirty pages).
      await runCommand('sync', []);
      const usedBefore = await usedBytes(mountPoint);
      const started = performance.now();
      await backend.createChild({ target: 'vda', base: rawBase, format: 'raw' }, child);
      t.diagnostic(`reflink copy of a 64 MiB raw base on ${kind}: ${(performance.now() - started).toFixed(2)} ms`);
      assert.ok((await usedBytes(mountPoint)) - usedBefore < 4 * MiB, 'the copy takes (almost) no space');
      assert.ok(await sharesExtents(child));
      assert.equal(await sha256(child), await sha256(rawBase));
      assert.equal((await stat(child)).mode & 0o777, 0o644, 'writable by its owner');
      assert.equal((await stat(rawBase)).mode & 0o777, 0o444, 'the base keeps its protection');
      assert.deepEqual(await backend.chain(child), [], 'no backing chain');
      await assert.rejects(backend.createChild({ target: 'vda', base: rawBase, format: 'raw' }, child), /EEXIST/, 'never overwrites');
    });

    it('is independent of its base: writes stay in the copy, and the copy outlives the base', async () => {
      const backend = REFLINK_COPY_BACKEND;
      const base = path.join(mountPoint, 'images', 'short-lived.raw');
      await writeFile(base, rawBytes);
      const child = path.join(mountPoint, 'clones', 'independent.raw');
      await backend.createChild({ target: 'vda', base, format: 'raw' }, child);
      const baseHash = await sha256(base);

      const expected = Buffer.from(rawBytes);
      const handle = await open(child, 'r+');
      for (const [offset, length] of [
        [0, 512],
        [5 * MiB + 123, 70_000],
        [64 * MiB - 4096, 4096],
      ] as const) {
        const data = randomBytes(length);
        await handle.write(data, 0, length, offset);
        data.copy(expected, offset);
      }
      await handle.sync();
      await handle.close();
      assert.equal(await sha256(base), baseHash, 'the base is unchanged');
      assert.ok((await readFile(child)).equals(expected), 'the copy holds the writes and the base elsewhere');

      await rm(base);
      await runCommand('sync', []);
      // Drop the copy's cached pages so the bytes below come from the filesystem's blocks.
      await writeFile('/proc/sys/vm/drop_caches', '1').catch(() => undefined);
      assert.ok((await readFile(child)).equals(expected), 'the copy reads its bytes after the base is gone');
      assert.equal(await sharesExtents(child), false, 'nothing is shared any more');
    });

    it('clones a qcow2 base into a standalone qcow2 that qemu reads as the base', async () => {
      const backend = REFLINK_COPY_BACKEND;
      assert.deepEqual(childDiskFormat(backend, 'qcow2'), { extension: 'qcow2', driver: { name: 'qemu', type: 'qcow2' } });
      const child = path.join(mountPoint, 'clones', 'vda.qcow2');
      await backend.createChild({ target: 'vda', base: qcow2Base, format: 'qcow2' }, child);
      const info = await qemuImgInfo(child);
      assert.deepEqual([info.format, info['virtual-size'], info['backing-filename']], ['qcow2', 64 * MiB, undefined]);
      assert.deepEqual(await backend.chain(child), []);
      await runCommand('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', child, rawBase]);
      // A guest's write through qemu lands in the copy only.
      const baseHash = await sha256(qcow2Base);
      await runCommand('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 1M 64k', child]);
      assert.equal(await sha256(qcow2Base), baseHash);
      await assert.rejects(runCommand('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', child, rawBase]));
    });

    it('refuses a base on another filesystem (no reflink across filesystems)', async () => {
      const base = path.join(scratch, `${kind}-elsewhere.raw`);
      await writeFile(base, randomBytes(MiB));
      const child = path.join(mountPoint, 'clones', 'elsewhere.raw');
      await assert.rejects(REFLINK_COPY_BACKEND.createChild({ target: 'vda', base, format: 'raw' }, child), refused(/different filesystems/));
      await assert.rejects(stat(child), /ENOENT/);
    });

    it('makes empty qcow2 data disks and removes what it made', async () => {
      const data = path.join(mountPoint, 'clones', 'data.qcow2');
      await REFLINK_COPY_BACKEND.createEmptyDisk(data, 16 * MiB);
      const info = await qemuImgInfo(data);
      assert.deepEqual([info.format, info['virtual-size']], ['qcow2', 16 * MiB]);
      await REFLINK_COPY_BACKEND.remove(data);
      await REFLINK_COPY_BACKEND.remove(data);
      await assert.rejects(stat(data), /ENOENT/);
      assert.equal(await REFLINK_COPY_BACKEND.chain(data), undefined);
    });
  });
}
