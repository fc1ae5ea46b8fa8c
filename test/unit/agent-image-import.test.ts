// Unit tests of services/agent/image-import.ts: the import path rules (lexical, symlinks, regular files), the
// URL and checksum rules, qemu-img info parsing (formats, backing files, data files, vmdk extents), the
// parameter-rendered template through the sanitizer, and whole imports with the real qemu-img on tiny files
// (a local qcow2, raw and vhd; a download from a local HTTP server with the right and a wrong checksum) that
// leave nothing behind when they fail. No libvirt: the hypervisor facts are a fake.
//
//   node --import tsx --test test/unit/agent-image-import.test.ts
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { ImageImportStage, ImportImageDomain, ImportImageDomain_DiskBus } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { ImageFile_Role } from '../../services/gen/cowherd/inventory/v1/resources.js';
import {
  checkImportPath,
  checkImportUrl,
  checkSha256,
  displayUrl,
  importImage,
  parseQemuImageInfo,
  resolveImportFile,
  type ImportImageOptions,
  type ImportProgress,
} from '../../services/agent/image-import.js';
import { renderImportDomain, sanitizeDomainTemplate, templateDisks } from '../../services/agent/hypervisor/index.js';

const run = promisify(execFile);
const qemuImg = (...args: string[]) => run('qemu-img', args, { timeout: 60_000 });
const MiB = 1024 * 1024;

async function failure(promise: Promise<unknown> | (() => unknown)): Promise<CowherdError> {
  try {
    await (typeof promise === 'function' ? promise() : promise);
  } catch (error) {
    assert.ok(error instanceof CowherdError, `not a CowherdError: ${String(error)}`);
    return error;
  }
  assert.fail('expected a failure');
}

describe('import path rules', () => {
  test('lexical: relative, no dot segments, no control characters', async () => {
    assert.equal(checkImportPath('debian.qcow2', 'import_path'), 'debian.qcow2');
    assert.equal(checkImportPath('cloud/debian.qcow2', 'import_path'), 'cloud/debian.qcow2');
    for (const bad of ['', '/etc/shadow', '../x', 'a/../../x', 'a/./b', 'a//b', 'a/', 'x\u0000y', 'x\ny', 'a'.repeat(1025)]) {
      const error = await failure(() => checkImportPath(bad, 'import_path'));
      assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, bad);
      assert.equal(error.field, 'import_path', bad);
    }
  });

  describe('resolving', () => {
    let root: string;
    let importDirectory: string;
    before(async () => {
      root = await mkdtemp(join(tmpdir(), 'cowherd-import-paths-'));
      importDirectory = join(root, 'import');
      await mkdir(join(importDirectory, 'sub'), { recursive: true });
      await writeFile(join(importDirectory, 'disk.img'), 'x');
      await writeFile(join(importDirectory, 'sub', 'inner.img'), 'yy');
      await writeFile(join(root, 'secret'), 'outside');
      await symlink(join(root, 'secret'), join(importDirectory, 'escape'));
      await symlink('../secret', join(importDirectory, 'sub-escape'));
      await symlink(root, join(importDirectory, 'dir-escape'));
      await symlink('disk.img', join(importDirectory, 'alias.img'));
      await symlink(join(root, 'missing'), join(importDirectory, 'dangling'));
    });
    after(() => rm(root, { recursive: true, force: true }));

    test('regular files inside, through inside symlinks too', async () => {
      assert.deepEqual(await resolveImportFile(importDirectory, 'disk.img', 'import_path'), { path: join(importDirectory, 'disk.img'), sizeBytes: 1 });
      assert.equal((await resolveImportFile(importDirectory, 'sub/inner.img', 'import_path')).sizeBytes, 2);
      assert.equal((await resolveImportFile(importDirectory, 'alias.img', 'import_path')).path, join(importDirectory, 'disk.img'));
    });

    test('symlinks out, directories and dangling links are refused naming the field; missing files are NOT_FOUND', async () => {
      for (const path of ['escape', '../secret', 'dir-escape/secret', 'sub-escape', 'sub', 'dangling']) {
        const error = await failure(resolveImportFile(importDirectory, path, 'import_path'));
        assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, `${path}: ${error.message}`);
        assert.equal(error.field, 'import_path', path);
      }
      assert.equal((await failure(resolveImportFile(importDirectory, 'nothing.img', 'import_path'))).code, GrpcStatus.NOT_FOUND);
    });
  });

  test('URLs and checksums', async () => {
    assert.equal(checkImportUrl('https://example.org/a.qcow2').hostname, 'example.org');
    for (const bad of ['', 'file:///etc/passwd', 'ftp://x/y', 'https://user:pw@example.org/a', 'not a url']) {
      assert.equal((await failure(() => checkImportUrl(bad))).field, 'url.uri', bad);
    }
    assert.equal(checkSha256('A'.repeat(64)), 'a'.repeat(64));
    assert.equal((await failure(() => checkSha256('abc'))).field, 'url.sha256');
    assert.equal(displayUrl('https://h.example:8443/x/y.img?token=secret#f'), 'https://h.example:8443/x/y.img');
  });
});

describe('qemu-img info parsing', () => {
  const info = (fields: Record<string, unknown>) => JSON.stringify({ filename: '/i/f', 'virtual-size': 1048576, 'actual-size': 4096, ...fields });
  test('accepted formats', () => {
    for (const format of ['qcow2', 'raw', 'vmdk', 'vpc', 'vhdx']) {
      const extents = format === 'vmdk' ? { 'format-specific': { type: 'vmdk', data: { extents: [{ filename: '/i/f' }] } } } : {};
      assert.deepEqual(parseQemuImageInfo(info({ format, ...extents }), 'import_path', '/i/f'), { format, virtualSizeBytes: 1048576, actualSizeBytes: 4096 });
    }
  });
  test('refusals name the field', async () => {
    const refused = [
      info({ format: 'luks' }),
      info({ format: 'iso' }),
      info({ format: 'qcow2', 'backing-filename': '/etc/shadow', 'full-backing-filename': '/etc/shadow' }),
      info({ format: 'vhdx', 'backing-filename': 'parent.vhdx' }),
      info({ format: 'qcow2', encrypted: true }),
      info({ format: 'qcow2', 'format-specific': { type: 'qcow2', data: { 'data-file': '/dev/sda' } } }),
      info({ format: 'vmdk', 'format-specific': { type: 'vmdk', data: { extents: [{ filename: '/etc/shadow' }] } } }),
      info({ format: 'raw', 'virtual-size': 0 }),
      'not json',
    ];
    for (const json of refused) {
      const error = await failure(() => parseQemuImageInfo(json, 'url.uri', '/i/f'));
      assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, json);
      assert.equal(error.field, 'url.uri', json);
    }
  });
  test('what qemu-img really prints for a qcow2 with a backing file is refused', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-import-info-'));
    try {
      await qemuImg('create', '-q', '-f', 'qcow2', join(directory, 'base.qcow2'), '1M');
      await qemuImg('create', '-q', '-f', 'qcow2', '-b', join(directory, 'base.qcow2'), '-F', 'qcow2', join(directory, 'child.qcow2'));
      const { stdout } = await qemuImg('info', '--output=json', join(directory, 'child.qcow2'));
      assert.match((await failure(() => parseQemuImageInfo(stdout, 'import_path', join(directory, 'child.qcow2')))).message, /backing file/);
      const base = await qemuImg('info', '--output=json', join(directory, 'base.qcow2'));
      assert.equal(parseQemuImageInfo(base.stdout, 'import_path', join(directory, 'base.qcow2')).format, 'qcow2');
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });
});

describe('the rendered domain', () => {
  test('renders from parameters into a template like a published one', () => {
    const xml = renderImportDomain({
      domainType: 'qemu',
      vcpus: 2,
      memoryMib: 512,
      firmware: 'uefi',
      diskBus: 'sata',
      diskPath: '/x/work/disk',
      diskFormat: 'qcow2',
      network: 'default',
    });
    const template = sanitizeDomainTemplate(xml, { diskFileName: ({ target }) => `${target}.qcow2`, imageFormat: 'qcow2' });
    assert.deepEqual(templateDisks(template.xml), [{ target: 'sda', fileName: 'sda.qcow2', format: 'qcow2' }]);
    assert.match(template.xml, /<vcpu>2<\/vcpu>/);
    assert.match(template.xml, /firmware="efi"|firmware='efi'/);
    assert.doesNotMatch(template.xml, /<name>|<uuid>|\/x\/work/);
  });
  test('refuses bad parameters naming the field', async () => {
    const base = { domainType: 'kvm', vcpus: 1, memoryMib: 1024, firmware: 'bios', diskBus: 'virtio', diskPath: '/d', diskFormat: 'qcow2' } as const;
    assert.equal((await failure(() => renderImportDomain({ ...base, vcpus: 0 }))).field, 'domain.vcpus');
    assert.equal((await failure(() => renderImportDomain({ ...base, memoryMib: 1 }))).field, 'domain.memory_mib');
    assert.equal((await failure(() => renderImportDomain({ ...base, network: "x'><hostdev" }))).field, 'domain.network');
    assert.equal((await failure(() => renderImportDomain({ ...base, diskBus: 'xen' }))).field, 'domain.disk_bus');
    assert.equal((await failure(() => renderImportDomain({ ...base, domainType: 'xen', diskFormat: 'vpc' }))).field, 'domain.disk_bus');
  });
});

describe('importing', () => {
  let root: string;
  let imageDirectory: string;
  let importDirectory: string;
  let server: Server;
  let baseUrl: string;
  let payload: Buffer;
  let payloadSha256: string;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'cowherd-import-'));
    imageDirectory = join(root, 'images-root');
    importDirectory = join(root, 'import');
    await mkdir(importDirectory, { recursive: true });
    await mkdir(join(imageDirectory, 'images'), { recursive: true });
    const raw = join(importDirectory, 'disk.raw');
    await writeFile(raw, Buffer.concat([Buffer.alloc(MiB, 7), Buffer.alloc(3 * MiB)]));
    await qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, join(importDirectory, 'disk.qcow2'));
    await qemuImg('convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, join(importDirectory, 'disk.vhd'));
    await qemuImg('convert', '-q', '-f', 'raw', '-O', 'vmdk', raw, join(importDirectory, 'disk.vmdk'));
    await qemuImg('convert', '-q', '-f', 'raw', '-O', 'vhdx', raw, join(importDirectory, 'disk.vhdx'));
    // A vmdk whose data is another file (a descriptor naming a flat extent) must not be followed.
    await qemuImg('convert', '-q', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=monolithicFlat', raw, join(importDirectory, 'flat.vmdk'));
    // A qcow2 named like a raw file: the content decides.
    await qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, join(importDirectory, 'misnamed.raw'));
    payload = await readFile(join(importDirectory, 'disk.qcow2'));
    payloadSha256 = createHash('sha256').update(payload).digest('hex');
    server = createServer((request, response) => {
      if (request.url === '/disk.qcow2') response.end(payload);
      else if (request.url === '/redirect') response.writeHead(302, { location: '/disk.qcow2' }).end();
      else if (request.url === '/stall') {
        response.writeHead(200, { 'content-length': String(payload.length) });
        response.write(payload.subarray(0, 1000));
      } else response.writeHead(404).end();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
    await rm(root, { recursive: true, force: true });
  });

  const options = (image: string, source: ImportImageOptions['source'], extra: Partial<ImportImageOptions> = {}): ImportImageOptions => ({
    libvirt: { hypervisorFacts: async () => ({ domainTypes: ['qemu'] }) as never },
    imageDirectory,
    importDirectory,
    hypervisor: 'kvm',
    image,
    source,
    template: { kind: 'domain', domain: ImportImageDomain.fromPartial({ vcpus: 1, memoryMib: '128', network: 'none' }) },
    download: { maxBytes: 64 * MiB, stallMs: 2000, timeoutMs: 20_000 },
    progressIntervalMs: 10,
    ...extra,
  });
  const leftovers = async () => (await readdir(join(imageDirectory, 'images'))).filter((entry) => entry.startsWith('.'));

  for (const [file, format] of [
    ['disk.qcow2', 'qcow2'],
    ['disk.raw', 'raw'],
    ['disk.vhd', 'vpc'],
    ['disk.vmdk', 'vmdk'],
    ['disk.vhdx', 'vhdx'],
    ['misnamed.raw', 'qcow2'],
  ] as const) {
    test(`a local ${file} becomes a qcow2 image with a template (probed as ${format})`, async () => {
      const image = `local-${file.replace('.', '-')}`;
      const progress: ImportProgress[] = [];
      const imported = await importImage(options(image, { kind: 'path', path: file }, { onProgress: (update) => progress.push(update) }));
      assert.equal(imported.directory, join(imageDirectory, 'images', image));
      assert.deepEqual(
        imported.files.map((entry) => [entry.path, entry.role]),
        [
          ['vda.qcow2', ImageFile_Role.ROLE_DISK],
          ['domain-template.xml', ImageFile_Role.ROLE_DOMAIN_TEMPLATE],
        ],
      );
      const disk = imported.files[0]!;
      assert.equal(disk.virtualSizeBytes, 4 * MiB);
      assert.equal(
        disk.sha256,
        createHash('sha256')
          .update(await readFile(join(imported.directory, 'vda.qcow2')))
          .digest('hex'),
      );
      assert.equal((await stat(join(imported.directory, 'vda.qcow2'))).mode & 0o777, 0o444);
      const { stdout } = await qemuImg('info', '--output=json', join(imported.directory, 'vda.qcow2'));
      assert.equal(JSON.parse(stdout).format, 'qcow2');
      assert.deepEqual(templateDisks(imported.domainTemplate), [{ target: 'vda', fileName: 'vda.qcow2', format: 'qcow2' }]);
      assert.ok(progress.some((update) => update.stage === ImageImportStage.IMAGE_IMPORT_STAGE_CONVERTING));
      assert.ok(progress.some((update) => update.stage === ImageImportStage.IMAGE_IMPORT_STAGE_HASHING && update.bytesDone === update.bytesTotal));
      assert.equal(progress.at(-1)!.sourceFormat, format);
      assert.deepEqual(await leftovers(), []);
      // The input is read, never changed.
      assert.ok((await stat(join(importDirectory, file))).isFile());
    });
  }

  test('a download with the right checksum, through a redirect', async () => {
    const progress: ImportProgress[] = [];
    const imported = await importImage(
      options('from-url', { kind: 'url', uri: `${baseUrl}/redirect`, sha256: payloadSha256, maxBytes: 0 }, { onProgress: (update) => progress.push(update) }),
    );
    assert.deepEqual(await readdir(imported.directory), ['domain-template.xml', 'vda.qcow2']);
    const downloading = progress.filter((update) => update.stage === ImageImportStage.IMAGE_IMPORT_STAGE_DOWNLOADING);
    assert.equal(downloading.at(-1)!.bytesDone, payload.length);
    assert.deepEqual(await leftovers(), []);
  });

  test('failures leave nothing: wrong checksum, 404, stall, too large, bad template', async () => {
    const cases: Array<[string, ImportImageOptions, GrpcStatus]> = [
      ['wrong-sum', options('wrong-sum', { kind: 'url', uri: `${baseUrl}/disk.qcow2`, sha256: 'a'.repeat(64), maxBytes: 0 }), GrpcStatus.DATA_LOSS],
      ['missing', options('missing', { kind: 'url', uri: `${baseUrl}/nothing`, sha256: payloadSha256, maxBytes: 0 }), GrpcStatus.UNAVAILABLE],
      [
        'stall',
        options(
          'stall',
          { kind: 'url', uri: `${baseUrl}/stall`, sha256: payloadSha256, maxBytes: 0 },
          { download: { maxBytes: 64 * MiB, stallMs: 300, timeoutMs: 20_000 } },
        ),
        GrpcStatus.UNAVAILABLE,
      ],
      ['too-large', options('too-large', { kind: 'url', uri: `${baseUrl}/disk.qcow2`, sha256: payloadSha256, maxBytes: 1000 }), GrpcStatus.FAILED_PRECONDITION],
      [
        'two-disks',
        options(
          'two-disks',
          { kind: 'path', path: 'disk.qcow2' },
          {
            template: {
              kind: 'xml',
              xml: `<domain type='qemu'><memory>65536</memory><os><type>hvm</type></os><devices><disk type='file' device='disk'><source file='a'/><target dev='vda'/></disk><disk type='file' device='disk'><source file='b'/><target dev='vdb'/></disk></devices></domain>`,
            },
          },
        ),
        GrpcStatus.INVALID_ARGUMENT,
      ],
      [
        'hostdev',
        options(
          'hostdev',
          { kind: 'path', path: 'disk.qcow2' },
          { template: { kind: 'xml', xml: `<domain type='qemu'><devices><hostdev mode='subsystem' type='pci'/></devices></domain>` } },
        ),
        GrpcStatus.FAILED_PRECONDITION,
      ],
      ['escape', options('escape', { kind: 'path', path: '../images-root/x' }), GrpcStatus.INVALID_ARGUMENT],
      ['flat-vmdk', options('flat-vmdk', { kind: 'path', path: 'flat.vmdk' }), GrpcStatus.INVALID_ARGUMENT],
    ];
    for (const [name, request, code] of cases) {
      const error = await failure(importImage(request));
      assert.equal(error.code, code, `${name}: ${error.message}`);
      assert.deepEqual(await readdir(join(imageDirectory, 'images')).then((entries) => entries.filter((entry) => entry.includes(name))), [], name);
    }
    assert.deepEqual(await leftovers(), []);
  });

  test('a cancel (the stream ended) stops the download and leaves nothing; an existing image is not overwritten', async () => {
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('the stream ended')), 200);
    const error = await failure(
      importImage(
        options(
          'cancelled',
          { kind: 'url', uri: `${baseUrl}/stall`, sha256: payloadSha256, maxBytes: 0 },
          {
            signal: controller.signal,
            download: { maxBytes: 64 * MiB, stallMs: 10_000, timeoutMs: 20_000 },
          },
        ),
      ),
    );
    assert.equal(error.code, GrpcStatus.CANCELLED, error.message);
    assert.deepEqual(await leftovers(), []);
    const taken = await failure(importImage(options('local-disk-qcow2', { kind: 'path', path: 'disk.raw' })));
    assert.equal(taken.code, GrpcStatus.ALREADY_EXISTS);
    assert.deepEqual(await leftovers(), []);
  });

  test('an import asked again while its cancelled predecessor cleans up (a takeover) waits for it, then runs', async () => {
    const controller = new AbortController();
    const first = importImage(
      options(
        'takeover',
        { kind: 'url', uri: `${baseUrl}/stall`, sha256: payloadSha256, maxBytes: 0 },
        {
          signal: controller.signal,
          download: { maxBytes: 64 * MiB, stallMs: 10_000, timeoutMs: 20_000 },
        },
      ),
    );
    await new Promise((resolve) => setTimeout(resolve, 100));
    const second = importImage(options('takeover', { kind: 'path', path: 'disk.qcow2' }));
    setTimeout(() => controller.abort(new Error('the stream ended')), 100);
    assert.equal((await failure(first)).code, GrpcStatus.CANCELLED);
    assert.equal((await second).directory, join(imageDirectory, 'images', 'takeover'));
    assert.deepEqual(await leftovers(), []);
  });

  test('caller XML is sanitized and its kernel comes from the import directory', async () => {
    await writeFile(join(importDirectory, 'vmlinuz'), 'kernel');
    const xml = `<domain type='qemu'><name>x</name><uuid>6c3c1f0e-4f5e-4d0e-9d55-3d1c2b9a0001</uuid><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type><kernel>vmlinuz</kernel><cmdline>console=ttyS0</cmdline></os><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/anything/here.img'/><target dev='sda' bus='sata'/></disk><interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface></devices></domain>`;
    const imported = await importImage(options('with-kernel', { kind: 'path', path: 'disk.raw' }, { template: { kind: 'xml', xml } }));
    assert.deepEqual(
      imported.files.map((file) => file.path),
      ['sda.qcow2', 'boot-kernel', 'domain-template.xml'],
    );
    assert.doesNotMatch(imported.domainTemplate, /52:54:00:aa:bb:cc|<uuid>|\/anything/);
    assert.match(imported.domainTemplate, /type="qcow2"|type='qcow2'/);
    const escaping = `<domain type='qemu'><memory>65536</memory><os><type>hvm</type><kernel>../../etc/passwd</kernel></os><devices><disk type='file' device='disk'><source file='a'/><target dev='vda'/></disk></devices></domain>`;
    const error = await failure(importImage(options('kernel-escape', { kind: 'path', path: 'disk.raw' }, { template: { kind: 'xml', xml: escaping } })));
    assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, error.message);
    assert.deepEqual(await leftovers(), []);
  });

  test('a Xen host gets a VHD', async () => {
    const imported = await importImage(
      options(
        'for-xen',
        { kind: 'path', path: 'disk.qcow2' },
        {
          hypervisor: 'xen',
          template: { kind: 'domain', domain: ImportImageDomain.fromPartial({ diskBus: ImportImageDomain_DiskBus.DISK_BUS_UNSPECIFIED, network: 'none' }) },
        },
      ),
    );
    assert.equal(imported.files[0]!.path, 'xvda.vhd');
    assert.equal(imported.domainType, 'xen');
    const { stdout } = await qemuImg('info', '--output=json', join(imported.directory, 'xvda.vhd'));
    assert.equal(JSON.parse(stdout).format, 'vpc');
  });
});
