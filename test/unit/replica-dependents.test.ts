// Unit test of services/agent/hypervisor/dependents.ts domainsBackedBy with real qemu-img files: a domain depends on a
// replica generation when any of its disks chains to a file in that generation's directory, however deep.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { backingChain, domainsBackedBy, type DomainInfo } from '../../services/agent/hypervisor/index.js';
import { parseStreamBackingUri } from '../../services/agent/image-directory/index.js';

const run = promisify(execFile);
let root: string;
const domain = (name: string, sourcePath: string, format: string, image?: string): DomainInfo =>
  ({
    name,
    uuid: name,
    state: 'shut off',
    domainType: 'qemu',
    vcpus: 1,
    memoryBytes: 1,
    disks: [{ target: 'vda', device: 'disk', type: 'file', sourcePath, format }],
    ...(image ? { clone: { source: { image }, operation: '', requestId: '' } } : {}),
  }) as unknown as DomainInfo;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'cowherd-test-dependents-'));
  for (const directory of ['images/img', 'images/img.generation-2', 'clones/a', 'clones/b', 'clones/c', 'vms'])
    await mkdir(join(root, directory), { recursive: true });
  for (const generation of ['img', 'img.generation-2'])
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(root, 'images', generation, 'vda.qcow2'), '16M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(root, 'images/img/vda.qcow2'), '-F', 'qcow2', join(root, 'clones/a/vda.qcow2')]);
  // A clone of clone a: its metadata names a VM, not the image; only the chain shows it uses generation 1.
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(root, 'clones/a/vda.qcow2'), '-F', 'qcow2', join(root, 'clones/b/vda.qcow2')]);
  await run('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-b',
    join(root, 'images/img.generation-2/vda.qcow2'),
    '-F',
    'qcow2',
    join(root, 'clones/c/vda.qcow2'),
  ]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(root, 'vms/other.qcow2'), '16M']);
  // A VHD child cowherd cannot follow here: its metadata decides.
  const vhd = Buffer.alloc(512);
  vhd.write('conectix', 0, 'latin1');
  await writeFile(join(root, 'vms/child.vhd'), vhd);
});

after(() => rm(root, { recursive: true, force: true }));

describe('domainsBackedBy', () => {
  test('follows backing chains per generation, counts clones of clones, and falls back to metadata for VHD children', async () => {
    const domains = [
      domain('a', join(root, 'clones/a/vda.qcow2'), 'qcow2', 'images/img'),
      domain('b', join(root, 'clones/b/vda.qcow2'), 'qcow2'),
      domain('c', join(root, 'clones/c/vda.qcow2'), 'qcow2', 'images/img'),
      domain('other', join(root, 'vms/other.qcow2'), 'qcow2'),
      domain('xen-child', join(root, 'vms/child.vhd'), 'vpc', 'images/img'),
    ];
    assert.deepEqual(await domainsBackedBy(domains, join(root, 'images/img'), 'img'), ['a', 'b', 'xen-child']);
    assert.deepEqual(await domainsBackedBy(domains, join(root, 'images/img.generation-2'), 'img'), ['c', 'xen-child']);
    assert.deepEqual(await domainsBackedBy(domains, join(root, 'images/another'), 'another'), []);
  });
});

describe('a streaming clone (its base an NBD export of the replica still arriving)', () => {
  test('depends on its replica from the first moment: its chain ends at the replica file the export serves', async () => {
    await mkdir(join(root, 'clones/s'), { recursive: true });
    const uri = `nbd+unix:///img.vda.qcow2?socket=${join(root, '.streaming', 'nbd.sock')}`;
    // -u: the export is not opened (no streaming server runs here); the size is given instead.
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', uri, '-F', 'qcow2', join(root, 'clones/s/vda.qcow2'), '16M']);
    assert.deepEqual(await backingChain(join(root, 'clones/s/vda.qcow2')), [join(root, 'images/img/vda.qcow2')]);
    const domains = [domain('s', join(root, 'clones/s/vda.qcow2'), 'qcow2')];
    assert.deepEqual(await domainsBackedBy(domains, join(root, 'images/img'), 'img'), ['s']);
    assert.deepEqual(await domainsBackedBy(domains, join(root, 'images/img.generation-2'), 'img'), []);
  });

  test('an NBD URI of another kind is no replica of this image directory', () => {
    assert.equal(parseStreamBackingUri('nbd+unix:///img.vda.qcow2?socket=/elsewhere/nbd.sock'), undefined);
    assert.equal(parseStreamBackingUri('nbd://host:10809/img.vda.qcow2'), undefined);
    assert.equal(parseStreamBackingUri('nbd+unix:///noDot?socket=/r/.streaming/nbd.sock'), undefined);
    assert.deepEqual(parseStreamBackingUri('nbd+unix:///img_v2.vda.qcow2?socket=/r/.streaming/nbd.sock'), {
      root: '/r',
      key: 'img_v2',
      file: 'vda.qcow2',
      replicaPath: '/r/images/img_v2/vda.qcow2',
    });
  });
});
