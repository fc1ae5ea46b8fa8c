/**
 * The public API from clients that are not cowherd's own, on real parts: NATS, the CA, inventory,
 * distribution, cloning and agents on the private libvirtd, with an admin bundle from the CA's
 * IssueCertificate, as an operator's.
 *
 * - test/python/clone_client.py, with stubs generated from proto/ by Debian's grpc tools, clones a published
 *   image (CloneVirtualMachines, GetOperation, WaitOperation, the response unpacked from the Any); virsh and
 *   inventory show the clones.
 * - test/go's clone-client does the same in Go: built by test/go/build.sh offline from Debian's packages (stubs
 *   from proto/ by protoc-gen-go and protoc-gen-go-grpc, `go build` in GOPATH mode on /usr/share/gocode), the same
 *   checks, and a refusal that prints what the Python client prints.
 * - The README's grpcurl block runs as it stands, command by command, through server reflection only (but
 *   for the plaintext probe port, which serves health alone and is called with Debian's health.proto): with
 *   grpcurl when it is on the PATH, otherwise with `buf curl` given grpcurl's flags (Debian 12 has no grpcurl
 *   package, and the npm packages that wrap it download it from GitHub at install time). The test changes only what differs on a test machine: the addresses (free ports), the
 *   admin bundle's directory, the libvirt domain names (made unique on the shared libvirtd) and the
 *   `operations/<id>` placeholder, which gets the operation the previous call started on that service.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import type { ChannelCredentials } from '@grpc/grpc-js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { DistributionServiceClient } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host_State, Image, Image_State, VirtualMachine_State, type Host, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { OperationsClient, type Operation } from '../../services/gen/google/longrunning/operations.js';
import { createClient } from '../../services/common/platform/client.js';
import { writeCredentials } from '../../services/common/platform/credential-files.js';
import { freePort } from '../../services/launcher/embedded-nats.js';
import { unpack } from '../../services/common/domain/operations.js';
import { createCsr, generateKeyPair } from '../../services/common/platform/pki.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call, waitFor } from '../harness/grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const run = promisify(execFile);
const URI = 'qemu:///system';
/** The README's example hosts: the stack's NATS and inventory are private, so the test uses them as they are. */
const HOST = 'kvm-01';
const PEER = 'kvm-02';
/** Where the local fleet keeps the admin bundle, as the README's block names it. */
const README_BUNDLE = '.state/fleet/credentials/admin';
const MARKER = '<!-- grpcurl flows: test/integration/public-api-clients.test.ts runs this block as it stands -->';
const imageType = Image;

/** grpcurl's command line carried out by `buf curl`: server reflection only, the flags the README uses. */
const GRPCURL_BY_BUF_CURL = `#!/usr/bin/env bash
# grpcurl [flags] address (list | service/method), carried out by buf curl through server reflection.
set -euo pipefail
args=(--protocol grpc) scheme=https positional=() import_paths=() protos=()
while (($#)); do
  case "$1" in
    -cacert) args+=(--cacert "$2"); shift 2 ;;
    -cert) args+=(--cert "$2"); shift 2 ;;
    -key) args+=(--key "$2"); shift 2 ;;
    -d) args+=(--data "$2"); shift 2 ;;
    -H) args+=(--header "$2"); shift 2 ;;
    -authority | -servername) args+=(--servername "$2"); shift 2 ;;
    -max-time) args+=(--timeout "$2s"); shift 2 ;;
    -plaintext) scheme=http; shift ;;
    -import-path) import_paths+=("$2"); shift 2 ;;
    -proto) protos+=("$2"); shift 2 ;;
    -*) echo "grpcurl (buf curl): flag $1 not supported here" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
# Without reflection (the plaintext probe port), the schema is the named proto file, found on the import path.
for proto in "\${protos[@]}"; do
  for directory in "\${import_paths[@]}" .; do
    if [[ -f $directory/$proto ]]; then args+=(--schema "$directory/$proto"); break; fi
  done
done
((\${#positional[@]} == 2)) || { echo "grpcurl (buf curl): want address and list or service/method" >&2; exit 2; }
if [[ \${positional[1]} == list ]]; then exec ${join(REPOSITORY, 'node_modules/.bin/buf')} curl "\${args[@]}" --list-services "$scheme://\${positional[0]}"; fi
exec ${join(REPOSITORY, 'node_modules/.bin/buf')} curl "\${args[@]}" "$scheme://\${positional[0]}/\${positional[1]}"
`;

/** The commands of the README's tested grpcurl block: assignments, then one command per entry (continuations joined). */
async function readmeGrpcurlBlock(): Promise<{ assignments: string[]; commands: string[] }> {
  const readme = await readFile(join(REPOSITORY, 'README.md'), 'utf8');
  const start = readme.indexOf(MARKER);
  assert.ok(start >= 0, `README.md has no block marked ${MARKER}`);
  const block = /```sh\n([\s\S]*?)\n```/.exec(readme.slice(start));
  assert.ok(block, 'the marked README block is not a ```sh block');
  const lines = block[1]!
    .replace(/\\\n\s*/g, '')
    .split('\n')
    .filter((line) => line.trim() !== '' && !line.trimStart().startsWith('#'));
  const assignments = lines.filter((line) => /^[A-Za-z_][A-Za-z0-9_]*=\S+$/.test(line));
  const commands = lines.filter((line) => !assignments.includes(line));
  return { assignments, commands };
}

/** How a clone client ended. */
interface ClientRun {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** The JSON object test/python/clone_client.py and test/go's clone-client print on stdout. */
interface ClientJson {
  operation: string | null;
  source: string;
  error: { code: string; message: string } | null;
  clones: Array<{ index: number; name: string; virtualMachine: string; host: string; state: string; started: boolean; overlays: string[]; error: unknown }>;
}

/** A JSON answer as grpcurl prints it (lowerCamelCase, enums by name), checked field by field. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = Record<string, any>;

interface Parsed {
  readonly address: string;
  readonly method: string;
  readonly data: Record<string, unknown> | undefined;
}

/** The address, method and -d JSON of a grpcurl command line (after substitution). */
function parseGrpcurl(command: string): Parsed {
  const words: string[] = command.match(/'[^']*'|\S+/g) ?? [];
  assert.equal(words[0], 'grpcurl', command);
  const dataIndex = words.indexOf('-d');
  const data = dataIndex > 0 ? (JSON.parse(words[dataIndex + 1]!.slice(1, -1)) as Record<string, unknown>) : undefined;
  return { address: words.at(-2)!, method: words.at(-1)!, data };
}

describe('public API clients: Python and Go clients generated from proto/, and the README grpcurl flows', {
  skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false,
  timeout: 360_000,
}, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  /** The README's libvirt domain names, made unique: the private libvirtd is shared by every test and fleet. */
  const sourceVm = `debian-template-${suffix}`;
  const webPrefix = `web-${suffix}-`;
  const domains: string[] = [];
  const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
  let admin: ChannelCredentials;
  let bundle: string;
  let ca: ServiceProcess & { enrollAddress: string };
  let inventoryProcess: ServiceProcess;
  let distributionProcess: ServiceProcess;
  let cloningProcess: ServiceProcess;
  let inventory: InventoryServiceClient;
  let startAgent: (host: string, token: string) => Promise<void>;
  let grpcurlKind = '';
  let binDirectory = '';

  const virtualMachine = (host: string, name: string) =>
    call<VirtualMachine>((cb) => inventory.getVirtualMachine({ name: `hosts/${host}/virtualMachines/${name}` }, cb));
  const domainState = async (name: string) => (await virsh('domstate', name)).stdout.trim();

  before(async () => {
    await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    ca = await startCertificateAuthorityProcess(resources, pki, nats);
    inventoryProcess = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    distributionProcess = await startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
    });
    cloningProcess = await startServiceProcess(resources, 'cloning', await pki.files('service', 'cloning'), nats.url, {
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
      COWHERD_DISTRIBUTION_ADDRESS: distributionProcess.address,
    });

    // The operator's admin bundle, issued and recorded by the CA: the files every client here uses.
    const bootstrap = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'bootstrap')), caPem: pki.ca.certificatePem });
    const caClient = createClient(CertificateAuthorityServiceClient, ca.address, bootstrap);
    resources.defer(() => caClient.close());
    const keys = await generateKeyPair(2048);
    const identity = 'spiffe://cowherd/admin/api-clients';
    const issued = await call<{ certificatePem: string }>((cb) =>
      caClient.issueCertificate(
        { csrPem: createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity, dnsNames: [] }), identity, dnsNames: [], ttl: undefined, requestId: '' },
        cb,
      ),
    );
    bundle = join(await resources.tempDir(), 'admin');
    const files = await writeCredentials(bundle, { certificatePem: issued.certificatePem, privateKeyPem: keys.privateKeyPem, caPem: pki.ca.certificatePem });
    admin = mutualTlsChannelCredentialsFromPem({
      certificatePem: await readFile(files.certificateFile, 'utf8'),
      privateKeyPem: await readFile(files.privateKeyFile, 'utf8'),
      caPem: await readFile(files.caFile, 'utf8'),
    });
    inventory = createClient(InventoryServiceClient, inventoryProcess.address, admin, { defaultDeadlineMs: 10_000 });
    resources.defer(() => inventory.close());

    const directory = await resources.tempDir('cowherd-e2e-');
    startAgent = async (host, token) => {
      const agentPort = await freePort();
      await startServiceProcess(resources, 'agent', undefined, nats.url, {
        COWHERD_LISTEN_ADDRESS: `localhost:${agentPort}`,
        COWHERD_HOST_ID: host,
        COWHERD_JOIN_TOKEN: token,
        COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
        COWHERD_CREDENTIALS_DIR: join(directory, host, 'credentials'),
        COWHERD_CA_ADDRESS: ca.address,
        COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
        COWHERD_ADVERTISE_ADDRESS: `localhost:${agentPort}`,
        COWHERD_LIBVIRT_URI: URI,
        COWHERD_IMAGE_DIR: join(directory, host, 'images-root'),
        COWHERD_TORRENT_PORT: '0',
        COWHERD_WEB_SEED_ADDRESS: '127.0.0.1:0',
      });
      await waitFor(`${host} READY`, async () =>
        (await call<Host>((cb) => inventory.getHost({ name: `hosts/${host}` }, cb))).state === Host_State.STATE_READY ? true : undefined,
      );
    };
    // kvm-01 joins here; kvm-02 joins with the token the README's CreateJoinToken command makes.
    const token = await call<{ token: string }>((cb) => caClient.createJoinToken({ host: HOST, ttl: undefined, requestId: '' }, cb));
    await startAgent(HOST, token.token);
    resources.defer(async () => {
      for (const domain of domains) {
        await virsh('destroy', domain).catch(() => undefined);
        await virsh('undefine', domain).catch(() => undefined);
      }
    });

    // The README's powered-off VM debian-template on kvm-01: one small qcow2 disk with some data.
    const vmDirectory = join(directory, HOST, 'images-root', 'vms');
    await mkdir(vmDirectory, { recursive: true });
    const raw = join(vmDirectory, 'data.raw');
    await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=2', 'status=none']);
    await run('qemu-img', ['convert', '-q', '-O', 'qcow2', raw, join(vmDirectory, `${sourceVm}.qcow2`)]);
    const xml = `<domain type='qemu'><name>${sourceVm}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${join(vmDirectory, `${sourceVm}.qcow2`)}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><model type='virtio'/></interface></devices></domain>`;
    await writeFile(join(vmDirectory, `${sourceVm}.xml`), xml);
    await virsh('define', join(vmDirectory, `${sourceVm}.xml`));
    domains.push(sourceVm);
    await waitFor(`${sourceVm} in inventory`, async () =>
      (await virtualMachine(HOST, sourceVm)).state === VirtualMachine_State.STATE_SHUT_OFF ? true : undefined,
    );

    // grpcurl itself when the machine has it; otherwise buf curl behind grpcurl's command line.
    const found = await run('bash', ['-c', 'command -v grpcurl']).then(
      ({ stdout }) => stdout.trim(),
      () => '',
    );
    if (found) {
      grpcurlKind = `grpcurl ${(
        await run(found, ['-version']).then(
          ({ stdout, stderr }) => stdout + stderr,
          () => '',
        )
      ).trim()}`;
    } else {
      binDirectory = join(await resources.tempDir(), 'bin');
      await mkdir(binDirectory);
      await writeFile(join(binDirectory, 'grpcurl'), GRPCURL_BY_BUF_CURL, { mode: 0o755 });
      grpcurlKind = `buf curl ${(await run(join(REPOSITORY, 'node_modules/.bin/buf'), ['--version'])).stdout.trim()} behind grpcurl's flags`;
    }
  });
  after(() => resources.release());

  /** Publishes `image` from the powered-off source VM with the generated TypeScript client; waits until AVAILABLE. */
  const publishImage = async (image: string): Promise<void> => {
    const distribution = createClient(DistributionServiceClient, distributionProcess.address, admin, { defaultDeadlineMs: 30_000 });
    const operations = createClient(OperationsClient, distributionProcess.address, admin, { defaultDeadlineMs: 30_000 });
    try {
      let operation = await call<Operation>((cb) =>
        distribution.publishImage(
          { imageId: image, sourceVirtualMachine: `hosts/${HOST}/virtualMachines/${sourceVm}`, description: '', labels: {}, requestId: '' },
          cb,
        ),
      );
      const deadline = Date.now() + 60_000;
      while (!operation.done && Date.now() < deadline)
        operation = await call<Operation>((cb) => operations.waitOperation({ name: operation.name, timeout: { seconds: '10', nanos: 0 } }, cb));
      assert.equal(operation.result?.$case, 'response', JSON.stringify(operation.result));
      assert.equal(unpack(imageType, operation.result.value).state, Image_State.STATE_AVAILABLE);
    } finally {
      distribution.close();
      operations.close();
    }
  };

  /** Runs a clone client (`command` is its argv before the flags) on the stack's cloning service with the admin bundle. */
  const cloneClient = (command: readonly string[], ...args: string[]) =>
    new Promise<ClientRun>((resolve) => {
      execFile(
        command[0]!,
        [...command.slice(1), '--credentials', bundle, '--cloning', cloningProcess.address, ...args],
        { cwd: REPOSITORY, timeout: 120_000 },
        (error, stdout, stderr) => {
          resolve({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stdout, stderr });
        },
      );
    });
  const pythonClient = ['/usr/bin/python3', join(REPOSITORY, 'test/python/clone_client.py')];

  /**
   * What both clients must show after cloning `image` twice as `<prefix>-{index}`: exit 0, the JSON with both
   * clones DONE on kvm-01, the domains powered off on overlays of the image's replica, and inventory's records.
   */
  const checkClones = async (result: ClientRun, image: string, names: readonly string[], progress: RegExp): Promise<void> => {
    assert.equal(result.code, 0, `the client exited ${result.code}: ${result.stderr}`);
    const printed = JSON.parse(result.stdout) as ClientJson;
    assert.match(printed.operation ?? '', /^operations\/[0-9a-f-]{36}$/);
    assert.equal(printed.source, `images/${image}`);
    assert.equal(printed.error, null);
    assert.deepEqual(
      printed.clones.map((clone) => [clone.index, clone.name, clone.virtualMachine, clone.host, clone.state, clone.started, clone.error]),
      names.map((name, index) => [index + 1, name, `hosts/${HOST}/virtualMachines/${name}`, `hosts/${HOST}`, 'STATE_DONE', false, null]),
    );
    assert.match(result.stderr, progress);

    // The clones exist on the hypervisor, powered off, each on its own overlay of the image's replica.
    for (const [index, name] of names.entries()) {
      assert.equal(await domainState(name), 'shut off');
      const disks = (await virsh('domblklist', name)).stdout;
      assert.ok(disks.includes(printed.clones[index]!.overlays[0]!), disks);
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', printed.clones[index]!.overlays[0]!])).stdout) as {
        'backing-filename'?: string;
      };
      assert.match(info['backing-filename'] ?? '', new RegExp(`/images/${image}/`));
    }
    // And in inventory, as clones of the image, once the agent reported them.
    for (const name of names) {
      const vm = await waitFor(`${name} in inventory`, () => virtualMachine(HOST, name));
      assert.deepEqual([vm.sourceImage, vm.managed, vm.state], [`images/${image}`, true, VirtualMachine_State.STATE_SHUT_OFF]);
    }
  };

  it("a Python client generated from proto/ with Debian's grpc tools clones an image through the public API", async () => {
    const image = `py-${suffix}`;
    await publishImage(image);
    const names = [`py-${suffix}-1`, `py-${suffix}-2`];
    domains.push(...names);
    const result = await cloneClient(pythonClient, '--image', image, '--count', '2', '--name-template', `py-${suffix}-{index}`);
    await checkClones(result, image, names, /clone_client: operations\/\S+ clones images\/py-/);

    // A failure is a non-zero exit with the canonical code in the JSON.
    const missing = await cloneClient(pythonClient, '--image', `no-such-${suffix}`, '--count', '1');
    assert.equal(missing.code, 1, missing.stderr);
    assert.deepEqual((JSON.parse(missing.stdout) as { error: { code: string } }).error.code, 'NOT_FOUND');
    assert.match(missing.stderr, /clone_client: NOT_FOUND: images\/no-such-/);
  });

  it("a Go client generated from proto/ with Debian's Go packages, built offline, clones an image through the public API", async (context) => {
    // Generated and built as the README says, into a directory of this test; GOPATH mode on /usr/share/gocode only.
    const binary = join(await resources.tempDir('cowherd-go-client-'), 'clone-client');
    const built = await run('bash', [join(REPOSITORY, 'test/go/build.sh'), binary], {
      cwd: REPOSITORY,
      timeout: 300_000,
      env: { ...process.env, GOPROXY: 'off', GOFLAGS: '' },
    });
    for (const line of built.stdout.trim().split('\n')) context.diagnostic(line);
    const goClient = [binary];

    const image = `go-${suffix}`;
    await publishImage(image);
    const names = [`go-${suffix}-1`, `go-${suffix}-2`];
    domains.push(...names);
    const result = await cloneClient(goClient, '--image', image, '--count', '2', '--name-template', `go-${suffix}-{index}`);
    await checkClones(result, image, names, /clone-client: operations\/\S+ clones images\/go-/);

    // A refusal: exit 1, the canonical code and the server's message in the JSON, as the Python client prints them.
    const missing = await cloneClient(goClient, '--image', `no-such-${suffix}`, '--count', '1');
    assert.equal(missing.code, 1, missing.stderr);
    const refused = JSON.parse(missing.stdout) as ClientJson;
    assert.deepEqual([refused.operation, refused.source, refused.clones, refused.error?.code], [null, `images/no-such-${suffix}`, [], 'NOT_FOUND']);
    assert.match(missing.stderr, /clone-client: NOT_FOUND: images\/no-such-/);
    const python = await cloneClient(pythonClient, '--image', `no-such-${suffix}`, '--count', '1');
    assert.deepEqual([missing.code, refused], [python.code, JSON.parse(python.stdout)]);
    // Usage errors are 2, as argparse's.
    assert.equal((await cloneClient(goClient, '--count', '1')).code, 2);
  });

  it("runs the README's grpcurl flows, as typed there, through server reflection", async (context) => {
    context.diagnostic(`grpcurl: ${grpcurlKind}`);
    const { assignments, commands } = await readmeGrpcurlBlock();
    assert.deepEqual(assignments, [`C=${README_BUNDLE}`], 'the block starts from the local fleet admin bundle');
    // The README's local fleet ports, and what they are on this stack.
    const addresses = new Map<string, string>([
      ['localhost:7440', ca.address],
      ['localhost:7442', inventoryProcess.address],
      ['localhost:7443', distributionProcess.address],
      ['localhost:7444', cloningProcess.address],
      ['localhost:7452', inventoryProcess.healthAddress],
    ]);
    /** The latest operation started on each address, for `operations/<id>`. */
    const started = new Map<string, string>();
    const environment = { ...process.env, PATH: binDirectory ? `${binDirectory}:${process.env['PATH'] ?? ''}` : (process.env['PATH'] ?? '') };
    const prelude = assignments.map((line) => line.replace(README_BUNDLE, bundle)).join('\n');
    const substitute = (command: string): string =>
      command
        .replace(/localhost:\d+/g, (address) => {
          const actual = addresses.get(address);
          assert.ok(actual, `the README names ${address}, which the test does not map`);
          return actual;
        })
        .replace(/\bdebian-template\b/g, sourceVm)
        .replace(/\bweb-(?=\{index\}|\d)/g, webPrefix);
    // Through bash on purpose: the README's lines are shell, quoting included, as an operator types them.
    const grpcurl = async (command: string): Promise<string> => {
      const result = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
        execFile('bash', ['-c', `${prelude}\n${command}`], { cwd: REPOSITORY, env: environment, timeout: 90_000 }, (error, stdout, stderr) =>
          resolve({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stdout, stderr }),
        );
      });
      assert.equal(result.code, 0, `${command}\nexited ${result.code}: ${result.stderr}`);
      return result.stdout;
    };

    const seen: string[] = [];
    for (const line of commands) {
      let command = substitute(line);
      const { address, method, data } = parseGrpcurl(command);
      if (data?.['name'] === 'operations/<id>') {
        const operation = started.get(address);
        assert.ok(operation, `${method}: no operation was started on ${address} before`);
        command = command.replace('operations/<id>', operation);
      }
      seen.push(method);
      const output = await grpcurl(command);
      if (method === 'list') {
        const services = output.trim().split('\n');
        for (const service of ['cowherd.inventory.v1.InventoryService', 'grpc.health.v1.Health', 'grpc.reflection.v1.ServerReflection'])
          assert.ok(services.includes(service), `list: ${output}`);
        continue;
      }
      let answer = JSON.parse(output) as Json;
      switch (method) {
        case 'grpc.health.v1.Health/Check':
          assert.deepEqual(answer, { status: 'SERVING' });
          break;
        case 'cowherd.certauthority.v1.CertificateAuthorityService/CreateJoinToken':
          assert.equal(answer['host'], PEER);
          assert.match(answer['token'], /^cjt1\./);
          // What the README says to run on kvm-02 next: its agent joins with the token.
          await startAgent(PEER, answer['token'] as string);
          break;
        case 'cowherd.inventory.v1.InventoryService/ListHosts':
          assert.deepEqual(
            answer['hosts'].map((host: Host) => [host.name, host.state]),
            [
              [`hosts/${HOST}`, 'STATE_READY'],
              [`hosts/${PEER}`, 'STATE_READY'],
            ],
          );
          break;
        case 'cowherd.inventory.v1.InventoryService/GetHost':
          assert.deepEqual([answer['name'], answer['state'], answer['hypervisor']], [`hosts/${HOST}`, 'STATE_READY', 'HYPERVISOR_KVM']);
          break;
        case 'cowherd.distribution.v1.DistributionService/PublishImage':
        case 'cowherd.distribution.v1.DistributionService/DistributeImage':
        case 'cowherd.cloning.v1.CloningService/CloneVirtualMachines':
        case 'cowherd.cloning.v1.CloningService/StopVirtualMachine':
          assert.match(answer['name'], /^operations\/[0-9a-f-]{36}$/);
          assert.match(answer['metadata']['@type'], /^type\.googleapis\.com\/cowherd\.(distribution|cloning)\.v1\.\w+Metadata$/);
          started.set(address, answer['name'] as string);
          if (method.endsWith('/CloneVirtualMachines')) domains.push(`${webPrefix}1`, `${webPrefix}2`);
          break;
        case 'google.longrunning.Operations/WaitOperation': {
          // As an operator does: the same command again until the operation is done.
          const deadline = Date.now() + 120_000;
          while (answer['done'] !== true && Date.now() < deadline) answer = JSON.parse(await grpcurl(command)) as Json;
          assert.equal(answer['done'], true, JSON.stringify(answer));
          assert.equal(answer['error'], undefined, JSON.stringify(answer['error']));
          const response = answer['response'] as Json;
          switch (response['@type']) {
            case 'type.googleapis.com/cowherd.inventory.v1.Image':
              assert.deepEqual([response['name'], response['state'], response['originHost']], ['images/debian-12', 'STATE_AVAILABLE', `hosts/${HOST}`]);
              break;
            case 'type.googleapis.com/cowherd.distribution.v1.DistributeImageResponse':
              assert.deepEqual(
                response['replicas'].map((replica: Record<string, string>) => [replica['host'], replica['state']]),
                [[`hosts/${PEER}`, 'STATE_AVAILABLE']],
              );
              assert.equal(response['failures'], undefined);
              break;
            case 'type.googleapis.com/cowherd.cloning.v1.CloneVirtualMachinesResponse':
              // Spread over the two hosts that hold the image, one each, fewest first, ties by name.
              assert.deepEqual(
                response['clones'].map((clone: Record<string, string>) => [clone['virtualMachine'], clone['state'], clone['started']]),
                [
                  [`hosts/${HOST}/virtualMachines/${webPrefix}1`, 'STATE_DONE', undefined],
                  [`hosts/${PEER}/virtualMachines/${webPrefix}2`, 'STATE_DONE', undefined],
                ],
              );
              for (const name of [`${webPrefix}1`, `${webPrefix}2`]) assert.equal(await domainState(name), 'shut off');
              break;
            case 'type.googleapis.com/cowherd.inventory.v1.VirtualMachine':
              assert.deepEqual([response['name'], response['state']], [`hosts/${HOST}/virtualMachines/${webPrefix}1`, 'STATE_SHUT_OFF']);
              assert.equal(await domainState(`${webPrefix}1`), 'shut off');
              break;
            default:
              assert.fail(`unexpected response ${String(response['@type'])}`);
          }
          break;
        }
        case 'cowherd.inventory.v1.InventoryService/ListImages':
          assert.deepEqual(
            answer['images'].map((image: Record<string, string>) => [image['name'], image['state']]).filter(([name]: string[]) => name === 'images/debian-12'),
            [['images/debian-12', 'STATE_AVAILABLE']],
          );
          break;
        case 'cowherd.inventory.v1.InventoryService/ListVirtualMachines': {
          // Inventory learns of new domains from the agents' reports: list again until both clones are there.
          const wanted = [`hosts/${HOST}/virtualMachines/${webPrefix}1`, `hosts/${PEER}/virtualMachines/${webPrefix}2`];
          const deadline = Date.now() + 20_000;
          const listed = (value: Json) => ((value['virtualMachines'] ?? []) as VirtualMachine[]).map((vm) => vm.name);
          while (!wanted.every((name) => listed(answer).includes(name)) && Date.now() < deadline) {
            await new Promise((resolve) => setTimeout(resolve, 300));
            answer = JSON.parse(await grpcurl(command)) as Json;
          }
          for (const name of wanted) assert.ok(listed(answer).includes(name), `${name} not in ${listed(answer).join(', ')}`);
          assert.ok(listed(answer).includes(`hosts/${HOST}/virtualMachines/${sourceVm}`));
          break;
        }
        case 'cowherd.cloning.v1.CloningService/StartVirtualMachine':
          assert.deepEqual([answer['name'], answer['state']], [`hosts/${HOST}/virtualMachines/${webPrefix}1`, 'STATE_RUNNING']);
          assert.equal(await domainState(`${webPrefix}1`), 'running');
          break;
        default:
          assert.fail(`the README calls ${method}, which this test does not check yet`);
      }
    }
    // Every flow the README promises was run: hosts, images, publish, distribute, clone, wait, VMs, power.
    for (const method of [
      'list',
      'grpc.health.v1.Health/Check',
      'cowherd.certauthority.v1.CertificateAuthorityService/CreateJoinToken',
      'cowherd.inventory.v1.InventoryService/ListHosts',
      'cowherd.inventory.v1.InventoryService/GetHost',
      'cowherd.inventory.v1.InventoryService/ListImages',
      'cowherd.distribution.v1.DistributionService/PublishImage',
      'cowherd.distribution.v1.DistributionService/DistributeImage',
      'cowherd.cloning.v1.CloningService/CloneVirtualMachines',
      'google.longrunning.Operations/WaitOperation',
      'cowherd.inventory.v1.InventoryService/ListVirtualMachines',
      'cowherd.cloning.v1.CloningService/StartVirtualMachine',
      'cowherd.cloning.v1.CloningService/StopVirtualMachine',
    ]) {
      assert.ok(seen.includes(method), `the README's grpcurl block has no ${method}`);
    }
  });
});
