/**
 * Image versions in the inventory, on a real inventory process and NATS: version records and image heads are
 * written into KV directly (as the distribution service writes them), then GetImage answers the image view,
 * a version by number or alias (NOT_FOUND for an unknown one), ListImages one entry per image,
 * ListImageVersions the versions oldest first page by page, ListVirtualMachines and ListImageReplicas select by
 * exact version, and UpdateHost sets the image directory's high watermark, kept across re-registration.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import {
  Host,
  Image,
  Image_State,
  ImageHead,
  ImageReplica,
  ImageReplica_State,
  ImageView,
  VirtualMachine,
  VirtualMachine_State,
} from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { createClient } from '../../services/common/platform/client.js';
import { KvStore, protoCodec } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { IMAGE_HEADS_BUCKET } from '../../services/common/domain/image-versions.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, imageKey, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, failure, waitFor } from '../harness/grpc.js';
import { startCertificateAuthorityProcess, startServiceProcess } from '../harness/processes.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** A version record as the distribution service stores it (key = storage key, name by key, version = n). */
function versionRecord(id: string, version: number, state = Image_State.STATE_AVAILABLE, storedVersion = version): Image {
  return Image.fromPartial({
    name: IMAGE_NAME.format({ image: imageKey(id, version) }),
    description: `${id} version ${version}`,
    hypervisor: Hypervisor.HYPERVISOR_KVM,
    state,
    originHost: 'hosts/kvm-v1',
    domainTemplate: '<domain/>',
    torrent: { metainfo: Buffer.from(`metainfo of ${id} ${version}`), infoHash: 'a'.repeat(40), pieceLengthBytes: '262144', totalBytes: '1' },
    version: String(storedVersion),
  });
}

function hostFacts(host: string): Host {
  return Host.fromPartial({
    name: HOST_NAME.format({ host }),
    hostname: `${host}.example`,
    hypervisor: Hypervisor.HYPERVISOR_KVM,
    libvirtUri: 'test:///default',
    agentEndpoint: `${host}:7445`,
    cpuCount: 2,
    memoryBytes: '1000',
    imageDirectory: '/images',
    agentVersion: 'test',
  });
}

describe('inventory: image versions', () => {
  const resources = new Resources();
  const clients: InventoryServiceClient[] = [];
  let pki: TestPki;
  let address: string;
  let admin: InventoryServiceClient;
  let images: KvStore<Image>;
  let heads: KvStore<ImageHead>;
  let replicas: KvStore<ImageReplica>;

  async function as(kind: 'admin' | 'host', name: string): Promise<InventoryServiceClient> {
    const client = createClient(
      InventoryServiceClient,
      address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials(kind, name)), caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 20_000 },
    );
    clients.push(client);
    return client;
  }
  const getImage = (name: string, view = ImageView.IMAGE_VIEW_UNSPECIFIED): Promise<Image> => call<Image>((cb) => admin.getImage({ name, view }, cb));
  const listImages = (filter = '') =>
    call<{ images: Image[]; nextPageToken: string }>((cb) =>
      admin.listImages({ pageSize: 0, pageToken: '', filter, view: ImageView.IMAGE_VIEW_UNSPECIFIED }, cb),
    );
  const listVersions = (parent: string, pageSize = 0, pageToken = '', view = ImageView.IMAGE_VIEW_UNSPECIFIED) =>
    call<{ versions: Image[]; nextPageToken: string }>((cb) => admin.listImageVersions({ parent, pageSize, pageToken, view }, cb));

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    const ca = await startCertificateAuthorityProcess(resources, pki, { url: nats.url });
    const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
    });
    address = inventory.address;
    admin = await as('admin', 'alice');
    const connection = await connectNats({
      servers: [nats.url],
      tls: await pki.files('service', 'distribution', { subdirectory: 'test-connection' }),
      name: 'test',
      log,
    });
    resources.defer(() => connection.close());
    images = await KvStore.open(connection.jetstream, 'images', protoCodec(Image));
    heads = await KvStore.open(connection.jetstream, IMAGE_HEADS_BUCKET, protoCodec(ImageHead));
    replicas = await KvStore.open(connection.jetstream, 'replicas', protoCodec(ImageReplica));

    // debian-12: versions 1-3 AVAILABLE, 4 PUBLISHING; latest 3, stable 2. alpine-3: published before versions
    // existed (no head, no version field). fresh: its first version still PUBLISHING, no head yet.
    // many: eleven versions, for paging (9 before 10). gone: version 1 deleted, 2 left.
    for (const version of [1, 2, 3]) await images.put(imageKey('debian-12', version), versionRecord('debian-12', version));
    await images.put(imageKey('debian-12', 4), versionRecord('debian-12', 4, Image_State.STATE_PUBLISHING));
    await heads.put(
      'debian-12',
      ImageHead.fromPartial({ image: 'images/debian-12', latestVersion: '3', lastVersion: '4', aliases: { stable: '2' }, keepVersions: 5 }),
    );
    await images.put('alpine-3', versionRecord('alpine-3', 1, Image_State.STATE_AVAILABLE, 0));
    await images.put('fresh', versionRecord('fresh', 1, Image_State.STATE_PUBLISHING, 0));
    for (let version = 1; version <= 11; version++) await images.put(imageKey('many', version), versionRecord('many', version));
    await heads.put('many', ImageHead.fromPartial({ image: 'images/many', latestVersion: '11', lastVersion: '11' }));
    await images.put(imageKey('gone', 2), versionRecord('gone', 2));
    await heads.put('gone', ImageHead.fromPartial({ image: 'images/gone', latestVersion: '2', lastVersion: '2' }));
    // The inventory follows KV through a watch: wait until the last write is in its memory.
    await waitFor(
      'the inventory to see the catalog',
      () => getImage('images/gone').then((image) => (image.aliases.latest === '2' ? image : undefined)),
      10_000,
    );
  });

  after(async () => {
    for (const client of clients) client.close();
    await resources.release();
  });

  it('GetImage of images/{image} is the image view: the latest version with aliases, versions and keep_versions', async () => {
    const view = await getImage('images/debian-12');
    assert.equal(view.name, 'images/debian-12');
    assert.equal(view.version, '3');
    assert.equal(view.description, 'debian-12 version 3');
    assert.deepEqual(view.aliases, { latest: '3', stable: '2' });
    assert.deepEqual(view.versions, ['1', '2', '3', '4']);
    assert.equal(view.keepVersions, 5);
    assert.ok(view.torrent!.metainfo.length > 0, 'FULL by default');

    const before = await getImage('images/alpine-3');
    assert.equal(before.name, 'images/alpine-3');
    assert.equal(before.version, '1');
    assert.deepEqual(before.aliases, { latest: '1' });
    assert.deepEqual(before.versions, ['1']);

    const publishing = await getImage('images/fresh');
    assert.equal(publishing.name, 'images/fresh');
    assert.equal(publishing.state, Image_State.STATE_PUBLISHING, 'an image still being published answers as before');

    assert.deepEqual((await getImage('images/gone')).versions, ['2']);
  });

  it('GetImage of a version by number or alias answers that version named by number', async () => {
    for (const [name, expected] of [
      ['images/debian-12/versions/1', 'images/debian-12/versions/1'],
      ['images/debian-12/versions/4', 'images/debian-12/versions/4'],
      ['images/debian-12/versions/stable', 'images/debian-12/versions/2'],
      ['images/debian-12/versions/latest', 'images/debian-12/versions/3'],
      ['images/alpine-3/versions/1', 'images/alpine-3/versions/1'],
      ['images/alpine-3/versions/latest', 'images/alpine-3/versions/1'],
    ] as const) {
      const version = await getImage(name);
      assert.equal(version.name, expected, name);
      assert.equal(version.version, expected.split('/').at(-1), name);
      assert.deepEqual(version.aliases, {}, `${name}: aliases are on the image view only`);
      assert.deepEqual(version.versions, [], `${name}: versions are on the image view only`);
    }
    assert.equal((await getImage('images/debian-12/versions/4')).state, Image_State.STATE_PUBLISHING);
    assert.equal((await getImage('images/debian-12/versions/2', ImageView.IMAGE_VIEW_BASIC)).torrent!.metainfo.length, 0);
  });

  it('GetImage: NOT_FOUND for an unknown image, version or alias; INVALID_ARGUMENT for a malformed name', async () => {
    for (const name of [
      'images/debian-12/versions/testing',
      'images/debian-12/versions/5',
      'images/alpine-3/versions/2',
      'images/alpine-3/versions/stable',
      'images/gone/versions/1',
      'images/nothing',
      'images/nothing/versions/latest',
    ]) {
      assert.equal((await failure((cb) => admin.getImage({ name, view: 0 }, cb))).code, GrpcStatus.NOT_FOUND, name);
    }
    for (const name of [
      'images/debian-12_v2',
      'images/debian-12/versions/0',
      'images/debian-12/versions/Stable',
      'images/debian-12/versions',
      'images/',
      'hosts/x',
    ]) {
      const refused = await failure((cb) => admin.getImage({ name, view: 0 }, cb));
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, name);
      assert.deepEqual(refused.fields, ['name'], name);
    }
  });

  it('ListImages lists one entry per image (its view), never one per version', async () => {
    const { images: listed } = await listImages();
    assert.deepEqual(
      listed.map((image) => `${image.name}@${image.version}`),
      ['images/alpine-3@1', 'images/debian-12@3', 'images/fresh@1', 'images/gone@2', 'images/many@11'],
    );
    assert.equal(listed[1]!.torrent!.metainfo.length, 0, 'BASIC by default');
    assert.deepEqual(listed[1]!.aliases, { latest: '3', stable: '2' });
    assert.deepEqual(
      (await listImages('state = AVAILABLE')).images.map((image) => image.name),
      ['images/alpine-3', 'images/debian-12', 'images/gone', 'images/many'],
    );
    const paged: string[] = [];
    let pageToken = '';
    do {
      const page = await call<{ images: Image[]; nextPageToken: string }>((cb) => admin.listImages({ pageSize: 2, pageToken, filter: '', view: 0 }, cb));
      paged.push(...page.images.map((image) => image.name));
      pageToken = page.nextPageToken;
    } while (pageToken !== '');
    assert.deepEqual(paged, ['images/alpine-3', 'images/debian-12', 'images/fresh', 'images/gone', 'images/many']);
  });

  it('ListImageVersions lists the versions oldest first, named by number, page by page', async () => {
    const debian = await listVersions('images/debian-12');
    assert.deepEqual(
      debian.versions.map((version) => version.name),
      ['images/debian-12/versions/1', 'images/debian-12/versions/2', 'images/debian-12/versions/3', 'images/debian-12/versions/4'],
    );
    assert.equal(debian.nextPageToken, '');
    assert.ok(
      debian.versions.every((version) => version.torrent!.metainfo.length === 0),
      'BASIC by default',
    );
    const full = await listVersions('images/debian-12', 0, '', ImageView.IMAGE_VIEW_FULL);
    assert.ok(full.versions.every((version) => version.torrent!.metainfo.length > 0));
    assert.deepEqual(
      (await listVersions('images/alpine-3')).versions.map((version) => `${version.name}@${version.version}`),
      ['images/alpine-3/versions/1@1'],
    );

    const numbers: string[] = [];
    const tokens: string[] = [];
    let pageToken = '';
    do {
      const page = await listVersions('images/many', 4, pageToken);
      numbers.push(...page.versions.map((version) => version.version));
      pageToken = page.nextPageToken;
      if (pageToken) tokens.push(pageToken);
    } while (pageToken !== '');
    assert.deepEqual(numbers, ['1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11']);
    assert.equal(tokens.length, 2);

    const foreign = await failure((cb) => admin.listImageVersions({ parent: 'images/debian-12', pageSize: 4, pageToken: tokens[0]!, view: 0 }, cb));
    assert.equal(foreign.code, GrpcStatus.INVALID_ARGUMENT, 'a token of another image');
    assert.deepEqual(foreign.fields, ['page_token']);
    assert.equal(
      (await failure((cb) => admin.listImageVersions({ parent: 'images/nothing', pageSize: 0, pageToken: '', view: 0 }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
    for (const parent of ['images/debian-12/versions/1', 'images/debian-12_v2', 'hosts/kvm-v1', '']) {
      const refused = await failure((cb) => admin.listImageVersions({ parent, pageSize: 0, pageToken: '', view: 0 }, cb));
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, parent);
      assert.deepEqual(refused.fields, ['parent'], parent);
    }
    const negative = await failure((cb) => admin.listImageVersions({ parent: 'images/debian-12', pageSize: -1, pageToken: '', view: 0 }, cb));
    assert.deepEqual(negative.fields, ['page_size']);
  });

  it('ListVirtualMachines selects by exact version; version 1 also where it was recorded without its number', async () => {
    const agent = await as('host', 'kvm-v1');
    await call((cb) => agent.registerHost({ host: hostFacts('kvm-v1') }, cb));
    const clone = (name: string, fields: Parameters<typeof VirtualMachine.fromPartial>[0]): VirtualMachine =>
      VirtualMachine.fromPartial({
        name: VIRTUAL_MACHINE_NAME.format({ host: 'kvm-v1', virtualMachine: name }),
        domainName: name,
        state: VirtualMachine_State.STATE_SHUT_OFF,
        managed: true,
        ...fields,
      });
    const reported = [
      clone('on-v2', {
        sourceImage: 'images/debian-12',
        sourceImageVersion: 'images/debian-12/versions/2',
        lineage: { image: 'images/debian-12', imageVersion: 'images/debian-12/versions/2', previousImageVersion: 'images/debian-12/versions/1' },
        disks: [{ target: 'vdb', path: '/images/clones/on-v2/data.qcow2', persistent: true }],
      }),
      clone('on-v1', { sourceImage: 'images/debian-12', sourceImageVersion: 'images/debian-12/versions/1' }),
      clone('lineage-only', { sourceImage: 'images/debian-12', lineage: { image: 'images/debian-12', imageVersion: 'images/debian-12/versions/1' } }),
      clone('before-versions', { sourceImage: 'images/debian-12' }),
      clone('alpine', { sourceImage: 'images/alpine-3', sourceImageVersion: 'images/alpine-3/versions/1' }),
      clone('hand-made', { managed: false }),
    ];
    await call((cb) => agent.reportVirtualMachines({ parent: 'hosts/kvm-v1', virtualMachines: reported, fullSnapshot: true, removedVirtualMachines: [] }, cb));
    const names = async (filter: string): Promise<string[]> =>
      (
        await call<{ virtualMachines: VirtualMachine[] }>((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-v1', pageSize: 0, pageToken: '', filter }, cb))
      ).virtualMachines
        .map((vm) => vm.domainName)
        .sort();
    assert.deepEqual(await names('source_image_version = "images/debian-12/versions/2"'), ['on-v2']);
    assert.deepEqual(await names('source_image_version = "images/debian-12/versions/1"'), ['before-versions', 'lineage-only', 'on-v1']);
    assert.deepEqual(await names('lineage.image_version = "images/debian-12/versions/2"'), ['on-v2']);
    assert.deepEqual(await names('source_image_version = ""'), ['hand-made']);
    assert.deepEqual(await names('source_image = "images/debian-12"'), ['before-versions', 'lineage-only', 'on-v1', 'on-v2'], 'every version of the image');
    assert.deepEqual(await names('source_image = "images/debian-12" AND source_image_version != "images/debian-12/versions/1"'), ['on-v2']);
    for (const filter of [
      'source_image_version = "images/debian-12/versions/stable"',
      'source_image_version = "images/debian-12"',
      'source_image = "images/debian-12/versions/2"',
    ]) {
      const refused = await failure((cb) => admin.listVirtualMachines({ parent: 'hosts/kvm-v1', pageSize: 0, pageToken: '', filter }, cb));
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, filter);
      assert.deepEqual(refused.fields, ['filter'], filter);
    }

    // The new fields the agent reports are kept, and a version the agent stops reporting survives.
    const stored = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: 'hosts/kvm-v1/virtualMachines/on-v2' }, cb));
    assert.equal(stored.sourceImageVersion, 'images/debian-12/versions/2');
    assert.equal(stored.lineage?.previousImageVersion, 'images/debian-12/versions/1');
    assert.equal(stored.disks[0]?.persistent, true);
    const lineageOnly = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: 'hosts/kvm-v1/virtualMachines/lineage-only' }, cb));
    assert.equal(lineageOnly.sourceImageVersion, 'images/debian-12/versions/1', 'filled from the lineage');
    await call((cb) =>
      agent.reportVirtualMachines(
        {
          parent: 'hosts/kvm-v1',
          virtualMachines: [{ ...reported[1]!, sourceImageVersion: '', state: VirtualMachine_State.STATE_RUNNING }],
          fullSnapshot: false,
          removedVirtualMachines: [],
        },
        cb,
      ),
    );
    const onV1 = await call<VirtualMachine>((cb) => admin.getVirtualMachine({ name: 'hosts/kvm-v1/virtualMachines/on-v1' }, cb));
    assert.equal(onV1.state, VirtualMachine_State.STATE_RUNNING);
    assert.equal(onV1.sourceImageVersion, 'images/debian-12/versions/1');
  });

  it('ListImageReplicas selects by exact version and names every replica version by number', async () => {
    const replica = (key: string, lastUseTime?: Date): ImageReplica =>
      ImageReplica.fromPartial({
        name: HOST_IMAGE_NAME.format({ host: 'kvm-v1', image: key }),
        host: 'hosts/kvm-v1',
        image: `images/${key.split('_v')[0]}`,
        state: ImageReplica_State.STATE_AVAILABLE,
        ...(key.includes('_v') ? { imageVersion: `images/${key.split('_v')[0]}/versions/${key.split('_v')[1]}` } : {}),
        ...(lastUseTime ? { lastUseTime } : {}),
      });
    const used = new Date('2026-01-02T03:04:05Z');
    await replicas.put('kvm-v1.debian-12', replica('debian-12'));
    await replicas.put('kvm-v1.debian-12_v2', replica('debian-12_v2', used));
    const list = async (filter: string): Promise<ImageReplica[]> =>
      (await call<{ imageReplicas: ImageReplica[] }>((cb) => admin.listImageReplicas({ parent: 'hosts/kvm-v1', pageSize: 0, pageToken: '', filter }, cb)))
        .imageReplicas;
    await waitFor('both replicas', async () => ((await list('image = "images/debian-12"')).length === 2 ? true : undefined), 10_000);
    const first = await list('image_version = "images/debian-12/versions/1"');
    assert.deepEqual(
      first.map((item) => [item.name, item.imageVersion]),
      [['hosts/kvm-v1/images/debian-12', 'images/debian-12/versions/1']],
      'a replica recorded before versions existed holds version 1',
    );
    const second = await list('image_version = "images/debian-12/versions/2"');
    assert.deepEqual(
      second.map((item) => item.name),
      ['hosts/kvm-v1/images/debian-12/versions/2'],
    );
    assert.deepEqual(second[0]!.lastUseTime, used);
    const got = await call<ImageReplica>((cb) => admin.getImageReplica({ name: 'hosts/kvm-v1/images/debian-12/versions/2' }, cb));
    assert.equal(got.imageVersion, 'images/debian-12/versions/2');
  });

  it('UpdateHost sets the image directory high watermark, kept across heartbeats and re-registration', async () => {
    const agent = await as('host', 'kvm-w1');
    await call((cb) => agent.registerHost({ host: hostFacts('kvm-w1') }, cb));
    const update = (percent: number) =>
      call<Host>((cb) =>
        admin.updateHost(
          { host: { ...hostFacts('kvm-w1'), imageDirectoryHighWatermarkPercent: percent }, updateMask: ['image_directory_high_watermark_percent'] },
          cb,
        ),
      );
    assert.equal((await update(85)).imageDirectoryHighWatermarkPercent, 85);
    await call((cb) => agent.heartbeat({ host: 'hosts/kvm-w1', memoryFreeBytes: '1', imageDirectoryFreeBytes: '1', imageDirectoryTotalBytes: '2' }, cb));
    await call((cb) => agent.registerHost({ host: hostFacts('kvm-w1') }, cb));
    assert.equal((await call<Host>((cb) => admin.getHost({ name: 'hosts/kvm-w1' }, cb))).imageDirectoryHighWatermarkPercent, 85);
    // Another path leaves it alone; 0 turns it off.
    await call((cb) => admin.updateHost({ host: { ...hostFacts('kvm-w1'), labels: { rack: 'r1' } }, updateMask: ['labels'] }, cb));
    assert.equal((await call<Host>((cb) => admin.getHost({ name: 'hosts/kvm-w1' }, cb))).imageDirectoryHighWatermarkPercent, 85);
    assert.equal((await update(0)).imageDirectoryHighWatermarkPercent, 0);
    assert.equal((await update(1)).imageDirectoryHighWatermarkPercent, 1);
    for (const percent of [100, -1, 250]) {
      const refused = await failure((cb) =>
        admin.updateHost(
          { host: { ...hostFacts('kvm-w1'), imageDirectoryHighWatermarkPercent: percent }, updateMask: ['image_directory_high_watermark_percent'] },
          cb,
        ),
      );
      assert.equal(refused.code, GrpcStatus.INVALID_ARGUMENT, String(percent));
      assert.deepEqual(refused.fields, ['host.image_directory_high_watermark_percent'], String(percent));
    }
    assert.equal(
      (await call<Host>((cb) => admin.getHost({ name: 'hosts/kvm-w1' }, cb))).imageDirectoryHighWatermarkPercent,
      1,
      'a refused update changes nothing',
    );
  });
});
