/**
 * bench:clone — 100 clones of one image on one host, three ways, in the same run on the same machine:
 * - cowherd: CloneVirtualMachines through the public API (cloning service -> agent: qcow2 overlays,
 *   XML rendered, batch define; not started);
 * - cowherd-identity: the same with a guest configuration (hostname template, an SSH key, user-data and
 *   network-config), so each clone also gets its own cloud-init seed disk; goal <= 20 ms per clone;
 * - per-clone-process: the 2011 tool's method, one process per step per clone (qemu-img create, then
 *   virsh define);
 * - copy: a full copy of the base per clone (cp), then virsh define;
 * - cowherd-rebase: the 100 (shut off) clones of the first row moved onto version 2 of the image with one
 *   AgentService.RebaseClones call (as the cloning service batches a host's clones): a fresh overlay per clone
 *   on version 2's disk swapped in by rename, the domains redefined; no guest shutdown or boot (they are off).
 *   bytes_per_clone = allocated bytes of the new overlays; goal <= 15 ms and <= 512 KiB per clone.
 * Prints one JSON line per method: {"method","clones","ms_per_clone","bytes_per_clone","base_unchanged"}.
 * Goal for cowherd: <= 15 ms and <= 512 KiB per clone; for cowherd-identity <= 20 ms per clone. Root (private libvirtd). BENCH_CLONES overrides 100.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { AgentServiceClient, type RebaseCloneResult } from '../services/gen/cowherd/agent/v1/agent_service.js';
import { CloneVirtualMachinesResponse, Placement_Strategy } from '../services/gen/cowherd/cloning/v1/cloning_service.js';
import { createClient } from '../services/common/platform/client.js';
import { mutualTlsChannelCredentialsFromPem } from '../services/common/platform/tls.js';
import { GuestConfiguration } from '../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../services/gen/google/longrunning/operations.js';
import { unpack } from '../services/common/domain/operations.js';
import { renderClone } from '../services/agent/hypervisor/index.js';
import { Resources } from '../test/harness/index.js';
import { call } from '../test/harness/grpc.js';
import { startCloneStack } from '../test/harness/clone-stack.js';

const run = promisify(execFile);
const CLONES = Number(process.env['BENCH_CLONES'] ?? 100);
const responseType = CloneVirtualMachinesResponse;

const sha256 = async (path: string): Promise<string> =>
  createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
/** Bytes on disk (allocated blocks) under a path. */
const diskUsage = async (path: string): Promise<number> => Number((await run('du', ['-s', '--block-size=1', path])).stdout.split('\t')[0]);

async function main(): Promise<void> {
  const resources = new Resources();
  try {
    const stack = await startCloneStack(resources, 'bench-host');
    const work = await resources.tempDir('cowherd-bench-');
    // The base: 1 GiB virtual, 32 MiB of data (what a full copy has to move).
    const raw = join(work, 'data.raw');
    await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=32', 'status=none']);
    await run('qemu-img', ['convert', '-q', '-O', 'qcow2', raw, join(work, 'base.qcow2')]);
    await run('qemu-img', ['resize', '-q', join(work, 'base.qcow2'), '1G']);
    const image = `bench-${Math.random().toString(36).slice(2, 7)}`;
    // The image is published through the public API from a powered-off VM, like an operator would.
    const vmDirectory = join(stack.imageDirectory, 'vms');
    await mkdir(vmDirectory, { recursive: true });
    await run('cp', [join(work, 'base.qcow2'), join(vmDirectory, `${image}-master.qcow2`)]);
    const master = `${image}-master`;
    await writeFile(
      join(vmDirectory, `${master}.xml`),
      `<domain type='qemu'><name>${master}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${join(vmDirectory, `${master}.qcow2`)}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><model type='virtio'/></interface></devices></domain>`,
    );
    await stack.virsh('define', join(vmDirectory, `${master}.xml`));
    stack.track(master);
    const deadline = Date.now() + 30_000;
    while (
      Date.now() < deadline &&
      !(await call<{ state: number }>((cb) => stack.inventory.getVirtualMachine({ name: `hosts/bench-host/virtualMachines/${master}` }, cb)).then(
        (vm) => vm.state === 3,
        () => false,
      ))
    )
      await new Promise((resolve) => setTimeout(resolve, 200));
    const publishing = await call<Operation>((cb) =>
      stack.distribution.publishImage(
        { imageId: image, sourceVirtualMachine: `hosts/bench-host/virtualMachines/${master}`, description: 'bench:clone master', labels: {}, requestId: '' },
        cb,
      ),
    );
    const published = await stack.wait(publishing.name, 600_000, stack.distributionOperations);
    if (published.result?.$case !== 'response') throw new Error(`publish failed: ${JSON.stringify(published.result)}`);
    const base = join(stack.imageDirectory, 'images', image, 'vda.qcow2');
    const baseHash = await sha256(base);
    const results: Array<Record<string, unknown>> = [];

    // cowherd, through the public API: plain clones, then clones that each get their own cloud-init seed disk.
    const throughApi = async (method: string, prefix: string, guestConfiguration?: GuestConfiguration): Promise<void> => {
      const names = Array.from({ length: CLONES }, (_, i) => `${image}-${prefix}-${i + 1}`);
      stack.track(...names);
      const batchesBefore = stack.agent.logs.filter((line) => line['msg'] === 'clone batch done').length;
      const started = performance.now();
      const operation = await call<Operation>((cb) =>
        stack.cloning.cloneVirtualMachines(
          {
            dataDiskBytes: '0',
            source: { $case: 'image', value: `images/${image}` },
            placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: ['hosts/bench-host'], maxClonesPerHost: 0 },
            delivery: 0,
            diskBackend: 0,
            count: CLONES,
            nameTemplate: `${image}-${prefix}-{index}`,
            start: false,
            requestId: '',
            guestConfiguration,
          },
          cb,
        ),
      );
      const done = await stack.wait(operation.name, 600_000);
      const elapsed = performance.now() - started;
      if (done.result?.$case !== 'response') throw new Error(`clone operation failed: ${JSON.stringify(done.result)}`);
      const response = unpack(responseType, done.result.value);
      const failed = response.clones.filter((clone) => clone.error && clone.error.code !== 0);
      let bytes = 0;
      for (const name of names) bytes += await diskUsage(join(stack.imageDirectory, 'clones', name));
      const batch = stack.agent.logs.filter((line) => line['msg'] === 'clone batch done')[batchesBefore];
      const phases = batch ? { source_ms: batch['sourceMs'], prepare_ms: batch['prepareMs'], define_ms: batch['defineMs'], finish_ms: batch['finishMs'] } : {};
      results.push({
        method,
        clones: CLONES,
        ms_per_clone: round(elapsed / CLONES),
        bytes_per_clone: Math.round(bytes / CLONES),
        base_unchanged: (await sha256(base)) === baseHash,
        failed: failed.length,
        agent_phases: phases,
      });
    };
    await throughApi('cowherd', 'api');
    await throughApi(
      'cowherd-identity',
      'id',
      GuestConfiguration.fromPartial({
        hostnameTemplate: '{name}',
        sshAuthorizedKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchBenchBenchBenchBenchBenchBenchBenchBench00 bench@{host}'],
        userData: '#cloud-config\npackage_update: false\nruncmd:\n  - echo {name} {index} {uuid} > /etc/motd\n',
        networkConfig: 'network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n',
      }),
    );
    let started: number;
    let elapsed: number;
    let bytes: number;

    // cowherd-rebase: version 2 laid out beside version 1 (its storage key `<image>_v2`) as distribution
    // leaves a replica, then the first row's clones (shut off) moved onto it in one call.
    await run('cp', ['-a', join(stack.imageDirectory, 'images', image), join(stack.imageDirectory, 'images', `${image}_v2`)]);
    // The reporter reads the 200 domains the rows above defined (a qemu-img process per disk, four at a time)
    // for several seconds: let it finish, or the row measures that on two cores instead of the rebase.
    await new Promise((resolve) => setTimeout(resolve, 15_000));
    const agentClient = createClient(
      AgentServiceClient,
      stack.agent.address,
      mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials('service', 'cloning')), caPem: stack.pki.ca.certificatePem }),
      { defaultDeadlineMs: 600_000 },
    );
    try {
      const apiNames = Array.from({ length: CLONES }, (_, i) => `${image}-api-${i + 1}`);
      const rebasesBefore = stack.agent.logs.filter((line) => line['msg'] === 'rebase done').length;
      started = performance.now();
      const rebased = await call<{ results: RebaseCloneResult[] }>((cb) =>
        agentClient.rebaseClones(
          {
            imageVersion: `images/${image}/versions/2`,
            virtualMachines: apiNames.map((name) => `hosts/bench-host/virtualMachines/${name}`),
            restart: false,
            newInstanceId: false,
            shutdownTimeout: undefined,
            operation: '',
          },
          cb,
        ),
      );
      elapsed = performance.now() - started;
      bytes = 0;
      for (const name of apiNames) bytes += await diskUsage(join(stack.imageDirectory, 'clones', name, 'vda.qcow2'));
      const batch = stack.agent.logs.filter((line) => line['msg'] === 'rebase done')[rebasesBefore];
      const swapMs = rebased.results.reduce(
        (sum, result) => sum + Number(result.swapDuration?.seconds ?? 0) * 1000 + (result.swapDuration?.nanos ?? 0) / 1e6,
        0,
      );
      results.push({
        method: 'cowherd-rebase',
        clones: CLONES,
        ms_per_clone: round(elapsed / CLONES),
        bytes_per_clone: Math.round(bytes / CLONES),
        base_unchanged: (await sha256(base)) === baseHash,
        failed: rebased.results.filter((result) => result.status && result.status.code !== 0).length,
        swap_ms_per_clone: round(swapMs / CLONES),
        agent_phases: batch
          ? { inspect_ms: batch['inspectMs'], prepare_ms: batch['prepareMs'], define_ms: batch['defineMs'], finish_ms: batch['finishMs'] }
          : {},
      });
    } finally {
      agentClient.close();
    }

    // The 2011 tool's method: a process per step per clone.
    const template = { xml: await readFile(join(stack.imageDirectory, 'images', image, 'domain-template.xml'), 'utf8') };
    const perProcessDirectory = join(work, 'per-process');
    await mkdir(perProcessDirectory);
    const perNames = Array.from({ length: CLONES }, (_, i) => `${image}-proc-${i + 1}`);
    stack.track(...perNames);
    const perXml: string[] = [];
    for (const name of perNames) {
      const rendered = await renderClone(template.xml, {
        name,
        hypervisor: 'kvm',
        cloneDirectory: join(perProcessDirectory, name),
        disks: [{ target: 'vda', path: join(perProcessDirectory, name, 'vda.qcow2') }],
        metadata: { source: { image: `images/${image}` }, operation: '', requestId: '' },
      });
      await mkdir(join(perProcessDirectory, name));
      await writeFile(join(perProcessDirectory, name, 'domain.xml'), rendered.xml);
      perXml.push(join(perProcessDirectory, name, 'domain.xml'));
    }
    started = performance.now();
    for (const [index, name] of perNames.entries()) {
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', join(perProcessDirectory, name, 'vda.qcow2')]);
      await stack.virsh('define', perXml[index]!);
    }
    elapsed = performance.now() - started;
    bytes = 0;
    for (const name of perNames) bytes += await diskUsage(join(perProcessDirectory, name, 'vda.qcow2'));
    results.push({
      method: 'per-clone-process',
      clones: CLONES,
      ms_per_clone: round(elapsed / CLONES),
      bytes_per_clone: Math.round(bytes / CLONES),
      base_unchanged: (await sha256(base)) === baseHash,
    });

    // A full copy per clone.
    const copyDirectory = join(work, 'copy');
    await mkdir(copyDirectory);
    const copyNames = Array.from({ length: CLONES }, (_, i) => `${image}-copy-${i + 1}`);
    stack.track(...copyNames);
    const copyXml: string[] = [];
    for (const name of copyNames) {
      const rendered = await renderClone(template.xml, {
        name,
        hypervisor: 'kvm',
        cloneDirectory: join(copyDirectory, name),
        disks: [{ target: 'vda', path: join(copyDirectory, name, 'vda.qcow2') }],
        metadata: { source: { image: `images/${image}` }, operation: '', requestId: '' },
      });
      await mkdir(join(copyDirectory, name));
      await writeFile(join(copyDirectory, name, 'domain.xml'), rendered.xml);
      copyXml.push(join(copyDirectory, name, 'domain.xml'));
    }
    started = performance.now();
    for (const [index, name] of copyNames.entries()) {
      await run('cp', [base, join(copyDirectory, name, 'vda.qcow2')]);
      await stack.virsh('define', copyXml[index]!);
    }
    elapsed = performance.now() - started;
    bytes = 0;
    for (const name of copyNames) bytes += await diskUsage(join(copyDirectory, name, 'vda.qcow2'));
    results.push({
      method: 'copy',
      clones: CLONES,
      ms_per_clone: round(elapsed / CLONES),
      bytes_per_clone: Math.round(bytes / CLONES),
      base_unchanged: (await sha256(base)) === baseHash,
    });

    for (const result of results) process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    await resources.release();
  }
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}

await main();
