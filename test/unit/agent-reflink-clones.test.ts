// The reflink-copy disk backend chosen per request (CreateClonesRequest.disk_backend) in the agent: each disk's
// `<driver>` rendered from its child's format, the backend recorded in the clone's cowherd metadata, reflink
// clones left out of a replica's dependents, the clone engine's refusals for the whole batch (a filesystem that
// cannot reflink, a hypervisor that does not run the backend, an unknown value, a replica still arriving) with
// nothing made; and, on a loop-mounted xfs (root, mkfs.xfs), the engine's reflink clones of a raw image and
// their rebase (a new reflink copy of the target; refused, clone unchanged, when the target's format differs).
//
//   node --import tsx --test test/unit/agent-reflink-clones.test.ts
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, statfs, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { CreateClonesRequest } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { CloneEngine } from '../../services/agent/clone-engine.js';
import { CloneRebaser } from '../../services/agent/clone-rebase.js';
import {
  dependsOnBase,
  diskBackendChoice,
  diskBackendValue,
  domainsBackedBy,
  domainsClonedFrom,
  readCloneMetadata,
  renderClone,
  sanitizeDomainTemplate,
  updateCloneMetadata,
  type DomainInfo,
} from '../../services/agent/hypervisor/index.js';
import { parseDomainXml, type HypervisorFacts, type Libvirt } from '../../services/agent/hypervisor/libvirt.js';

const run = promisify(execFile);
const log = createLogger({ service: 'test', level: 'silent' });
const MiB = 1024 * 1024;
const EXT4_SUPER_MAGIC = 0xef53;
const MKFS_XFS = '/usr/sbin/mkfs.xfs';

const sha256 = async (file: string): Promise<string> =>
  createHash('sha256')
    .update(await readFile(file))
    .digest('hex');

async function qemuImgInfo(file: string): Promise<{ format: string; 'backing-filename'?: string }> {
  return JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', file])).stdout);
}

/** A template with two file disks: a raw system disk and a qcow2 second disk. */
function twoDiskTemplate(): string {
  return sanitizeDomainTemplate(
    `<domain type='qemu'><name>t</name><uuid>${randomUUID()}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/srv/vms/system.raw'/><target dev='vda' bus='virtio'/></disk><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/vms/data.qcow2'/><target dev='vdb' bus='virtio'/></disk></devices></domain>`,
  ).xml;
}

/** Domains kept as XML, as libvirt keeps them (what the engine and the rebase read back). */
class XmlLibvirt implements Libvirt {
  readonly uri = 'test:///xml';
  readonly xml = new Map<string, string>();
  defines = 0;

  private info(name: string): DomainInfo {
    return { ...parseDomainXml(this.xml.get(name)!), state: 'shut off' };
  }
  private byId(nameOrUuid: string): string {
    for (const name of this.xml.keys()) if (name === nameOrUuid || this.info(name).uuid === nameOrUuid) return name;
    throw new Error(`no domain ${nameOrUuid}`);
  }
  async listDomains(): Promise<DomainInfo[]> {
    return [...this.xml.keys()].map((name) => this.info(name));
  }
  async domain(nameOrUuid: string): Promise<DomainInfo> {
    return this.info(this.byId(nameOrUuid));
  }
  async domainXml(nameOrUuid: string): Promise<string> {
    return this.xml.get(this.byId(nameOrUuid))!;
  }
  async hypervisorFacts(): Promise<HypervisorFacts> {
    throw new Error('not used');
  }
  async watchEvents(): Promise<{ stop(): Promise<void> }> {
    return { stop: async () => undefined };
  }
  async define(xml: string): Promise<void> {
    this.defines += 1;
    this.xml.set(parseDomainXml(xml).name, xml);
  }
  async start(): Promise<void> {}
  async shutdown(): Promise<void> {}
  async destroy(): Promise<void> {}
  async undefine(nameOrUuid: string): Promise<void> {
    this.xml.delete(this.byId(nameOrUuid));
  }
}

function request(names: readonly string[], overrides: Partial<CreateClonesRequest> = {}): CreateClonesRequest {
  return {
    source: { $case: 'image', value: 'images/img' },
    clones: names.map((domainName) => ({ domainName, start: false, index: 0 })),
    operation: 'operations/00000000-0000-4000-8000-000000000017',
    requestId: '',
    validateOnly: false,
    stream: false,
    diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY,
    guestConfiguration: undefined,
    guestConfigurationDigest: '',
    dataDiskBytes: '0',
    ...overrides,
  };
}

/** A replica `images/<key>/` with a raw (or qcow2) system disk of `bytes` and its template. */
async function writeReplica(imageDirectory: string, key: string, bytes: Buffer, format: 'raw' | 'qcow2' = 'raw'): Promise<string> {
  const directory = join(imageDirectory, 'images', key);
  await mkdir(directory, { recursive: true });
  const raw = join(directory, 'disk0.raw');
  await writeFile(raw, bytes);
  let file = raw;
  if (format === 'qcow2') {
    file = join(directory, 'disk0.qcow2');
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, file]);
    await rm(raw);
  }
  await writeFile(
    join(directory, 'domain-template.xml'),
    `<domain type='qemu'><name>x</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='${format}'/><source file='${file.slice(directory.length + 1)}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
  );
  await chmod(file, 0o444);
  return file;
}

/** An error with this code (and reason), naming what the pattern says. */
function failsWith(code: GrpcStatus, reason: ErrorReason | undefined, pattern: RegExp): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof CowherdError, String(error));
    assert.equal(error.code, code, error.message);
    if (reason !== undefined) assert.equal(error.reason, reason, error.message);
    assert.match(error.message, pattern);
    return true;
  };
}

describe('the disk backend of a clone, as the agent renders, records and counts it', () => {
  let root: string;
  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'cowherd-reflink-clones-'));
  });
  after(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it("renders each disk's <driver> from its child: a raw reflink copy is qemu/raw, a disk without one gets the hypervisor's standard", async () => {
    const cloneDirectory = join(root, 'clones', 'render-1');
    const rendered = await renderClone(twoDiskTemplate(), {
      name: 'render-1',
      hypervisor: 'kvm',
      cloneDirectory,
      disks: [
        { target: 'vda', path: join(cloneDirectory, 'vda.raw'), driver: { name: 'qemu', type: 'raw' } },
        { target: 'vdb', path: join(cloneDirectory, 'vdb.qcow2') },
      ],
      metadata: { source: { image: 'images/img' }, operation: 'operations/op', requestId: 'r', diskBackend: 'reflink-copy' },
    });
    assert.deepEqual(
      rendered.disks.map((disk) => [disk.target, disk.path, disk.driverName, disk.driverType]),
      [
        ['vda', join(cloneDirectory, 'vda.raw'), 'qemu', 'raw'],
        ['vdb', join(cloneDirectory, 'vdb.qcow2'), 'qemu', 'qcow2'],
      ],
    );
    const domain = parseDomainXml(rendered.xml);
    assert.deepEqual(
      domain.disks.map((disk) => [disk.target, disk.sourcePath, disk.format]),
      [
        ['vda', join(cloneDirectory, 'vda.raw'), 'raw'],
        ['vdb', join(cloneDirectory, 'vdb.qcow2'), 'qcow2'],
      ],
    );
    assert.match(rendered.xml, /<cowherd:diskBackend>reflink-copy<\/cowherd:diskBackend>/);
    assert.equal(domain.clone?.diskBackend, 'reflink-copy');
    // A driver that is not a plain libvirt name is refused, as any other bad option.
    await assert.rejects(
      renderClone(twoDiskTemplate(), {
        name: 'render-2',
        hypervisor: 'kvm',
        cloneDirectory: join(root, 'clones', 'render-2'),
        disks: [
          { target: 'vda', path: join(root, 'clones', 'render-2', 'vda.raw'), driver: { name: 'qemu', type: "raw'/><x" } },
          { target: 'vdb', path: join(root, 'clones', 'render-2', 'vdb.qcow2') },
        ],
        metadata: { source: { image: 'images/img' }, operation: '', requestId: '' },
      }),
      /disks\[0\]\.driver/,
    );
  });

  it('records the backend in the cowherd metadata: read back, kept by a rebase record update, unknown names left out', () => {
    const xml = `<domain type='qemu'><name>c</name><metadata><cowherd:clone xmlns:cowherd='https://cowherd.dev/xmlns/clone/1'><cowherd:image>images/img</cowherd:image><cowherd:operation>o</cowherd:operation><cowherd:requestId>r</cowherd:requestId><cowherd:diskBackend>reflink-copy</cowherd:diskBackend></cowherd:clone></metadata></domain>`;
    assert.equal(readCloneMetadata(xml)?.diskBackend, 'reflink-copy');
    const updated = updateCloneMetadata(xml, { imageVersion: 'images/img/versions/2', previousImageVersion: 'images/img/versions/1' });
    assert.equal(readCloneMetadata(updated)?.diskBackend, 'reflink-copy');
    assert.equal(readCloneMetadata(updated)?.imageVersion, 'images/img/versions/2');
    const unknown = readCloneMetadata(xml.replace('reflink-copy', 'teleport'));
    assert.equal(unknown?.diskBackend, undefined);
    assert.equal(dependsOnBase(unknown!), true, 'an unknown backend counts as depending on its base');
    assert.equal(dependsOnBase({ diskBackend: 'reflink-copy' }), false);
    assert.equal(dependsOnBase({}), true, 'clones recorded before the backend was: the standard backend');
  });

  it('maps the proto values: UNSPECIFIED is the standard, an unknown number is INVALID_ARGUMENT naming disk_backend', () => {
    assert.equal(diskBackendChoice(DiskBackend.DISK_BACKEND_UNSPECIFIED), undefined);
    assert.equal(diskBackendChoice(DiskBackend.DISK_BACKEND_REFLINK_COPY), 'reflink-copy');
    assert.equal(diskBackendChoice(DiskBackend.DISK_BACKEND_QCOW2_OVERLAY), 'qcow2-overlay');
    assert.equal(diskBackendChoice(DiskBackend.DISK_BACKEND_VHD_DIFFERENCING), 'vhd-differencing');
    assert.throws(
      () => diskBackendChoice(9),
      (error: unknown) => error instanceof CowherdError && error.code === GrpcStatus.INVALID_ARGUMENT && error.field === 'disk_backend',
    );
    assert.equal(diskBackendValue('reflink-copy'), DiskBackend.DISK_BACKEND_REFLINK_COPY);
    assert.equal(diskBackendValue(undefined), DiskBackend.DISK_BACKEND_UNSPECIFIED);
  });

  it("leaves reflink copies out of a replica's dependents: not cloned from it by metadata, not backed by it by chain", async () => {
    const replica = join(root, 'images', 'dep');
    await mkdir(replica, { recursive: true });
    await mkdir(join(root, 'clones', 'overlay'), { recursive: true });
    await mkdir(join(root, 'clones', 'copy'), { recursive: true });
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(replica, 'vda.qcow2'), '16M']);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(replica, 'vda.qcow2'), '-F', 'qcow2', join(root, 'clones/overlay/vda.qcow2')]);
    // A reflink copy is a qcow2 (or raw) without a backing file; a byte copy stands in for it here.
    await run('cp', [join(replica, 'vda.qcow2'), join(root, 'clones/copy/vda.qcow2')]);
    const domain = (name: string, diskBackend?: 'reflink-copy' | 'qcow2-overlay'): DomainInfo =>
      ({
        name,
        uuid: name,
        state: 'shut off',
        domainType: 'qemu',
        vcpus: 1,
        memoryBytes: 1,
        disks: [{ target: 'vda', device: 'disk', type: 'file', sourcePath: join(root, 'clones', name, 'vda.qcow2'), format: 'qcow2' }],
        clone: { source: { image: 'images/dep' }, operation: '', requestId: '', ...(diskBackend ? { diskBackend } : {}) },
      }) as DomainInfo;
    const domains = [domain('overlay', 'qcow2-overlay'), domain('copy', 'reflink-copy')];
    assert.deepEqual(domainsClonedFrom(domains, 'dep'), ['overlay']);
    assert.deepEqual(await domainsBackedBy(domains, replica, 'dep'), ['overlay']);
    // Even an unreadable reflink copy (where the metadata decides) does not count.
    await rm(join(root, 'clones/copy/vda.qcow2'));
    assert.deepEqual(await domainsBackedBy(domains, replica, 'dep'), ['overlay']);
  });
});

describe('the clone engine refuses a disk backend for the whole batch, before anything is made', () => {
  let root: string;
  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'cowherd-reflink-refusal-'));
    await writeReplica(root, 'img', randomBytes(MiB));
  });
  after(async () => {
    await rm(root, { recursive: true, force: true });
  });

  const engineOn = (hypervisor: 'kvm' | 'xen', extra: Partial<ConstructorParameters<typeof CloneEngine>[0]> = {}) => {
    const libvirt = new XmlLibvirt();
    const events: string[] = [];
    const engine = new CloneEngine({
      host: 'h',
      imageDirectory: root,
      hypervisor,
      libvirt,
      events: { publish: async (type: { kind: string }) => void events.push(type.kind) } as never,
      log,
      ...extra,
    });
    return { engine, libvirt, events };
  };

  /** Nothing of the batch exists: no clone directory, no domain, no event. */
  async function nothingMade(libvirt: XmlLibvirt, events: readonly string[]): Promise<void> {
    const clones = join(root, 'clones');
    assert.deepEqual(existsSync(clones) ? (await readdir(clones)).filter((name) => !name.startsWith('.cowherd-reflink-probe')) : [], []);
    assert.equal(libvirt.defines, 0);
    assert.deepEqual(events, []);
  }

  it('REFLINK_COPY where the clones directory cannot reflink (ext4): FAILED_PRECONDITION naming the reason, for validate_only too', async (t: TestContext) => {
    if ((await statfs(root)).type !== EXT4_SUPER_MAGIC) {
      t.skip(`${tmpdir()} is not ext4 here: the refusal needs a filesystem without reflinks`);
      return;
    }
    const { engine, libvirt, events } = engineOn('kvm');
    const refusal = failsWith(GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH, /REFLINK_COPY.*cannot make reflink copies/);
    await assert.rejects(engine.createClones(request(['r-1', 'r-2'], { dataDiskBytes: String(MiB) })), refusal);
    await nothingMade(libvirt, events);
    await assert.rejects(engine.check(request(['r-1'], { validateOnly: true })), refusal);
    await nothingMade(libvirt, events);
    // The same request with the standard backend works here.
    const made = await engine.createClones(request(['s-1'], { diskBackend: DiskBackend.DISK_BACKEND_UNSPECIFIED }));
    assert.equal(made[0]!.status?.code ?? 0, 0, made[0]!.status?.message);
    assert.equal(made[0]!.virtualMachine?.lineage?.diskBackend, DiskBackend.DISK_BACKEND_QCOW2_OVERLAY);
    assert.equal(readCloneMetadata(libvirt.xml.get('s-1')!)?.diskBackend, 'qcow2-overlay');
    assert.equal((await qemuImgInfo(join(root, 'clones', 's-1', 'vda.qcow2')))['backing-filename'], join(root, 'images', 'img', 'disk0.raw'));
    await rm(join(root, 'clones'), { recursive: true, force: true });
  });

  it('a backend the hypervisor does not run, and a value that is no backend', async () => {
    const xen = engineOn('xen');
    await assert.rejects(
      xen.engine.createClones(request(['x-1'])),
      failsWith(GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH, /reflink-copy does not run on Xen/),
    );
    await nothingMade(xen.libvirt, xen.events);
    const kvm = engineOn('kvm');
    await assert.rejects(
      kvm.engine.createClones(request(['v-1'], { diskBackend: DiskBackend.DISK_BACKEND_VHD_DIFFERENCING })),
      failsWith(GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH, /vhd-differencing does not run on KVM/),
    );
    await assert.rejects(
      kvm.engine.createClones(request(['u-1'], { diskBackend: 9 as DiskBackend })),
      failsWith(GrpcStatus.INVALID_ARGUMENT, undefined, /^disk_backend /),
    );
    await nothingMade(kvm.libvirt, kvm.events);
  });

  it('REFLINK_COPY with stream never asks the streaming server: a replica still arriving is IMAGE_NOT_ON_HOST, saying why', async () => {
    let asked = 0;
    const { engine, libvirt, events } = engineOn('kvm', {
      streamed: {
        source: async () => {
          asked += 1;
          throw new Error('the streaming server must not be asked for a reflink copy');
        },
        linkBootFiles: async () => '',
      },
      replicaBase: async () => {
        throw CowherdError.failedPrecondition('hosts/h/images/img is not available yet (STATE_TRANSFERRING)', ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST);
      },
    });
    await assert.rejects(
      engine.createClones(request(['st-1'], { stream: true })),
      failsWith(GrpcStatus.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST, /not available yet.*REFLINK_COPY does not stream/),
    );
    assert.equal(asked, 0);
    await nothingMade(libvirt, events);
  });
});

const skipXfs = process.getuid?.() !== 0 ? 'needs root (loop mount)' : !existsSync(MKFS_XFS) ? `needs ${MKFS_XFS} (scripts/install.sh installs it)` : false;

describe('reflink clones and their rebase on a loop-mounted xfs', { skip: skipXfs }, () => {
  let scratch: string;
  let mountPoint: string;
  let mounted = false;
  let libvirt: XmlLibvirt;
  let engine: CloneEngine;
  let rebaser: CloneRebaser;
  const v1 = randomBytes(8 * MiB);
  const v2 = randomBytes(8 * MiB);
  const published: string[] = [];

  before(async () => {
    scratch = await mkdtemp(join(tmpdir(), 'cowherd-reflink-xfs-'));
    const image = join(scratch, 'xfs.img');
    mountPoint = join(scratch, 'mnt');
    await mkdir(mountPoint);
    await writeFile(image, '');
    await truncate(image, 320 * MiB);
    await run(MKFS_XFS, ['-q', '-m', 'reflink=1', image], { timeout: 60_000 });
    await run('mount', ['-o', 'loop', image, mountPoint], { timeout: 30_000 });
    mounted = true;
    await writeReplica(mountPoint, 'img', v1);
    await writeReplica(mountPoint, 'img_v2', v2);
    await writeReplica(mountPoint, 'img_v3', v2, 'qcow2');
    libvirt = new XmlLibvirt();
    const events = { publish: async (type: { kind: string }) => void published.push(type.kind) } as never;
    engine = new CloneEngine({ host: 'h', imageDirectory: mountPoint, hypervisor: 'kvm', libvirt, events, log });
    rebaser = new CloneRebaser({ host: 'h', imageDirectory: mountPoint, hypervisor: 'kvm', libvirt, events, log });
  });
  after(async () => {
    if (mounted) await run('umount', [mountPoint], { timeout: 30_000 }).catch(() => run('umount', ['-l', mountPoint], { timeout: 30_000 }));
    await rm(scratch, { recursive: true, force: true });
  });

  it('makes each disk a writable raw reflink copy with no chain, rendered with the raw driver and recorded as reflink-copy', async () => {
    const results = await engine.createClones(request(['rc-1', 'rc-2'], { dataDiskBytes: String(MiB) }));
    assert.deepEqual(
      results.map((result) => result.status?.code ?? 0),
      [0, 0],
      JSON.stringify(results.map((result) => result.status?.message)),
    );
    const base = join(mountPoint, 'images', 'img', 'disk0.raw');
    for (const name of ['rc-1', 'rc-2']) {
      const child = join(mountPoint, 'clones', name, 'vda.raw');
      assert.equal((await qemuImgInfo(child)).format, 'raw');
      assert.equal(await sha256(child), await sha256(base), 'the same bytes as the base');
      assert.equal((await stat(child)).mode & 0o777, 0o644);
      const domain = parseDomainXml(libvirt.xml.get(name)!);
      assert.deepEqual(
        domain.disks.map((disk) => [disk.target, disk.format, disk.sourcePath]),
        [
          ['vda', 'raw', child],
          ['vdb', 'qcow2', join(mountPoint, 'clones', name, 'data.qcow2')],
        ],
      );
      assert.equal(domain.clone?.diskBackend, 'reflink-copy');
    }
    assert.equal(results[0]!.virtualMachine?.lineage?.diskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
    assert.equal(results[0]!.virtualMachine?.lineage?.replica, 'hosts/h/images/img', 'lineage says where it came from');
    const domains = await libvirt.listDomains();
    assert.deepEqual(domainsClonedFrom(domains, 'img'), [], 'not dependents of the replica');
    assert.deepEqual(await domainsBackedBy(domains, join(mountPoint, 'images', 'img'), 'img'), []);
    assert.deepEqual((await readdir(join(mountPoint, 'clones'))).sort(), ['rc-1', 'rc-2'], 'no prototypes, no probe files left');
  });

  it('a rebase gives a reflink clone a new reflink copy of the target, recorded, keeping its backend', async () => {
    const [result] = await rebaser.rebase({
      virtualMachines: ['hosts/h/virtualMachines/rc-1'],
      imageVersion: 'images/img/versions/2',
      operation: 'operations/00000000-0000-4000-8000-000000000018',
      shutdownTimeout: undefined,
      restart: false,
      newInstanceId: false,
    });
    assert.equal(result!.status?.code ?? 0, 0, result!.status?.message);
    const child = join(mountPoint, 'clones', 'rc-1', 'vda.raw');
    assert.equal(await sha256(child), await sha256(join(mountPoint, 'images', 'img_v2', 'disk0.raw')), "the target's bytes");
    assert.equal((await qemuImgInfo(child))['backing-filename'], undefined);
    const record = readCloneMetadata(libvirt.xml.get('rc-1')!);
    assert.equal(record?.imageVersion, 'images/img/versions/2');
    assert.equal(record?.previousImageVersion, 'images/img/versions/1');
    assert.equal(record?.diskBackend, 'reflink-copy');
    assert.equal(parseDomainXml(libvirt.xml.get('rc-1')!).disks[0]!.format, 'raw');
    assert.deepEqual(
      (await readdir(join(mountPoint, 'clones', 'rc-1'))).filter((name) => name.startsWith('.')),
      [],
      'no work files left',
    );
  });

  it('a rebase onto a version whose disk has another format is refused for that clone, which stays as it was', async () => {
    const child = join(mountPoint, 'clones', 'rc-2', 'vda.raw');
    const before = await sha256(child);
    const [result] = await rebaser.rebase({
      virtualMachines: ['hosts/h/virtualMachines/rc-2'],
      imageVersion: 'images/img/versions/3',
      operation: 'operations/00000000-0000-4000-8000-000000000019',
      shutdownTimeout: undefined,
      restart: false,
      newInstanceId: false,
    });
    assert.equal(result!.status?.code, GrpcStatus.FAILED_PRECONDITION);
    assert.match(result!.status?.message ?? '', /reflink copy whose disk vda is raw.*is qcow2/);
    assert.equal(await sha256(child), before);
    assert.equal(readCloneMetadata(libvirt.xml.get('rc-2')!)?.imageVersion, 'images/img/versions/1');
  });

  it('the copies outlive their base: the replica removed, every clone still reads its bytes', async () => {
    await rm(join(mountPoint, 'images', 'img'), { recursive: true, force: true });
    assert.equal(await sha256(join(mountPoint, 'clones', 'rc-2', 'vda.raw')), createHash('sha256').update(v1).digest('hex'));
  });
});
