/**
 * A network-namespace test bed: several hosts on one machine, each its own network namespace with one
 * interface (`eth0`, 198.18.0.<n>/24) on a bridge that lives in a dedicated switch namespace, so nothing of it
 * touches the root namespace's network. Every host is shaped with htb to the same rate both ways: egress of its
 * `eth0` limits what it uploads, egress of its switch port limits what it downloads. Root only.
 *
 * Hygiene: IPv6 is off (no neighbour discovery or MLD chatter in the byte counters) and each host drops, with
 * iptables, anything it would send off 198.18.0.0/15 (multicast such as SSDP and local peer discovery
 * included), except to one multicast group of its own (MULTICAST_GROUP). Each host also gets a directory on the
 * shared file system (`directory(host)`).
 *
 * CPU: every process started with `spawn` or `exec` for a host (and everything it forks) runs in a cpuacct
 * cgroup of that host (cgroup v1, /sys/fs/cgroup/cpuacct/chb-<pid>-<random>/<host>), so `cpuSeconds(host)` is
 * the CPU time all of the host's processes used, those that exited included. The cgroup's clock is the
 * scheduler's runtime of its tasks: user and system time in process context. Kernel work done outside it is not
 * counted: softirq work (most of the network stack's receive path) that runs in ksoftirqd or while another task
 * is on the CPU (without IRQ time accounting, which this kernel lacks, it is charged to whichever task it
 * interrupts), and the kernel's own threads (writeback of the page cache). Without cgroups (no cpuacct hierarchy
 * mounted), each test bed says so on stderr and `cpuSeconds` returns undefined.
 *
 * Clean-up: namespaces are named `chb-<pid>-<random>-<host>`, directories `cowherd-testbed-<pid>-*`, cgroups
 * `chb-<pid>-<random>`. `destroy()` kills every process left in the namespaces and deletes them (with them the
 * links and the bridge), the directories and the cgroups; it also runs by itself on exit, SIGINT and SIGTERM. A
 * new test bed first removes namespaces, directories and cgroups of earlier runs whose pid is dead (a run killed
 * with SIGKILL), and only those.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCommand, startDaemon, type Daemon, type RunOptions } from '../services/common/platform/child-process.js';

/** Options of {@link TestBed.create}. */
export interface TestBedOptions {
  /** Host names (lowercase letters and digits, at most 10 characters); the n-th gets 198.18.0.<n+1>. */
  readonly hosts: readonly string[];
  /** Each host's rate, in Mbit/s, in each direction. */
  readonly rateMbit: number;
  /**
   * Bytes the shaper may queue per direction before it drops. Default: 100 ms at the rate (1.25 MB at
   * 100 Mbit/s), a switch port's buffer rather than the kernel's default of 1000 packets (which with
   * 64 KiB GSO packets would queue seconds).
   */
  readonly queueBytes?: number;
  /** Parent of the per-host directories. Default: the system temp directory. */
  readonly directory?: string;
}

/** Options of {@link TestBed.spawn}. */
export interface SpawnOptions {
  /** Resolve only once the output (stdout and stderr) matches this. */
  readonly readyPattern?: RegExp;
  /** Give up (and kill it) when not ready after this long. Default 30 s. */
  readonly readyTimeoutMs?: number;
  readonly env?: Readonly<Record<string, string>>;
  readonly cwd?: string;
  /** Each output line as it comes. */
  readonly onLine?: (line: string) => void;
}

const PREFIX = 'chb';
const STALE_NAMESPACE = /^chb-(\d+)-[a-z0-9]+-/;
const STALE_DIRECTORY = /^cowherd-testbed-(\d+)-/;
const STALE_CGROUP = /^chb-(\d+)-[a-z0-9]+$/;
/** The cgroup v1 cpuacct hierarchy, where every host gets a cgroup. */
const CPUACCT = '/sys/fs/cgroup/cpuacct';
/**
 * Joins the cgroup whose `cgroup.procs` is $1, then becomes the rest of its arguments (same pid): a fixed script,
 * the command still passed as an argument array. The join happens before `ip netns exec`, which mounts a sysfs of
 * the namespace over /sys, and before the command can fork, so that every descendant is in the cgroup too.
 */
const JOIN_CGROUP = 'echo $$ > "$1" && shift && exec "$@"';
const SWITCH = 'switch';
const HOST_NAME = /^[a-z][a-z0-9]{0,9}$/;

/** Thrown when the test bed cannot be built (not root, a missing tool, a kernel feature the machine lacks). */
/** The name and address by which test-bed hosts reach the control plane (NATS and the services on this machine). */
export const CONTROL_NAME = 'cowherd-control';
export const CONTROL_ADDRESS = '198.18.0.254';
/**
 * The one multicast group the hosts may send to (everything else off 198.18.0.0/15 is dropped): administratively
 * scoped (239.0.0.0/8, RFC 2365), for bench:distribution's multicast method. IGMP reports still go nowhere, so
 * the bridge, which never learns a member, floods the group to every port.
 */
export const MULTICAST_GROUP = '239.192.77.1';
/** The gRPC port of a cowherd agent inside a test-bed host. */
export const AGENT_PORT = 7445;

/** Where a test-bed agent reaches the control plane: host:port addresses as this machine sees them, NATS URLs. */
export interface ControlPlaneAddresses {
  readonly enrollAddress: string;
  readonly caAddress: string;
  readonly inventoryAddress: string;
  /** Comma-separated NATS URLs naming {@link CONTROL_NAME}. */
  readonly natsUrl: string;
}

/**
 * The variables of a cowherd agent in test-bed host `host`: it reaches the control plane by CONTROL_NAME (its
 * certificates name it), keeps its state under the host's directory, serves on AGENT_PORT at the host's address,
 * and sees only the domains of its own image directory (the hosts share one libvirtd).
 */
export function testBedAgentEnvironment(bed: TestBed, host: string, control: ControlPlaneAddresses): Record<string, string> {
  const portOf = (address: string): string => address.slice(address.lastIndexOf(':') + 1);
  const root = bed.directory(host);
  return {
    COWHERD_HOST_ID: host,
    COWHERD_ENROLL_ADDRESS: `${CONTROL_NAME}:${portOf(control.enrollAddress)}`,
    COWHERD_CA_ADDRESS: `${CONTROL_NAME}:${portOf(control.caAddress)}`,
    COWHERD_INVENTORY_ADDRESS: `${CONTROL_NAME}:${portOf(control.inventoryAddress)}`,
    COWHERD_NATS_URL: control.natsUrl,
    COWHERD_CREDENTIALS_DIR: join(root, 'credentials'),
    COWHERD_IMAGE_DIR: join(root, 'images-root'),
    COWHERD_LISTEN_ADDRESS: `0.0.0.0:${AGENT_PORT}`,
    COWHERD_ADVERTISE_ADDRESS: `${bed.address(host)}:${AGENT_PORT}`,
    COWHERD_HEALTH_ADDRESS: '127.0.0.1:0',
    COWHERD_METRICS_ADDRESS: '127.0.0.1:0',
    COWHERD_TORRENT_PORT: '6881',
    COWHERD_WEB_SEED_ADDRESS: '0.0.0.0:7447',
    COWHERD_DOMAIN_SCOPE: 'image-directory',
    COWHERD_LIBVIRT_URI: 'qemu:///system',
  };
}

export class TestBedError extends Error {
  override readonly name = 'TestBedError';
}

export class TestBed {
  /** Namespace name prefix of this test bed, `chb-<pid>-<random>-`. */
  readonly prefix: string;
  readonly hosts: readonly string[];
  /** The shaped rate, in bytes per second, each host has up and down. */
  readonly rateBytesPerSecond: number;
  private readonly daemons = new Set<Daemon>();
  /** This bed's cgroup under CPUACCT (one sub-cgroup per host), or undefined when the machine has none. */
  private readonly cgroup: string | undefined;
  private destroyed = false;
  private readonly onExit = (): void => this.destroySync();
  private readonly onSignal = (signal: NodeJS.Signals): void => {
    process.stderr.write(`testbed: ${signal}, removing namespaces ${this.prefix}*\n`);
    this.destroySync();
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };

  private constructor(
    hosts: readonly string[],
    rateMbit: number,
    private readonly root: string,
  ) {
    this.prefix = `${PREFIX}-${process.pid}-${randomBytes(3).toString('hex')}-`;
    this.hosts = hosts;
    this.rateBytesPerSecond = (rateMbit * 1_000_000) / 8;
    this.cgroup = createCgroups(this.prefix.slice(0, -1), hosts);
    process.once('exit', this.onExit);
    process.once('SIGINT', this.onSignal);
    process.once('SIGTERM', this.onSignal);
  }

  /** Builds the namespaces, bridge, links, addresses and shaping; removes stale test beds first. */
  static async create(options: TestBedOptions): Promise<TestBed> {
    if (process.getuid?.() !== 0) throw new TestBedError('the test bed needs root (network namespaces, tc)');
    if (options.hosts.length === 0 || options.hosts.length > 250) throw new TestBedError('between 1 and 250 hosts');
    for (const host of options.hosts) if (!HOST_NAME.test(host) || host === SWITCH) throw new TestBedError(`bad host name ${JSON.stringify(host)}`);
    if (new Set(options.hosts).size !== options.hosts.length) throw new TestBedError('host names must be unique');
    if (!(options.rateMbit > 0)) throw new TestBedError('rateMbit must be positive');
    const parent = options.directory ?? tmpdir();
    TestBed.removeStale(parent);
    const root = await mkdtemp(join(parent, `cowherd-testbed-${process.pid}-`));
    const bed = new TestBed(options.hosts, options.rateMbit, root);
    try {
      await bed.build(options.rateMbit, options.queueBytes ?? Math.round(bed.rateBytesPerSecond / 10));
    } catch (error) {
      bed.destroySync();
      throw error;
    }
    return bed;
  }

  /**
   * Deletes namespaces (killing what still runs in them) and host directories (under `directory`) of earlier
   * test beds whose process is gone.
   */
  static removeStale(directory: string = tmpdir()): void {
    for (const namespace of listNamespaces()) {
      const match = STALE_NAMESPACE.exec(namespace);
      if (match && !isAlive(Number(match[1]))) removeNamespace(namespace);
    }
    for (const entry of readdirSync(directory)) {
      const match = STALE_DIRECTORY.exec(entry);
      if (match && !isAlive(Number(match[1]))) rmSync(join(directory, entry), { recursive: true, force: true });
    }
    if (existsSync(join(CPUACCT, 'cgroup.procs'))) {
      for (const entry of readdirSync(CPUACCT)) {
        const match = STALE_CGROUP.exec(entry);
        if (match && !isAlive(Number(match[1]))) removeCgroup(join(CPUACCT, entry));
      }
    }
  }

  /** The namespace of a host (or of the switch). */
  namespace(host: string): string {
    if (host !== SWITCH) this.check(host);
    return `${this.prefix}${host}`;
  }

  /** The host's IPv4 address, 198.18.0.<index + 1>. */
  address(host: string): string {
    return `198.18.0.${this.hosts.indexOf(this.check(host)) + 1}`;
  }

  /** A directory for the host's files (on the shared file system: readable from every namespace and from here). */
  directory(host: string): string {
    return join(this.root, this.check(host));
  }

  /** Empties every host's directory (between two methods of a benchmark). */
  async clearDirectories(): Promise<void> {
    for (const host of this.hosts) {
      const directory = this.directory(host);
      for (const entry of await readdir(directory)) await rm(join(directory, entry), { recursive: true, force: true });
    }
  }

  /** Runs a command inside the host's namespace (and cgroup) to completion; returns stdout, throws CommandError. */
  exec(host: string, command: string, args: readonly string[], options: RunOptions = {}): Promise<string> {
    const [program, programArgs] = this.inside(host, command, args);
    return runCommand(program, programArgs, options);
  }

  /**
   * Starts a long-running command inside the host's namespace (with `readyPattern`: waits until its output
   * matches). The test bed kills it in `destroy()` if nobody stopped it before.
   */
  async spawn(host: string, command: string, args: readonly string[], options: SpawnOptions = {}): Promise<Daemon> {
    const [program, programArgs] = this.inside(host, command, args);
    const daemon = await startDaemon(program, programArgs, {
      ...options,
      readyTimeoutMs: options.readyTimeoutMs ?? 30_000,
    });
    const tracked: Daemon = {
      pid: daemon.pid,
      output: () => daemon.output(),
      exited: daemon.exited,
      stop: async (graceMs) => {
        this.daemons.delete(tracked);
        await daemon.stop(graceMs);
      },
    };
    this.daemons.add(tracked);
    return tracked;
  }

  /**
   * CPU-seconds (user and system) that every process started for the host with `spawn` or `exec`, and their
   * children, have used so far, exited ones included; undefined when the machine has no cpuacct cgroups.
   */
  cpuSeconds(host: string): number | undefined {
    if (this.cgroup === undefined) return undefined;
    return Number(readFileSync(join(this.cgroup, this.check(host), 'cpuacct.usage'), 'utf8')) / 1e9;
  }

  /** Bytes the host's `eth0` has transmitted (everything on the wire: payload and TCP/IP/Ethernet headers). */
  async txBytes(host: string): Promise<number> {
    return (await this.linkStatistics(host)).tx.bytes;
  }

  /** Bytes the host's `eth0` has received. */
  async rxBytes(host: string): Promise<number> {
    return (await this.linkStatistics(host)).rx.bytes;
  }

  /**
   * Connects the root namespace to the switch (unshaped) with `address`/24, so that processes running here (a
   * control plane) and the hosts reach each other. The link goes away with the switch namespace.
   */
  async connectRoot(address = '198.18.0.254'): Promise<void> {
    const device = `chbr${process.pid % 1_000_000}`;
    const switchNamespace = this.namespace(SWITCH);
    await runCommand('ip', ['link', 'add', device, 'type', 'veth', 'peer', 'name', 'p-root', 'netns', switchNamespace]);
    await runCommand('ip', ['-n', switchNamespace, 'link', 'set', 'p-root', 'master', 'br0']);
    await runCommand('ip', ['-n', switchNamespace, 'link', 'set', 'p-root', 'up']);
    await runCommand('sysctl', ['-q', '-w', `net.ipv6.conf.${device}.disable_ipv6=1`]).catch(() => '');
    await runCommand('ip', ['addr', 'add', `${address}/24`, 'dev', device]);
    await runCommand('ip', ['link', 'set', device, 'up']);
  }

  /**
   * Gives every host namespace an /etc/hosts with these names (`ip netns exec` bind-mounts
   * /etc/netns/<namespace>/hosts over /etc/hosts), e.g. a control-plane name that certificates carry.
   */
  async setHostNames(names: Readonly<Record<string, string>>): Promise<void> {
    const lines = [
      '127.0.0.1 localhost',
      ...Object.entries(names).map(([name, address]) => `${address} ${name}`),
      ...this.hosts.map((host) => `${this.address(host)} ${host}`),
    ];
    for (const host of this.hosts) {
      const directory = join('/etc/netns', this.namespace(host));
      await mkdir(directory, { recursive: true });
      await writeFile(join(directory, 'hosts'), `${lines.join('\n')}\n`);
    }
  }

  /** Stops every process started with `spawn` (SIGTERM, then SIGKILL), then does what `destroySync` does. */
  async destroy(): Promise<void> {
    await Promise.all([...this.daemons].map((daemon) => daemon.stop(2_000)));
    this.destroySync();
  }

  /**
   * Kills every process still in the test bed's namespaces, deletes the namespaces (and with them the links and
   * the bridge) and the host directories. Synchronous, so it also runs from `process.on('exit')`. Idempotent.
   */
  destroySync(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    process.removeListener('exit', this.onExit);
    process.removeListener('SIGINT', this.onSignal);
    process.removeListener('SIGTERM', this.onSignal);
    for (const namespace of listNamespaces()) if (namespace.startsWith(this.prefix)) removeNamespace(namespace);
    for (const host of this.hosts) rmSync(join('/etc/netns', `${this.prefix}${host}`), { recursive: true, force: true });
    rmSync(this.root, { recursive: true, force: true });
    if (this.cgroup !== undefined) removeCgroup(this.cgroup);
  }

  /** The program and arguments that run `command` in the host's namespace and, where there is one, its cgroup. */
  private inside(host: string, command: string, args: readonly string[]): [string, string[]] {
    const inNamespace = ['ip', 'netns', 'exec', this.namespace(host), command, ...args];
    if (this.cgroup === undefined) return [inNamespace[0]!, inNamespace.slice(1)];
    return ['sh', ['-c', JOIN_CGROUP, 'sh', join(this.cgroup, host, 'cgroup.procs'), ...inNamespace]];
  }

  private check(host: string): string {
    if (!this.hosts.includes(host)) throw new TestBedError(`no host ${JSON.stringify(host)} in this test bed`);
    return host;
  }

  private async linkStatistics(host: string): Promise<{ rx: { bytes: number }; tx: { bytes: number } }> {
    const links = JSON.parse(await runCommand('ip', ['-n', this.namespace(host), '-s', '-j', 'link', 'show', 'dev', 'eth0'])) as Array<{
      stats64: { rx: { bytes: number }; tx: { bytes: number } };
    }>;
    const link = links[0];
    if (link === undefined) throw new TestBedError(`${host}: no eth0`);
    return link.stats64;
  }

  private async build(rateMbit: number, queueBytes: number): Promise<void> {
    const ip = (...args: string[]): Promise<string> => runCommand('ip', args);
    const inside = (namespace: string, command: string, ...args: string[]): Promise<string> => runCommand('ip', ['netns', 'exec', namespace, command, ...args]);
    const switchNamespace = this.namespace(SWITCH);
    for (const namespace of [switchNamespace, ...this.hosts.map((host) => this.namespace(host))]) {
      await ip('netns', 'add', namespace);
      // Before any link comes up, so that no IPv6 address (and no neighbour discovery) ever appears.
      await inside(namespace, 'sysctl', '-q', '-w', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1');
      await ip('-n', namespace, 'link', 'set', 'lo', 'up');
    }
    await ip('-n', switchNamespace, 'link', 'add', 'br0', 'type', 'bridge', 'stp_state', '0');
    await ip('-n', switchNamespace, 'link', 'set', 'br0', 'up');
    const shape = async (namespace: string, device: string): Promise<void> => {
      await runCommand('tc', ['-n', namespace, 'qdisc', 'add', 'dev', device, 'root', 'handle', '1:', 'htb', 'default', '10']);
      await runCommand('tc', [
        '-n',
        namespace,
        'class',
        'add',
        'dev',
        device,
        'parent',
        '1:',
        'classid',
        '1:10',
        'htb',
        'rate',
        `${rateMbit}mbit`,
        'ceil',
        `${rateMbit}mbit`,
        'quantum',
        '1514',
      ]);
      await runCommand('tc', ['-n', namespace, 'qdisc', 'add', 'dev', device, 'parent', '1:10', 'handle', '10:', 'bfifo', 'limit', String(queueBytes)]);
    };
    for (const host of this.hosts) {
      const namespace = this.namespace(host);
      const port = `p-${host}`;
      await ip('-n', switchNamespace, 'link', 'add', port, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', namespace);
      await ip('-n', switchNamespace, 'link', 'set', port, 'master', 'br0');
      await ip('-n', switchNamespace, 'link', 'set', port, 'up');
      await ip('-n', namespace, 'addr', 'add', `${this.address(host)}/24`, 'dev', 'eth0');
      await ip('-n', namespace, 'link', 'set', 'eth0', 'up');
      await shape(namespace, 'eth0');
      await shape(switchNamespace, port);
      await inside(namespace, 'iptables', '-w', '-A', 'OUTPUT', '-o', 'eth0', '-d', MULTICAST_GROUP, '-j', 'ACCEPT');
      await inside(namespace, 'iptables', '-w', '-A', 'OUTPUT', '-o', 'eth0', '!', '-d', '198.18.0.0/15', '-j', 'DROP');
    }
    for (const host of this.hosts) await mkdir(this.directory(host));
  }
}

function listNamespaces(): string[] {
  let output: string;
  try {
    output = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    return [];
  }
  return output
    .split('\n')
    .map((line) => line.split(' ')[0] ?? '')
    .filter((name) => name.startsWith(`${PREFIX}-`));
}

/** SIGKILLs every process in the namespace, then deletes it (the kernel frees it, links included, once empty). */
function removeNamespace(namespace: string): void {
  rmSync(join('/etc/netns', namespace), { recursive: true, force: true });
  for (let attempt = 0; attempt < 20; attempt++) {
    let pids: number[] = [];
    try {
      pids = execFileSync('ip', ['netns', 'pids', namespace], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
        .split('\n')
        .filter(Boolean)
        .map(Number);
    } catch {
      break;
    }
    if (pids.length === 0) break;
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
    execFileSync('sleep', ['0.05']);
  }
  try {
    execFileSync('ip', ['netns', 'delete', namespace], { stdio: 'ignore' });
  } catch {
    // Gone already, or deleted by a concurrent cleanup.
  }
}

/**
 * Creates `<CPUACCT>/<name>/<host>` for every host; returns the bed's cgroup, or undefined (with a message on
 * stderr) when the machine has no cpuacct hierarchy or it cannot be written.
 */
function createCgroups(name: string, hosts: readonly string[]): string | undefined {
  const cgroup = join(CPUACCT, name);
  try {
    if (!existsSync(join(CPUACCT, 'cgroup.procs'))) throw new Error(`no cgroup v1 cpuacct hierarchy at ${CPUACCT}`);
    mkdirSync(cgroup);
    for (const host of hosts) mkdirSync(join(cgroup, host));
    return cgroup;
  } catch (error) {
    process.stderr.write(`testbed: no CPU accounting per host (${error instanceof Error ? error.message : String(error)}); cpuSeconds() returns undefined\n`);
    removeCgroup(cgroup);
    return undefined;
  }
}

/**
 * Removes a bed's cgroup and its host cgroups (rmdir: a cgroup goes once no task is left in it; the namespaces'
 * processes are killed before this, so a retry covers the moment until the last of them has exited).
 */
function removeCgroup(cgroup: string): void {
  let children: string[] = [];
  try {
    children = readdirSync(cgroup, { withFileTypes: true })
      .filter((entry) => entry.isDirectory())
      .map((entry) => join(cgroup, entry.name));
  } catch {
    return;
  }
  for (const path of [...children, cgroup]) {
    for (let attempt = 0; attempt < 40; attempt++) {
      try {
        rmdirSync(path);
        break;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') break;
        if (attempt === 39) process.stderr.write(`testbed: could not remove cgroup ${path}: ${String(error)}\n`);
        else execFileSync('sleep', ['0.05']);
      }
    }
  }
}

/** True when the process exists and is not a zombie (a killed run's pid stays a zombie until its parent reaps it). */
function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}
