// The agent's parsers and pure decisions: virsh quoting, domain XML, states, events, error kinds, qemu-img
// chains, hypervisor detection and the agent's configuration.
//
//   node --import tsx --test test/unit/agent-parsing.test.ts
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError } from '../../services/common/platform/config.js';
import { DiskFormat, Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { loadAgentConfig } from '../../services/agent/config.js';
import { diskFormatOf, inspectAll, parseQemuImgInfo } from '../../services/agent/hypervisor/disks.js';
import { detectHypervisor } from '../../services/agent/host/host-facts.js';
import {
  classifyVirshError,
  parseDomainState,
  parseDomainXml,
  parseEventLine,
  parseHypervisorFacts,
  quoteVirshArgument,
  virshCommandLine,
  type HypervisorFacts,
} from '../../services/agent/hypervisor/libvirt.js';

test('virsh arguments are single-quoted, quotes escaped as in sh', () => {
  assert.equal(quoteVirshArgument('plain'), "'plain'");
  assert.equal(quoteVirshArgument("it's; rm -rf /"), "'it'\\''s; rm -rf /'");
  assert.equal(
    virshCommandLine([
      ['domstate', '--domain', 'a b'],
      ['dumpxml', '--domain', "x'y"],
    ]),
    "'domstate' '--domain' 'a b'; 'dumpxml' '--domain' 'x'\\''y'",
  );
});

const DOMAIN_XML = `<domain type='kvm' id='3'>
  <name>web-1</name>
  <uuid>CFA144CF-7813-4B09-B6AB-3420D2262204</uuid>
  <memory unit='GiB'>2</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/cowherd/images/clones/web-1/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/sdb'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/image'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
    </disk>
  </devices>
</domain>`;

test('domain XML: name, lowercase uuid, type, current vCPUs, memory in bytes, disks in order', () => {
  const domain = parseDomainXml(DOMAIN_XML);
  assert.equal(domain.name, 'web-1');
  assert.equal(domain.uuid, 'cfa144cf-7813-4b09-b6ab-3420d2262204');
  assert.equal(domain.domainType, 'kvm');
  assert.equal(domain.vcpus, 2);
  assert.equal(domain.memoryBytes, 2 * 1024 ** 3);
  assert.deepEqual(domain.disks, [
    { target: 'vda', device: 'disk', type: 'file', sourcePath: '/var/lib/cowherd/images/clones/web-1/vda.qcow2', format: 'qcow2' },
    { target: 'vdb', device: 'disk', type: 'block', sourcePath: '/dev/sdb', format: 'raw' },
    { target: 'vdc', device: 'disk', type: 'network' },
    { target: 'hdc', device: 'cdrom', type: 'file' },
  ]);
  const single = parseDomainXml(
    `<domain type='qemu'><name>a&amp;b</name><uuid>x</uuid><memory>65536</memory><vcpu>1</vcpu><devices><disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk></devices></domain>`,
  );
  assert.equal(single.name, 'a&b');
  assert.equal(single.memoryBytes, 65536 * 1024, 'KiB by default');
  assert.equal(single.disks.length, 1);
  assert.throws(() => parseDomainXml('<domain/>'), /without <name>/);
});

test('domain states, event lines and error kinds', () => {
  assert.equal(parseDomainState('running\n\n'), 'running');
  assert.equal(parseDomainState('shut off\n'), 'shut off');
  assert.equal(parseDomainState('something new'), 'no state');
  assert.deepEqual(parseEventLine("event 'lifecycle' for domain 'web-1': Started Booted"), {
    kind: 'domain',
    event: 'lifecycle',
    domain: 'web-1',
    detail: 'Started Booted',
  });
  assert.deepEqual(parseEventLine("event 'lifecycle' for domain 'it's: odd': Defined Added"), {
    kind: 'domain',
    event: 'lifecycle',
    domain: "it's: odd",
    detail: 'Defined Added',
  });
  assert.deepEqual(parseEventLine("event 'reboot' for domain 'web-1'"), { kind: 'domain', event: 'reboot', domain: 'web-1', detail: '' });
  assert.equal(parseEventLine('events received: 3'), undefined);
  assert.equal(classifyVirshError("error: failed to get domain 'x'"), 'domain-not-found');
  assert.equal(
    classifyVirshError("error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory"),
    'connection-failed',
  );
  assert.equal(classifyVirshError('error: Requested operation is not valid: domain is not running'), 'operation-invalid');
  assert.equal(classifyVirshError('error: Domain is already active'), 'operation-invalid');
  assert.equal(classifyVirshError('error: XML error: missing name'), 'invalid-argument');
  assert.equal(classifyVirshError('error: internal error: qemu unexpectedly closed the monitor'), 'operation-failed');
  assert.equal(classifyVirshError('', true), 'timeout');
});

const QEMU_CHAIN = JSON.stringify([
  {
    filename: 'top.qcow2',
    format: 'qcow2',
    'virtual-size': 16777216,
    'actual-size': 200704,
    'full-backing-filename': '/img/mid.qcow2',
    'backing-filename': 'mid.qcow2',
    'backing-filename-format': 'qcow2',
  },
  {
    filename: '/img/mid.qcow2',
    format: 'qcow2',
    'virtual-size': 16777216,
    'actual-size': 200704,
    'full-backing-filename': '/img/base.raw',
    'backing-filename-format': 'raw',
  },
  { filename: '/img/base.raw', format: 'raw', 'virtual-size': 16777216, 'actual-size': 4096 },
]);

test('qemu-img chains: sizes of the disk, backing files nearest first; a lone info keeps the declared backing file', () => {
  assert.deepEqual(parseQemuImgInfo(QEMU_CHAIN), {
    format: 'qcow2',
    virtualSizeBytes: 16777216,
    allocatedBytes: 200704,
    backingChain: [
      { path: '/img/mid.qcow2', format: 'qcow2' },
      { path: '/img/base.raw', format: 'raw' },
    ],
  });
  const lone = parseQemuImgInfo(
    JSON.stringify({
      filename: 'x.qcow2',
      format: 'qcow2',
      'virtual-size': 1,
      'actual-size': 2,
      'full-backing-filename': '/gone.raw',
      'backing-filename-format': 'raw',
    }),
  );
  assert.deepEqual(lone.backingChain, [{ path: '/gone.raw', format: 'raw' }]);
  assert.equal(diskFormatOf('vpc'), DiskFormat.DISK_FORMAT_VHD);
  assert.equal(diskFormatOf('vmdk'), DiskFormat.DISK_FORMAT_UNSPECIFIED);
});

test('inspectAll keeps order and bounds concurrency', async () => {
  let active = 0;
  let peak = 0;
  const results = await inspectAll([5, 1, 4, 2, 3, 0], 2, async (n) => {
    active += 1;
    peak = Math.max(peak, active);
    await new Promise((resolve) => setTimeout(resolve, n));
    active -= 1;
    return n * 10;
  });
  assert.deepEqual(results, [50, 10, 40, 20, 30, 0]);
  assert.equal(peak, 2);
});

const VERSION_QEMU =
  'Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\nUsing API: QEMU 9.0.0\nRunning hypervisor: QEMU 7.2.22\nRunning against daemon: 9.0.0\n';
const capabilities = (types: string[], osType = 'hvm'): string =>
  `<capabilities><host/><guest><os_type>${osType}</os_type><arch name='x86_64'><emulator>/usr/bin/qemu-system-x86_64</emulator>${types.map((type) => `<domain type='${type}'/>`).join('')}</arch></guest></capabilities>`;

test('hypervisor detection: KVM with acceleration, KVM under TCG, Xen, and the test driver', () => {
  const tcg = parseHypervisorFacts('qemu:///system\n', VERSION_QEMU, capabilities(['qemu']));
  assert.deepEqual(tcg, {
    uri: 'qemu:///system',
    driver: 'QEMU',
    libraryVersion: '9.0.0',
    daemonVersion: '9.0.0',
    hypervisorName: 'QEMU',
    hypervisorVersion: '7.2.22',
    domainTypes: ['qemu'],
    osTypes: ['hvm'],
  });
  const tcgDetection = detectHypervisor(tcg, { devKvm: true, procXen: false });
  assert.equal(tcgDetection.hypervisor, Hypervisor.HYPERVISOR_KVM);
  assert.match(
    tcgDetection.detail,
    /^qemu 7\.2\.22 via libvirt 9\.0\.0 \(qemu:\/\/\/system\), TCG emulation without KVM: libvirt offers only domain type 'qemu' \(\/dev\/kvm exists/,
  );
  assert.match(detectHypervisor(tcg, { devKvm: false, procXen: false }).detail, /\/dev\/kvm missing/);

  const kvm = parseHypervisorFacts('qemu:///system', VERSION_QEMU, capabilities(['qemu', 'kvm']));
  const kvmDetection = detectHypervisor(kvm, { devKvm: true, procXen: false });
  assert.equal(kvmDetection.hypervisor, Hypervisor.HYPERVISOR_KVM);
  assert.match(kvmDetection.detail, /KVM acceleration: libvirt offers domain type 'kvm'/);

  const xenFacts: HypervisorFacts = parseHypervisorFacts(
    'xen:///system',
    'Using library: libvirt 9.0.0\nUsing API: Xen 9.0.0\nRunning hypervisor: Xen 4.17.0\n',
    capabilities(['xen'], 'xen'),
  );
  const xen = detectHypervisor(xenFacts, { devKvm: false, procXen: true, sysHypervisorType: 'xen' });
  assert.equal(xen.hypervisor, Hypervisor.HYPERVISOR_XEN);
  assert.match(xen.detail, /^Xen 4\.17\.0 via libvirt 9\.0\.0 \(xen:\/\/\/system\): libvirt's Xen driver; \/sys\/hypervisor\/type is xen/);

  const testDriver = parseHypervisorFacts(
    'test:///default',
    'Using library: libvirt 9.0.0\nUsing API: TEST 9.0.0\nRunning hypervisor: TEST 0.0.2\n',
    capabilities(['test']),
  );
  assert.equal(detectHypervisor(testDriver, { devKvm: false, procXen: false }).hypervisor, Hypervisor.HYPERVISOR_UNSPECIFIED);
});

test('agent configuration: defaults, advertise address from host id and listen port, bad values listed', () => {
  const config = loadAgentConfig({ COWHERD_HOST_ID: 'kvm-07' });
  assert.equal(config.libvirtUri, 'qemu:///system');
  assert.equal(config.imageDirectory, '/var/lib/cowherd/images');
  assert.equal(config.inventoryAddress, 'localhost:7442');
  assert.equal(config.advertiseAddress, 'kvm-07:7445');
  assert.equal(loadAgentConfig({ COWHERD_HOST_ID: 'kvm-07', COWHERD_LISTEN_ADDRESS: '0.0.0.0:9000' }).advertiseAddress, 'kvm-07:9000');
  assert.equal(loadAgentConfig({ COWHERD_HOST_ID: 'kvm-07', COWHERD_ADVERTISE_ADDRESS: 'kvm-07.rack3:7445' }).advertiseAddress, 'kvm-07.rack3:7445');
  assert.ok(Object.isFrozen(config));
  assert.throws(
    () => loadAgentConfig({ COWHERD_LIBVIRT_URI: 'not a uri', COWHERD_INVENTORY_ADDRESS: 'nope', COWHERD_ADVERTISE_ADDRESS: 'x' }),
    (error: unknown) => error instanceof ConfigError && error.problems.length === 3,
  );
  // A host may not take a service's or NATS's name: its certificate would carry that DNS name.
  for (const reserved of ['inventory', 'certificate-authority', 'nats-0', 'localhost']) {
    assert.throws(
      () => loadAgentConfig({ COWHERD_HOST_ID: reserved }),
      (error: unknown) => error instanceof ConfigError && /COWHERD_HOST_ID/.test(error.message) && /reserved/.test(error.message),
      reserved,
    );
  }
});
