// Unit tests of services/agent/hypervisor/domain-xml.ts: image templates from real domain XML, clone rendering, and every
// refusal. No libvirt needed (the integration test defines the results in a real libvirtd).
//
//   node --import tsx --test test/unit/agent-domain-xml.test.ts
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { XMLParser } from 'fast-xml-parser';
import { CowherdError } from '../../services/common/platform/errors.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { CLONE_METADATA_NAMESPACE, readCloneMetadata } from '../../services/agent/hypervisor/domain-xml/clone-metadata.js';
import { renderClone, type RandomSource, type RenderCloneOptions } from '../../services/agent/hypervisor/domain-xml/clone-rendering.js';
import { DomainXmlError } from '../../services/agent/hypervisor/domain-xml/errors.js';
import { sanitizeDomainTemplate } from '../../services/agent/hypervisor/domain-xml/template.js';
import { parseDomainXml } from '../../services/agent/hypervisor/libvirt.js';

// `virsh dumpxml --inactive --security-info` of a domain defined in the private libvirtd (libvirt 9.0, qemu
// 7.2) with two disks, an empty CD-ROM, an interface, a serial console with a log file, a second serial to a
// file, a guest-agent channel on a unix socket, NVRAM, VNC with a password, other tools' metadata and a
// seclabel. The comment and <vendor-extension> were added by hand: libvirt drops both when it defines a domain.
const REAL_DOMAIN_XML = `<domain type='qemu'>
  <!-- Managed by the web team: ask before changing. -->
  <name>web-base</name>
  <uuid>c90a0226-6d5f-4984-ac90-260c76247616</uuid>
  <title>Web server base</title>
  <description>Built by Alice for the web tier</description>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <cowherd:image xmlns:cowherd="https://cowherd.dev/xmlns/image/1">
      <cowherd:owner>team-web</cowherd:owner>
    </cowherd:image>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web-base_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <vendor-extension level='3'>
    <setting name='turbo'>on</setting>
  </vendor-extension>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web-base-root.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <serial>root-disk</serial>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/web-base-data.img'/>
      <target dev='vdb' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
      <address type='drive' controller='0' bus='1' target='0' unit='0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'/>
    <controller type='ide' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/web-base-serial0.log' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <serial type='file'>
      <source path='/var/log/web-base/serial1.out'/>
      <target type='isa-serial' port='1'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <log file='/var/log/libvirt/qemu/web-base-serial0.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/run/web-base/guest-agent.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='0.0.0.0' passwd='s3cretvn'>
      <listen type='address' address='0.0.0.0'/>
    </graphics>
    <audio id='1' type='none'/>
    <video>
      <model type='cirrus' vram='16384' heads='1' primary='yes'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </video>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x08' function='0x0'/>
    </rng>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'/>
</domain>
`;

/** One element (or comment) of a document in document order: its path with sibling indexes, attributes and text. */
interface FlatEntry {
  path: string;
  attributes: Record<string, string>;
  text: string;
}

const orderedParser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  parseTagValue: false,
  parseAttributeValue: false,
  commentPropName: '#comment',
});

/** Flattens a document independently of the module under test, so that two documents compare element by element. */
function flatten(xml: string): FlatEntry[] {
  const entries: FlatEntry[] = [];
  const visit = (nodes: Array<Record<string, unknown>>, prefix: string): void => {
    const seen = new Map<string, number>();
    for (const node of nodes) {
      const name = Object.keys(node).find((key) => key !== ':@');
      if (name === undefined || name === '#text') continue;
      const index = seen.get(name) ?? 0;
      seen.set(name, index + 1);
      const elementPath = `${prefix}/${name}[${index}]`;
      const children = node[name] as Array<Record<string, unknown>>;
      const text = children
        .filter((child) => '#text' in child)
        .map((child) => String(child['#text']).trim())
        .join('');
      entries.push({ path: elementPath, attributes: { ...((node[':@'] as Record<string, string> | undefined) ?? {}) }, text });
      if (name !== '#comment') visit(children, elementPath);
    }
  };
  visit(orderedParser.parse(xml) as Array<Record<string, unknown>>, '');
  return entries;
}

/** `xml` flattened, with the entries under removed paths dropped and the others edited. */
function expectFrom(xml: string, removed: readonly string[], edit: Record<string, (entry: FlatEntry) => void>): FlatEntry[] {
  const entries = flatten(xml).filter((entry) => !removed.some((prefix) => entry.path === prefix || entry.path.startsWith(`${prefix}/`)));
  for (const entry of entries) edit[entry.path]?.(entry);
  for (const [pathName] of Object.entries(edit))
    assert.ok(
      entries.some((entry) => entry.path === pathName),
      `the test edits ${pathName}, which the source lacks`,
    );
  return entries;
}

function without(attributes: Record<string, string>, ...names: string[]): Record<string, string> {
  return Object.fromEntries(Object.entries(attributes).filter(([name]) => !names.includes(name)));
}

/** Runs `action` and checks it throws a DomainXmlError with the reason (and code). */
async function assertRefused(action: () => unknown, reason: ErrorReason, pattern?: RegExp): Promise<DomainXmlError> {
  try {
    await action();
  } catch (error) {
    assert.ok(error instanceof DomainXmlError, `expected DomainXmlError, got ${String(error)}`);
    assert.ok(error instanceof CowherdError);
    assert.equal(error.reasonName, ErrorReason[reason], error.message);
    assert.equal(error.code, reason === ErrorReason.ERROR_REASON_UNTRUSTED_DOMAIN_XML ? GrpcStatus.FAILED_PRECONDITION : GrpcStatus.INVALID_ARGUMENT);
    if (pattern) assert.match(error.message, pattern);
    return error;
  }
  assert.fail('expected a DomainXmlError, nothing was thrown');
}

const untrusted = ErrorReason.ERROR_REASON_UNTRUSTED_DOMAIN_XML;
const outside = ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY;
const invalid = ErrorReason.ERROR_REASON_INVALID_FIELD;

/** A small valid KVM domain with one qcow2 disk, for refusal cases: `devices` goes into <devices>, `extra` into <domain>. */
function smallDomain(devices = '', extra = '', type = 'kvm'): string {
  return `<domain type='${type}'>
  <name>small</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  ${extra}
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/small.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
    ${devices}
  </devices>
</domain>`;
}

describe('sanitizeDomainTemplate', () => {
  test('removes identity and host paths from a real domain and keeps everything else, element by element', () => {
    const template = sanitizeDomainTemplate(REAL_DOMAIN_XML);
    const expected = expectFrom(
      REAL_DOMAIN_XML,
      [
        '/domain[0]/name[0]',
        '/domain[0]/uuid[0]',
        '/domain[0]/title[0]',
        '/domain[0]/description[0]',
        '/domain[0]/metadata[0]/libosinfo:libosinfo[0]',
        '/domain[0]/devices[0]/emulator[0]',
        '/domain[0]/devices[0]/interface[0]/mac[0]',
        '/domain[0]/seclabel[0]',
      ],
      {
        '/domain[0]/os[0]/nvram[0]': (entry) => (entry.text = ''),
        '/domain[0]/devices[0]/disk[0]/source[0]': (entry) => (entry.attributes['file'] = 'disk-0.qcow2'),
        '/domain[0]/devices[0]/disk[1]/source[0]': (entry) => (entry.attributes['file'] = 'disk-1.img'),
        '/domain[0]/devices[0]/serial[0]/log[0]': (entry) => (entry.attributes['file'] = 'serial-0.log'),
        '/domain[0]/devices[0]/serial[1]/source[0]': (entry) => (entry.attributes['path'] = 'serial-1.out'),
        // The console logs to its serial's file, and keeps doing so.
        '/domain[0]/devices[0]/console[0]/log[0]': (entry) => (entry.attributes['file'] = 'serial-0.log'),
        '/domain[0]/devices[0]/channel[0]/source[0]': (entry) => (entry.attributes = without(entry.attributes, 'path')),
        '/domain[0]/devices[0]/graphics[0]': (entry) => (entry.attributes = without(entry.attributes, 'listen', 'passwd')),
        '/domain[0]/devices[0]/graphics[0]/listen[0]': (entry) => (entry.attributes = without(entry.attributes, 'address')),
      },
    );
    assert.deepEqual(flatten(template.xml), expected);

    // Spelled out for the reader, beyond the element-by-element comparison.
    for (const gone of [
      '<name>',
      '<uuid>',
      'web-base',
      'c90a0226',
      '52:54:00:12:34:56',
      'seclabel',
      's3cretvn',
      '0.0.0.0',
      '/var/',
      '/run/',
      'libosinfo',
      'emulator',
      'Alice',
    ]) {
      assert.ok(!template.xml.includes(gone), `template still contains ${gone}`);
    }
    for (const kept of [
      '<!-- Managed by the web team: ask before changing. -->',
      '<vendor-extension level="3">',
      '<acpi/>',
      'cowherd:owner',
      '/usr/share/OVMF/OVMF_CODE.fd',
      '/dev/urandom',
    ]) {
      assert.ok(template.xml.includes(kept), `template lost ${kept}`);
    }

    assert.equal(template.domainType, 'qemu');
    assert.deepEqual(template.disks, [
      { target: 'vda', device: 'disk', sourcePath: '/var/lib/libvirt/images/web-base-root.qcow2', format: 'qcow2', fileName: 'disk-0.qcow2' },
      { target: 'vdb', device: 'disk', sourcePath: '/var/lib/libvirt/images/web-base-data.img', format: 'raw', fileName: 'disk-1.img' },
    ]);
    assert.deepEqual(template.bootFiles, []);
  });

  test('is idempotent on its own output and names disk files as asked', () => {
    const template = sanitizeDomainTemplate(REAL_DOMAIN_XML, { diskFileName: ({ target, format }) => `${target}.${format}` });
    assert.deepEqual(
      template.disks.map((disk) => disk.fileName),
      ['vda.qcow2', 'vdb.raw'],
    );
    // The template has no host paths left, so sanitizing it again only re-reads the placeholders as "paths".
    const again = sanitizeDomainTemplate(template.xml, { diskFileName: ({ target, format }) => `${target}.${format}` });
    assert.equal(again.xml, template.xml);
  });

  test('exports direct-boot kernel and initrd, and escapes values correctly', () => {
    const xml = smallDomain(
      '',
      `<os><type arch='x86_64' machine='pc'>hvm</type><kernel>/boot/vmlinuz-6.1</kernel><initrd>/boot/initrd.img-6.1</initrd><cmdline>console=ttyS0 root=/dev/vda quiet="a&amp;b&lt;c"</cmdline></os>`,
    ).replace("<os><type arch='x86_64' machine='pc'>hvm</type></os>", '');
    const template = sanitizeDomainTemplate(xml);
    assert.deepEqual(template.bootFiles, [
      { element: 'kernel', sourcePath: '/boot/vmlinuz-6.1', fileName: 'boot-kernel' },
      { element: 'initrd', sourcePath: '/boot/initrd.img-6.1', fileName: 'boot-initrd' },
    ]);
    assert.match(template.xml, /<kernel>boot-kernel<\/kernel>/);
    assert.match(template.xml, /<cmdline>console=ttyS0 root=\/dev\/vda quiet="a&amp;b&lt;c"<\/cmdline>/);
  });

  test('keeps a disk file name with XML special characters intact through character references', () => {
    const xml = smallDomain().replace('/var/lib/libvirt/images/small.qcow2', '/var/lib/images/a&amp;b&#39;c&#x22;d.qcow2');
    const template = sanitizeDomainTemplate(xml);
    assert.equal(template.disks[0]?.sourcePath, `/var/lib/images/a&b'c"d.qcow2`);
  });

  test('drops fixed graphics ports, live-only attributes and tap device paths', () => {
    const xml = smallDomain(
      `<graphics type='spice' port='5901' tlsPort='5902' autoport='no'><listen type='address' address='10.0.0.5'/></graphics>
       <console type='pty' tty='/dev/pts/3'><source path='/dev/pts/3'/><target type='serial' port='0'/></console>`,
    )
      .replace("<interface type='network'>", "<interface type='network'><target dev='vnet7'/><backend tap='/dev/net/tun' vhost='/dev/vhost-net'/>")
      .replace("<domain type='kvm'>", "<domain type='kvm' id='7'>");
    const template = sanitizeDomainTemplate(xml);
    assert.match(template.xml, /<graphics type="spice" autoport="yes">/);
    assert.match(template.xml, /<domain type="kvm">/);
    for (const gone of ['5901', '10.0.0.5', '/dev/pts', 'vnet7', '/dev/net/tun', '/dev/vhost-net']) assert.ok(!template.xml.includes(gone), gone);
  });

  test('refuses what cowherd cannot publish safely', async () => {
    const cases: Array<[string, string, ErrorReason, RegExp?]> = [
      [
        'block disk',
        smallDomain(`<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdb'/><target dev='vdb'/></disk>`),
        untrusted,
        /disk type "block"/,
      ],
      [
        'network disk',
        smallDomain(
          `<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'><host name='h'/></source><target dev='vdb'/></disk>`,
        ),
        untrusted,
        /disk type "network"/,
      ],
      [
        'volume disk',
        smallDomain(`<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdb'/></disk>`),
        untrusted,
        /disk type "volume"/,
      ],
      [
        'vmdk disk',
        smallDomain(`<disk type='file' device='disk'><driver name='qemu' type='vmdk'/><source file='/x.vmdk'/><target dev='vdb'/></disk>`),
        untrusted,
        /format "vmdk"/,
      ],
      [
        'hostdev',
        smallDomain(`<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='0' slot='1' function='0'/></source></hostdev>`),
        untrusted,
        /host device passthrough/,
      ],
      [
        'hostdev interface',
        smallDomain(`<interface type='hostdev'><source><address type='pci' domain='0' bus='0' slot='2' function='0'/></source></interface>`),
        untrusted,
        /interface type "hostdev"/,
      ],
      ['filesystem', smallDomain(`<filesystem type='mount'><source dir='/srv'/><target dir='srv'/></filesystem>`), untrusted, /file system passthrough/],
      [
        'interface script',
        smallDomain(`<interface type='bridge'><source bridge='br0'/><script path='/etc/qemu-ifup'/></interface>`),
        untrusted,
        /scripts run on the host/,
      ],
      ['serial on a host device', smallDomain(`<serial type='dev'><source path='/dev/ttyS0'/><target port='0'/></serial>`), untrusted, /reaches a host device/],
      [
        'qemu:commandline',
        smallDomain('', `<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-set'/></qemu:commandline>`),
        untrusted,
        /qemu namespace/,
      ],
      [
        'qemu:override under another prefix',
        smallDomain('', `<q:override xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'><q:device alias='x'/></q:override>`),
        untrusted,
        /qemu namespace/,
      ],
      [
        'qemu namespace as the default namespace',
        smallDomain('', `<commandline xmlns='http://libvirt.org/schemas/domain/qemu/1.0'><arg value='-x'/></commandline>`),
        untrusted,
        /qemu namespace/,
      ],
      [
        'xen:commandline',
        smallDomain('', `<xen:commandline xmlns:xen='http://libvirt.org/schemas/domain/xen/1.0'><xen:arg value='x'/></xen:commandline>`),
        untrusted,
        /xen namespace/,
      ],
      ['undeclared prefix', smallDomain('', `<qemu:commandline><qemu:arg value='-x'/></qemu:commandline>`), untrusted, /not declared/],
      [
        'host file read through fw_cfg',
        smallDomain('', `<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>`),
        untrusted,
        /\/etc\/shadow/,
      ],
      ['TPM passthrough', smallDomain(`<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>`), untrusted, /\/dev\/tpm0/],
      ['random device that is a host file', smallDomain(`<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>`), untrusted, /\/etc\/shadow/],
      [
        'firmware outside firmware directories',
        smallDomain('', '').replace("<os><type arch='x86_64' machine='pc'>hvm</type></os>", `<os><type>hvm</type><loader type='rom'>/etc/shadow</loader></os>`),
        untrusted,
        /firmware directory/,
      ],
      ['lxc domain', smallDomain('', '', 'lxc'), untrusted, /type "lxc"/],
      ['DOCTYPE entity', `<!DOCTYPE domain [<!ENTITY p "/etc/shadow">]>${smallDomain('', '<description>&p;</description>')}`, untrusted, /entities/],
      ['undefined entity', smallDomain('', '<description>&nbsp;</description>'), untrusted, /undefined entity/],
      ['bare ampersand in an attribute', smallDomain().replace('small.qcow2', 'a&b.qcow2'), untrusted, /bare '&'/],
      ['two root elements', `${smallDomain()}<domain/>`, untrusted],
      ['not XML', 'domain', untrusted],
      ['empty', '', untrusted],
      ['disk file name with a slash', smallDomain(), outside],
    ];
    for (const [label, xml, reason, pattern] of cases) {
      await test(label, async () => {
        await assertRefused(
          () => sanitizeDomainTemplate(xml, label === 'disk file name with a slash' ? { diskFileName: () => '../escape.qcow2' } : {}),
          reason,
          pattern,
        );
      });
    }
  });
});

describe('renderClone', () => {
  let root: string;
  let template: string;
  const used = new Set(['52:54:00:00:00:01', '52:54:00:AB:CD:EF']);

  before(async () => {
    root = await mkdtemp(path.join(tmpdir(), 'cowherd-domain-xml-'));
    template = sanitizeDomainTemplate(REAL_DOMAIN_XML).xml;
  });
  after(async () => {
    await rm(root, { recursive: true, force: true });
  });

  const optionsFor = (name: string, overrides: Partial<RenderCloneOptions> = {}): RenderCloneOptions => {
    const cloneDirectory = path.join(root, 'clones', name);
    return {
      name,
      hypervisor: 'kvm',
      cloneDirectory,
      disks: [
        { target: 'vda', path: path.join(cloneDirectory, 'disk-0.qcow2') },
        { target: 'vdb', path: path.join(cloneDirectory, 'disk-1.qcow2') },
      ],
      usedMacAddresses: used,
      metadata: { source: { image: 'images/web' }, operation: 'operations/op-1', requestId: '3f1c2f4e-1111-4222-8333-444455556666' },
      ...overrides,
    };
  };

  const macsOf = (xml: string): string[] => {
    const parsed = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@', isArray: (name) => name === 'interface' }).parse(xml) as {
      domain: { devices: { interface: Array<{ mac: { '@address': string } }> } };
    };
    return parsed.domain.devices.interface.map((nic) => nic.mac['@address']);
  };

  test('renders 100 clones: unique UUIDs and MACs, disks inside each clone directory, metadata, everything else kept', async () => {
    const uuids = new Set<string>();
    const macs = new Set<string>();
    for (let index = 0; index < 100; index++) {
      const name = `web-${index}`;
      const options = optionsFor(name);
      const clone = await renderClone(template, options);
      const definition = parseDomainXml(clone.xml);
      assert.equal(definition.name, name);
      assert.equal(definition.uuid, clone.uuid);
      assert.match(clone.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      uuids.add(clone.uuid);
      assert.deepEqual(macsOf(clone.xml), clone.macAddresses);
      for (const mac of clone.macAddresses) {
        assert.match(mac, /^52:54:00(:[0-9a-f]{2}){3}$/);
        assert.ok(!used.has(mac) && !used.has(mac.toUpperCase()), `${mac} is in the avoid set`);
        macs.add(mac);
      }
      assert.deepEqual(
        definition.disks.filter((disk) => disk.sourcePath).map((disk) => ({ target: disk.target, sourcePath: disk.sourcePath, format: disk.format })),
        [
          { target: 'vda', sourcePath: path.join(options.cloneDirectory, 'disk-0.qcow2'), format: 'qcow2' },
          { target: 'vdb', sourcePath: path.join(options.cloneDirectory, 'disk-1.qcow2'), format: 'qcow2' },
        ],
      );
      assert.equal(clone.nvramPath, path.join(options.cloneDirectory, 'nvram.fd'));
      assert.deepEqual(readCloneMetadata(clone.xml), options.metadata);

      if (index === 0) {
        // Element by element: the template plus exactly the clone's own values.
        const dir = options.cloneDirectory;
        const expected = expectFrom(template, [], {
          '/domain[0]/os[0]/nvram[0]': (entry) => (entry.text = path.join(dir, 'nvram.fd')),
          '/domain[0]/devices[0]/disk[0]/source[0]': (entry) => (entry.attributes['file'] = path.join(dir, 'disk-0.qcow2')),
          '/domain[0]/devices[0]/disk[1]/source[0]': (entry) => (entry.attributes['file'] = path.join(dir, 'disk-1.qcow2')),
          '/domain[0]/devices[0]/disk[1]/driver[0]': (entry) => (entry.attributes['type'] = 'qcow2'),
          '/domain[0]/devices[0]/serial[0]/log[0]': (entry) => (entry.attributes['file'] = path.join(dir, 'serial-0.log')),
          '/domain[0]/devices[0]/serial[1]/source[0]': (entry) => (entry.attributes['path'] = path.join(dir, 'serial-1.out')),
          '/domain[0]/devices[0]/console[0]/log[0]': (entry) => (entry.attributes['file'] = path.join(dir, 'serial-0.log')),
        });
        const added = (entry: FlatEntry): boolean =>
          ['/domain[0]/name[0]', '/domain[0]/uuid[0]', '/domain[0]/devices[0]/interface[0]/mac[0]'].includes(entry.path) ||
          entry.path.startsWith('/domain[0]/metadata[0]/cowherd:clone[0]');
        const actual = flatten(clone.xml);
        assert.deepEqual(
          actual.filter((entry) => !added(entry)),
          expected,
        );
        assert.deepEqual(
          actual.filter(added).map((entry) => entry.path),
          [
            '/domain[0]/name[0]',
            '/domain[0]/uuid[0]',
            '/domain[0]/metadata[0]/cowherd:clone[0]',
            '/domain[0]/metadata[0]/cowherd:clone[0]/cowherd:image[0]',
            '/domain[0]/metadata[0]/cowherd:clone[0]/cowherd:operation[0]',
            '/domain[0]/metadata[0]/cowherd:clone[0]/cowherd:requestId[0]',
            '/domain[0]/devices[0]/interface[0]/mac[0]',
          ],
        );
        assert.ok(clone.xml.includes(`<cowherd:clone xmlns:cowherd="${CLONE_METADATA_NAMESPACE}">`));
        assert.ok(clone.xml.includes('<acpi/>'));
        assert.ok(clone.xml.includes('<!-- Managed by the web team: ask before changing. -->'));
      }
    }
    assert.equal(uuids.size, 100);
    assert.equal(macs.size, 100);
  });

  test('gives each interface its own MAC, skipping used ones, even when the random source repeats itself', async () => {
    const twoNics = template.replace('</interface>', "</interface><interface type='bridge'><source bridge='br0'/></interface>");
    const sequence = [1, 1, 2, 2, 3];
    const random: RandomSource = {
      randomBytes: () => Uint8Array.of(0, 0, sequence.shift() ?? 9),
      randomUUID: () => '0f0e0d0c-0b0a-4908-8706-050403020100',
    };
    const clone = await renderClone(twoNics, optionsFor('two-nics', { random }));
    assert.deepEqual(clone.macAddresses, ['52:54:00:00:00:02', '52:54:00:00:00:03']);
    assert.deepEqual(macsOf(clone.xml), clone.macAddresses);
    assert.equal(clone.uuid, '0f0e0d0c-0b0a-4908-8706-050403020100');
  });

  test('replaces an earlier clone record and records a virtual machine source', async () => {
    const first = await renderClone(template, optionsFor('gen-1'));
    const second = await renderClone(first.xml.replace(/<name>.*<\/name>|<uuid>.*<\/uuid>/g, '').replaceAll(path.join(root, 'clones', 'gen-1') + '/', ''), {
      ...optionsFor('gen-2'),
      metadata: { source: { virtualMachine: 'hosts/h1/virtualMachines/gen-1' }, operation: 'operations/op-2', requestId: 'r-2' },
    });
    assert.deepEqual(readCloneMetadata(second.xml), {
      source: { virtualMachine: 'hosts/h1/virtualMachines/gen-1' },
      operation: 'operations/op-2',
      requestId: 'r-2',
    });
    assert.equal(second.xml.match(/<cowherd:clone /g)?.length, 1);
  });

  test('Xen: VHD differencing children through blktap (driver tap, type vhd)', async () => {
    const xenTemplate = sanitizeDomainTemplate(REAL_DOMAIN_XML.replace("<domain type='qemu'>", "<domain type='xen'>")).xml;
    const clone = await renderClone(xenTemplate, {
      ...optionsFor('xen-1', { hypervisor: 'xen' }),
      disks: [
        { target: 'vda', path: path.join(root, 'clones', 'xen-1', 'disk-0.vhd') },
        { target: 'vdb', path: path.join(root, 'clones', 'xen-1', 'disk-1.vhd') },
      ],
    });
    assert.deepEqual(
      clone.disks.map((disk) => [disk.driverName, disk.driverType]),
      [
        ['tap', 'vhd'],
        ['tap', 'vhd'],
      ],
    );
    assert.match(clone.xml, /<driver name="tap" type="vhd" cache="none" discard="unmap"\/>/);
    await assertRefused(() => renderClone(xenTemplate, optionsFor('xen-2')), untrusted, /type "xen"/);
    await assertRefused(() => renderClone(template, optionsFor('kvm-on-xen', { hypervisor: 'xen' })), untrusted, /type "qemu"/);
  });

  test('direct-boot files come from the image directory', async () => {
    const bootTemplate = sanitizeDomainTemplate(
      smallDomain().replace(
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>",
        "<os><type arch='x86_64' machine='pc'>hvm</type><kernel>/boot/vmlinuz</kernel><initrd>/boot/initrd.img</initrd></os>",
      ),
    ).xml;
    const cloneDirectory = path.join(root, 'clones', 'boot-1');
    const base = { ...optionsFor('boot-1'), disks: [{ target: 'vda', path: path.join(cloneDirectory, 'vda.qcow2') }] };
    await assertRefused(() => renderClone(bootTemplate, base), invalid, /image_directory/);
    const clone = await renderClone(bootTemplate, { ...base, imageDirectory: path.join(root, 'images', 'web') });
    assert.match(clone.xml, new RegExp(`<kernel>${path.join(root, 'images', 'web', 'boot-kernel')}</kernel>`));
    assert.match(clone.xml, new RegExp(`<initrd>${path.join(root, 'images', 'web', 'boot-initrd')}</initrd>`));
    assert.equal(clone.nvramPath, undefined);
  });

  test('refuses child paths outside the clone directory, bad names and bad disk lists', async () => {
    const escapeDirectory = path.join(root, 'clones', 'escape');
    await mkdir(escapeDirectory, { recursive: true });
    await symlink('/etc', path.join(escapeDirectory, 'link'));
    const disks = (vda: string): RenderCloneOptions['disks'] => [
      { target: 'vda', path: vda },
      { target: 'vdb', path: path.join(escapeDirectory, 'disk-1.qcow2') },
    ];
    const cases: Array<[string, Partial<RenderCloneOptions>, ErrorReason, RegExp?]> = [
      ['child path with ..', { disks: disks(`${escapeDirectory}/../escape/disk-0.qcow2`) }, outside, /disks\[0\]\.path/],
      ['child path outside the directory', { disks: disks(path.join(root, 'elsewhere', 'disk-0.qcow2')) }, outside, /not inside/],
      ['child path that is the directory itself', { disks: disks(escapeDirectory) }, outside, /not inside/],
      ['relative child path', { disks: disks('disk-0.qcow2') }, outside, /absolute/],
      ['child path through a symlink', { disks: disks(path.join(escapeDirectory, 'link', 'shadow')) }, outside, /symlink/],
      ['child path with a line break', { disks: disks(`${escapeDirectory}/disk\n0.qcow2`) }, outside],
      ['missing child', { disks: [{ target: 'vda', path: path.join(escapeDirectory, 'disk-0.qcow2') }] }, invalid, /"vdb"/],
      [
        'child for an unknown disk',
        { disks: [...disks(path.join(escapeDirectory, 'disk-0.qcow2')), { target: 'vdz', path: path.join(escapeDirectory, 'z.qcow2') }] },
        invalid,
        /vdz/,
      ],
      [
        'repeated child',
        { disks: [...disks(path.join(escapeDirectory, 'disk-0.qcow2')), { target: 'vda', path: path.join(escapeDirectory, 'again.qcow2') }] },
        invalid,
        /repeats/,
      ],
      ['relative clone directory', { cloneDirectory: 'clones/escape' }, invalid, /clone_directory/],
      ['empty name', { name: '' }, invalid, /domain_name/],
      ['name starting with a dash', { name: '-rf' }, invalid, /domain_name/],
      ['name with a slash', { name: 'a/b' }, invalid, /domain_name/],
      ['name with a space', { name: 'a b' }, invalid, /domain_name/],
      ['name with markup', { name: 'a<b>' }, invalid, /domain_name/],
      ['name of 64 characters', { name: `a${'b'.repeat(63)}` }, invalid, /domain_name/],
    ];
    for (const [label, overrides, reason, pattern] of cases) {
      await test(label, async () => {
        const error = await assertRefused(() => renderClone(template, { ...optionsFor('escape'), ...overrides }), reason, pattern);
        if (reason === invalid || reason === outside) assert.ok(error.field, 'names the field');
      });
    }
    // The longest valid name is fine.
    await renderClone(template, { ...optionsFor('escape'), name: `a${'b'.repeat(62)}`, disks: disks(path.join(escapeDirectory, 'disk-0.qcow2')) });
  });

  test('refuses a log file name that is a symlink planted in the clone directory', async () => {
    const plantedDirectory = path.join(root, 'clones', 'planted');
    await mkdir(plantedDirectory, { recursive: true });
    await symlink(path.join(root, 'host-file'), path.join(plantedDirectory, 'serial-0.log'));
    await assertRefused(() => renderClone(template, optionsFor('planted')), outside, /symlink/);
  });

  test('refuses absurdly deep XML instead of crashing', async () => {
    const deep = `${'<a>'.repeat(150)}${'</a>'.repeat(150)}`;
    await assertRefused(() => sanitizeDomainTemplate(smallDomain('', `<vendor-extension>${deep}</vendor-extension>`)), untrusted);
  });

  test('never trusts the template', async () => {
    const small = sanitizeDomainTemplate(smallDomain()).xml;
    const options = { ...optionsFor('small'), disks: [{ target: 'vda', path: path.join(root, 'clones', 'small', 'disk-0.qcow2') }] };
    const cases: Array<[string, string, RegExp]> = [
      [
        'qemu:commandline',
        small.replace(
          '</domain>',
          `<qemu:commandline xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"><qemu:arg value="-x"/></qemu:commandline></domain>`,
        ),
        /qemu namespace/,
      ],
      [
        'block disk',
        small.replace('</devices>', `<disk type="block" device="disk"><source dev="/dev/sda"/><target dev="vdb"/></disk></devices>`),
        /disk type "block"/,
      ],
      [
        'hostdev',
        small.replace('</devices>', `<hostdev mode="subsystem" type="usb"><source><vendor id="0x1"/><product id="0x2"/></source></hostdev></devices>`),
        /host device passthrough/,
      ],
      ['absolute disk source', small.replace('file="disk-0.qcow2"', 'file="/etc/shadow"'), /not an image file name/],
      ['disk source with ..', small.replace('file="disk-0.qcow2"', 'file="../../etc/shadow"'), /not an image file name/],
      [
        'backing store',
        small.replace('<target dev="vda"', '<backingStore type="file"><source file="/etc/shadow"/></backingStore><target dev="vda"'),
        /backing files/,
      ],
      ['seclabel', small.replace('</domain>', '<seclabel type="none"/></domain>'), /security label/],
      ['emulator', small.replace('<devices>', '<devices><emulator>/tmp/evil</emulator>'), /emulator/],
      [
        'log outside the clone directory',
        small.replace('</devices>', '<serial type="pty"><log file="/var/log/x.log"/><target port="0"/></serial></devices>'),
        /log/,
      ],
      ['log with ..', small.replace('</devices>', '<serial type="pty"><log file="../x.log"/><target port="0"/></serial></devices>'), /log/],
      [
        'loader outside firmware',
        small.replace('<type arch="x86_64" machine="pc">hvm</type>', '<type arch="x86_64" machine="pc">hvm</type><loader type="rom">/etc/shadow</loader>'),
        /firmware/,
      ],
      [
        'kernel with a path',
        small.replace('<type arch="x86_64" machine="pc">hvm</type>', '<type arch="x86_64" machine="pc">hvm</type><kernel>../../boot/vmlinuz</kernel>'),
        /kernel/,
      ],
      ['interface script', small.replace('<source network="default"/>', '<source network="default"/><script path="/tmp/x"/>'), /scripts/],
    ];
    for (const [label, xml, pattern] of cases) {
      await test(label, async () => {
        await assertRefused(() => renderClone(xml, { ...options, imageDirectory: path.join(root, 'images', 'small') }), untrusted, pattern);
      });
    }
  });
});

describe('readCloneMetadata', () => {
  test('is undefined for domains that are not cowherd clones', () => {
    assert.equal(readCloneMetadata(REAL_DOMAIN_XML), undefined);
    assert.equal(readCloneMetadata('not xml'), undefined);
  });
});
