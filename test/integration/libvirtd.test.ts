// Integration test for scripts/libvirtd.sh: the private libvirtd starts, and a TCG guest on a qcow2 disk can be
// defined, started, destroyed and undefined quickly. Needs root (libvirtd, mount namespaces); CI runs as root.
//
//   node --import tsx --test test/integration/libvirtd.test.ts
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const libvirtdScript = path.join(repoRoot, 'scripts', 'libvirtd.sh');

/** Result of a finished child process. */
interface RunResult {
  stdout: string;
  stderr: string;
}

/** Runs a command with an argument array and a timeout; a failure carries the command line and its stderr. */
async function run(file: string, args: readonly string[], timeoutMs: number): Promise<RunResult> {
  try {
    const { stdout, stderr } = await execFileAsync(file, args, {
      cwd: repoRoot,
      timeout: timeoutMs,
      killSignal: 'SIGKILL',
      encoding: 'utf8',
    });
    return { stdout, stderr };
  } catch (error: unknown) {
    const details = error as { stderr?: string; stdout?: string; code?: unknown; signal?: unknown };
    throw new Error(
      `${file} ${args.join(' ')} failed (code ${String(details.code)}, signal ${String(details.signal)}):\n` + `${details.stderr ?? ''}${details.stdout ?? ''}`,
      { cause: error },
    );
  }
}

/** Best effort for cleanup: never throws. */
async function runQuietly(file: string, args: readonly string[], timeoutMs: number): Promise<void> {
  await run(file, args, timeoutMs).catch(() => undefined);
}

function domainXml(name: string, diskPath: string): string {
  // type='qemu' (TCG): KVM is masked in libvirtd's namespace. <acpi/> or a poweroff never completes.
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${diskPath}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
`;
}

// Cleanups run in reverse order of registration, each on its own, in after() so that they also run when the
// test fails half-way.
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) {
    await cleanup().catch((error: unknown) => {
      console.error('cleanup failed:', error);
    });
  }
});

test('private libvirtd defines, starts, destroys and undefines a TCG guest', { timeout: 30_000 }, async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip('needs root: libvirtd and its private mount namespace are root-only (CI runs as root)');
    return;
  }

  // Leave libvirtd as we found it: stop it afterwards only if this test started it.
  const status = await run('bash', [libvirtdScript, 'status'], 15_000).then(
    () => 'running' as const,
    () => 'stopped' as const,
  );
  const started = await run('bash', [libvirtdScript, 'start'], 20_000);
  if (status === 'stopped') {
    cleanups.push(async () => {
      await run('bash', [libvirtdScript, 'stop'], 30_000);
    });
  }

  const envOutput = await run('bash', [libvirtdScript, 'env'], 5_000);
  const uri = /LIBVIRT_DEFAULT_URI=(\S+)/.exec(envOutput.stdout)?.[1];
  assert.ok(uri, `env prints LIBVIRT_DEFAULT_URI, got: ${envOutput.stdout}`);
  assert.ok(started.stdout.includes(`uri ${uri}`), `start prints the URI to use, got: ${started.stdout}`);
  const virsh = (args: readonly string[], timeoutMs = 15_000): Promise<RunResult> => run('virsh', ['-q', '-c', uri, ...args], timeoutMs);

  const dir = await mkdtemp(path.join(tmpdir(), 'cowherd-libvirtd-test-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));

  const name = `cowherd-test-${process.pid}-${randomBytes(4).toString('hex')}`;
  const diskPath = path.join(dir, 'disk.qcow2');
  const xmlPath = path.join(dir, 'domain.xml');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', diskPath, '64M'], 10_000);
  await writeFile(xmlPath, domainXml(name, diskPath));

  // Registered before define, so a define that succeeded but was not seen still gets undone.
  cleanups.push(async () => {
    await runQuietly('virsh', ['-q', '-c', uri, 'destroy', name], 15_000);
    await runQuietly('virsh', ['-q', '-c', uri, 'undefine', name], 15_000);
  });

  let begin = performance.now();
  await virsh(['define', xmlPath]);
  const defineMs = performance.now() - begin;
  // A libvirtd that sees /dev/kvm but cannot use it re-probes qemu on every call: define then takes 30-40 s.
  assert.ok(defineMs < 5_000, `virsh define took ${defineMs.toFixed(0)} ms; is /dev/kvm masked for libvirtd?`);

  begin = performance.now();
  await virsh(['start', name], 20_000);
  const startMs = performance.now() - begin;

  const running = await virsh(['domstate', name]);
  assert.equal(running.stdout.trim(), 'running');

  begin = performance.now();
  await virsh(['destroy', name]);
  const destroyMs = performance.now() - begin;
  const shutOff = await virsh(['domstate', name]);
  assert.equal(shutOff.stdout.trim(), 'shut off');

  await virsh(['undefine', name]);
  const all = await virsh(['list', '--all', '--name']);
  assert.ok(!all.stdout.split('\n').includes(name), `${name} is still defined after undefine`);

  t.diagnostic(`define ${defineMs.toFixed(0)} ms, start ${startMs.toFixed(0)} ms, destroy ${destroyMs.toFixed(0)} ms`);
});
