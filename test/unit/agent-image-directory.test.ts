// The image directory as the agent prepares it at start (services/agent/image-directory/layout.ts): its folders,
// and the define work directory emptied of what a process killed in the middle of a `virsh define` left.
//
//   node --import tsx --test test/unit/agent-image-directory.test.ts
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { clonesDirectory, defineWorkDirectory, imagesDirectory, prepareImageDirectory } from '../../services/agent/image-directory/index.js';
import { VirshLibvirt } from '../../services/agent/hypervisor/index.js';

let root: string;

before(async () => {
  root = join(await mkdtemp(join(tmpdir(), 'cowherd-test-image-directory-')), 'image-dir');
});

after(async () => {
  await rm(join(root, '..'), { recursive: true, force: true });
});

describe('prepareImageDirectory', () => {
  it('makes the folders, and an empty private define work directory even after a crash left files in it', async () => {
    await prepareImageDirectory(root);
    for (const folder of [root, imagesDirectory(root), clonesDirectory(root)]) assert.ok((await stat(folder)).isDirectory());
    assert.equal((await stat(defineWorkDirectory(root))).mode & 0o777, 0o700);
    // What an agent killed during a define leaves: a directory of domain XML.
    const left = join(defineWorkDirectory(root), 'cowherd-define-abc123');
    await mkdir(left);
    await writeFile(join(left, 'domain-0.xml'), '<domain/>');
    await writeFile(join(imagesDirectory(root), 'keep'), 'x');
    await prepareImageDirectory(root);
    assert.deepEqual(await readdir(defineWorkDirectory(root)), []);
    assert.deepEqual(await readdir(imagesDirectory(root)), ['keep'], 'nothing else is touched');
  });

  it('VirshLibvirt writes the XML it defines there and removes it, also when the define fails', async () => {
    // virsh against a libvirt URI that does not exist fails; the work files must go all the same.
    const libvirt = new VirshLibvirt({ uri: 'test:///nonexistent-cowherd', workDirectory: defineWorkDirectory(root), timeoutMs: 10_000 });
    await assert.rejects(libvirt.define('<domain type="test"><name>x</name><memory>1024</memory><os><type>hvm</type></os></domain>'));
    await assert.rejects(libvirt.defineMany(['<domain/>', '<domain/>']).then((errors) => (errors.some(Boolean) ? Promise.reject(errors[0]) : undefined)));
    assert.deepEqual(await readdir(defineWorkDirectory(root)), []);
    // And it is the work directory given that is used, not the system's temp directory.
    const elsewhere = new VirshLibvirt({ uri: 'test:///nonexistent-cowherd', workDirectory: join(root, 'missing'), timeoutMs: 10_000 });
    await assert.rejects(
      elsewhere.define('<domain/>'),
      (error: NodeJS.ErrnoException) => error.code === 'ENOENT' && String(error.path).startsWith(join(root, 'missing')),
    );
  });
});
