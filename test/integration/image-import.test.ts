/**
 * ImportImage through the public API on real parts (NATS, CA, inventory, distribution, cloning, two agents on
 * the private libvirtd, qemu-img): a qcow2, a raw and a VHD file in the origin's import directory, and a qcow2
 * served by a local HTTP server, become images registered like published ones (catalog record, origin
 * replica, image.published, image.available with generation 1). A download with a wrong checksum and an
 * import path that escapes leave nothing behind: no files, no records, no events. The imported image then
 * distributes to a second host and clones there.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { readdir, readFile, stat, symlink } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { IMAGE_AVAILABLE, IMAGE_PUBLISHED } from '../../services/common/domain/event-types.js';
import { consumeEvents } from '../../services/common/platform/events.js';
import { createClient } from '../../services/common/platform/client.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { unpack } from '../../services/common/domain/operations.js';
import {
  CloneResult_State,
  CloneVirtualMachinesRequest,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import {
  DistributeImageResponse,
  DistributionServiceClient,
  ImageImportStage,
  ImportImageDomain,
  ImportImageMetadata,
  ImportImageRequest,
} from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import type { ImageAvailable, ImagePublished } from '../../services/gen/cowherd/events/v1/events.js';
import { Image, Image_State, ImageReplica_State, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';
import { call, failure } from '../harness/grpc.js';
import { Resources } from '../harness/index.js';
import { REPOSITORY } from '../harness/processes.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

describe('importing images from files and URLs', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false, timeout: 600_000 }, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const origin = `imp-a-${suffix}`;
  const receiver = `imp-b-${suffix}`;
  let stack: CloneStack;
  let second: StackAgent;
  let importDirectory: string;
  let server: Server;
  let baseUrl: string;
  let qcow2Sha256: string;
  const published: ImagePublished[] = [];
  const available: ImageAvailable[] = [];

  before(async () => {
    stack = await startCloneStack(resources, origin);
    second = await stack.addAgent(receiver);
    await stack.waitHostsReady([origin, receiver]);
    // The agent's default import directory, made at its start.
    importDirectory = join(stack.imageDirectory, 'import');
    assert.ok((await stat(importDirectory)).isDirectory());
    const raw = join(importDirectory, 'disk.raw');
    await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=4', 'status=none']);
    await run('truncate', ['-s', '16M', raw]);
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, join(importDirectory, 'disk.qcow2')]);
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, join(importDirectory, 'disk.vhd')]);
    await symlink('/etc/passwd', join(importDirectory, 'escape'));
    const qcow2 = await readFile(join(importDirectory, 'disk.qcow2'));
    qcow2Sha256 = createHash('sha256').update(qcow2).digest('hex');
    server = createServer((request, response) => {
      if (new URL(request.url ?? '/', 'http://local').pathname === '/images/disk.qcow2')
        response.writeHead(200, { 'content-length': String(qcow2.length) }).end(qcow2);
      else response.writeHead(404).end();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    resources.defer(async () => {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    });
    baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const consumer = await consumeEvents<ImagePublished | ImageAvailable>(stack.connection.jetstream, stack.connection.manager, {
      durable: `test-import-${suffix}`,
      types: [IMAGE_PUBLISHED, IMAGE_AVAILABLE] as never,
      log: createLogger({ service: 'test', level: 'silent' }),
      handle: async (event) => {
        if (event.typeName === IMAGE_PUBLISHED.typeName) published.push(event.payload as ImagePublished);
        else available.push(event.payload as ImageAvailable);
      },
    });
    resources.defer(() => consumer.stop());
  });
  after(() => resources.release());

  const request = (imageId: string, source: ImportImageRequest['source'], domain: Partial<ImportImageDomain> = {}): ImportImageRequest =>
    ImportImageRequest.fromPartial({
      imageId,
      host: HOST_NAME.format({ host: origin }),
      source,
      template: { $case: 'domain', value: ImportImageDomain.fromPartial({ vcpus: 1, memoryMib: '128', ...domain }) },
      description: `imported ${imageId}`,
      labels: { origin: 'import' },
    });

  async function runImport(body: ImportImageRequest): Promise<{ done: Operation; metadata: ImportImageMetadata }> {
    const started = await call<Operation>((cb) => stack.distribution.importImage(body, cb));
    const done = await stack.wait(started.name, 180_000, stack.distributionOperations);
    assert.equal(done.done, true);
    return { done, metadata: unpack(ImportImageMetadata, done.metadata) };
  }

  async function assertNothingLeft(imageId: string): Promise<void> {
    const entries = await readdir(join(stack.imageDirectory, 'images'));
    assert.deepEqual(
      entries.filter((entry) => entry.includes(imageId)),
      [],
      'no replica directory, work directory or state file',
    );
    assert.equal((await failure((cb) => stack.inventory.getImage({ name: IMAGE_NAME.format({ image: imageId }), view: 0 }, cb))).code, GrpcStatus.NOT_FOUND);
    assert.equal(
      (await failure((cb) => stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: origin, image: imageId }) }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const name = IMAGE_NAME.format({ image: imageId });
    assert.deepEqual(
      [...published, ...available].filter((event) => event.image === name),
      [],
      'no events',
    );
  }

  for (const [file, format] of [
    ['disk.qcow2', 'qcow2'],
    ['disk.raw', 'raw'],
    ['disk.vhd', 'vpc'],
  ] as const) {
    it(`imports a local ${format} file as a published image`, async () => {
      const imageId = `imp-${format}-${suffix}`;
      const { done, metadata } = await runImport(request(imageId, { $case: 'importPath', value: file }));
      assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
      const image = unpack(Image, done.result.value);
      assert.equal(image.state, Image_State.STATE_AVAILABLE);
      assert.equal(image.originHost, HOST_NAME.format({ host: origin }));
      assert.equal(image.description, `imported ${imageId}`);
      assert.match(image.torrent?.infoHash ?? '', /^[0-9a-f]{40}$/);
      assert.equal(metadata.stage, ImageImportStage.IMAGE_IMPORT_STAGE_DONE);
      assert.equal(metadata.sourceFormat, format);
      const disk = image.files.find((entry) => entry.targetDevice === 'vda');
      assert.ok(disk, JSON.stringify(image.files));
      assert.equal(Number(disk.virtualSizeBytes), 16 * MiB);
      const directory = join(stack.imageDirectory, 'images', imageId);
      assert.equal(
        createHash('sha256')
          .update(await readFile(join(directory, disk.path)))
          .digest('hex'),
        disk.sha256,
      );
      assert.equal(JSON.parse((await run('qemu-img', ['info', '--output=json', join(directory, disk.path)])).stdout).format, 'qcow2');
      assert.equal((await stat(join(directory, disk.path))).mode & 0o222, 0, 'read-only');
      const template = await readFile(join(directory, 'domain-template.xml'), 'utf8');
      assert.equal(template, image.domainTemplate);
      assert.doesNotMatch(template, /<name>|<uuid>|\/import\//);
      const replica = await call<ImageReplica>((cb) => stack.inventory.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: origin, image: imageId }) }, cb));
      assert.equal(replica.state, ImageReplica_State.STATE_AVAILABLE);
      assert.equal(replica.origin, true);
      // image.published and the origin's image.available (generation 1), as for a publish.
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline && !(published.some((event) => event.image === image.name) && available.some((event) => event.image === image.name)))
        await new Promise((resolve) => setTimeout(resolve, 100));
      assert.ok(published.some((event) => event.image === image.name && event.infoHash === image.torrent!.infoHash));
      const origins = available.filter((event) => event.image === image.name);
      assert.deepEqual(
        origins.map((event) => [event.host, event.origin, event.generation]),
        [[HOST_NAME.format({ host: origin }), true, '1']],
      );
    });
  }

  it('imports from a URL with the right checksum', async () => {
    const imageId = `imp-url-${suffix}`;
    const { done, metadata } = await runImport(
      request(imageId, { $case: 'url', value: { uri: `${baseUrl}/images/disk.qcow2?token=secret`, sha256: qcow2Sha256, maxBytes: '0' } }),
    );
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    assert.equal(unpack(Image, done.result.value).state, Image_State.STATE_AVAILABLE);
    assert.equal(metadata.source, `${baseUrl}/images/disk.qcow2`, 'the query string (tokens) stays out of the metadata');
    assert.equal(metadata.sourceFormat, 'qcow2');
  });

  it('fails a download with a wrong checksum and leaves nothing', async () => {
    const imageId = `imp-bad-${suffix}`;
    const { done } = await runImport(request(imageId, { $case: 'url', value: { uri: `${baseUrl}/images/disk.qcow2`, sha256: 'b'.repeat(64), maxBytes: '0' } }));
    assert.equal(done.result?.$case, 'error', JSON.stringify(done.result));
    assert.equal(done.result.value.code, GrpcStatus.DATA_LOSS);
    assert.match(done.result.value.message, /SHA-256/);
    await assertNothingLeft(imageId);
    // The id is free again.
    const retry = await runImport(request(imageId, { $case: 'url', value: { uri: `${baseUrl}/images/disk.qcow2`, sha256: qcow2Sha256, maxBytes: '0' } }));
    assert.equal(retry.done.result?.$case, 'response', JSON.stringify(retry.done.result));
  });

  it('fails a URL that does not answer 200 with a transfer failure, not an unreachable host', async () => {
    const imageId = `imp-404-${suffix}`;
    const { done } = await runImport(request(imageId, { $case: 'url', value: { uri: `${baseUrl}/nothing.qcow2`, sha256: qcow2Sha256, maxBytes: '0' } }));
    assert.equal(done.result?.$case, 'error', JSON.stringify(done.result));
    assert.match(done.result.value.message, /HTTP 404/);
    await assertNothingLeft(imageId);
  });

  it('refuses paths that leave the import directory, naming the field', async () => {
    for (const path of ['../images/x', '/etc/passwd', 'a/../../b', '']) {
      const refused = await failure((cb) => stack.distribution.importImage(request(`imp-path-${suffix}`, { $case: 'importPath', value: path }), cb));
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, path);
      assert.deepEqual(refused.fields, ['import_path'], path);
    }
    const kernel = await failure((cb) =>
      stack.distribution.importImage(request(`imp-path-${suffix}`, { $case: 'importPath', value: 'disk.qcow2' }, { kernelPath: '../../etc/passwd' }), cb),
    );
    assert.deepEqual(kernel.fields, ['domain.kernel_path']);
    const url = await failure((cb) =>
      stack.distribution.importImage(
        request(`imp-path-${suffix}`, { $case: 'url', value: { uri: 'file:///etc/passwd', sha256: qcow2Sha256, maxBytes: '0' } }),
        cb,
      ),
    );
    assert.deepEqual(url.fields, ['url.uri']);
    // A symlink out of the import directory is found by the agent: the operation fails, naming the field.
    const imageId = `imp-link-${suffix}`;
    const { done } = await runImport(request(imageId, { $case: 'importPath', value: 'escape' }));
    assert.equal(done.result?.$case, 'error', JSON.stringify(done.result));
    assert.equal(done.result.value.code, GrpcStatus.INVALID_ARGUMENT);
    assert.match(done.result.value.message, /^import_path /);
    await assertNothingLeft(imageId);
  });

  it('distributes the imported image to another host and clones it there', async () => {
    const imageId = `imp-qcow2-${suffix}`;
    const distributed = await call<Operation>((cb) =>
      stack.distribution.distributeImage({ image: IMAGE_NAME.format({ image: imageId }), hosts: [HOST_NAME.format({ host: receiver })], requestId: '' }, cb),
    );
    const done = await stack.wait(distributed.name, 240_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const response = unpack(DistributeImageResponse, done.result.value);
    assert.deepEqual(response.failures, []);
    assert.deepEqual(
      response.replicas.map((replica) => [replica.host, replica.state]),
      [[HOST_NAME.format({ host: receiver }), ImageReplica_State.STATE_AVAILABLE]],
    );
    assert.ok((await readdir(join(second.imageDirectory, 'images', imageId))).includes('domain-template.xml'));

    const names = [`${imageId}-1`, `${imageId}-2`];
    const started = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        CloneVirtualMachinesRequest.fromPartial({
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [HOST_NAME.format({ host: receiver })], maxClonesPerHost: 0 },
          count: 2,
          nameTemplate: `${imageId}-{index}`,
          start: false,
        }),
        cb,
      ),
    );
    stack.track(...names);
    const cloned = await stack.wait(started.name);
    assert.equal(cloned.result?.$case, 'response', JSON.stringify(cloned.result));
    const clones = unpack(CloneVirtualMachinesResponse, cloned.result.value);
    assert.deepEqual(
      clones.clones.map((clone) => [clone.domainName, clone.state]),
      names.map((name) => [name, CloneResult_State.STATE_DONE]),
    );
    for (const name of names) {
      assert.equal((await stack.virsh('domstate', name)).stdout.trim(), 'shut off');
      const xml = (await stack.virsh('dumpxml', name)).stdout;
      assert.match(xml, new RegExp(`${second.imageDirectory}/clones/${name}/vda\\.qcow2`));
    }
  });

  it('imports through `cowherd images import` with progress, and refuses a bad invocation', async () => {
    const files = await stack.pki.files('admin', 'cli-importer');
    const cowherd = (...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> =>
      new Promise((resolve) => {
        execFile(
          process.execPath,
          [
            '--import',
            'tsx',
            'services/cli/main.ts',
            '--distribution',
            stack.distributionProcess.address,
            '--credentials',
            dirname(files.certificateFile),
            ...args,
          ],
          { cwd: REPOSITORY, timeout: 180_000, env: { PATH: process.env['PATH'] ?? '' } },
          (error, stdout, stderr) => resolve({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stdout, stderr }),
        );
      });
    const imageId = `imp-cli-${suffix}`;
    const imported = await cowherd(
      'images',
      'import',
      '--host',
      origin,
      '--image',
      imageId,
      '--file',
      'disk.raw',
      '--memory-mib',
      '256',
      '--network',
      'none',
      '--output',
      'json',
    );
    assert.equal(imported.code, 0, imported.stderr);
    const image = JSON.parse(imported.stdout) as { name: string; state: string };
    assert.deepEqual([image.name, image.state], [IMAGE_NAME.format({ image: imageId }), 'STATE_AVAILABLE']);
    assert.match(imported.stderr, /HASHING|CONVERTING|DONE/, 'progress lines on stderr');
    const both = await cowherd(
      'images',
      'import',
      '--host',
      origin,
      '--image',
      `${imageId}-x`,
      '--file',
      'a',
      '--url',
      'https://x/y',
      '--sha256',
      'a'.repeat(64),
    );
    assert.equal(both.code, 2, both.stderr);
    assert.match(both.stderr, /exactly one of --file and --url/);
    const escape = await cowherd('images', 'import', '--host', origin, '--image', `${imageId}-y`, '--file', '../../etc/passwd');
    assert.notEqual(escape.code, 0);
    assert.match(escape.stderr, /import_path/);
  });

  it('is for admins only: hosts and services are refused', async () => {
    for (const [kind, name] of [
      ['host', origin],
      ['service', 'cloning'],
      ['service', 'inventory'],
    ] as const) {
      const credentials = mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials(kind, name)), caPem: stack.pki.ca.certificatePem });
      const client = createClient(DistributionServiceClient, stack.distributionProcess.address, credentials, { defaultDeadlineMs: 10_000 });
      try {
        const refused = await failure((cb) => client.importImage(request(`imp-deny-${suffix}`, { $case: 'importPath', value: 'disk.qcow2' }), cb));
        assert.equal(refused.code, GrpcStatus.PERMISSION_DENIED, `${kind}/${name}`);
      } finally {
        client.close();
      }
    }
  });

  it('importing onto an existing image id adds its next version', async () => {
    const { done } = await runImport(request(`imp-qcow2-${suffix}`, { $case: 'importPath', value: 'disk.qcow2' }));
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const version = unpack(Image, done.result.value);
    assert.equal(version.name, `images/imp-qcow2-${suffix}/versions/2`);
    assert.equal(version.version, '2');
    assert.equal(version.state, Image_State.STATE_AVAILABLE);
    assert.ok((await stat(join(stack.imageDirectory, 'images', `imp-qcow2-${suffix}_v2`))).isDirectory());
  });
});
