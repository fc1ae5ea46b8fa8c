// Unit tests of services/agent/image-export.ts with a fake Libvirt and the real qemu-img on tiny files:
// every refusal (leaving nothing behind), monotonic progress, flattening, read-only results, the template's
// disk formats, stale work directories, cancellation.
//
//   node --import tsx --test test/unit/agent-image-export.test.ts
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { DiskFormat, ImagePublishStage } from '../../services/gen/cowherd/common/v1/types.js';
import { ImageFile_Role } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { exportImage, toImageFiles, type ExportImageOptions, type ExportProgress } from '../../services/agent/image-export.js';
import { sanitizeDomainTemplate, templateDisks } from '../../services/agent/hypervisor/index.js';
import { LibvirtError, type DomainInfo, type DomainState, type Libvirt } from '../../services/agent/hypervisor/libvirt.js';

const run = promisify(execFile);
const qemuImg = (...args: string[]) => run('qemu-img', args, { timeout: 60_000 });
const sha256 = async (file: string) =>
  createHash('sha256')
    .update(await readFile(file))
    .digest('hex');
const MiB = 1024 * 1024;

function domainXml(options: { type?: string; disks: Array<{ path: string; format: string; target: string }>; kernel?: string; extra?: string }): string {
  const disks = options.disks
    .map(
      (disk) =>
        `<disk type='file' device='disk'><driver name='qemu' type='${disk.format}'/><source file='${disk.path}'/><target dev='${disk.target}' bus='virtio'/></disk>`,
    )
    .join('');
  const kernel = options.kernel ? `<kernel>${options.kernel}</kernel><cmdline>console=ttyS0 a=b&amp;c</cmdline>` : '';
  return `<domain type='${options.type ?? 'qemu'}'><name>src</name><uuid>6c3c1f0e-4f5e-4d0e-9d55-3d1c2b9a0001</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<sysinfo type='smbios'><system><entry name='manufacturer'>A&amp;B &lt;x&gt; "q" 'a'</entry></system></sysinfo>
<os><type arch='x86_64' machine='pc'>hvm</type>${kernel}</os><features><acpi/></features><!-- keep me -->
<devices>${disks}<interface type='user'><mac address='52:54:00:11:22:33'/><model type='virtio'/></interface>${options.extra ?? ''}</devices></domain>`;
}

/** A fake Libvirt with one domain per name. */
function fakeLibvirt(domains: Record<string, { state: DomainState; xml: string; type?: string }>): Pick<Libvirt, 'domain' | 'domainXml'> {
  const info = (name: string): DomainInfo => {
    const domain = domains[name];
    if (!domain) throw new LibvirtError('domain-not-found', `Domain not found: no domain with matching name '${name}'`);
    return { name, uuid: `uuid-${name}`, state: domain.state, domainType: domain.type ?? 'qemu', vcpus: 1, memoryBytes: 64 * MiB, disks: [] };
  };
  return {
    domain: async (name) => info(name),
    domainXml: async (uuid) => domains[uuid.replace(/^uuid-/, '')]!.xml,
  };
}

async function expectError(promise: Promise<unknown>, code: GrpcStatus, reason: ErrorReason): Promise<CowherdError> {
  const error = await promise.then(
    () => assert.fail('expected a failure'),
    (caught: unknown) => caught,
  );
  assert.ok(error instanceof CowherdError, `not a CowherdError: ${String(error)}`);
  assert.equal(error.code, code, error.message);
  assert.equal(error.reason, reason, error.message);
  return error;
}

describe('exportImage', () => {
  let root: string;
  let sources: string;
  let base: string;
  let overlay: string;
  let rawDisk: string;
  let kernel: string;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'cowherd-test-export-'));
    sources = join(root, 'sources');
    await mkdir(sources);
    base = join(sources, 'base.qcow2');
    overlay = join(sources, 'overlay.qcow2');
    rawDisk = join(sources, 'data.raw');
    kernel = join(sources, 'vmlinuz');
    await qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 6M', base]);
    await qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 2M 2M', '-c', 'write -P 0x33 10M 1M', overlay]);
    await qemuImg('create', '-q', '-f', 'raw', rawDisk, '8M');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 1M 1M', rawDisk]);
    await writeFile(kernel, Buffer.alloc(300_000, 7));
  });
  after(async () => {
    await run('chmod', ['-R', 'u+w', root]).catch(() => undefined);
    await rm(root, { recursive: true, force: true });
  });

  async function imageDirectory(): Promise<string> {
    const directory = await mkdtemp(join(root, 'imagedir-'));
    await mkdir(join(directory, 'images'));
    return directory;
  }
  function options(directory: string, libvirt: Pick<Libvirt, 'domain' | 'domainXml'>, overrides: Partial<ExportImageOptions> = {}): ExportImageOptions {
    return { libvirt, imageDirectory: directory, host: 'h1', virtualMachine: 'hosts/h1/virtualMachines/src', image: 'img-1', ...overrides };
  }
  const goodXml = () =>
    domainXml({
      disks: [
        { path: overlay, format: 'qcow2', target: 'vda' },
        { path: rawDisk, format: 'raw', target: 'vdb' },
      ],
      kernel,
    });

  test('exports a qcow2 overlay flattened and a raw disk as qcow2, with a boot file, hashes and read-only files', async () => {
    const directory = await imageDirectory();
    // What a crashed export of the same id left (read-only, like a finished one), and another id's work.
    const stale = join(directory, 'images', '.img-1.partial-deadbeef');
    await mkdir(stale);
    await writeFile(join(stale, 'vda.qcow2'), 'half');
    await chmod(join(stale, 'vda.qcow2'), 0o444);
    await chmod(stale, 0o555);
    const otherWork = join(directory, 'images', '.img-10.partial-cafe');
    await mkdir(otherWork);

    const reports: ExportProgress[] = [];
    const result = await exportImage(
      options(directory, fakeLibvirt({ src: { state: 'shut off', xml: goodXml() } }), {
        onProgress: (progress) => reports.push(progress),
        progressIntervalMs: 0,
      }),
    );

    assert.equal(result.directory, join(directory, 'images', 'img-1'));
    assert.deepEqual((await readdir(join(directory, 'images'))).sort(), ['.img-10.partial-cafe', 'img-1']);
    assert.deepEqual(
      result.files.map((file) => [file.path, file.role, file.format, file.targetDevice]),
      [
        ['vda.qcow2', ImageFile_Role.ROLE_DISK, DiskFormat.DISK_FORMAT_QCOW2, 'vda'],
        ['vdb.qcow2', ImageFile_Role.ROLE_DISK, DiskFormat.DISK_FORMAT_QCOW2, 'vdb'],
        ['boot-kernel', ImageFile_Role.ROLE_UNSPECIFIED, DiskFormat.DISK_FORMAT_UNSPECIFIED, ''],
        ['domain-template.xml', ImageFile_Role.ROLE_DOMAIN_TEMPLATE, DiskFormat.DISK_FORMAT_UNSPECIFIED, ''],
      ],
    );
    assert.equal(result.files[2]!.bootFile, 'kernel');
    assert.deepEqual(
      result.files.map((file) => file.virtualSizeBytes),
      [16 * MiB, 8 * MiB, 0, 0],
    );
    for (const file of result.files) {
      const path = join(result.directory, file.path);
      const info = await stat(path);
      assert.equal(info.mode & 0o777, 0o444, file.path);
      assert.equal(info.size, file.sizeBytes, file.path);
      assert.equal(await sha256(path), file.sha256, file.path);
    }
    assert.equal((await stat(result.directory)).mode & 0o777, 0o555);
    assert.equal(
      result.totalBytes,
      result.files.reduce((sum, file) => sum + file.sizeBytes, 0),
    );
    assert.equal(toImageFiles(result.files)[0]!.sizeBytes, String(result.files[0]!.sizeBytes));

    // Flattened: no backing file, same guest-visible bytes as the chain; the raw disk converted, same bytes.
    const info = JSON.parse((await qemuImg('info', '--output=json', '-f', 'qcow2', join(result.directory, 'vda.qcow2'))).stdout) as Record<string, unknown>;
    assert.equal(info['backing-filename'], undefined);
    await qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', overlay, join(result.directory, 'vda.qcow2'));
    await qemuImg('compare', '-f', 'raw', '-F', 'qcow2', rawDisk, join(result.directory, 'vdb.qcow2'));
    assert.deepEqual(await readFile(join(result.directory, 'boot-kernel')), await readFile(kernel));

    // The template: exported names and formats, no identity, everything else kept.
    const template = await readFile(join(result.directory, 'domain-template.xml'), 'utf8');
    assert.equal(template, result.domainTemplate);
    assert.deepEqual(
      templateDisks(template).map((disk) => [disk.target, disk.fileName, disk.format]),
      [
        ['vda', 'vda.qcow2', 'qcow2'],
        ['vdb', 'vdb.qcow2', 'qcow2'],
      ],
    );
    assert.match(template, /<kernel>boot-kernel<\/kernel>/);
    assert.match(template, /A&amp;B &lt;x&gt;/);
    assert.match(template, /a=b&amp;c/);
    assert.match(template, /<!-- keep me -->/);
    assert.doesNotMatch(template, /<name>|<uuid>|52:54:00:11:22:33|sources/);

    // Progress: EXPORTING then HASHING, monotonic within a stage, each ending at its total.
    const stages = [...new Set(reports.map((report) => report.stage))];
    assert.deepEqual(stages, [ImagePublishStage.IMAGE_PUBLISH_STAGE_EXPORTING, ImagePublishStage.IMAGE_PUBLISH_STAGE_HASHING]);
    for (const stage of stages) {
      const ofStage = reports.filter((report) => report.stage === stage);
      assert.ok(
        ofStage.every(
          (report, index) =>
            report.bytesTotal === ofStage[0]!.bytesTotal &&
            report.bytesDone <= report.bytesTotal &&
            (index === 0 || report.bytesDone >= ofStage[index - 1]!.bytesDone),
        ),
        JSON.stringify(ofStage),
      );
      assert.equal(ofStage[0]!.bytesDone, 0);
      assert.equal(ofStage.at(-1)!.bytesDone, ofStage.at(-1)!.bytesTotal);
    }
    assert.equal(reports.filter((report) => report.stage === ImagePublishStage.IMAGE_PUBLISH_STAGE_HASHING).at(-1)!.bytesTotal, result.totalBytes);

    // The same id again: ALREADY_EXISTS, the image untouched.
    await expectError(
      exportImage(options(directory, fakeLibvirt({ src: { state: 'shut off', xml: goodXml() } }))),
      GrpcStatus.ALREADY_EXISTS,
      ErrorReason.ERROR_REASON_ALREADY_EXISTS,
    );
    assert.equal(await sha256(join(result.directory, 'vda.qcow2')), result.files[0]!.sha256);
  });

  test('a Xen domain exports VHD with the exact virtual size', async () => {
    const directory = await imageDirectory();
    const xml = domainXml({ type: 'xen', disks: [{ path: rawDisk, format: 'raw', target: 'xvda' }] });
    const result = await exportImage(options(directory, fakeLibvirt({ src: { state: 'shut off', xml, type: 'xen' } })));
    assert.deepEqual(
      result.files.map((file) => [file.path, file.format, file.virtualSizeBytes]),
      [
        ['xvda.vhd', DiskFormat.DISK_FORMAT_VHD, 8 * MiB],
        ['domain-template.xml', DiskFormat.DISK_FORMAT_UNSPECIFIED, 0],
      ],
    );
    assert.deepEqual(
      templateDisks(result.domainTemplate).map((disk) => disk.format),
      ['vpc'],
    );
    await qemuImg('compare', '-f', 'raw', '-F', 'vpc', rawDisk, join(result.directory, 'xvda.vhd'));
  });

  const refusals: Array<[string, Partial<ExportImageOptions> | (() => Partial<ExportImageOptions>), GrpcStatus, ErrorReason]> = [
    ['a bad image id', { image: 'Bad_Id' }, GrpcStatus.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_INVALID_FIELD],
    ['an image name instead of an id', { image: 'images/img-1' }, GrpcStatus.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_INVALID_FIELD],
    ['a malformed VM name', { virtualMachine: 'virtualMachines/src' }, GrpcStatus.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_INVALID_FIELD],
    ['a VM on another host', { virtualMachine: 'hosts/h2/virtualMachines/src' }, GrpcStatus.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_HOST_MISMATCH],
    ['a VM that does not exist', { virtualMachine: 'hosts/h1/virtualMachines/nope' }, GrpcStatus.NOT_FOUND, ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND],
    ['a running VM', { virtualMachine: 'hosts/h1/virtualMachines/running' }, GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING],
    ['a paused VM', { virtualMachine: 'hosts/h1/virtualMachines/paused' }, GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING],
    [
      'a VM with host device passthrough',
      { virtualMachine: 'hosts/h1/virtualMachines/hostdev' },
      GrpcStatus.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_UNTRUSTED_DOMAIN_XML,
    ],
    [
      'a VM whose disk is missing',
      { virtualMachine: 'hosts/h1/virtualMachines/missing' },
      GrpcStatus.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    ],
    [
      'a VM whose backing file is missing',
      { virtualMachine: 'hosts/h1/virtualMachines/orphan' },
      GrpcStatus.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    ],
    [
      'a VM whose kernel is missing',
      { virtualMachine: 'hosts/h1/virtualMachines/nokernel' },
      GrpcStatus.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    ],
  ];
  for (const [name, overrides, code, reason] of refusals) {
    test(`refuses ${name} and leaves nothing behind`, async () => {
      const directory = await imageDirectory();
      const orphan = join(root, `orphan-${Math.random().toString(36).slice(2)}.qcow2`);
      const gone = join(root, `gone-${Math.random().toString(36).slice(2)}.qcow2`);
      await qemuImg('create', '-q', '-f', 'qcow2', gone, '4M');
      await qemuImg('create', '-q', '-f', 'qcow2', '-b', gone, '-F', 'qcow2', orphan);
      await rm(gone);
      const libvirt = fakeLibvirt({
        src: { state: 'shut off', xml: goodXml() },
        running: { state: 'running', xml: goodXml() },
        paused: { state: 'paused', xml: goodXml() },
        hostdev: {
          state: 'shut off',
          xml: domainXml({
            disks: [{ path: overlay, format: 'qcow2', target: 'vda' }],
            extra: "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>",
          }),
        },
        missing: { state: 'shut off', xml: domainXml({ disks: [{ path: join(root, 'no-such.qcow2'), format: 'qcow2', target: 'vda' }] }) },
        orphan: { state: 'shut off', xml: domainXml({ disks: [{ path: orphan, format: 'qcow2', target: 'vda' }] }) },
        nokernel: { state: 'shut off', xml: domainXml({ disks: [{ path: overlay, format: 'qcow2', target: 'vda' }], kernel: join(root, 'no-kernel') }) },
      });
      const error = await expectError(exportImage(options(directory, libvirt, typeof overrides === 'function' ? overrides() : overrides)), code, reason);
      if (code === GrpcStatus.INVALID_ARGUMENT) assert.ok(error.field === 'image' || error.field === 'virtual_machine');
      assert.deepEqual(await readdir(join(directory, 'images')), []);
    });
  }

  test('an existing image id is refused before anything is copied', async () => {
    const directory = await imageDirectory();
    await mkdir(join(directory, 'images', 'img-1'));
    await expectError(
      exportImage(options(directory, fakeLibvirt({ src: { state: 'shut off', xml: goodXml() } }))),
      GrpcStatus.ALREADY_EXISTS,
      ErrorReason.ERROR_REASON_ALREADY_EXISTS,
    );
    assert.deepEqual(await readdir(join(directory, 'images')), ['img-1']);
    assert.deepEqual(await readdir(join(directory, 'images', 'img-1')), []);
  });

  test('a second export of the same id while one runs is refused and does not disturb it', async () => {
    const directory = await imageDirectory();
    const libvirt = fakeLibvirt({ src: { state: 'shut off', xml: goodXml() } });
    const first = exportImage(options(directory, libvirt));
    await expectError(exportImage(options(directory, libvirt)), GrpcStatus.ALREADY_EXISTS, ErrorReason.ERROR_REASON_ALREADY_EXISTS);
    const result = await first;
    assert.deepEqual(await readdir(join(directory, 'images')), ['img-1']);
    assert.equal(result.files.length, 4);
  });

  test('cancelling removes the work directory and throws CANCELLED', async () => {
    const directory = await imageDirectory();
    const controller = new AbortController();
    const onProgress = (progress: ExportProgress): void => {
      if (progress.stage === ImagePublishStage.IMAGE_PUBLISH_STAGE_HASHING) controller.abort();
    };
    await expectError(
      exportImage(options(directory, fakeLibvirt({ src: { state: 'shut off', xml: goodXml() } }), { onProgress, signal: controller.signal })),
      GrpcStatus.CANCELLED,
      ErrorReason.ERROR_REASON_OPERATION_CONFLICT,
    );
    assert.deepEqual(await readdir(join(directory, 'images')), []);
  });

  test('the image format option changes only the disk driver types of the template', () => {
    const sanitized = sanitizeDomainTemplate(domainXml({ disks: [{ path: rawDisk, format: 'raw', target: 'vda' }], kernel }));
    const retargeted = sanitizeDomainTemplate(domainXml({ disks: [{ path: rawDisk, format: 'raw', target: 'vda' }], kernel }), { imageFormat: 'qcow2' });
    assert.equal(retargeted.xml, sanitized.xml.replace(`type="raw"`, `type="qcow2"`));
    assert.equal(retargeted.disks[0]!.format, 'raw', 'the exported disk list keeps the source format');
    assert.equal(
      sanitizeDomainTemplate(domainXml({ disks: [{ path: rawDisk, format: 'raw', target: 'vda' }], kernel }), { imageFormat: 'raw' }).xml,
      sanitized.xml,
    );
  });
});
