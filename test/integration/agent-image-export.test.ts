// exportImage against the private libvirtd of scripts/libvirtd.sh (qemu:///system, TCG; root only, CI runs as
// root) and the real qemu-img: a powered-off domain whose disk is a qcow2 overlay of a base (a backing chain
// of two) becomes an image whose disk stands alone, reads the same guest-visible bytes, is named by the
// template, hashes as sha256sum says, and is read-only; a running VM, a disk locked by another running VM and
// an existing image id are refused with nothing left behind.
//
//   node --import tsx --test test/integration/agent-image-export.test.ts
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { ImagePublishStage } from '../../services/gen/cowherd/common/v1/types.js';
import { ImageFile_Role } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { templateDisks } from '../../services/agent/hypervisor/index.js';
import { exportImage, type ExportProgress } from '../../services/agent/image-export.js';
import { VirshLibvirt } from '../../services/agent/hypervisor/libvirt.js';

const run = promisify(execFile);
const URI = 'qemu:///system';
const repoRoot = join(fileURLToPath(new URL('.', import.meta.url)), '..', '..');
const log = createLogger({ service: 'test', level: 'silent' });
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
const suffix = randomBytes(3).toString('hex');
const MiB = 1024 * 1024;

function domainXml(name: string, disk: string): string {
  // type='qemu' (TCG): KVM is masked in libvirtd's namespace; <acpi/> or a poweroff never completes.
  return `<domain type='qemu'><name>${name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk>
<interface type='user'><model type='virtio'/></interface></devices></domain>`;
}

async function refused(promise: Promise<unknown>, code: GrpcStatus, reason: ErrorReason): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof CowherdError, String(error));
    assert.equal(error.code, code, error.message);
    assert.equal(error.reason, reason, error.message);
    return true;
  });
}

describe('exportImage with a real libvirtd', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const libvirt = new VirshLibvirt({ uri: URI, log });
  const source = `cowherd-export-${suffix}`;
  const locker = `cowherd-export-lock-${suffix}`;
  const domains: string[] = [];
  let directory: string;
  let imageDirectory: string;
  let overlay: string;

  before(async () => {
    await run('bash', [join(repoRoot, 'scripts', 'libvirtd.sh'), 'start'], { timeout: 120_000 });
    directory = await mkdtemp(join(tmpdir(), 'cowherd-test-export-'));
    imageDirectory = join(directory, 'image-dir');
    const vms = join(imageDirectory, 'vms');
    await mkdir(vms, { recursive: true });
    const base = join(vms, `${source}-base.qcow2`);
    overlay = join(vms, `${source}.qcow2`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '64M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 24M', '-c', 'write -P 0x17 40M 8M', base]);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
    // The overlay hides part of the base's data and adds its own: only the chain as a whole reads right.
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xa5 4M 4M', '-c', 'write -z 16M 2M', '-c', 'write -P 0x99 60M 1M', overlay]);
    for (const [name, disk] of [
      [source, overlay],
      [locker, overlay],
    ] as const) {
      const file = join(directory, `${name}.xml`);
      await writeFile(file, domainXml(name, disk));
      await virsh('define', file);
      domains.push(name);
    }
  });
  after(async () => {
    for (const name of domains) {
      await virsh('destroy', name).catch(() => undefined);
      await virsh('undefine', name).catch(() => undefined);
    }
    if (directory) {
      // Exported images are read-only (0555 directories).
      await run('chmod', ['-R', 'u+w', directory]).catch(() => undefined);
      await rm(directory, { recursive: true, force: true });
    }
  });

  const options = (image: string, onProgress?: (progress: ExportProgress) => void) => ({
    libvirt,
    imageDirectory,
    host: 'export-host',
    virtualMachine: `hosts/export-host/virtualMachines/${source}`,
    image,
    log,
    ...(onProgress ? { onProgress } : {}),
  });
  const imagesEntries = async () => (await readdir(join(imageDirectory, 'images'))).sort();

  test('exports the overlay flattened: no backing file, same guest bytes, named by the template, hashed, read-only', async (t) => {
    const reports: ExportProgress[] = [];
    const startedAt = performance.now();
    const result = await exportImage(options(`img-${suffix}`, (progress) => reports.push(progress)));
    const elapsedMs = performance.now() - startedAt;
    assert.equal(result.directory, join(imageDirectory, 'images', `img-${suffix}`));
    assert.deepEqual(await imagesEntries(), [`img-${suffix}`]);

    const disk = result.files.find((file) => file.role === ImageFile_Role.ROLE_DISK)!;
    assert.equal(disk.path, 'vda.qcow2');
    assert.equal(disk.virtualSizeBytes, 64 * MiB);
    const exported = join(result.directory, disk.path);
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-f', 'qcow2', exported])).stdout) as Record<string, unknown>;
    assert.equal(info['backing-filename'], undefined, 'the exported disk has no backing file');
    await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', overlay, exported]);

    const template = await readFile(join(result.directory, 'domain-template.xml'), 'utf8');
    assert.equal(template, result.domainTemplate);
    assert.deepEqual(
      templateDisks(template).map((entry) => [entry.target, entry.fileName, entry.format]),
      [['vda', 'vda.qcow2', 'qcow2']],
    );
    assert.doesNotMatch(template, new RegExp(`${source}|${imageDirectory}|<uuid>|<mac `));

    const { stdout } = await run(
      'sha256sum',
      result.files.map((file) => file.path),
      { cwd: result.directory },
    );
    const sums = new Map(
      stdout
        .trim()
        .split('\n')
        .map((line) => [line.split(/\s+/)[1]!, line.split(/\s+/)[0]!]),
    );
    for (const file of result.files) {
      assert.equal(file.sha256, sums.get(file.path), file.path);
      const fileInfo = await stat(join(result.directory, file.path));
      assert.equal(fileInfo.mode & 0o777, 0o444, file.path);
      assert.equal(fileInfo.size, file.sizeBytes, file.path);
    }
    assert.equal((await stat(result.directory)).mode & 0o777, 0o555);
    assert.deepEqual(
      [...new Set(reports.map((report) => report.stage))],
      [ImagePublishStage.IMAGE_PUBLISH_STAGE_EXPORTING, ImagePublishStage.IMAGE_PUBLISH_STAGE_HASHING],
    );
    assert.equal(reports.at(-1)!.bytesDone, result.totalBytes);
    // The source is untouched and still usable by libvirt.
    assert.equal((await libvirt.domain(source)).state, 'shut off');
    t.diagnostic(`exported a 64 MiB chain (${Math.round(result.totalBytes / MiB)} MiB image) in ${Math.round(elapsedMs)} ms`);
  });

  test('an existing image id is refused and the image stays as it was', async () => {
    const before = await readdir(join(imageDirectory, 'images', `img-${suffix}`));
    await refused(exportImage(options(`img-${suffix}`)), GrpcStatus.ALREADY_EXISTS, ErrorReason.ERROR_REASON_ALREADY_EXISTS);
    assert.deepEqual(await imagesEntries(), [`img-${suffix}`]);
    assert.deepEqual(await readdir(join(imageDirectory, 'images', `img-${suffix}`)), before);
  });

  test('a running VM is refused, leaving nothing behind', async () => {
    await virsh('start', source);
    try {
      await refused(exportImage(options(`running-${suffix}`)), GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING);
      assert.deepEqual(await imagesEntries(), [`img-${suffix}`]);
    } finally {
      await virsh('destroy', source);
    }
  });

  test('a disk locked by another running VM is refused (no -U), leaving nothing behind', async () => {
    await virsh('start', locker);
    try {
      assert.equal((await libvirt.domain(source)).state, 'shut off');
      await refused(exportImage(options(`locked-${suffix}`)), GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING);
      assert.deepEqual(await imagesEntries(), [`img-${suffix}`]);
    } finally {
      await virsh('destroy', locker);
    }
  });
});
