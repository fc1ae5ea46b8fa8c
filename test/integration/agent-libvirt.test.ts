// The agent's libvirt, qemu-img and host-facts modules against real libvirt: `test:///default` (no daemon; its
// state lives per connection, so every virsh process sees the 'test' domain fresh) and the private libvirtd of
// scripts/libvirtd.sh (qemu:///system, TCG; root only, CI runs as root). Also the reporter end to end with real
// virsh events and a fake inventory.
//
//   node --import tsx --test test/integration/agent-libvirt.test.ts
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir, totalmem } from 'node:os';
import path from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { runCommand } from '../../services/common/platform/child-process.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { DiskFormat, Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import type { ReportVirtualMachinesRequest } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host, VirtualMachine_State, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { createQemuImgDiskInspector } from '../../services/agent/hypervisor/disks.js';
import { createHostFactsSource } from '../../services/agent/host/host-facts.js';
import { LibvirtError, VirshLibvirt, type EventWatch, type LibvirtEvent } from '../../services/agent/hypervisor/libvirt.js';
import { createReporter, type InventoryPort } from '../../services/agent/host/reporter.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const libvirtdScript = path.join(repoRoot, 'scripts', 'libvirtd.sh');
const log = createLogger({ service: 'agent-test', level: process.env['COWHERD_TEST_LOG_LEVEL'] === 'debug' ? 'debug' : 'silent' });
const isRoot = process.getuid?.() === 0;
const prefix = `cowherd-test-${randomBytes(3).toString('hex')}`;

// Cleanups run in reverse order of registration, each on its own, also when a test fails half-way.
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch((error: unknown) => console.error('cleanup failed:', error));
});

function domainXml(name: string, diskPath: string, format = 'qcow2'): string {
  const escaped = name.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll("'", '&apos;');
  // type='qemu' (TCG): KVM is masked in libvirtd's namespace. <acpi/> or a poweroff never completes.
  return `<domain type='qemu'>
  <name>${escaped}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='${format}'/>
      <source file='${diskPath}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
  </devices>
</domain>
`;
}

/** Collects events; `next` waits for the first matching one after the call. */
class EventLog {
  readonly events: Array<{ at: number; event: LibvirtEvent }> = [];
  private waiters: Array<{ match: (event: LibvirtEvent) => boolean; resolve: (at: number) => void }> = [];

  readonly push = (event: LibvirtEvent): void => {
    const at = performance.now();
    this.events.push({ at, event });
    this.waiters = this.waiters.filter((waiter) => (waiter.match(event) ? (waiter.resolve(at), false) : true));
  };

  next(domain: string, detail: RegExp, timeoutMs = 5_000): Promise<number> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no ${detail} event for ${domain} within ${timeoutMs} ms; got ${JSON.stringify(this.events.map((entry) => entry.event))}`)),
        timeoutMs,
      );
      this.waiters.push({
        match: (event) => event.kind === 'domain' && event.domain === domain && detail.test(event.detail),
        resolve: (at) => {
          clearTimeout(timer);
          resolve(at);
        },
      });
    });
  }
}

describe('test:///default', () => {
  const libvirt = new VirshLibvirt({ uri: 'test:///default', log });

  test('lists the default domain with its state, vCPUs, memory and disk', async () => {
    const domains = await libvirt.listDomains();
    const domain = domains.find((candidate) => candidate.name === 'test');
    assert.ok(domain, `the test driver's 'test' domain, got ${JSON.stringify(domains)}`);
    assert.equal(domain.state, 'running');
    assert.match(domain.uuid, /^[0-9a-f-]{36}$/);
    assert.ok(domain.vcpus >= 1);
    assert.ok(domain.memoryBytes > 0);
    assert.equal(domain.disks[0]?.type, 'file');
    assert.equal((await libvirt.domain(domain.uuid)).name, 'test');
  });

  test('unknown domains and bad connections are typed errors', async () => {
    await assert.rejects(
      libvirt.domain(`${prefix}-missing`),
      (error: unknown) => error instanceof LibvirtError && error.kind === 'domain-not-found' && /failed to get domain/.test(error.message),
    );
    await assert.rejects(libvirt.destroy(`${prefix}-missing`), (error: unknown) => error instanceof LibvirtError && error.kind === 'domain-not-found');
    await assert.rejects(
      new VirshLibvirt({ uri: 'qemu+unix:///system?socket=/nonexistent/libvirt-sock' }).listDomains(),
      (error: unknown) => error instanceof LibvirtError && error.kind === 'connection-failed',
    );
  });

  test('hypervisor facts name the test driver, which is neither KVM nor Xen', async () => {
    const facts = await libvirt.hypervisorFacts();
    assert.equal(facts.driver, 'TEST');
    assert.equal(facts.uri, 'test:///default');
    assert.deepEqual(facts.domainTypes, ['test']);
    const registration = await createHostFactsSource({ libvirt, imageDirectory: tmpdir(), advertiseAddress: 'kvm-01:7445' }).registration();
    assert.equal(registration.hypervisor, Hypervisor.HYPERVISOR_UNSPECIFIED);
    assert.equal(registration.libvirtReachable, true);
  });
});

test('the event watch reconnects after virsh exits and says so', async () => {
  // A stand-in virsh that prints the ready marker and one event, then dies as it would when libvirtd restarts.
  const directory = await mkdtemp(path.join(tmpdir(), 'cowherd-fake-virsh-'));
  cleanups.push(() => rm(directory, { recursive: true, force: true }));
  const fake = path.join(directory, 'virsh');
  await writeFile(
    fake,
    `#!/bin/bash\nline="$3"; marker="\${line#echo }"; echo "\${marker%%;*}"\necho "event 'lifecycle' for domain 'stub': Started Booted"\nsleep 0.2\nexit 1\n`,
    { mode: 0o755 },
  );
  const seen: LibvirtEvent[] = [];
  const watch = await new VirshLibvirt({ uri: 'test:///default', virsh: fake, log }).watchEvents((event) => seen.push(event));
  try {
    const deadline = performance.now() + 5_000;
    while (seen.filter((event) => event.kind === 'domain').length < 2 && performance.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.deepEqual(seen.slice(0, 3), [
      { kind: 'domain', event: 'lifecycle', domain: 'stub', detail: 'Started Booted' },
      { kind: 'reconnected' },
      { kind: 'domain', event: 'lifecycle', domain: 'stub', detail: 'Started Booted' },
    ]);
  } finally {
    await watch.stop();
  }
});

describe('qemu:///system (private libvirtd)', { skip: isRoot ? false : 'needs root: libvirtd runs in a private mount namespace (CI runs as root)' }, () => {
  const uri = 'qemu:///system';
  const libvirt = new VirshLibvirt({ uri, log });
  let directory = '';
  let overlay = '';
  let middle = '';
  let base = '';
  let watch: EventWatch | undefined;
  const events = new EventLog();

  before(async () => {
    const running = await runCommand('bash', [libvirtdScript, 'status'], { timeoutMs: 15_000 }).then(
      () => true,
      () => false,
    );
    await runCommand('bash', [libvirtdScript, 'start'], { timeoutMs: 60_000 });
    if (!running) cleanups.push(async () => void (await runCommand('bash', [libvirtdScript, 'stop'], { timeoutMs: 60_000 })));
    directory = await mkdtemp(path.join(tmpdir(), 'cowherd-agent-libvirt-'));
    cleanups.push(() => rm(directory, { recursive: true, force: true }));
    // Remove every domain these tests defined, whatever happened.
    cleanups.push(async () => {
      for (const domain of await libvirt.listDomains()) {
        if (!domain.name.startsWith(prefix)) continue;
        await libvirt.destroy(domain.uuid).catch(() => undefined);
        await libvirt.undefine(domain.uuid).catch(() => undefined);
      }
    });
    base = path.join(directory, 'base.raw');
    middle = path.join(directory, 'middle.qcow2');
    overlay = path.join(directory, 'overlay.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'raw', base, '64M']);
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', middle]);
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', middle, '-F', 'qcow2', overlay]);
    watch = await libvirt.watchEvents(events.push);
    cleanups.push(async () => watch?.stop());
  });

  test('define, start, destroy and undefine are seen by listDomains and arrive as events within seconds', async (t: TestContext) => {
    const name = `${prefix}-lifecycle`;
    const latencies: Record<string, number> = {};
    const returned: Record<string, number> = {};
    const step = async (label: string, detail: RegExp, action: () => Promise<void>): Promise<void> => {
      const seen = events.next(name, detail);
      const begin = performance.now();
      await action();
      const done = performance.now();
      const at = await seen;
      latencies[label] = at - begin;
      returned[label] = done - begin;
      assert.ok(at - begin < 3_000, `${label} event took ${(at - begin).toFixed(0)} ms`);
    };

    await step('define', /^Defined/, () => libvirt.define(domainXml(name, overlay)));
    const defined = (await libvirt.listDomains()).find((domain) => domain.name === name);
    assert.ok(defined, 'listDomains sees the new domain');
    assert.equal(defined.state, 'shut off');
    assert.equal(defined.domainType, 'qemu');
    assert.equal(defined.vcpus, 1);
    assert.equal(defined.memoryBytes, 64 * 1024 * 1024);
    assert.deepEqual(defined.disks[0], { target: 'vda', device: 'disk', type: 'file', sourcePath: overlay, format: 'qcow2' });
    assert.equal(defined.disks[1]?.device, 'cdrom');
    assert.equal(defined.disks[1]?.sourcePath, undefined, 'an empty CD-ROM has no source');

    const disks = createQemuImgDiskInspector({ log });
    const disk = await disks.inspect(defined.disks[0]!);
    assert.deepEqual(disk?.backingChain, [
      { path: middle, format: DiskFormat.DISK_FORMAT_QCOW2 },
      { path: base, format: DiskFormat.DISK_FORMAT_RAW },
    ]);
    assert.equal(disk?.format, DiskFormat.DISK_FORMAT_QCOW2);
    assert.equal(disk?.virtualSizeBytes, String(64 * 1024 * 1024));
    assert.ok(Number(disk?.allocatedBytes) > 0 && Number(disk?.allocatedBytes) < 1024 * 1024, `an overlay allocates little, got ${disk?.allocatedBytes}`);
    assert.equal(await disks.inspect(defined.disks[1]!), undefined, 'no record for an empty CD-ROM');

    await step('start', /^Started/, () => libvirt.start(name));
    assert.equal((await libvirt.domain(name)).state, 'running');
    // A running VM locks its image: -U reads it anyway.
    assert.equal((await disks.inspect(defined.disks[0]!))?.backingChain.length, 2);
    await assert.rejects(libvirt.start(name), (error: unknown) => error instanceof LibvirtError && error.kind === 'operation-invalid');

    await step('destroy', /^Stopped/, () => libvirt.destroy(name));
    assert.equal((await libvirt.domain(name)).state, 'shut off');
    await assert.rejects(libvirt.destroy(name), (error: unknown) => error instanceof LibvirtError && error.kind === 'operation-invalid');

    await step('undefine', /^Undefined/, () => libvirt.undefine(name));
    await assert.rejects(libvirt.domain(name), (error: unknown) => error instanceof LibvirtError && error.kind === 'domain-not-found');
    // Events usually arrive before the virsh call itself has returned.
    t.diagnostic(
      `event after the call began (call returned after): ${Object.entries(latencies)
        .map(([label, ms]) => `${label} ${ms.toFixed(0)} ms (${returned[label]!.toFixed(0)} ms)`)
        .join(', ')}`,
    );
  });

  test('names with quotes, semicolons and a leading dash survive batched virsh commands', async () => {
    const name = `${prefix} it's; --odd "one"`;
    await libvirt.define(domainXml(name, overlay));
    const listed = (await libvirt.listDomains()).find((domain) => domain.name === name);
    assert.ok(listed, 'listDomains reads it');
    const read = await libvirt.domain(name);
    assert.equal(read.uuid, listed.uuid);
    assert.equal(read.state, 'shut off');
    await libvirt.undefine(name);
    await assert.rejects(libvirt.domain(name), (error: unknown) => error instanceof LibvirtError && error.kind === 'domain-not-found');
  });

  test('a missing disk file is reported without a chain; a broken chain as far as it goes', async () => {
    const disks = createQemuImgDiskInspector({ log });
    const missing = await disks.inspect({ target: 'vdb', device: 'disk', type: 'file', sourcePath: path.join(directory, 'missing.qcow2'), format: 'qcow2' });
    assert.deepEqual(missing, {
      persistent: false,
      target: 'vdb',
      path: path.join(directory, 'missing.qcow2'),
      format: DiskFormat.DISK_FORMAT_QCOW2,
      virtualSizeBytes: '0',
      allocatedBytes: '0',
      backingChain: [],
    });
    const gone = path.join(directory, 'gone.raw');
    const orphan = path.join(directory, 'orphan.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'raw', gone, '1M']);
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', gone, '-F', 'raw', orphan]);
    await rm(gone);
    const broken = await disks.inspect({ target: 'vdc', device: 'disk', type: 'file', sourcePath: orphan, format: 'qcow2' });
    assert.equal(broken?.virtualSizeBytes, String(1024 * 1024));
    assert.deepEqual(broken?.backingChain, [{ path: gone, format: DiskFormat.DISK_FORMAT_RAW }]);
  });

  test('host facts: KVM through QEMU under TCG, and why; CPUs, memory, image directory space', async () => {
    const registration = await createHostFactsSource({ libvirt, imageDirectory: directory, advertiseAddress: 'kvm-01:7445' }).registration();
    assert.equal(registration.hypervisor, Hypervisor.HYPERVISOR_KVM);
    assert.match(registration.hypervisorDetail, /^qemu \d+\.\d+(\.\d+)? via libvirt \d+\.\d+\.\d+ \(qemu:\/\/\/system\)/);
    // scripts/libvirtd.sh masks /dev/kvm from libvirtd: guests hang on this machine's KVM.
    assert.match(registration.hypervisorDetail, /TCG emulation without KVM: libvirt offers only domain type 'qemu'/);
    assert.equal(registration.libvirtUri, uri);
    assert.equal(registration.cpuCount, cpus().length);
    assert.equal(registration.memoryBytes, totalmem());
    assert.ok(registration.memoryFreeBytes > 0 && registration.memoryFreeBytes <= totalmem());
    assert.ok(
      registration.imageDirectoryTotalBytes > 0 &&
        registration.imageDirectoryFreeBytes > 0 &&
        registration.imageDirectoryFreeBytes <= registration.imageDirectoryTotalBytes,
    );
    assert.match(registration.agentVersion, /^\d+\.\d+\.\d+/);
    assert.equal(registration.agentEndpoint, 'kvm-01:7445');
  });

  test('the reporter keeps a fake inventory current from real events within a second; listDomains cost for N domains', async (t: TestContext) => {
    const count = 40;
    const names = Array.from({ length: count }, (_, index) => `${prefix}-bulk-${index}`);
    for (const name of names) await libvirt.define(domainXml(name, overlay));
    let begin = performance.now();
    const listed = await libvirt.listDomains();
    const listMs = performance.now() - begin;
    const all = listed.filter((domain) => domain.name.startsWith(`${prefix}-bulk-`));
    assert.equal(all.length, count);

    const machines = new Map<string, VirtualMachine>();
    const reports: Array<{ at: number; request: ReportVirtualMachinesRequest }> = [];
    const inventory: InventoryPort = {
      registerHost: async (request) => Host.fromPartial(request.host ?? {}),
      heartbeat: async () => ({ heartbeatInterval: { seconds: '10', nanos: 0 }, transferLimits: undefined }),
      reportVirtualMachines: async (request) => {
        reports.push({ at: performance.now(), request });
        if (request.fullSnapshot) machines.clear();
        for (const name of request.removedVirtualMachines) machines.delete(name);
        for (const machine of request.virtualMachines) machines.set(machine.name, machine);
        return { changedCount: request.virtualMachines.length, removedCount: request.removedVirtualMachines.length, revision: '1' };
      },
    };
    const reporter = createReporter({
      host: 'kvm-01',
      inventory,
      libvirt,
      disks: createQemuImgDiskInspector({ log }),
      facts: createHostFactsSource({ libvirt, imageDirectory: directory, advertiseAddress: 'kvm-01:7445' }),
      log,
    });
    cleanups.push(() => reporter.stop());
    begin = performance.now();
    await reporter.start();
    const waitFor = async (what: string, predicate: () => boolean, timeoutMs = 10_000): Promise<number> => {
      const start = performance.now();
      while (!predicate()) {
        if (performance.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
      return performance.now() - start;
    };
    await waitFor('the first full snapshot', () => reports.some((report) => report.request.fullSnapshot));
    const snapshotMs = performance.now() - begin;
    const bulk = [...machines.values()].filter((machine) => machine.domainName.startsWith(`${prefix}-bulk-`));
    assert.equal(bulk.length, count);
    assert.equal(bulk[0]!.disks[0]!.backingChain.length, 2);

    const name = `${prefix}-reported`;
    const resource = `hosts/kvm-01/virtualMachines/${name}`;
    const timings: Record<string, number> = {};
    const measure = async (label: string, action: () => Promise<void>, predicate: () => boolean): Promise<void> => {
      const start = performance.now();
      await action();
      await waitFor(label, predicate, 5_000);
      timings[label] = performance.now() - start;
      assert.ok(timings[label]! < 2_000, `${label} reached inventory after ${timings[label]!.toFixed(0)} ms`);
    };
    await measure(
      'define',
      () => libvirt.define(domainXml(name, overlay)),
      () => machines.get(resource)?.state === VirtualMachine_State.STATE_SHUT_OFF,
    );
    await measure(
      'start',
      () => libvirt.start(name),
      () => machines.get(resource)?.state === VirtualMachine_State.STATE_RUNNING,
    );
    await measure(
      'destroy',
      () => libvirt.destroy(name),
      () => machines.get(resource)?.state === VirtualMachine_State.STATE_SHUT_OFF,
    );
    await measure(
      'undefine',
      () => libvirt.undefine(name),
      () => !machines.has(resource),
    );
    const removal = reports.at(-1)!.request;
    assert.deepEqual(removal.removedVirtualMachines, [resource]);
    assert.equal(removal.fullSnapshot, false);

    await reporter.stop();
    for (const bulkName of names) await libvirt.undefine(bulkName);
    t.diagnostic(
      `listDomains for ${listed.length} domains: ${listMs.toFixed(0)} ms; first full snapshot incl. qemu-img (registration included): ${snapshotMs.toFixed(0)} ms; ` +
        `libvirt change to inventory (debounce 200 ms): ${Object.entries(timings)
          .map(([label, ms]) => `${label} ${ms.toFixed(0)} ms`)
          .join(', ')}`,
    );
  });
});
