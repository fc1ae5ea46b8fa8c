// The agent's disk backends (services/agent/hypervisor/disk-backends.ts) on real files made by qemu-img: the qcow2
// overlay and the VHD differencing disk behind one interface, what each refuses, and the chain each reports.
//
//   node --import tsx --test test/unit/agent-disk-backends.test.ts
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { runCommand } from '../../services/common/platform/child-process.js';
import { diskBackendFor, readVhdInfo } from '../../services/agent/hypervisor/index.js';
import { childDiskFormat } from '../../services/agent/hypervisor/disk-backends.js';

const MiB = 1024 * 1024;
let directory: string;
let qcow2Base: string;
let rawBase: string;
let vhdBase: string;

const sha256 = async (file: string): Promise<string> =>
  createHash('sha256')
    .update(await readFile(file))
    .digest('hex');

async function qemuImgInfo(file: string): Promise<{ format: string; 'virtual-size': number; 'backing-filename'?: string; 'backing-filename-format'?: string }> {
  return JSON.parse(await runCommand('qemu-img', ['info', '--output=json', '-U', file]));
}

function mismatch(error: unknown): boolean {
  assert.ok(error instanceof CowherdError);
  assert.equal(error.code, GrpcStatus.FAILED_PRECONDITION);
  assert.equal(error.reason, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH);
  return true;
}

before(async () => {
  directory = await mkdtemp(path.join(tmpdir(), 'cowherd-disk-backends-'));
  rawBase = path.join(directory, 'base.raw');
  await writeFile(rawBase, Buffer.alloc(4 * MiB, 7));
  qcow2Base = path.join(directory, 'base.qcow2');
  await runCommand('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', rawBase, qcow2Base]);
  vhdBase = path.join(directory, 'base.vhd');
  await runCommand('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', rawBase, vhdBase]);
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

describe('disk backends', () => {
  it('chooses qcow2 overlays on KVM and VHD differencing disks on Xen, with their libvirt drivers', () => {
    const kvm = diskBackendFor('kvm');
    const xen = diskBackendFor('xen');
    assert.deepEqual([kvm.name, kvm.extension, kvm.driver, kvm.copiesChildren], ['qcow2-overlay', 'qcow2', { name: 'qemu', type: 'qcow2' }, true]);
    assert.deepEqual([xen.name, xen.extension, xen.driver, xen.copiesChildren], ['vhd-differencing', 'vhd', { name: 'tap', type: 'vhd' }, false]);
  });

  it("names each child's extension and driver per base format, and runs a chosen backend only where its hypervisor can", () => {
    const kvm = diskBackendFor('kvm');
    const xen = diskBackendFor('xen');
    const reflink = diskBackendFor('kvm', 'reflink-copy');
    assert.deepEqual([reflink.name, reflink.extension, reflink.copiesChildren], ['reflink-copy', 'qcow2', false]);
    assert.deepEqual(
      (['qcow2', 'raw'] as const).map((format) => [childDiskFormat(kvm, format), childDiskFormat(reflink, format)]),
      [
        [
          { extension: 'qcow2', driver: { name: 'qemu', type: 'qcow2' } },
          { extension: 'qcow2', driver: { name: 'qemu', type: 'qcow2' } },
        ],
        [
          { extension: 'qcow2', driver: { name: 'qemu', type: 'qcow2' } },
          { extension: 'raw', driver: { name: 'qemu', type: 'raw' } },
        ],
      ],
    );
    assert.deepEqual(childDiskFormat(xen, 'vpc'), { extension: 'vhd', driver: { name: 'tap', type: 'vhd' } });
    // A backend without childFormat (one of another room, say) falls back to its extension and driver.
    const { childFormat: _unused, ...plain } = kvm;
    assert.deepEqual(childDiskFormat(plain as typeof kvm, 'raw'), { extension: 'qcow2', driver: { name: 'qemu', type: 'qcow2' } });
    assert.equal(diskBackendFor('kvm', 'qcow2-overlay'), kvm);
    assert.equal(diskBackendFor('xen', 'vhd-differencing'), xen);
    assert.throws(() => diskBackendFor('xen', 'reflink-copy'), mismatch);
    assert.throws(() => diskBackendFor('kvm', 'vhd-differencing'), mismatch);
    assert.deepEqual(
      (['qcow2', 'raw', 'vpc'] as const).map((format) => reflink.accepts(format)),
      [true, true, false],
    );
  });

  it('qcow2-overlay: children of qcow2 and raw bases, a copied prototype, the chain, and the base untouched', async () => {
    const backend = diskBackendFor('kvm');
    const before = await sha256(qcow2Base);
    const child = path.join(directory, 'kvm-child.qcow2');
    await backend.createChild({ target: 'vda', base: qcow2Base, format: 'qcow2' }, child);
    const info = await qemuImgInfo(child);
    assert.equal(info.format, 'qcow2');
    assert.equal(info['virtual-size'], 4 * MiB);
    assert.equal(info['backing-filename'], qcow2Base);
    assert.equal(info['backing-filename-format'], 'qcow2');
    assert.deepEqual(await backend.chain(child), [qcow2Base]);

    const fromRaw = path.join(directory, 'kvm-raw-child.qcow2');
    await backend.createChild({ target: 'vda', base: rawBase, format: 'raw' }, fromRaw);
    assert.equal((await qemuImgInfo(fromRaw))['backing-filename-format'], 'raw');
    assert.deepEqual(await backend.chain(fromRaw), [rawBase]);

    // A prototype is copied byte for byte; an existing file is never overwritten.
    const copy = path.join(directory, 'kvm-copy.qcow2');
    await backend.createChild({ target: 'vda', base: qcow2Base, format: 'qcow2' }, copy, child);
    assert.equal(await sha256(copy), await sha256(child));
    await assert.rejects(backend.createChild({ target: 'vda', base: qcow2Base, format: 'qcow2' }, copy, child), /EEXIST/);

    assert.equal(await sha256(qcow2Base), before, 'the base is never written');
    await backend.remove(copy);
    await backend.remove(copy);
    await assert.rejects(stat(copy), /ENOENT/);
    assert.equal(await backend.chain(copy), undefined, 'no chain for a file that is gone');
  });

  it('qcow2-overlay refuses a VHD base, and vhd-differencing anything but a VHD base, before making a file', async () => {
    const child = path.join(directory, 'refused');
    await assert.rejects(diskBackendFor('kvm').createChild({ target: 'vda', base: vhdBase, format: 'vpc' }, child), mismatch);
    await assert.rejects(diskBackendFor('xen').createChild({ target: 'xvda', base: qcow2Base, format: 'qcow2' }, child), mismatch);
    await assert.rejects(diskBackendFor('xen').createChild({ target: 'xvda', base: rawBase, format: 'raw' }, child), mismatch);
    await assert.rejects(stat(child), /ENOENT/);
    assert.throws(() => diskBackendFor('kvm').checkBase({ target: 'vda', format: 'vpc' }), mismatch);
    assert.deepEqual(
      (['qcow2', 'raw', 'vpc'] as const).map((format) => [diskBackendFor('kvm').accepts(format), diskBackendFor('xen').accepts(format)]),
      [
        [true, false],
        [true, false],
        [false, true],
      ],
    );
    diskBackendFor('kvm').checkBase({ target: 'vda', format: 'raw' });
    diskBackendFor('xen').checkBase({ target: 'xvda', format: 'vpc' });
  });

  it('vhd-differencing: a child whose parent is the base, its chain, and the base untouched', async () => {
    const backend = diskBackendFor('xen');
    const before = await sha256(vhdBase);
    const child = path.join(directory, 'xen-child.vhd');
    await backend.createChild({ target: 'xvda', base: vhdBase, format: 'vpc' }, child);
    const info = await readVhdInfo(child);
    assert.equal(info.diskType, 'differencing');
    assert.equal(info.currentSizeBytes, (await readVhdInfo(vhdBase)).currentSizeBytes);
    assert.deepEqual(await backend.chain(child), [vhdBase]);
    assert.deepEqual(await backend.chain(vhdBase), [], 'a base has no parent');
    assert.equal(await sha256(vhdBase), before);
  });

  it('makes empty data disks of the exact size in each format, copies qcow2 ones, and never overwrites', async () => {
    const qcow2 = path.join(directory, 'data.qcow2');
    await diskBackendFor('kvm').createEmptyDisk(qcow2, 64 * MiB);
    const info = await qemuImgInfo(qcow2);
    assert.deepEqual([info.format, info['virtual-size'], info['backing-filename']], ['qcow2', 64 * MiB, undefined]);
    const copied = path.join(directory, 'data-copy.qcow2');
    await diskBackendFor('kvm').createEmptyDisk(copied, 64 * MiB, qcow2);
    assert.equal(await sha256(copied), await sha256(qcow2));
    await assert.rejects(diskBackendFor('kvm').createEmptyDisk(qcow2, 64 * MiB), /EEXIST/);

    const vhd = path.join(directory, 'data.vhd');
    await diskBackendFor('xen').createEmptyDisk(vhd, 64 * MiB);
    const vhdInfo = await readVhdInfo(vhd);
    assert.deepEqual([vhdInfo.diskType, vhdInfo.currentSizeBytes], ['dynamic', 64 * MiB]);
    await assert.rejects(diskBackendFor('xen').createEmptyDisk(vhd, 64 * MiB), /EEXIST/);
  });
});
