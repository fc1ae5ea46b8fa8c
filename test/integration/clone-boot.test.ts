/**
 * Clones that really boot: a real agent process makes two copy-on-write clones of an image replica (a qcow2
 * base and a direct-kernel-boot template) on the private libvirtd; one of them boots a tiny guest under TCG
 * (Debian's kernel and a busybox initramfs, scripts/guest-kernel.sh) that writes a marker block to its disk
 * and powers off. The write lands in that clone's overlay and nowhere else: the base's SHA-256 is unchanged
 * and the sibling clone still reads the base's bytes.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { constants, copyFile, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { AgentServiceClient, type CreateCloneResult } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { createClient } from '../../services/common/platform/client.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { sanitizeDomainTemplate } from '../../services/agent/hypervisor/index.js';
import { guestDomainXml } from '../../services/launcher/story.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { call } from '../harness/grpc.js';
import { guestKit, markerBlock, MARKER_BLOCK, MARKER_OFFSET, type GuestKit } from '../harness/guest.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess } from '../harness/processes.js';

const run = promisify(execFile);
const URI = 'qemu:///system';
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
const sha256 = async (path: string) =>
  createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const suffix = Math.random().toString(36).slice(2, 7);
/** The base disk: 16 MiB, every 4 KiB block filled with a pattern that names the block. */
const DISK_BYTES = 16 * 1024 * 1024;
/** How long a boot may take before the test gives up (they take a few seconds under TCG). */
const BOOT_TIMEOUT_MS = 90_000;

function basePattern(): Buffer {
  const disk = Buffer.alloc(DISK_BYTES);
  for (let offset = 0; offset < DISK_BYTES; offset += MARKER_BLOCK) disk.fill(`base-block-${offset / MARKER_BLOCK};`, offset, offset + MARKER_BLOCK, 'latin1');
  return disk;
}

/** What the guest sees on its disk: the overlay read through its backing chain, as raw bytes. */
async function guestVisibleDisk(overlay: string, scratch: string): Promise<Buffer> {
  const raw = join(scratch, `visible-${Math.random().toString(36).slice(2, 8)}.raw`);
  await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', overlay, raw], { timeout: 60_000 });
  return readFile(raw);
}

interface MapEntry {
  readonly start: number;
  readonly length: number;
  readonly depth: number;
  readonly data: boolean;
}

/** The ranges whose data is in the overlay itself (depth 0), not in its backing file. */
async function overlayDataRanges(overlay: string): Promise<Array<{ start: number; end: number }>> {
  const { stdout } = await run('qemu-img', ['map', '-U', '--output=json', overlay], { timeout: 60_000 });
  return (JSON.parse(stdout) as MapEntry[])
    .filter((entry) => entry.depth === 0 && entry.data)
    .map((entry) => ({ start: entry.start, end: entry.start + entry.length }));
}

describe('a clone boots under TCG and writes only to its overlay', { skip: process.getuid?.() !== 0 ? 'needs root (libvirtd)' : false }, () => {
  const resources = new Resources();
  let agentClient: AgentServiceClient;
  let imageDirectory: string;
  let scratch: string;
  let kit: GuestKit;
  const domains: string[] = [];

  before(async () => {
    const [kitBuilt] = await Promise.all([guestKit(), run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 })]);
    kit = kitBuilt;
    resources.defer(async () => {
      for (const domain of domains) {
        await virsh('destroy', domain).catch(() => undefined);
        await virsh('undefine', domain).catch(() => undefined);
      }
    });
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
    const ca = await startCertificateAuthorityProcess(resources, pki, nats);
    const inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    const directory = await resources.tempDir('cowherd-e2e-');
    imageDirectory = join(directory, 'images-root');
    scratch = join(directory, 'scratch');
    await mkdir(scratch, { recursive: true });
    await mkdir(imageDirectory, { recursive: true });

    const caAdmin = createClient(
      CertificateAuthorityServiceClient,
      ca.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem }),
    );
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host: 'boot-host', ttl: undefined, requestId: '' }, cb));
    caAdmin.close();
    const agent = await startServiceProcess(resources, 'agent', undefined, nats.url, {
      COWHERD_HOST_ID: 'boot-host',
      COWHERD_JOIN_TOKEN: token.token,
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: join(directory, 'credentials'),
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventory.address,
      COWHERD_LIBVIRT_URI: URI,
      COWHERD_IMAGE_DIR: imageDirectory,
    });
    agentClient = createClient(
      AgentServiceClient,
      agent.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('service', 'cloning')), caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 120_000 },
    );
  });
  after(async () => {
    agentClient?.close();
    await resources.release();
  });

  it('boots one of two clones of a replica: the marker lands in its overlay, the base and the sibling are untouched', async (t) => {
    const marker = `m${suffix}`;
    const source = `cowherd-boot-src-${suffix}`;

    // The source VM, as a publisher would have it: a qcow2 disk and a direct kernel boot from host paths.
    const sourceDirectory = join(scratch, 'source');
    await mkdir(sourceDirectory);
    const pattern = basePattern();
    await writeFile(join(sourceDirectory, 'disk.raw'), pattern);
    const sourceDisk = join(sourceDirectory, 'disk.qcow2');
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', join(sourceDirectory, 'disk.raw'), sourceDisk]);
    const consoleLog = join(sourceDirectory, 'console.log');
    const sourceXml = guestDomainXml({
      name: source,
      memoryMib: 192,
      kernel: kit.kernel,
      initrd: kit.initrd,
      commandLine: `console=ttyS0 quiet panic=-1 marker=${marker}`,
      disk: sourceDisk,
      console: consoleLog,
    });
    // Through libvirt and back, so the template is what `virsh dumpxml --inactive` of a real VM gives.
    await writeFile(join(sourceDirectory, 'source.xml'), sourceXml);
    domains.push(source);
    await virsh('define', join(sourceDirectory, 'source.xml'));
    const template = sanitizeDomainTemplate((await virsh('dumpxml', '--inactive', source)).stdout);
    await virsh('undefine', source);

    // The replica as distribution leaves it: the template, the disk and the boot files under their names.
    const image = `boot-${suffix}`;
    const replica = join(imageDirectory, 'images', image);
    await mkdir(replica, { recursive: true });
    assert.equal(template.disks.length, 1);
    assert.deepEqual(
      template.bootFiles.map((file) => [file.element, file.sourcePath]),
      [
        ['kernel', kit.kernel],
        ['initrd', kit.initrd],
      ],
    );
    const base = join(replica, template.disks[0]!.fileName);
    await copyFile(sourceDisk, base);
    for (const bootFile of template.bootFiles) await copyFile(bootFile.sourcePath, join(replica, bootFile.fileName), constants.COPYFILE_FICLONE);
    await writeFile(join(replica, 'domain-template.xml'), template.xml);
    const baseHash = await sha256(base);

    const booted = `boot-a-${suffix}`;
    const sibling = `boot-b-${suffix}`;
    domains.push(booted, sibling);
    const response = await call<{ results: CreateCloneResult[] }>((cb) =>
      agentClient.createClones(
        {
          dataDiskBytes: '0',
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          source: { $case: 'image', value: `images/${image}` },
          clones: [booted, sibling].map((domainName) => ({ domainName, start: false, index: 0 })),
          operation: '',
          requestId: `boot-${suffix}`,
          stream: false,
          diskBackend: 0,
          validateOnly: false,
        },
        cb,
      ),
    );
    assert.deepEqual(
      response.results.map((result) => [result.domainName, result.status?.code ?? 0, result.started]),
      [
        [booted, 0, false],
        [sibling, 0, false],
      ],
      JSON.stringify(response.results.map((result) => result.status)),
    );
    const overlay = (name: string) => join(imageDirectory, 'clones', name, 'vda.qcow2');
    const bootedXml = (await virsh('dumpxml', booted)).stdout;
    assert.ok(bootedXml.includes(`<kernel>${join(replica, 'boot-kernel')}</kernel>`), "the clone boots the replica's kernel");
    assert.ok(bootedXml.includes(`<source file='${overlay(booted)}'`), "the clone's disk is its overlay");

    // Boot one clone; its /init writes the marker and powers off.
    const startedAt = Date.now();
    await virsh('start', booted);
    const startReturnedAt = Date.now();
    let state = 'running';
    while (Date.now() - startedAt < BOOT_TIMEOUT_MS) {
      state = (await virsh('domstate', booted)).stdout.trim();
      if (state === 'shut off') break;
      await sleep(100);
    }
    const bootMs = Date.now() - startedAt;
    const consoleOutput = await readFile(join(imageDirectory, 'clones', booted, 'serial-0.out'), 'utf8').catch(
      (error: unknown) => `(no console output: ${(error as Error).message})`,
    );
    t.diagnostic(`boot: virsh start returned after ${startReturnedAt - startedAt} ms; shut off after ${bootMs} ms (kernel ${kit.version})`);
    assert.equal(state, 'shut off', `the guest did not power off within ${BOOT_TIMEOUT_MS} ms; console:\n${consoleOutput.slice(-3000)}`);
    assert.match(consoleOutput, /cowherd-guest: marker written/, `console:\n${consoleOutput.slice(-3000)}`);

    // The write is in the booted clone's overlay, at the marker's offset and nowhere else.
    const expected = markerBlock(marker);
    const bootedDisk = await guestVisibleDisk(overlay(booted), scratch);
    assert.equal(bootedDisk.length, DISK_BYTES);
    assert.ok(
      bootedDisk.subarray(MARKER_OFFSET, MARKER_OFFSET + MARKER_BLOCK).equals(expected),
      `the marker block reads ${JSON.stringify(bootedDisk.subarray(MARKER_OFFSET, MARKER_OFFSET + 64).toString('latin1'))}`,
    );
    assert.ok(bootedDisk.subarray(0, MARKER_OFFSET).equals(pattern.subarray(0, MARKER_OFFSET)), 'the guest changed nothing before the marker');
    assert.ok(
      bootedDisk.subarray(MARKER_OFFSET + MARKER_BLOCK).equals(pattern.subarray(MARKER_OFFSET + MARKER_BLOCK)),
      'the guest changed nothing after the marker',
    );
    const written = await overlayDataRanges(overlay(booted));
    assert.ok(
      written.some((range) => range.start <= MARKER_OFFSET && range.end >= MARKER_OFFSET + MARKER_BLOCK),
      `the overlay holds the marker's block (overlay data: ${JSON.stringify(written)})`,
    );

    // The base is unchanged and still read-only; the sibling reads the base's bytes, through an empty overlay.
    assert.equal(await sha256(base), baseHash, 'the base is unchanged');
    assert.equal((await stat(base)).mode & 0o222, 0, 'the base is read-only on disk');
    const siblingDisk = await guestVisibleDisk(overlay(sibling), scratch);
    assert.ok(siblingDisk.equals(pattern), 'the sibling sees the base, not the marker');
    assert.deepEqual(await overlayDataRanges(overlay(sibling)), [], "the sibling's overlay holds no data");
    assert.equal((await virsh('domstate', sibling)).stdout.trim(), 'shut off');
  });
});
