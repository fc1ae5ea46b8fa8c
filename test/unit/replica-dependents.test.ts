// Unit test of services/agent/hypervisor/dependents.ts domainsBackedBy with real qemu-img files: a domain depends on a
// replica generation when any of its disks chains to a file in that generation's directory, however deep.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { domainsBackedBy, type DomainInfo } from '../../services/agent/hypervisor/index.js';

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
