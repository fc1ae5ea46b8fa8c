// services/agent/hypervisor/domain-xml.ts against the private libvirtd of scripts/libvirtd.sh (qemu:///system, TCG): a real
// domain on a qcow2 disk is dumped, sanitized into a template, and cloned twice onto qcow2 overlays; libvirt
// accepts both clones, reads back their names, UUIDs, MACs, disks and lineage, and starts one (which proves the
// overlay and the log file in the clone directory work). Needs root (libvirtd runs in a private mount
// namespace); CI runs as root.
//
//   node --import tsx --test test/integration/agent-domain-xml.test.ts
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { XMLParser } from 'fast-xml-parser';
import { runCommand } from '../../services/common/platform/child-process.js';
import { readCloneMetadata, renderClone, sanitizeDomainTemplate, type DomainTemplate, type RenderedClone } from '../../services/agent/hypervisor/index.js';
import { parseDomainXml } from '../../services/agent/hypervisor/libvirt.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const libvirtdScript = path.join(repoRoot, 'scripts', 'libvirtd.sh');
const uri = 'qemu:///system';
const isRoot = process.getuid?.() === 0;
const prefix = `cowherd-test-dx-${randomBytes(3).toString('hex')}`;

// Cleanups run in reverse order of registration, each on its own, also when a test fails half-way.
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch((error: unknown) => console.error('cleanup failed:', error));
});

function virsh(args: readonly string[], timeoutMs = 20_000): Promise<string> {
  return runCommand('virsh', ['-q', '-c', uri, ...args], { timeoutMs, env: { LC_ALL: 'C', LANG: 'C' } });
}

/** `virsh define` from a file: `virsh define /dev/stdin` fails from Node (stdin is a socketpair). */
async function define(directory: string, name: string, xml: string): Promise<void> {
  const file = path.join(directory, `${name}.xml`);
  await writeFile(file, xml, { mode: 0o600 });
  await virsh(['define', '--file', file]);
}

function macsOf(xml: string): string[] {
  const parsed = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@', isArray: (name) => name === 'interface' }).parse(xml) as {
    domain: { devices: { interface?: Array<{ mac?: { '@address'?: string } }> } };
  };
  return (parsed.domain.devices.interface ?? []).map((nic) => nic.mac?.['@address'] ?? '');
}

function sourceDomainXml(name: string, diskPath: string, logPath: string): string {
  // type='qemu' (TCG): KVM is masked in libvirtd's namespace. <acpi/> or a poweroff never completes.
  return `<domain type='qemu'>
  <name>${name}</name>
  <description>source of the domain-xml integration test</description>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${diskPath}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <log file='${logPath}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <log file='${logPath}' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1' passwd='pw12'/>
  </devices>
</domain>
`;
}

describe('domain XML templates and clones in a real libvirtd', {
  skip: isRoot ? false : 'needs root: libvirtd runs in a private mount namespace (CI runs as root)',
}, () => {
  let directory = '';
  let sourcePath = '';
  const sourceName = `${prefix}-source`;

  before(async () => {
    const running = await runCommand('bash', [libvirtdScript, 'status'], { timeoutMs: 15_000 }).then(
      () => true,
      () => false,
    );
    await runCommand('bash', [libvirtdScript, 'start'], { timeoutMs: 60_000 });
    if (!running) cleanups.push(async () => void (await runCommand('bash', [libvirtdScript, 'stop'], { timeoutMs: 60_000 })));
    directory = await mkdtemp(path.join(tmpdir(), 'cowherd-domain-xml-'));
    cleanups.push(() => rm(directory, { recursive: true, force: true }));
    // Registered before anything is defined: every domain these tests may have defined goes, whatever happened.
    cleanups.push(async () => {
      const names = (await virsh(['list', '--all', '--name'])).split('\n').map((line) => line.trim());
      for (const name of names.filter((candidate) => candidate.startsWith(prefix))) {
        await virsh(['destroy', '--domain', name]).catch(() => undefined);
        await virsh(['undefine', '--domain', name, '--nvram']).catch(() => virsh(['undefine', '--domain', name]).catch(() => undefined));
      }
    });
    await mkdir(path.join(directory, 'source'));
    sourcePath = path.join(directory, 'source', 'root.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', sourcePath, '64M'], { timeoutMs: 10_000 });
    await define(directory, sourceName, sourceDomainXml(sourceName, sourcePath, path.join(directory, 'source', 'serial.log')));
  });

  test('dumpxml -> template -> two overlay clones that libvirt defines, reads back and starts', { timeout: 120_000 }, async () => {
    // Publish: the exporter's view.
    const dumped = await virsh(['dumpxml', '--inactive', '--security-info', '--domain', sourceName]);
    assert.match(dumped, /passwd='pw12'/, '--security-info shows the VNC password, which the template must lose');
    const sourceMacs = macsOf(dumped);
    assert.equal(sourceMacs.length, 1);
    const template: DomainTemplate = sanitizeDomainTemplate(dumped);
    assert.deepEqual(template.disks, [{ target: 'vda', device: 'disk', sourcePath, format: 'qcow2', fileName: 'disk-0.qcow2' }]);
    for (const gone of [sourceName, directory, sourceMacs[0]!, 'pw12', '127.0.0.1', '<uuid>', 'emulator', 'seclabel']) {
      assert.ok(!template.xml.includes(gone), `the template still contains ${gone}:\n${template.xml}`);
    }
    const imageDirectory = path.join(directory, 'images', 'web');
    await mkdir(imageDirectory, { recursive: true });
    for (const disk of template.disks) await copyFile(disk.sourcePath, path.join(imageDirectory, disk.fileName));

    // Clone: one overlay per disk, in the clone's own directory; MACs avoid every MAC on the host.
    const usedMacs = new Set(sourceMacs);
    const clones: RenderedClone[] = [];
    for (const suffix of ['a', 'b']) {
      const name = `${prefix}-clone-${suffix}`;
      const cloneDirectory = path.join(directory, 'clones', name);
      await mkdir(cloneDirectory, { recursive: true });
      const disks = [];
      for (const disk of template.disks) {
        const child = path.join(cloneDirectory, `${disk.target}.qcow2`);
        await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.join(imageDirectory, disk.fileName), '-F', disk.format, child], {
          timeoutMs: 10_000,
        });
        disks.push({ target: disk.target, path: child });
      }
      const clone = await renderClone(template.xml, {
        name,
        hypervisor: 'kvm',
        cloneDirectory,
        disks,
        imageDirectory,
        usedMacAddresses: usedMacs,
        metadata: { source: { image: 'images/web' }, operation: `operations/${prefix}`, requestId: `${prefix}-request` },
      });
      for (const mac of clone.macAddresses) usedMacs.add(mac);
      await define(directory, name, clone.xml);
      clones.push(clone);

      const readBack = await virsh(['dumpxml', '--inactive', '--domain', name]);
      const definition = parseDomainXml(readBack);
      assert.equal(definition.name, name);
      assert.equal(definition.uuid, clone.uuid);
      assert.equal((await virsh(['domuuid', '--domain', name])).trim(), clone.uuid);
      assert.deepEqual(macsOf(readBack), clone.macAddresses);
      assert.deepEqual(definition.disks, [
        { target: 'vda', device: 'disk', type: 'file', sourcePath: path.join(cloneDirectory, 'vda.qcow2'), format: 'qcow2' },
      ]);
      assert.ok(readBack.includes(`<log file='${path.join(cloneDirectory, 'serial-0.log')}'`), `serial log in the clone directory:\n${readBack}`);
      assert.ok(readBack.includes('<acpi/>'));
      assert.deepEqual(readCloneMetadata(readBack), { source: { image: 'images/web' }, operation: `operations/${prefix}`, requestId: `${prefix}-request` });
    }
    const [first, second] = clones as [RenderedClone, RenderedClone];
    assert.notEqual(first.uuid, second.uuid);
    assert.equal(new Set([...sourceMacs, ...first.macAddresses, ...second.macAddresses]).size, 3, 'every MAC on the host is different');

    // The overlay opens and virtlogd writes the serial log into the clone directory.
    await virsh(['start', '--domain', first.name], 30_000);
    assert.equal((await virsh(['domstate', '--domain', first.name])).trim(), 'running');
    await virsh(['destroy', '--domain', first.name]);
    assert.ok((await stat(path.join(directory, 'clones', first.name, 'serial-0.log'))).isFile(), 'the serial log was written in the clone directory');
  });
});
