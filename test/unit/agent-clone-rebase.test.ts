// Unit tests of the rebase job (services/agent/clone-rebase.ts) with real qemu-img overlays and an in-memory
// libvirt: a failed redefinition puts the old overlay back, a crash after the switch converges on retry (only
// the record is rewritten, the event keeps its id), a crash's work files are removed, the seed gets a new
// instance-id only when asked, and a retry of a done move changes nothing.
//
//   node --import tsx --test test/unit/agent-clone-rebase.test.ts
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { cp, mkdir, mkdtemp, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { RebaseClonesRequest } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { GuestConfiguration } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { CloneEngine } from '../../services/agent/clone-engine.js';
import { CloneRebaser } from '../../services/agent/clone-rebase.js';
import { diskBackendFor, readCloneMetadata, readSeedImage, sanitizeDomainTemplate } from '../../services/agent/hypervisor/index.js';
import { parseDomainXml, type DomainInfo, type HypervisorFacts, type Libvirt } from '../../services/agent/hypervisor/libvirt.js';

const run = promisify(execFile);
const log = createLogger({ service: 'test', level: 'silent' });

/** Domains kept as XML, as libvirt keeps them; `failDefine` makes the next defines of these names fail. */
class XmlLibvirt implements Libvirt {
  readonly uri = 'test:///xml';
  readonly xml = new Map<string, string>();
  readonly states = new Map<string, DomainInfo['state']>();
  readonly failDefine = new Set<string>();

  private info(name: string): DomainInfo {
    return { ...parseDomainXml(this.xml.get(name)!), state: this.states.get(name) ?? 'shut off' };
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
  async domainsMany(namesOrUuids: readonly string[]): Promise<Array<DomainInfo | undefined>> {
    return namesOrUuids.map((id) => {
      try {
        return this.info(this.byId(id));
      } catch {
        return undefined;
      }
    });
  }
  async domainXml(nameOrUuid: string): Promise<string> {
    return this.xml.get(this.byId(nameOrUuid))!;
  }
  async inactiveXmlMany(uuids: readonly string[]): Promise<string[]> {
    return uuids.map((uuid) => this.xml.get(this.byId(uuid)) ?? '');
  }
  async hypervisorFacts(): Promise<HypervisorFacts> {
    throw new Error('not used');
  }
  async watchEvents(): Promise<{ stop(): Promise<void> }> {
    return { stop: async () => undefined };
  }
  async define(xml: string): Promise<void> {
    const { name } = parseDomainXml(xml);
    if (this.failDefine.has(name)) throw new Error(`define of ${name} refused`);
    this.xml.set(name, xml);
  }
  async defineMany(documents: readonly string[]): Promise<Array<Error | undefined>> {
    return Promise.all(
      documents.map((xml) =>
        this.define(xml).then(
          () => undefined,
          (error: unknown) => error as Error,
        ),
      ),
    );
  }
  /** As virsh does it: every define tried, each followed by a read of what libvirt holds. */
  async redefineMany(documents: readonly string[]): Promise<string[]> {
    const read: string[] = [];
    for (const xml of documents) {
      await this.define(xml).catch(() => undefined);
      read.push(this.xml.get(parseDomainXml(xml).name) ?? '');
    }
    return read;
  }
  async start(nameOrUuid: string): Promise<void> {
    this.states.set(this.byId(nameOrUuid), 'running');
  }
  async shutdown(nameOrUuid: string): Promise<void> {
    this.states.set(this.byId(nameOrUuid), 'shut off');
  }
  async destroy(nameOrUuid: string): Promise<void> {
    this.states.set(this.byId(nameOrUuid), 'shut off');
  }
  async undefine(nameOrUuid: string): Promise<void> {
    this.xml.delete(this.byId(nameOrUuid));
  }
}

describe('rebase job', () => {
  let root: string;
  let libvirt: XmlLibvirt;
  let engine: CloneEngine;
  let rebaser: CloneRebaser;
  const published: Array<{ id: string; payload: Record<string, unknown> }> = [];
  const used: string[] = [];
  const disks = new Map<string, string>();

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'agent-rebase-'));
    const base = join(root, 'base.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
    const template = sanitizeDomainTemplate(
      `<domain type='qemu'><name>t</name><uuid>${randomUUID()}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${base}'/><target dev='vda' bus='virtio'/></disk><interface type='user'/></devices></domain>`,
    );
    for (const key of ['img', 'img_v2', 'img_v3']) {
      const directory = join(root, 'images', key);
      await mkdir(directory, { recursive: true });
      await cp(base, join(directory, template.disks[0]!.fileName));
      await writeFile(join(directory, 'domain-template.xml'), template.xml);
      disks.set(key, join(directory, template.disks[0]!.fileName));
    }
    libvirt = new XmlLibvirt();
    const events = {
      publish: async (_type: unknown, payload: unknown, options?: { id?: string }) =>
        void published.push({ id: options?.id ?? '', payload: payload as Record<string, unknown> }),
    };
    engine = new CloneEngine({ host: 'h', imageDirectory: root, hypervisor: 'kvm', libvirt, events: events as never, log });
    rebaser = new CloneRebaser({
      host: 'h',
      imageDirectory: root,
      hypervisor: 'kvm',
      libvirt,
      events: events as never,
      log,
      onReplicaUsed: async (key) => void used.push(key),
    });
    const made = await engine.createClones({
      source: { $case: 'image', value: 'images/img' },
      clones: ['a', 'b', 'c'].map((domainName) => ({ domainName, start: false, index: 0 })),
      operation: '',
      requestId: 'r1',
      stream: false,
      diskBackend: 0,
      validateOnly: false,
      guestConfiguration: GuestConfiguration.fromPartial({ hostnameTemplate: '{name}' }),
      guestConfigurationDigest: '',
      dataDiskBytes: String(2 ** 20),
    });
    assert.ok(
      made.every((result) => !result.status),
      JSON.stringify(made.map((result) => result.status)),
    );
  });
  after(() => rm(root, { recursive: true, force: true }));

  const request = (imageVersion: string, names: string[], extra: Partial<RebaseClonesRequest> = {}): RebaseClonesRequest => ({
    imageVersion,
    virtualMachines: names.map((name) => `hosts/h/virtualMachines/${name}`),
    restart: false,
    newInstanceId: false,
    shutdownTimeout: undefined,
    operation: 'operations/op',
    ...extra,
  });
  const backingOf = async (path: string): Promise<string> =>
    (JSON.parse((await run('qemu-img', ['info', '--output=json', path])).stdout) as { 'backing-filename': string })['backing-filename'];
  const overlay = (name: string) => join(root, 'clones', name, 'vda.qcow2');
  const instanceId = async (name: string) =>
    /instance-id: (.*)/.exec(
      readSeedImage(await readFile(join(root, 'clones', name, 'cidata.iso')))
        .files.get('meta-data')!
        .toString('utf8'),
    )![1];

  test('a redefinition that fails puts the old overlay back; the others move', async () => {
    const before = await readFile(overlay('a'));
    libvirt.failDefine.add('a');
    try {
      const results = await rebaser.rebase(request('images/img/versions/2', ['a', 'b']));
      assert.equal(results[0]!.status?.code, GrpcStatus.INTERNAL);
      assert.equal(results[1]!.status?.code ?? 0, 0);
    } finally {
      libvirt.failDefine.delete('a');
    }
    assert.deepEqual(await readFile(overlay('a')), before, 'the old overlay, byte for byte');
    assert.equal(await backingOf(overlay('a')), disks.get('img'));
    assert.equal(readCloneMetadata(libvirt.xml.get('a')!)?.imageVersion, 'images/img/versions/1');
    assert.deepEqual(
      (await readdir(join(root, 'clones', 'a'))).filter((entry) => entry.startsWith('.')),
      [],
    );
    assert.equal(await backingOf(overlay('b')), disks.get('img_v2'));
    assert.deepEqual(used, ['img_v2']);
  });

  test('a crash after the switch converges: the retry rewrites only the record, with the same event id', async () => {
    // As if the agent died between the rename and the redefinition: the disk on version 2, the record on 1,
    // and the work files of the switch left behind.
    const next = join(root, 'clones', 'a', '.vda.qcow2.rebase');
    await diskBackendFor('kvm').createChild({ target: 'vda', base: disks.get('img_v2')!, format: 'qcow2' }, next);
    await cp(overlay('a'), join(root, 'clones', 'a', '.vda.qcow2.previous'));
    await rename(next, overlay('a'));
    const uuid = parseDomainXml(libvirt.xml.get('a')!).uuid;
    const results = await rebaser.rebase(request('images/img/versions/2', ['a']));
    assert.equal(results[0]!.status?.code ?? 0, 0);
    assert.equal(results[0]!.previousImageVersion, 'images/img/versions/1');
    const metadata = readCloneMetadata(libvirt.xml.get('a')!);
    assert.deepEqual([metadata?.imageVersion, metadata?.previousImageVersion], ['images/img/versions/2', 'images/img/versions/1']);
    assert.deepEqual(metadata?.persistentDisks, ['vdb']);
    assert.equal(parseDomainXml(libvirt.xml.get('a')!).uuid, uuid);
    const ids = published.filter((event) => event.id.startsWith('clone.rebased/')).map((event) => event.id);
    assert.ok(ids.includes('clone.rebased/operations/op/h/a/img/img_v2'), ids.join(' '));
    assert.ok(ids.includes('clone.rebased/operations/op/h/b/img/img_v2'));
  });

  test('a retry of a done move changes nothing; the same operation records its event again under the same id', async () => {
    const count = published.length;
    const before = await readFile(overlay('b'));
    const results = await rebaser.rebase(request('images/img/versions/2', ['b']));
    assert.equal(results[0]!.status?.code ?? 0, 0);
    assert.equal(results[0]!.swapDuration, undefined);
    assert.equal(results[0]!.previousImageVersion, 'images/img/versions/1');
    assert.deepEqual(await readFile(overlay('b')), before);
    // The agent may have died between the switch and the record of the event: the stream drops the repeat.
    assert.deepEqual(
      published.slice(count).map((event) => event.id),
      ['clone.rebased/operations/op/h/b/img/img_v2'],
    );
    const other = await rebaser.rebase(request('images/img/versions/2', ['b'], { operation: 'operations/other' }));
    assert.equal(other[0]!.status?.code ?? 0, 0);
    assert.equal(published.length, count + 1, 'another operation finds it there: no event');
  });

  test('new_instance_id renews only the seed of clones that move; restart starts them', async () => {
    const old = await instanceId('c');
    const results = await rebaser.rebase(request('images/img/versions/3', ['c'], { newInstanceId: true, restart: true }));
    assert.equal(results[0]!.status?.code ?? 0, 0);
    assert.equal(results[0]!.restarted, true);
    assert.equal(libvirt.states.get('c'), 'running');
    const renewed = await instanceId('c');
    assert.notEqual(renewed, old);
    assert.equal(await backingOf(overlay('c')), disks.get('img_v3'));
    assert.match(
      readSeedImage(await readFile(join(root, 'clones', 'c', 'cidata.iso')))
        .files.get('meta-data')!
        .toString('utf8'),
      /local-hostname: "c"/,
    );
    // Running: it is shut down (the fake stops at once), moved back, not restarted.
    const back = await rebaser.rebase(request('images/img/versions/1', ['c']));
    assert.equal(back[0]!.status?.code ?? 0, 0);
    assert.equal(back[0]!.restarted, false);
    assert.equal(libvirt.states.get('c'), 'shut off');
    assert.equal(await instanceId('c'), renewed, 'without new_instance_id the seed stays');
    assert.equal(readCloneMetadata(libvirt.xml.get('c')!)?.previousImageVersion, 'images/img/versions/3');
  });

  test('a clone that is the source of other clones is not moved (HAS_DEPENDENTS); an unknown one is NOT_FOUND', async () => {
    const made = await engine.createClones({
      source: { $case: 'virtualMachine', value: 'hosts/h/virtualMachines/b' },
      clones: [{ domainName: 'b-child', start: false, index: 0 }],
      operation: '',
      requestId: 'r2',
      stream: false,
      diskBackend: 0,
      validateOnly: false,
      guestConfiguration: undefined,
      guestConfigurationDigest: '',
      dataDiskBytes: '0',
    });
    assert.ok(!made[0]!.status, JSON.stringify(made[0]!.status));
    const results = await rebaser.rebase(request('images/img/versions/3', ['b', 'nobody']));
    assert.equal(results[0]!.status?.code, GrpcStatus.FAILED_PRECONDITION);
    assert.match(results[0]!.status?.message ?? '', /use .*b's disks/);
    assert.equal(results[1]!.status?.code, GrpcStatus.NOT_FOUND);
    assert.equal(await backingOf(overlay('b')), disks.get('img_v2'), 'b stays where it was');
  });

  test('whole-call errors name the field', async () => {
    for (const [bad, field] of [
      [request('images/img', ['a']), 'image_version'],
      [request('images/img/versions/latest', ['a']), 'image_version'],
      [request('images/img/versions/2', []), 'virtual_machines'],
      [request('images/img/versions/2', ['a', 'a']), 'virtual_machines[1]'],
      [request('images/img/versions/2', ['a'], { shutdownTimeout: { seconds: '7200', nanos: 0 } }), 'shutdown_timeout'],
    ] as const) {
      await assert.rejects(
        rebaser.rebase(bad),
        (error: { code?: number; field?: string }) => error.code === GrpcStatus.INVALID_ARGUMENT && error.field === field,
      );
    }
    await assert.rejects(rebaser.rebase(request('images/img/versions/9', ['a'])), (error: { code?: number }) => error.code === GrpcStatus.NOT_FOUND);
  });
});
