// Unit tests of the agent's pure parts for image versions, persistent data disks and rebases: the lineage
// record's new fields (read, written, updated), the version a backing file stands for, the data disk's size
// rule and attachment, a seed's new instance-id, and the image directory's names with storage keys.
//
//   node --import tsx --test test/unit/agent-versions.test.ts
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { dataDiskSize, MAX_DATA_DISK_BYTES } from '../../services/agent/clone-engine.js';
import { cloneImageKey, imageKeyOfBackingFile, readCloneMetadata, updateCloneMetadata } from '../../services/agent/hypervisor/domain-xml/clone-metadata.js';
import { renderClone } from '../../services/agent/hypervisor/domain-xml/clone-rendering.js';
import { attachDataDisk } from '../../services/agent/hypervisor/domain-xml/data-disk-attachment.js';
import { attachSeedImage } from '../../services/agent/hypervisor/domain-xml/seed-attachment.js';
import { buildSeedImage, readSeedImage, withNewInstanceId } from '../../services/agent/hypervisor/seed-image.js';
import { toVirtualMachine } from '../../services/agent/host/reporter.js';
import { DiskFormat } from '../../services/gen/cowherd/common/v1/types.js';
import { Disk } from '../../services/gen/cowherd/inventory/v1/resources.js';
import {
  exportWorkDirectory,
  rebaseWorkFile,
  replicaDirectory,
  replicaGenerationOf,
  replicaStateFile,
  replicaStateFileId,
} from '../../services/agent/image-directory/layout.js';

const TEMPLATE = `<domain type='qemu'><name>t</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='disk-0.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>`;
const SATA_TEMPLATE = TEMPLATE.replace("target dev='vda' bus='virtio'", "target dev='sda' bus='sata'");

describe('agent: versions, data disks, rebase helpers', () => {
  let root: string;
  let cloneDirectory: string;
  before(async () => {
    root = await mkdtemp(path.join(tmpdir(), 'agent-versions-'));
    cloneDirectory = path.join(root, 'clones', 'c1');
    await mkdir(cloneDirectory, { recursive: true });
  });
  after(() => rm(root, { recursive: true, force: true }));

  const render = (template = TEMPLATE, target = 'vda') =>
    renderClone(template, {
      name: 'c1',
      hypervisor: 'kvm',
      cloneDirectory,
      disks: [{ target, path: path.join(cloneDirectory, `${target}.qcow2`) }],
      metadata: { source: { image: 'images/x' }, operation: 'operations/o', requestId: 'r', imageVersion: 'images/x/versions/2' },
    });

  test('the lineage record carries the exact version; update sets new and previous and keeps the rest', async () => {
    const rendered = await render();
    const read = readCloneMetadata(rendered.xml);
    assert.equal(read?.imageVersion, 'images/x/versions/2');
    assert.equal(read?.previousImageVersion, undefined);
    assert.equal(cloneImageKey(read), 'x_v2');
    const updated = updateCloneMetadata(rendered.xml, { imageVersion: 'images/x/versions/3', previousImageVersion: 'images/x/versions/2' });
    const again = readCloneMetadata(updated);
    assert.deepEqual(
      [again?.imageVersion, again?.previousImageVersion, again?.operation, again?.requestId],
      ['images/x/versions/3', 'images/x/versions/2', 'operations/o', 'r'],
    );
    assert.equal(cloneImageKey(again), 'x_v3');
    assert.ok(updated.includes(rendered.uuid), 'the UUID stays');
    // Updating twice keeps one element per field.
    const twice = updateCloneMetadata(updated, { imageVersion: 'images/x/versions/1' });
    assert.equal((twice.match(/imageVersion>/g) ?? []).length, 2, 'one <cowherd:imageVersion> element (open and close)');
    assert.equal(cloneImageKey(readCloneMetadata(twice)), 'x');
    assert.throws(() => updateCloneMetadata(TEMPLATE, { imageVersion: 'images/x/versions/2' }), /no cowherd clone record/);
  });

  test('a clone made before versions existed stands on version 1 of its image', () => {
    assert.equal(cloneImageKey({ source: { image: 'images/debian-12' }, operation: '', requestId: '' }), 'debian-12');
    assert.equal(cloneImageKey({ source: { virtualMachine: 'hosts/h/virtualMachines/v' }, operation: '', requestId: '' }), undefined);
    assert.equal(cloneImageKey(undefined), undefined);
  });

  test('the version a backing file stands for is its replica directory, generations included', () => {
    assert.equal(imageKeyOfBackingFile('/var/lib/cowherd/images/debian-12/disk-0.qcow2'), 'debian-12');
    assert.equal(imageKeyOfBackingFile('/var/lib/cowherd/images/debian-12_v3/disk-0.qcow2'), 'debian-12_v3');
    assert.equal(imageKeyOfBackingFile('/var/lib/cowherd/images/debian-12_v3.generation-2/disk-0.qcow2'), 'debian-12_v3');
    assert.equal(imageKeyOfBackingFile('/var/lib/cowherd/vms/base.qcow2'), undefined);
    assert.equal(imageKeyOfBackingFile('/var/lib/cowherd/images/.x.partial/disk-0.qcow2'), undefined);
    assert.equal(imageKeyOfBackingFile('/var/lib/cowherd/images/x_v1/disk-0.qcow2'), undefined, 'version 1 has no _v suffix');
  });

  test('data_disk_bytes: 0 is none, rounded up to a MiB, negative or above 16 TiB refused naming the field', () => {
    assert.equal(dataDiskSize('0'), 0);
    assert.equal(dataDiskSize('1'), 2 ** 20);
    assert.equal(dataDiskSize(String(2 ** 30)), 2 ** 30);
    assert.equal(dataDiskSize(String(MAX_DATA_DISK_BYTES)), MAX_DATA_DISK_BYTES);
    for (const bad of ['-1', String(MAX_DATA_DISK_BYTES + 1), 'abc']) {
      assert.throws(
        () => dataDiskSize(bad),
        (error: unknown) => error instanceof CowherdError && error.code === GrpcStatus.INVALID_ARGUMENT && error.field === 'data_disk_bytes',
      );
    }
  });

  test('a data disk goes on the system disk bus at the next target, before the seed, and is recorded as persistent', async () => {
    const rendered = await render();
    const attached = await attachDataDisk(rendered.xml, { diskPath: path.join(cloneDirectory, 'data.qcow2'), cloneDirectory, hypervisor: 'kvm' });
    assert.equal(attached.target, 'vdb');
    assert.match(attached.xml, /<driver name="qemu" type="qcow2"\/>\s*<source file="[^"]*data\.qcow2"\/>\s*<target dev="vdb" bus="virtio"\/>/);
    assert.deepEqual(readCloneMetadata(attached.xml)?.persistentDisks, ['vdb']);
    const seeded = await attachSeedImage(attached.xml, { seedPath: path.join(cloneDirectory, 'cidata.iso'), cloneDirectory, hypervisor: 'kvm' });
    assert.equal(seeded.target, 'vdc');
    assert.deepEqual(readCloneMetadata(seeded.xml)?.persistentDisks, ['vdb'], 'the seed attachment keeps the record');

    const sata = await attachDataDisk((await render(SATA_TEMPLATE, 'sda')).xml, {
      diskPath: path.join(cloneDirectory, 'data.qcow2'),
      cloneDirectory,
      hypervisor: 'kvm',
    });
    assert.equal(sata.target, 'sdb');
    assert.match(sata.xml, /target dev="sdb" bus="sata"/);
    await assert.rejects(
      attachDataDisk(rendered.xml, { diskPath: path.join(root, 'elsewhere.qcow2'), cloneDirectory, hypervisor: 'kvm' }),
      'a data disk outside the clone directory is refused',
    );
  });

  test('a new instance-id replaces only that line of meta-data and keeps every other file', () => {
    const image = buildSeedImage([
      { name: 'meta-data', content: 'instance-id: "old"\nlocal-hostname: "web-1"\n' },
      { name: 'user-data', content: '#cloud-config\n' },
    ]);
    const renewed = readSeedImage(withNewInstanceId(image, 'new-id'));
    assert.equal(renewed.label, 'cidata');
    assert.equal(renewed.files.get('meta-data')?.toString('utf8'), 'instance-id: "new-id"\nlocal-hostname: "web-1"\n');
    assert.equal(renewed.files.get('user-data')?.toString('utf8'), '#cloud-config\n');
  });

  test('the reporter shows the exact version, the previous one and the persistent disks; old clones by their backing file', () => {
    const disks = [
      Disk.fromPartial({
        target: 'vda',
        path: '/d/clones/c1/vda.qcow2',
        format: DiskFormat.DISK_FORMAT_QCOW2,
        backingChain: [{ path: '/d/images/x_v2/disk-0.qcow2', format: DiskFormat.DISK_FORMAT_QCOW2 }],
      }),
      Disk.fromPartial({ target: 'vdb', path: '/d/clones/c1/data.qcow2', format: DiskFormat.DISK_FORMAT_QCOW2 }),
    ];
    const domain = { name: 'c1', uuid: 'U', state: 'shut off' as const, domainType: 'qemu', vcpus: 1, memoryBytes: 1, disks: [] };
    const rebased = toVirtualMachine(
      'h',
      {
        ...domain,
        clone: {
          source: { image: 'images/x' },
          operation: '',
          requestId: '',
          imageVersion: 'images/x/versions/3',
          previousImageVersion: 'images/x/versions/2',
          persistentDisks: ['vdb'],
        },
      },
      disks,
    );
    assert.deepEqual(
      [
        rebased.sourceImage,
        rebased.sourceImageVersion,
        rebased.lineage?.image,
        rebased.lineage?.imageVersion,
        rebased.lineage?.previousImageVersion,
        rebased.lineage?.replica,
      ],
      ['images/x', 'images/x/versions/3', 'images/x', 'images/x/versions/3', 'images/x/versions/2', 'hosts/h/images/x/versions/3'],
    );
    assert.deepEqual(
      rebased.disks.map((disk) => [disk.target, disk.persistent]),
      [
        ['vda', false],
        ['vdb', true],
      ],
    );
    // Made before versions existed: the record names only the image; the backing file says version 2.
    const old = toVirtualMachine('h', { ...domain, clone: { source: { image: 'images/x' }, operation: '', requestId: '' } }, disks);
    assert.equal(old.sourceImageVersion, 'images/x/versions/2');
    assert.equal(old.lineage?.replica, 'hosts/h/images/x/versions/2');
    assert.ok(old.disks.every((disk) => !disk.persistent));
    const noBacking = toVirtualMachine('h', { ...domain, clone: { source: { image: 'images/x' }, operation: '', requestId: '' } }, [disks[1]!]);
    assert.equal(noBacking.sourceImageVersion, 'images/x/versions/1');
  });

  test('storage keys name distinct replica directories, state files and work files', () => {
    assert.equal(replicaDirectory('/r', 'x_v2'), '/r/images/x_v2');
    assert.equal(replicaDirectory('/r', 'x_v2', 3), '/r/images/x_v2.generation-3');
    assert.equal(replicaGenerationOf('x', 'x_v2'), undefined, 'version 2 is no generation of version 1');
    assert.equal(replicaGenerationOf('x_v2', 'x_v2.generation-3'), 3);
    assert.equal(replicaGenerationOf('x', 'x.generation-2'), 2);
    assert.equal(replicaStateFileId(path.basename(replicaStateFile('/r', 'x_v2'))), 'x_v2');
    assert.ok(!path.basename(exportWorkDirectory('/r', 'x_v2', 'u')).startsWith('.x.partial-'));
    assert.equal(rebaseWorkFile('/r/clones/c/vda.qcow2', 'rebase'), '/r/clones/c/.vda.qcow2.rebase');
    assert.equal(rebaseWorkFile('/r/clones/c/vda.qcow2', 'previous'), '/r/clones/c/.vda.qcow2.previous');
  });
});
