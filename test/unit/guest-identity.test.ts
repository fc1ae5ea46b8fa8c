// Per-clone guest identity (cloud-init NoCloud): the seed image read back byte by byte (and by blkid when the
// host has it), the guest configuration's checks and per-clone rendering, the seed's place in the domain XML,
// the agent's CloneEngine making seeded clones (and leaving no seed behind on a failure), and cloning keeping
// the secrets out of the operation record.
//
//   node --import tsx --test test/unit/guest-identity.test.ts
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CloneEngine } from '../../services/agent/clone-engine.js';
import { toVirtualMachine } from '../../services/agent/host/reporter.js';
import { attachSeedImage, buildSeedImage, readCloneMetadata, readSeedImage } from '../../services/agent/hypervisor/index.js';
import type { DomainInfo, Libvirt } from '../../services/agent/hypervisor/libvirt.js';
import {
  checkGuestConfiguration,
  guestConfigurationDigest,
  renderGuestIdentity,
  type GuestVariables,
} from '../../services/common/domain/guest-configuration.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { CloneVirtualMachinesRequest, type CloneVirtualMachinesMetadata } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { GuestConfiguration, Host, Host_State, Image, Image_State } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { FleetView } from '../../services/cloning/fleet-view.js';
import { cloningHandlers } from '../../services/cloning/handlers.js';
import { cloneOperationKind } from '../../services/cloning/clone-operation.js';
import { GuestSecrets } from '../../services/cloning/guest-secrets.js';
import { guestConfigurationFromFlags } from '../../services/cli/vms-commands.js';
import { ArgumentReader } from '../../services/cli/resource-arguments.js';
import { writeTinyReplica } from '../harness/index.js';

const run = promisify(execFile);
const log = createLogger({ service: 'test', level: 'silent' });
const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEexampleEXAMPLEexampleEXAMPLEexample00 ops@{host}';
/** XML with the whitespace between elements gone and single quotes, so that assertions read as one line. */
const compact = (xml: string): string => xml.replace(/>\s+</g, '><').replaceAll('"', "'");
const VARIABLES: GuestVariables = { name: 'web-3', index: 3, host: 'kvm-01', uuid: '6f1c2a7b-5d10-4a55-9d1e-3f1c2a7b5d10' };

function configuration(fields: Partial<GuestConfiguration> = {}): GuestConfiguration {
  return GuestConfiguration.fromPartial(fields);
}

/** Asserts INVALID_ARGUMENT naming `field`, and that the message quotes no part of `secret`. */
function refuses(action: () => unknown, field: string, secret?: string): void {
  assert.throws(action, (error: unknown) => {
    assert.ok(error instanceof CowherdError, String(error));
    assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(error.field, field);
    if (secret !== undefined) assert.ok(!error.message.includes(secret), `the message quotes the document: ${error.message}`);
    return true;
  });
}

describe('the NoCloud seed image', () => {
  it('reads back: label cidata in both descriptors, exact Joliet names, 8.3 primary names, the contents', async () => {
    const files = {
      'meta-data': 'instance-id: "i-1"\nlocal-hostname: "web-1"\n',
      'user-data': '#cloud-config\nruncmd: [echo hi]\n',
      'network-config': 'version: 2\n',
    };
    const image = buildSeedImage(Object.entries(files).map(([name, content]) => ({ name, content })));
    assert.equal(image.length % 2048, 0);
    const read = readSeedImage(image);
    assert.equal(read.label, 'cidata');
    assert.equal(read.jolietLabel, 'cidata');
    assert.deepEqual(Object.fromEntries([...read.files].map(([name, data]) => [name, data.toString('utf8')])), files);
    assert.deepEqual(read.primaryNames, ['META_DAT.', 'NETWORK_.', 'USER_DAT.']);
  });

  it('is what blkid calls an iso9660 file system labelled cidata (when blkid is installed)', async (t) => {
    const blkid = await run('blkid', ['--version']).catch(() => undefined);
    if (!blkid) return t.skip('no blkid on this host');
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-test-seed-'));
    try {
      const path = join(directory, 'cidata.iso');
      await writeFile(path, buildSeedImage([{ name: 'meta-data', content: 'instance-id: x\n' }]));
      const { stdout } = await run('blkid', ['-p', '-o', 'export', path]);
      assert.match(stdout, /^TYPE=iso9660$/m);
      assert.match(stdout, /^LABEL=cidata$/m);
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });

  it('is fast: well under a millisecond per image', () => {
    const started = performance.now();
    for (let i = 0; i < 200; i++)
      buildSeedImage([
        { name: 'meta-data', content: `instance-id: ${i}\n` },
        { name: 'user-data', content: '#cloud-config\n' },
      ]);
    assert.ok((performance.now() - started) / 200 < 1, 'one image takes under 1 ms');
  });

  it('refuses names it cannot store exactly', () => {
    assert.throws(() => buildSeedImage([{ name: 'Meta Data', content: '' }]));
    assert.throws(() =>
      buildSeedImage([
        { name: 'network-config', content: '' },
        { name: 'network-configuration', content: '' },
      ]),
    );
  });
});

describe('the guest configuration', () => {
  it('renders each variable, keeps other braces, quotes meta-data values', () => {
    const identity = renderGuestIdentity(
      configuration({
        hostnameTemplate: '{name}.{host}.example',
        sshAuthorizedKeys: [KEY],
        userData: '#cloud-config\nruncmd:\n  - echo "${HOME} {{ v1.local_hostname }} {index} {uuid}"\n',
        networkConfig: 'network:\n  version: 2\n  ethernets:\n    eth0:\n      addresses: [10.0.0.{index}/24]\n',
      }),
      VARIABLES,
    );
    assert.equal(identity.hostname, 'web-3.kvm-01.example');
    assert.equal(
      identity.metaData,
      `instance-id: "${VARIABLES.uuid}"\nlocal-hostname: "web-3.kvm-01.example"\npublic-keys:\n  - ${JSON.stringify(KEY.replace('{host}', 'kvm-01'))}\n`,
    );
    assert.match(identity.userData, /echo "\$\{HOME\} \{\{ v1\.local_hostname \}\} 3 6f1c2a7b-/);
    assert.match(identity.networkConfig ?? '', /10\.0\.0\.3\/24/);
  });

  it('defaults: hostname {name}, an empty #cloud-config, no network-config', () => {
    const identity = renderGuestIdentity(configuration(), VARIABLES);
    assert.equal(identity.hostname, 'web-3');
    assert.equal(identity.userData, '#cloud-config\n');
    assert.equal(identity.networkConfig, undefined);
  });

  it('refuses with INVALID_ARGUMENT naming the field, quoting no document', () => {
    const secret = 'password: hunter2';
    refuses(() => checkGuestConfiguration(configuration({ hostnameTemplate: '{nmae}' })), 'guest_configuration.hostname_template');
    refuses(() => renderGuestIdentity(configuration({ hostnameTemplate: 'web_{index}' }), VARIABLES), 'guest_configuration.hostname_template');
    refuses(() => renderGuestIdentity(configuration({ hostnameTemplate: '-{name}' }), VARIABLES), 'guest_configuration.hostname_template');
    refuses(() => renderGuestIdentity(configuration({ hostnameTemplate: `${'a'.repeat(64)}` }), VARIABLES), 'guest_configuration.hostname_template');
    refuses(() => checkGuestConfiguration(configuration({ userData: `${secret}\n` })), 'guest_configuration.user_data', secret);
    refuses(() => checkGuestConfiguration(configuration({ userData: `#cloud-config\n${'x'.repeat(70_000)}` })), 'guest_configuration.user_data');
    refuses(
      () => checkGuestConfiguration(configuration({ networkConfig: `network:\n  version: 1\n  config: []\n# ${secret}\n` })),
      'guest_configuration.network_config',
      secret,
    );
    refuses(() => checkGuestConfiguration(configuration({ networkConfig: 'ethernets: {}\n' })), 'guest_configuration.network_config');
    refuses(() => checkGuestConfiguration(configuration({ sshAuthorizedKeys: [KEY, 'not a key'] })), 'guest_configuration.ssh_authorized_keys[1]');
    refuses(() => checkGuestConfiguration(configuration({ sshAuthorizedKeys: [`${KEY}\nssh-rsa AAAA`] })), 'guest_configuration.ssh_authorized_keys[0]');
    refuses(
      () => checkGuestConfiguration(configuration({ sshAuthorizedKeys: Array.from({ length: 101 }, () => KEY) })),
      'guest_configuration.ssh_authorized_keys',
    );
  });

  it('accepts scripts, MIME multiparts, Jinja headers and top-level version 2', () => {
    checkGuestConfiguration(configuration({ userData: '#!/bin/sh\necho hi\n' }));
    checkGuestConfiguration(configuration({ userData: 'Content-Type: multipart/mixed; boundary="x"\n\n--x--\n' }));
    checkGuestConfiguration(configuration({ userData: '## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n' }));
    checkGuestConfiguration(configuration({ networkConfig: '# comment\nversion: 2\nethernets:\n  eth0: {dhcp4: true}\n' }));
  });

  it('has a stable digest that changes with any field', () => {
    const a = configuration({ userData: '#cloud-config\n' });
    assert.match(guestConfigurationDigest(a), /^[0-9a-f]{64}$/);
    assert.equal(guestConfigurationDigest(a), guestConfigurationDigest(configuration({ userData: '#cloud-config\n' })));
    assert.notEqual(guestConfigurationDigest(a), guestConfigurationDigest(configuration({ userData: '#cloud-config\n ' })));
  });
});

describe('the seed in the domain XML', () => {
  const template = (disks: string) =>
    `<domain type='qemu'><name>c</name><uuid>6f1c2a7b-5d10-4a55-9d1e-3f1c2a7b5d10</uuid><memory>65536</memory><os><type>hvm</type></os><devices>${disks}<interface type='network'><source network='default'/></interface></devices></domain>`;
  const disk = (dev: string, bus: string) =>
    `<disk type='file' device='disk'><source file='/images/clones/c/${dev}.qcow2'/><target dev='${dev}' bus='${bus}'/></disk>`;

  it('a read-only virtio disk after the last disk on virtio templates; a CD-ROM on SATA or IDE templates; xvd on Xen', async () => {
    const options = { seedPath: '/images/clones/c/cidata.iso', cloneDirectory: '/images/clones/c' };
    const virtio = await attachSeedImage(template(disk('vda', 'virtio') + disk('vdb', 'virtio')), { ...options, hypervisor: 'kvm' });
    assert.equal(virtio.target, 'vdc');
    assert.match(
      compact(virtio.xml),
      /vdb' bus='virtio'\/><\/disk><disk type='file' device='disk'><driver name='qemu' type='raw'\/><source file='\/images\/clones\/c\/cidata.iso'\/><target dev='vdc' bus='virtio'\/><readonly\/><\/disk><interface/,
    );
    const sata = await attachSeedImage(template(disk('sda', 'sata')), { ...options, hypervisor: 'kvm' });
    assert.equal(sata.target, 'sdb');
    assert.match(compact(sata.xml), /device='cdrom'.*<target dev='sdb' bus='sata'\/><readonly\/>/);
    const ide = await attachSeedImage(template(disk('hda', 'ide')), { ...options, hypervisor: 'kvm' });
    assert.match(compact(ide.xml), /device='cdrom'.*<target dev='hdb' bus='ide'\/>/);
    const xen = await attachSeedImage(template(disk('xvda', 'xen')), { ...options, hypervisor: 'xen' });
    assert.equal(xen.target, 'xvdb');
    await assert.rejects(attachSeedImage(template(disk('vda', 'virtio')), { ...options, seedPath: '/etc/passwd', hypervisor: 'kvm' }));
  });
});

/** A fake libvirt that records definitions; `failDefine` names domains whose define fails. */
function fakeLibvirt(failDefine: ReadonlySet<string> = new Set()) {
  const defined: Array<DomainInfo & { xml: string }> = [];
  const libvirt = {
    uri: 'test:///default',
    listDomains: async () => [...defined],
    define: async (xml: string) => {
      const name = /<name>([^<]+)<\/name>/.exec(xml)![1]!;
      if (failDefine.has(name)) throw new Error(`define ${name} failed`);
      const clone = readCloneMetadata(xml);
      defined.push({
        name,
        uuid: /<uuid>([^<]+)<\/uuid>/.exec(xml)![1]!,
        state: 'shut off',
        domainType: 'qemu',
        vcpus: 1,
        memoryBytes: 64 << 20,
        disks: [],
        ...(clone ? { clone } : {}),
        xml,
      } as DomainInfo & { xml: string });
    },
  } as unknown as Libvirt;
  return { libvirt, defined };
}

describe('CloneEngine with a guest configuration', () => {
  const events = { publish: async () => undefined } as never;
  const request = (names: string[], fields: Record<string, unknown> = {}) => ({
    source: { $case: 'image' as const, value: 'images/tiny' },
    clones: names.map((domainName, position) => ({ domainName, start: false, index: position + 11 })),
    operation: 'operations/00000000-0000-4000-8000-000000000001',
    requestId: `req-${Math.random()}`,
    validateOnly: false,
    stream: false,
    diskBackend: 0,
    guestConfiguration: undefined,
    guestConfigurationDigest: '',
    dataDiskBytes: '0',
    ...fields,
  });

  it('writes each clone its own seed (instance-id = its UUID, its hostname), attached read-only; the VM carries the digest', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-test-engine-seed-'));
    try {
      await writeTinyReplica(directory);
      const { libvirt, defined } = fakeLibvirt();
      const engine = new CloneEngine({ host: 'kvm-01', imageDirectory: directory, hypervisor: 'kvm', libvirt, events, log });
      const guest = configuration({ hostnameTemplate: 'node-{index}', sshAuthorizedKeys: [KEY], userData: '#cloud-config\n# {name}\n' });
      const names = ['id-a', 'id-b', 'id-c'];
      const results = await engine.createClones(
        request(names, { dataDiskBytes: '0', guestConfiguration: guest, guestConfigurationDigest: guestConfigurationDigest(guest) }),
      );
      assert.deepEqual(
        results.map((result) => result.status?.code ?? 0),
        [0, 0, 0],
      );
      for (const [position, name] of names.entries()) {
        const vm = results[position]!.virtualMachine!;
        assert.equal(vm.guestConfigurationDigest, guestConfigurationDigest(guest));
        const seed = readSeedImage(await readFile(join(directory, 'clones', name, 'cidata.iso')));
        const metaData = seed.files.get('meta-data')!.toString();
        assert.match(metaData, new RegExp(`^instance-id: "${vm.uuid}"$`, 'm'));
        assert.match(metaData, new RegExp(`^local-hostname: "node-${position + 11}"$`, 'm'));
        assert.equal(seed.files.get('user-data')!.toString(), `#cloud-config\n# ${name}\n`);
        assert.equal(seed.files.has('network-config'), false);
        const domain = defined.find((candidate) => candidate.name === name)!;
        assert.equal(domain.clone?.guestConfigurationDigest, guestConfigurationDigest(guest), 'the digest is in the lineage record');
        assert.equal(toVirtualMachine('kvm-01', domain, []).guestConfigurationDigest, guestConfigurationDigest(guest), 'the reporter shows it to inventory');
        const xml = compact(domain.xml);
        assert.ok(xml.includes(`<source file='${join(directory, 'clones', name, 'cidata.iso')}'/><target dev='vdb' bus='virtio'/><readonly/>`), xml);
        assert.equal((await readFile(join(directory, 'clones', name, 'domain.xml'), 'utf8')).includes('cidata.iso'), true);
      }
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });

  it('a clone whose define fails leaves no seed; a bad configuration or digest makes nothing; a withheld configuration makes no new clone', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-test-engine-seed-'));
    try {
      await writeTinyReplica(directory);
      const { libvirt } = fakeLibvirt(new Set(['bad-b']));
      const engine = new CloneEngine({ host: 'kvm-01', imageDirectory: directory, hypervisor: 'kvm', libvirt, events, log });
      const guest = configuration({ userData: '#cloud-config\n' });
      const results = await engine.createClones(request(['ok-a', 'bad-b'], { dataDiskBytes: '0', guestConfiguration: guest }));
      assert.equal(results[0]!.status?.code ?? 0, 0);
      assert.notEqual(results[1]!.status?.code ?? 0, 0);
      assert.deepEqual(await readdir(join(directory, 'clones')), ['ok-a'], 'the failed clone left nothing, its seed included');

      await assert.rejects(
        engine.createClones(request(['never-a'], { dataDiskBytes: '0', guestConfiguration: configuration({ hostnameTemplate: 'x_{index}' }) })),
        (error: CowherdError) => error.code === GrpcStatus.INVALID_ARGUMENT && error.field === 'guest_configuration.hostname_template',
      );
      await assert.rejects(
        engine.createClones(request(['never-b'], { dataDiskBytes: '0', guestConfiguration: guest, guestConfigurationDigest: '0'.repeat(64) })),
        (error: CowherdError) => error.code === GrpcStatus.INVALID_ARGUMENT && error.field === 'guest_configuration_digest',
      );
      const withheld = await engine.createClones(request(['never-c'], { dataDiskBytes: '0', guestConfigurationDigest: guestConfigurationDigest(guest) }));
      assert.equal(withheld[0]!.status?.code, GrpcStatus.FAILED_PRECONDITION);
      assert.deepEqual(await readdir(join(directory, 'clones')), ['ok-a'], 'nothing made for refused or withheld clones');
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });
});

describe('cloning keeps the guest configuration out of the operation record', () => {
  const fleet: FleetView = {
    getVirtualMachine: async () => undefined,
    getImage: async (name) => Image.fromPartial({ name, state: Image_State.STATE_AVAILABLE, hypervisor: Hypervisor.HYPERVISOR_KVM }),
    listHosts: async () => [
      Host.fromPartial({ name: 'hosts/kvm-01', state: Host_State.STATE_READY, hypervisor: Hypervisor.HYPERVISOR_KVM, agentEndpoint: 'x:1' }),
    ],
    listReplicas: async () => [],
    domainNamesInUse: async () => new Map(),
  };

  it('stores the request without secrets, the digest in the metadata, and gives the agents the configuration from memory', async () => {
    const secrets = new GuestSecrets();
    const calls: Array<{ request: unknown }> = [];
    const kind = cloneOperationKind({
      fleet,
      agents: {
        createClones: async (_host, request) => {
          calls.push({ request });
          return { results: [] };
        },
      },
      guestSecrets: secrets,
    });
    let stored: { request: CloneVirtualMachinesRequest; metadata: CloneVirtualMachinesMetadata } | undefined;
    const handlers = cloningHandlers({
      fleet,
      kind,
      guestSecrets: secrets,
      operations: {
        start: (async (_kind: unknown, request: CloneVirtualMachinesRequest, metadata: CloneVirtualMachinesMetadata) => {
          stored = { request, metadata };
          return { name: 'operations/x', done: false };
        }) as never,
      },
    });
    const guest = configuration({
      hostnameTemplate: 'vm-{index}',
      sshAuthorizedKeys: [KEY],
      userData: '#cloud-config\npassword: hunter2\n',
      networkConfig: 'version: 2\n',
    });
    const request = CloneVirtualMachinesRequest.fromPartial({
      source: { $case: 'image', value: 'images/debian-12' },
      count: 2,
      nameTemplate: 'vm-{index}',
      guestConfiguration: guest,
    });
    await (handlers.cloneVirtualMachines as (request: CloneVirtualMachinesRequest) => Promise<unknown>)(request);
    assert.ok(stored);
    assert.deepEqual(stored.request.guestConfiguration, configuration({ hostnameTemplate: 'vm-{index}' }));
    assert.ok(!Buffer.from(CloneVirtualMachinesRequest.encode(stored.request).finish()).includes('hunter2'));
    assert.equal(stored.metadata.guestConfigurationDigest, guestConfigurationDigest(guest));
    assert.equal(secrets.size, 1);

    // The bad hostname of one clone is refused before anything starts.
    await assert.rejects(
      (handlers.cloneVirtualMachines as (request: CloneVirtualMachinesRequest) => Promise<unknown>)({
        ...request,
        guestConfiguration: configuration({ hostnameTemplate: '{name}-' }),
      }),
      (error: CowherdError) => error.code === GrpcStatus.INVALID_ARGUMENT && error.field === 'guest_configuration.hostname_template',
    );
  });

  it("the image's default configuration applies field by field under the request's, and is checked too", async () => {
    const imageDefault = configuration({ hostnameTemplate: 'img-{index}', userData: '#cloud-config\n# image\n', networkConfig: 'version: 2\n' });
    const withDefault: FleetView = {
      ...fleet,
      getImage: async (name) =>
        Image.fromPartial({ name, state: Image_State.STATE_AVAILABLE, hypervisor: Hypervisor.HYPERVISOR_KVM, defaultGuestConfiguration: imageDefault }),
    };
    const held: GuestConfiguration[] = [];
    const handlers = cloningHandlers({
      fleet: withDefault,
      kind: cloneOperationKind({ fleet: withDefault, agents: { createClones: async () => ({ results: [] }) } }),
      guestSecrets: {
        hold: (_digest, guest) => {
          held.push(guest);
          return () => undefined;
        },
      },
      operations: { start: (async () => ({ name: 'operations/y', done: false })) as never },
    });
    const clone = handlers.cloneVirtualMachines as (request: CloneVirtualMachinesRequest) => Promise<unknown>;
    const base = { source: { $case: 'image' as const, value: 'images/debian-12' }, count: 2, nameTemplate: 'vm-{index}' };
    await clone(CloneVirtualMachinesRequest.fromPartial({ ...base, guestConfiguration: configuration({ userData: '#!/bin/sh\necho request\n' }) }));
    await clone(CloneVirtualMachinesRequest.fromPartial(base));
    assert.deepEqual(held, [
      configuration({ hostnameTemplate: 'img-{index}', userData: '#!/bin/sh\necho request\n', networkConfig: 'version: 2\n' }),
      imageDefault,
    ]);
  });

  it('the GuestSecrets vault forgets a configuration when its last operation ends', () => {
    const secrets = new GuestSecrets();
    const guest = configuration({ userData: '#cloud-config\n' });
    const first = secrets.hold('d', guest);
    secrets.hold('d', guest);
    assert.equal(secrets.get('d'), guest);
    first();
    first();
    assert.equal(secrets.get('d'), guest);
    secrets.release('d');
    assert.equal(secrets.get('d'), undefined);
  });
});

describe('cowherd vms clone flags', () => {
  it('read keys (authorized_keys style), user-data and network-config files into a guest configuration; none of them means none', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-test-cli-guest-'));
    try {
      await writeFile(join(directory, 'keys'), `# team keys\n${KEY}\n\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== second\n`);
      await writeFile(join(directory, 'user-data'), '#cloud-config\n');
      await writeFile(join(directory, 'network'), 'version: 2\n');
      const invocation = (values: Record<string, string | string[] | true>) =>
        ({
          string: (name: string) => (typeof values[name] === 'string' ? (values[name] as string) : undefined),
          flag: (name: string) => values[name] === true,
          list: (name: string) => (Array.isArray(values[name]) ? (values[name] as string[]) : []),
        }) as never;
      const args = new ArgumentReader([]);
      assert.deepEqual(
        await guestConfigurationFromFlags(
          invocation({
            'hostname-template': 'web-{index}',
            'ssh-key-file': [join(directory, 'keys')],
            'user-data-file': join(directory, 'user-data'),
            'network-config-file': join(directory, 'network'),
          }),
          args,
        ),
        {
          hostnameTemplate: 'web-{index}',
          sshAuthorizedKeys: [KEY, 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== second'],
          userData: '#cloud-config\n',
          networkConfig: 'version: 2\n',
        },
      );
      assert.deepEqual(await guestConfigurationFromFlags(invocation({ 'cloud-init': true }), args), configuration());
      assert.equal(await guestConfigurationFromFlags(invocation({}), args), undefined);
      await assert.rejects(guestConfigurationFromFlags(invocation({ 'user-data-file': join(directory, 'missing') }), args), /--user-data-file .*ENOENT/);
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });
});
