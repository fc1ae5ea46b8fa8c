/**
 * The `cowherd` CLI run exactly as a user types it (`node --import tsx services/cli/main.ts ...`) against a
 * real stack: NATS, the CA, inventory, distribution, cloning and an agent on the private libvirtd. The admin
 * bundle comes from the CA's IssueCertificate, as an operator's does. The test parses `--output json`,
 * publishes a powered-off VM and clones the image through the CLI, reads the lineage and the event stream,
 * publishes a second version, sets and deletes aliases, rebases a clone with a data disk onto the new version,
 * sets retention and asks garbage collection for a dry run, and checks that wrong invocations exit with the
 * documented codes and say what to do.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { createClient } from '../../services/common/platform/client.js';
import { writeCredentials } from '../../services/common/platform/credential-files.js';
import { freePort } from '../../services/launcher/embedded-nats.js';
import { createCsr, generateKeyPair } from '../../services/common/platform/pki.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call } from '../harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess } from '../harness/processes.js';

const run = promisify(execFile);
const HOST = 'cli-host';
const PEER = 'cli-peer';
const URI = 'qemu:///system';

interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

describe('the cowherd CLI as a user types it', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const image = `cli-img-${suffix}`;
  const sourceVm = `cli-src-${suffix}`;
  const domains: string[] = [];
  const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
  let connection: string[] = [];
  let environment: Record<string, string> = {};

  /** Runs the CLI as a user would, connection flags first (flags given later on the line override them). */
  const cowherd = (...args: string[]): Promise<CliResult> =>
    new Promise((resolve) => {
      execFile(
        process.execPath,
        ['--import', 'tsx', 'services/cli/main.ts', ...connection, ...args],
        { cwd: REPOSITORY, env: environment, timeout: 90_000 },
        (error, stdout, stderr) => {
          const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
          resolve({ code, stdout, stderr });
        },
      );
    });
  /** Runs it with --output json and parses stdout; fails with stderr when it exits non-zero. */
  const json = async <T = Record<string, unknown>>(...args: string[]): Promise<T> => {
    const result = await cowherd(...args, '--output', 'json');
    assert.equal(result.code, 0, `cowherd ${args.join(' ')} exited ${result.code}: ${result.stderr}`);
    return JSON.parse(result.stdout) as T;
  };

  before(async () => {
    await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    const ca = await startCertificateAuthorityProcess(resources, pki, nats);
    const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    const distribution = await startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
    });
    const cloning = await startServiceProcess(resources, 'cloning', await pki.files('service', 'cloning'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_DISTRIBUTION_ADDRESS: distribution.address,
    });

    // The operator's admin bundle, issued and recorded by the CA (which also admits it to NATS).
    const bootstrap = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'bootstrap')), caPem: pki.ca.certificatePem });
    const caClient = createClient(CertificateAuthorityServiceClient, ca.address, bootstrap);
    const keys = await generateKeyPair(2048);
    const identity = 'spiffe://cowherd/admin/cli-tester';
    const issued = await call<{ certificatePem: string }>((cb) =>
      caClient.issueCertificate(
        { csrPem: createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity, dnsNames: [] }), identity, dnsNames: [], ttl: undefined, requestId: '' },
        cb,
      ),
    );
    const bundle = join(await resources.tempDir(), 'admin');
    await writeCredentials(bundle, { certificatePem: issued.certificatePem, privateKeyPem: keys.privateKeyPem, caPem: pki.ca.certificatePem });

    // Two agents join with join tokens made by the CLI, as new hosts do.
    connection = [
      '--credentials',
      bundle,
      '--ca',
      ca.address,
      '--inventory',
      inventory.address,
      '--distribution',
      distribution.address,
      '--cloning',
      cloning.address,
      '--nats',
      nats.url,
    ];
    environment = Object.fromEntries(
      Object.entries(process.env).filter((entry): entry is [string, string] => entry[1] !== undefined && !entry[0].startsWith('COWHERD_')),
    );
    const directory = await resources.tempDir('cowherd-e2e-');
    const imageDirectory = join(directory, HOST, 'images-root');
    for (const host of [HOST, PEER]) {
      const token = await json<{ token: string; host: string; state: string }>('hosts', 'join-token', host, '--ttl', '10m');
      assert.match(token.token, /^cjt1\./);
      assert.deepEqual([token.host, token.state], [host, 'STATE_PENDING']);
      const agentPort = await freePort();
      await startServiceProcess(resources, 'agent', undefined, nats.url, {
        COWHERD_LISTEN_ADDRESS: `localhost:${agentPort}`,
        COWHERD_HOST_ID: host,
        COWHERD_JOIN_TOKEN: token.token,
        COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
        COWHERD_CREDENTIALS_DIR: join(directory, host, 'credentials'),
        COWHERD_CA_ADDRESS: ca.address,
        COWHERD_INVENTORY_ADDRESS: inventory.address,
        COWHERD_ADVERTISE_ADDRESS: `localhost:${agentPort}`,
        COWHERD_LIBVIRT_URI: URI,
        COWHERD_IMAGE_DIR: join(directory, host, 'images-root'),
        COWHERD_TORRENT_PORT: '0',
        COWHERD_WEB_SEED_ADDRESS: '127.0.0.1:0',
      });
    }
    resources.defer(async () => {
      caClient.close();
      for (const domain of domains) {
        await virsh('destroy', domain).catch(() => undefined);
        await virsh('undefine', domain).catch(() => undefined);
      }
    });

    // A powered-off VM to publish: one small qcow2 disk.
    const vmDirectory = join(imageDirectory, 'vms');
    await mkdir(vmDirectory, { recursive: true });
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', join(vmDirectory, `${sourceVm}.qcow2`), '64M']);
    const xml = `<domain type='qemu'><name>${sourceVm}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${join(vmDirectory, `${sourceVm}.qcow2`)}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><model type='virtio'/></interface></devices></domain>`;
    await writeFile(join(vmDirectory, `${sourceVm}.xml`), xml);
    await virsh('define', join(vmDirectory, `${sourceVm}.xml`));
    domains.push(sourceVm);
    const reader = createClient(InventoryServiceClient, inventory.address, bootstrap, { defaultDeadlineMs: 10_000 });
    resources.defer(() => reader.close());
    const deadline = Date.now() + 20_000;
    const ready = async (): Promise<boolean> =>
      (await call<{ state: number }>((cb) => reader.getVirtualMachine({ name: `hosts/${HOST}/virtualMachines/${sourceVm}` }, cb)).then(
        (vm) => vm.state === 3,
        () => false,
      )) &&
      (await call<{ state: number }>((cb) => reader.getHost({ name: `hosts/${PEER}` }, cb)).then(
        (host) => host.state === 1,
        () => false,
      ));
    while (Date.now() < deadline && !(await ready())) await new Promise((resolve) => setTimeout(resolve, 200));
  });
  after(() => resources.release());

  it('lists hosts and shows one, as JSON and as a table', async () => {
    const { hosts } = await json<{ hosts: Array<{ name: string; state: string; hypervisor: string }> }>('hosts', 'list');
    assert.deepEqual(
      hosts.map((host) => [host.name, host.state]),
      [
        [`hosts/${HOST}`, 'STATE_READY'],
        [`hosts/${PEER}`, 'STATE_READY'],
      ],
    );
    const shown = await json<{ host: { name: string }; virtualMachines: Array<{ name: string }> }>('hosts', 'show', HOST);
    assert.equal(shown.host.name, `hosts/${HOST}`);
    assert.ok(shown.virtualMachines.some((vm) => vm.name === `hosts/${HOST}/virtualMachines/${sourceVm}`));
    const table = await cowherd('hosts', 'list');
    assert.equal(table.code, 0, table.stderr);
    assert.match(table.stdout, /^HOST\s+STATE\s+HYPERVISOR/m);
    assert.match(table.stdout, new RegExp(`^${HOST}\\s+READY\\s+(KVM|XEN)`, 'm'));
  });

  it('publishes a powered-off VM as an image, distributes it peer-to-peer and shows its replicas', async () => {
    const published = await json<{ name: string; state: string; originHost: string }>(
      'images',
      'publish',
      '--host',
      HOST,
      '--vm',
      sourceVm,
      '--image',
      image,
      '--description',
      'made by the CLI test',
      '--label',
      'os=none',
    );
    assert.deepEqual([published.name, published.state, published.originHost], [`images/${image}`, 'STATE_AVAILABLE', `hosts/${HOST}`]);
    const { images } = await json<{ images: Array<{ name: string; labels?: Record<string, string> }> }>('images', 'list');
    assert.deepEqual(images.find((entry) => entry.name === `images/${image}`)?.labels, { os: 'none' });

    // Not a terminal: progress comes as plain lines on stderr, the result as JSON on stdout.
    const distributed = await cowherd('images', 'distribute', image, '--hosts', PEER, '--output', 'json');
    assert.equal(distributed.code, 0, distributed.stderr);
    const response = JSON.parse(distributed.stdout) as { replicas?: Array<{ host: string; state: string }>; failures?: unknown[] };
    assert.deepEqual(
      response.replicas?.map((replica) => [replica.host, replica.state]),
      [[`hosts/${PEER}`, 'STATE_AVAILABLE']],
    );
    assert.equal(response.failures, undefined);
    assert.match(distributed.stderr, new RegExp(`^distributing images/${image} to ${PEER} \\(operations/`, 'm'));
    assert.match(distributed.stderr, new RegExp(`^${PEER}\\s+AVAILABLE\\s+`, 'm'));

    const shown = await json<{ image: { name: string }; imageReplicas: Array<{ host: string; state: string; origin?: boolean }> }>('images', 'show', image);
    assert.deepEqual(
      shown.imageReplicas.map((replica) => [replica.host, replica.state, replica.origin ?? false]),
      [
        [`hosts/${HOST}`, 'STATE_AVAILABLE', true],
        [`hosts/${PEER}`, 'STATE_AVAILABLE', false],
      ],
    );
    const table = await cowherd('images', 'show', image);
    assert.match(table.stdout, /^HOST\s+REPLICA STATE\s+ORIGIN/m);
    assert.match(table.stdout, new RegExp(`^${PEER}\\s+AVAILABLE\\s+no`, 'm'));
  });

  it('clones through the CLI, lists the clones across hosts, shows their lineage and follows the events', async () => {
    // Follow the event stream while cloning, as an operator would in a second terminal.
    const follower = spawn(
      process.execPath,
      ['--import', 'tsx', 'services/cli/main.ts', ...connection, 'events', '--follow', '--types', 'clone.done', '--output', 'json'],
      { cwd: REPOSITORY, env: environment, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    resources.defer(() => void follower.kill('SIGKILL'));
    let followed = '';
    let followerErrors = '';
    follower.stdout.on('data', (chunk: Buffer) => (followed += chunk.toString()));
    follower.stderr.on('data', (chunk: Buffer) => (followerErrors += chunk.toString()));
    const followerExit = new Promise<number | null>((resolve) => follower.on('close', (code) => resolve(code)));
    const waitUntil = async (condition: () => boolean, what: string): Promise<void> => {
      const deadline = Date.now() + 20_000;
      while (!condition()) {
        if (Date.now() > deadline || follower.exitCode !== null) throw new Error(`${what}; stderr: ${followerErrors}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    };
    await waitUntil(() => followerErrors.includes('following'), 'the follower did not start');

    // Round robin over both hosts: clone 1 on cli-host, clone 2 on cli-peer.
    const clones = [`${HOST}/${image}-1`, `${PEER}/${image}-2`];
    const names = clones.map((clone) => `hosts/${clone.split('/')[0]}/virtualMachines/${clone.split('/')[1]}`);
    domains.push(`${image}-1`, `${image}-2`);
    const cloned = await json<{ clones: Array<{ virtualMachine: string; state: string; overlays: string[] }> }>(
      'vms',
      'clone',
      '--image',
      image,
      '--count',
      '2',
      '--hosts',
      `${HOST},${PEER}`,
      '--template',
      `${image}-{index}`,
    );
    assert.deepEqual(
      cloned.clones.map((clone) => [clone.virtualMachine, clone.state]),
      names.map((name) => [name, 'STATE_DONE']),
    );

    await waitUntil(() => names.every((name) => followed.includes(name)), `the follower did not see both clone.done events: ${followed}`);
    follower.kill('SIGINT');
    assert.equal(await followerExit, 0, followerErrors);
    const events = followed
      .trim()
      .split('\n')
      .map((line) => JSON.parse(line) as { kind: string; host: string; event: { virtualMachine: string; image: string } });
    assert.deepEqual(events.map((event) => [event.kind, event.host, event.event.virtualMachine, event.event.image]).sort(), [
      ['clone.done', HOST, names[0], `images/${image}`],
      ['clone.done', PEER, names[1], `images/${image}`],
    ]);
    // The stored stream has them too, filtered by host.
    const stored = await cowherd('events', '--types', 'clone', '--host', PEER, '--last', '5', '--output', 'json');
    assert.equal(stored.code, 0, stored.stderr);
    assert.ok(stored.stdout.includes(names[1]!) && !stored.stdout.includes(names[0]!), stored.stdout);

    // Inventory learns of the clones from the agents' reports: wait for them in `vms list` (all hosts).
    let listed: Array<{ name: string; host: string; sourceImage?: string; managed?: boolean }> = [];
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline) {
      listed = (await json<{ virtualMachines: typeof listed }>('vms', 'list')).virtualMachines;
      if (names.every((name) => listed.some((vm) => vm.name === name))) break;
      await new Promise((resolve) => setTimeout(resolve, 300));
    }
    for (const name of names) {
      const vm = listed.find((entry) => entry.name === name);
      assert.deepEqual([vm?.sourceImage, vm?.managed], [`images/${image}`, true], JSON.stringify(listed));
    }
    // Both agents drive the one private libvirtd of this machine, so each also reports the other's domains:
    // the checks look for each clone under its own host rather than for exact lists.
    const filtered = await json<{ virtualMachines: Array<{ name: string; sourceImage: string }> }>(
      'vms',
      'list',
      '--host',
      PEER,
      '--filter',
      `source_image = "images/${image}"`,
    );
    assert.ok(
      filtered.virtualMachines.some((vm) => vm.name === names[1]),
      JSON.stringify(filtered),
    );
    assert.ok(
      filtered.virtualMachines.every((vm) => vm.name.startsWith(`hosts/${PEER}/`) && vm.sourceImage === `images/${image}`),
      JSON.stringify(filtered),
    );

    // Lineage of the clone on the peer: its overlay's base is the peer's own replica of the image.
    const shown = await json<{
      virtualMachine: { disks: Array<{ path: string; backingChain: Array<{ path: string }> }> };
      lineage: { overlays: string[]; imageReplica: { name: string }; image: { name: string }; host: { name: string } };
    }>('vms', 'show', clones[1]!);
    assert.equal(shown.lineage.image.name, `images/${image}`);
    assert.equal(shown.lineage.imageReplica.name, `hosts/${PEER}/images/${image}`);
    assert.equal(shown.lineage.host.name, `hosts/${PEER}`);
    assert.equal(shown.lineage.overlays.length, 1);
    assert.equal(shown.virtualMachine.disks[0]?.path, shown.lineage.overlays[0]);
    assert.match(shown.virtualMachine.disks[0]?.backingChain[0]?.path ?? '', new RegExp(`/${PEER}/images-root/images/${image}/`));
    // Each replica counts the clones on it, from the same lineage `vms show` reads (issue 12: 0 before).
    const byImage = await json<{ imageReplicas: Array<{ host: string; dependentVirtualMachines?: string[] }> }>('images', 'show', image);
    for (const [index, host] of [HOST, PEER].entries()) {
      const replica = byImage.imageReplicas.find((entry) => entry.host === `hosts/${host}`);
      assert.ok(replica?.dependentVirtualMachines?.includes(names[index]!), `images show: ${JSON.stringify(replica)}`);
    }
    const byHost = await json<{ imageReplicas: Array<{ image: string; dependentVirtualMachines?: string[] }> }>('hosts', 'show', PEER);
    assert.ok(
      byHost.imageReplicas.find((entry) => entry.image === `images/${image}`)?.dependentVirtualMachines?.includes(names[1]!),
      `hosts show: ${JSON.stringify(byHost.imageReplicas)}`,
    );
    assert.match((await cowherd('images', 'show', image)).stdout, new RegExp(`^${PEER}\\s+AVAILABLE\\s+no\\s+[1-9]\\d*\\s`, 'm'));
    assert.match((await cowherd('hosts', 'show', PEER)).stdout, new RegExp(`^${image}\\s+AVAILABLE\\s+no\\s+[1-9]`, 'm'));
    const tree = await cowherd('vms', 'show', names[0]!);
    assert.match(tree.stdout, /lineage:\n.*\(VM, SHUT_OFF\)\n.*└─ overlay .*\n.*└─ base replica .*\n.*└─ image .*\n.*└─ host /);

    const overview = await json<{
      hosts: Array<{ host: { name: string }; imageReplicas: Array<{ image: string }>; virtualMachines: Array<{ name: string }> }>;
    }>('overview');
    for (const [index, host] of [HOST, PEER].entries()) {
      const entry = overview.hosts.find((candidate) => candidate.host.name === `hosts/${host}`);
      assert.ok(
        entry?.imageReplicas.some((replica) => replica.image === `images/${image}`),
        JSON.stringify(entry),
      );
      assert.ok(
        entry?.virtualMachines.some((vm) => vm.name === names[index]),
        JSON.stringify(entry),
      );
    }

    // Power and deletion: start; stop without waiting, then follow the operation; delete.
    assert.equal((await json<{ state: string }>('vms', 'start', clones[0]!)).state, 'STATE_RUNNING');
    const stopping = await cowherd('vms', 'stop', clones[0]!, '--force', '--no-wait');
    assert.equal(stopping.code, 0, stopping.stderr);
    assert.match(stopping.stdout, /^operations\/[0-9a-f-]{36}\n$/);
    assert.equal((await json<{ state: string }>('operations', 'wait', stopping.stdout.trim())).state, 'STATE_SHUT_OFF');
    // The image cannot go while clones use it: exit 4 with what to do.
    const inUse = await cowherd('images', 'delete', image);
    assert.equal(inUse.code, 4, inUse.stderr);
    assert.match(inUse.stderr, /^cowherd: .*images\/cli-img-.*\nhint: delete the VMs cloned from it first: `cowherd vms list --filter/);
    for (const [index, clone] of clones.entries()) assert.deepEqual(await json('vms', 'delete', clone), { name: names[index], deleted: true });
    await assert.rejects(virsh('domstate', `${image}-1`));
  });

  it('versions: a second publish adds version 2; versions, aliases, a clone with a data disk rebased onto 2, retention and gc --dry-run', async () => {
    // Usage errors come before any call.
    const usage = await Promise.all([
      cowherd('vms', 'rebase', '--all'),
      cowherd('vms', 'rebase', '--to-version', image),
      cowherd('vms', 'rebase', '--to-version', image, '--all', '--filter', 'state = RUNNING'),
      cowherd('vms', 'rebase', '--to-version', `${image}/versions/x_1`, '--all'),
      cowherd('vms', 'rebase', '--to-version', image, '--all', '--canary', '0'),
      cowherd('vms', 'rebase', '--to-version', image, '--all', '--shutdown-timeout', '2h'),
      cowherd('vms', 'clone', '--image', image, '--data-disk', '10Q'),
      cowherd('images', 'alias', image, 'latest', '1'),
      cowherd('images', 'alias', image, 'stable'),
      cowherd('images', 'alias', image, 'stable', '1', '--delete'),
      cowherd('hosts', 'update', HOST, '--image-dir-watermark', '100'),
    ]);
    const messages = [
      /missing --to-version/,
      /which clones\? give --filter '<expr>' .* or --all/,
      /give either --filter or --all, not both/,
      /--to-version ".*\/versions\/x_1" must be <image> or <image>\/versions\/<number\|alias>/,
      /--canary must be a whole number from 1 to 100/,
      /--shutdown-timeout must be at most 1h/,
      /--data-disk must be a size like 10G/,
      /latest always points at the newest AVAILABLE version/,
      /missing <version> \(or --delete to remove the alias\)/,
      /give either <version> or --delete, not both/,
      /--image-dir-watermark must be a whole number from 0 to 99/,
    ];
    for (const [index, result] of usage.entries()) {
      assert.equal(result.code, 2, `${messages[index]}: ${result.stderr}`);
      assert.match(result.stderr, messages[index]!);
    }

    // Publishing onto the existing id adds version 2, which becomes latest.
    const published = await json<{ name: string; version: string; state: string }>('images', 'publish', '--host', HOST, '--vm', sourceVm, '--image', image);
    assert.deepEqual([published.version, published.state], ['2', 'STATE_AVAILABLE']);
    const versions = await json<{ versions: Array<{ name: string; version: string; state: string }>; aliases: Record<string, string> }>(
      'images',
      'versions',
      image,
    );
    assert.deepEqual(
      versions.versions.map((version) => [version.name, version.version, version.state]),
      [
        [`images/${image}/versions/1`, '1', 'STATE_AVAILABLE'],
        [`images/${image}/versions/2`, '2', 'STATE_AVAILABLE'],
      ],
    );
    assert.deepEqual(versions.aliases, { latest: '2' });
    const versionTable = await cowherd('images', 'versions', image);
    assert.equal(versionTable.code, 0, versionTable.stderr);
    assert.match(versionTable.stdout, /^VERSION\s+STATE\s+SIZE\s+CREATED\s+ALIASES\s+HOSTS\s+CLONES\s+NAME$/m);
    assert.match(versionTable.stdout, new RegExp(`^2\\s+AVAILABLE\\s+.*\\s+latest\\s+1/1\\s+0\\s+images/${image}/versions/2$`, 'm'));
    const shownLatest = await cowherd('images', 'show', image);
    assert.match(shownLatest.stdout, new RegExp(`^version:\\s+2 \\(latest\\) \\(images/${image}/versions/2\\)$`, 'm'));
    assert.match(shownLatest.stdout, /^aliases:\s+latest=2$/m);

    // An alias: set (by number), read through it, delete; deleting it again is NOT_FOUND.
    const aliased = await json<{ aliases: Record<string, string> }>('images', 'alias', image, 'stable', '1');
    assert.deepEqual(aliased.aliases, { latest: '2', stable: '1' });
    const byAlias = await json<{ image: { version: string } }>('images', 'show', `${image}/versions/stable`);
    assert.equal(byAlias.image.version, '1');
    const unknownAlias = await cowherd('images', 'show', `${image}/versions/nope`);
    assert.equal(unknownAlias.code, 3, unknownAlias.stderr);
    assert.match(unknownAlias.stderr, new RegExp(`\`cowherd images versions ${image}\` lists its versions and aliases`));
    assert.deepEqual((await json<{ aliases: Record<string, string> }>('images', 'alias', image, 'stable', '--delete')).aliases, { latest: '2' });
    const deletedAgain = await cowherd('images', 'alias', image, 'stable', '--delete');
    assert.equal(deletedAgain.code, 3, deletedAgain.stderr);
    assert.match(deletedAgain.stderr, /has no alias "stable"/);

    // A clone of version 1 with a persistent data disk, moved onto version 2: its data disk and identity stay.
    const clone = `${image}-r1`;
    const name = `hosts/${HOST}/virtualMachines/${clone}`;
    domains.push(clone);
    const cloned = await json<{ clones: Array<{ virtualMachine: string; state: string }> }>(
      'vms',
      'clone',
      '--image',
      `${image}/versions/1`,
      '--hosts',
      HOST,
      '--template',
      clone,
      '--data-disk',
      '8M',
    );
    assert.deepEqual(
      cloned.clones.map((entry) => [entry.virtualMachine, entry.state]),
      [[name, 'STATE_DONE']],
    );
    type Shown = {
      virtualMachine: { uuid: string; sourceImageVersion?: string; disks: Array<{ path: string; persistent?: boolean }> };
      lineage: { imageReplica: { name: string } | null };
    };
    // Inventory learns of the move from the agent's report of the redefined domain: seconds, more on a busy machine.
    const waitForVersion = async (version: string): Promise<Shown> => {
      const deadline = Date.now() + 60_000;
      let shown: Shown | undefined;
      while (Date.now() < deadline) {
        const result = await cowherd('vms', 'show', name, '--output', 'json');
        if (result.code === 0) {
          shown = JSON.parse(result.stdout) as Shown;
          if (shown.virtualMachine.sourceImageVersion === version) return shown;
        }
        await new Promise((resolve) => setTimeout(resolve, 300));
      }
      assert.fail(`${name} is not on ${version}: ${JSON.stringify(shown)}`);
    };
    const before = await waitForVersion(`images/${image}/versions/1`);
    const dataDisk = before.virtualMachine.disks.find((disk) => disk.persistent);
    assert.ok(dataDisk, JSON.stringify(before.virtualMachine.disks));
    const listed = await cowherd('vms', 'list', '--host', HOST, '--filter', `source_image_version = "images/${image}/versions/1"`);
    assert.match(listed.stdout, new RegExp(`^${HOST}/${clone}\\s+SHUT_OFF\\s+1\\s+.+?\\s+2\\s+images/${image}\\s+1\\s+yes$`, 'm'));

    // Both agents drive this machine's one libvirtd and each reports the other's domains too: --host keeps to the real one.
    const rebased = await cowherd(
      'vms',
      'rebase',
      '--host',
      HOST,
      '--filter',
      `source_image_version = "images/${image}/versions/1"`,
      '--to-version',
      `${image}/versions/2`,
      '--canary',
      '1',
    );
    assert.equal(rebased.code, 0, rebased.stderr);
    assert.match(rebased.stdout, /^VM\s+RESULT\s+FROM\s+TO\s+CANARY\s+STARTED$/m);
    assert.match(rebased.stdout, new RegExp(`^${HOST}/${clone}\\s+MOVED\\s+${image}/versions/1\\s+${image}/versions/2\\s+yes\\s+no$`, 'm'));
    assert.match(rebased.stderr, /rebase onto .*\/versions\/2\s+1\/1 done, 0 failed/);
    const after = await waitForVersion(`images/${image}/versions/2`);
    assert.equal(after.virtualMachine.uuid, before.virtualMachine.uuid);
    assert.ok(
      after.virtualMachine.disks.some((disk) => disk.persistent && disk.path === dataDisk.path),
      JSON.stringify(after.virtualMachine.disks),
    );
    assert.match((await cowherd('vms', 'show', name)).stdout, new RegExp(`^previous version:\\s+images/${image}/versions/1 `, 'm'));
    // Nothing left on version 1 for that filter: the service refuses an empty selection.
    const nothing = await cowherd('vms', 'rebase', '--host', HOST, '--filter', `source_image_version = "images/${image}/versions/1"`, '--to-version', image);
    assert.equal(nothing.code, 4, nothing.stderr);

    // Retention: keep 1 version; version 1 (no clone, no alias) would go, version 2 stays; an alias keeps 1.
    assert.equal((await json<{ keepVersions: number }>('images', 'update', image, '--keep-versions', '1')).keepVersions, 1);
    const dryRun = await json<{ versions?: string[] }>('images', 'gc', '--dry-run', '--image', image);
    assert.deepEqual(dryRun.versions, [`images/${image}/versions/1`]);
    await json('images', 'alias', image, 'stable', '1');
    assert.equal((await json<{ versions?: string[] }>('images', 'gc', '--dry-run', '--image', image)).versions, undefined);
    const gcTable = await cowherd('images', 'gc', '--dry-run', '--image', image);
    assert.equal(gcTable.code, 0, gcTable.stderr);
    assert.match(gcTable.stderr, /dry run: 0 version\(s\) and 0 replica\(s\) would go/);
    assert.equal((await json<{ image: { version: string } }>('images', 'show', `${image}/versions/1`)).image.version, '1');

    // A host's watermark, set and turned off.
    assert.equal(
      (await json<{ imageDirectoryHighWatermarkPercent?: number }>('hosts', 'update', HOST, '--image-dir-watermark', '90')).imageDirectoryHighWatermarkPercent,
      90,
    );
    assert.equal(
      (await json<{ imageDirectoryHighWatermarkPercent?: number }>('hosts', 'update', HOST, '--image-dir-watermark', '0')).imageDirectoryHighWatermarkPercent,
      undefined,
    );

    assert.deepEqual(await json('vms', 'delete', `${HOST}/${clone}`), { name, deleted: true });
  });

  it('drains a host and takes it back', async () => {
    assert.equal((await json<{ draining?: boolean; state: string }>('hosts', 'drain', HOST)).state, 'STATE_DRAINING');
    const undone = await json<{ draining?: boolean; state: string }>('hosts', 'drain', HOST, '--undo');
    assert.equal(undone.draining, undefined, 'draining false is left out of proto JSON');
    assert.equal(undone.state, 'STATE_READY');
  });

  it('exits non-zero with a helpful message on wrong invocations', async () => {
    const [unknownHost, unknownVm, missingFlag, unknownCommand, unknownOption, badOutput, unreachable, noCredentials, globalsLast, wrongService] =
      await Promise.all([
        cowherd('hosts', 'show', 'no-such-host'),
        cowherd('vms', 'show', `${HOST}/no-such-vm`),
        cowherd('images', 'publish', '--host', HOST, '--image', 'x'),
        cowherd('frobnicate'),
        cowherd('vms', 'list', '--hots', HOST),
        cowherd('hosts', 'list', '--output', 'yaml'),
        cowherd('hosts', 'list', '--inventory', 'localhost:1'),
        new Promise<CliResult>((resolve) =>
          execFile(
            process.execPath,
            ['--import', 'tsx', 'services/cli/main.ts', 'hosts', 'list', '--credentials', '/nonexistent/cowherd-admin'],
            { cwd: REPOSITORY, env: environment },
            (error, stdout, stderr) => resolve({ code: typeof error?.code === 'number' ? error.code : 0, stdout, stderr }),
          ),
        ),
        new Promise<CliResult>((resolve) =>
          execFile(
            process.execPath,
            ['--import', 'tsx', 'services/cli/main.ts', 'hosts', 'show', `hosts/${HOST}`, '--output', 'json', ...connection],
            { cwd: REPOSITORY, env: environment },
            (error, stdout, stderr) => resolve({ code: typeof error?.code === 'number' ? error.code : 0, stdout, stderr }),
          ),
        ),
        // The distribution service where the inventory should be: same CA, wrong identity.
        cowherd('hosts', 'list', '--inventory', connection[connection.indexOf('--distribution') + 1]!),
      ]);
    assert.equal(unknownHost.code, 3, unknownHost.stderr);
    assert.equal(unknownHost.stderr, 'cowherd: no host named "no-such-host"; `cowherd hosts list` shows the hosts\n');
    assert.equal(unknownVm.code, 3, unknownVm.stderr);
    assert.match(unknownVm.stderr, /no VM named "no-such-vm" on host "cli-host"; `cowherd vms list --host cli-host` shows its VMs/);
    assert.equal(missingFlag.code, 2);
    assert.match(
      missingFlag.stderr,
      /^cowherd: missing --vm <vm>\nusage: cowherd images publish --host <host> --vm <vm> --image <id> \[options\]\nrun 'cowherd images publish --help' for more\n$/,
    );
    assert.equal(unknownCommand.code, 2);
    assert.match(unknownCommand.stderr, /unknown command "frobnicate"/);
    assert.equal(unknownOption.code, 2);
    assert.match(unknownOption.stderr, /unknown option --hots; did you mean "--host"\?/);
    assert.equal(badOutput.code, 2);
    assert.match(badOutput.stderr, /--output must be table or json/);
    assert.equal(unreachable.code, 6, unreachable.stderr);
    assert.match(unreachable.stderr, /cannot reach the inventory service at localhost:1 .*--inventory or COWHERD_INVENTORY_ADDRESS/);
    assert.equal(wrongService.code, 6, wrongService.stderr);
    assert.match(
      wrongService.stderr,
      /the server at \S+ is not the inventory service \(it presents spiffe:\/\/cowherd\/service\/distribution\); point --inventory or COWHERD_INVENTORY_ADDRESS/,
    );
    assert.equal(noCredentials.code, 5);
    assert.match(noCredentials.stderr, /cannot read the admin credentials: \/nonexistent\/cowherd-admin\/cert.pem .*--credentials <dir>/);
    assert.equal(globalsLast.code, 0, globalsLast.stderr);
    assert.equal((JSON.parse(globalsLast.stdout) as { host: { name: string } }).host.name, `hosts/${HOST}`);
    for (const result of [unknownHost, unknownVm, missingFlag, unknownCommand, unreachable, noCredentials]) {
      assert.doesNotMatch(result.stderr, /\n\s+at /, 'no stack trace');
      assert.doesNotMatch(result.stderr, /BEGIN [A-Z ]*PRIVATE KEY/, 'no secrets');
    }
    const help = await cowherd('vms', 'clone', '--help');
    assert.equal(help.code, 0);
    assert.match(help.stdout, /^usage: cowherd vms clone \[options\]/);
    assert.match(help.stdout, /--placement <hosts\|image-hosts>/);
    assert.match(help.stdout, /--stream\s+where a host lacks the image/);
  });

  it('deletes the image once nothing uses it', async () => {
    // Inventory drops the deleted clones when the agent reports them gone; until then the image is in use.
    const deadline = Date.now() + 15_000;
    let result: CliResult;
    do {
      result = await cowherd('images', 'delete', image, '--output', 'json');
      if (result.code !== 4) break;
      await new Promise((resolve) => setTimeout(resolve, 300));
    } while (Date.now() < deadline);
    assert.equal(result.code, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout), { name: `images/${image}`, deleted: true });
    const gone = await cowherd('images', 'show', image);
    assert.equal(gone.code, 3);
    assert.match(gone.stderr, new RegExp(`no image named "${image}"`));
  });
});
