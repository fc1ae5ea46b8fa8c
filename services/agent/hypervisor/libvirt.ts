/**
 * The agent's view of libvirt: a small interface, and its implementation through `virsh` (every call goes
 * through runCommand/startDaemon with argument arrays). virsh works for local and remote URIs alike and
 * costs ~25 ms a process, so reads that touch many domains run as ONE virsh process with several commands
 * ("cmd1; cmd2", parsed by virsh itself); every argument in such a line is quoted by
 * {@link quoteVirshArgument}. virsh's failures become {@link LibvirtError}s with a `kind`.
 */
import { CLONE_METADATA_NAMESPACE, readCloneMetadata, type CloneMetadata } from './domain-xml/clone-metadata.js';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { XMLParser } from 'fast-xml-parser';
import { CommandError, runCommand, startDaemon, type Daemon } from '../../common/platform/child-process.js';
import type { Logger } from '../../common/platform/logger.js';

/** libvirt domain states as virsh prints them (virDomainState). */
export type DomainState = 'running' | 'idle' | 'paused' | 'in shutdown' | 'shut off' | 'crashed' | 'pmsuspended' | 'no state';

const DOMAIN_STATES: readonly DomainState[] = ['running', 'idle', 'paused', 'in shutdown', 'shut off', 'crashed', 'pmsuspended', 'no state'];

/** One `<disk>` of a domain definition. */
export interface DomainDisk {
  /** `<target dev>`, for example "vda". */
  readonly target: string;
  /** `<disk device>`: "disk", "cdrom", "floppy" or "lun". */
  readonly device: string;
  /** `<disk type>`: "file", "block", "network", "volume", "dir" or "nvme". */
  readonly type: string;
  /** The host path for file (`source@file`), block (`source@dev`) and dir (`source@dir`) disks; absent otherwise or when empty. */
  readonly sourcePath?: string;
  /** `<driver type>`: the image format libvirt opens it with ("qcow2", "raw", "vpc"...). */
  readonly format?: string;
}

/** A domain as the agent reports it: parsed from its XML plus its state. */
export interface DomainInfo {
  readonly name: string;
  /** Lowercase, with hyphens. */
  readonly uuid: string;
  readonly state: DomainState;
  /** `<domain type>`: "kvm", "qemu" (TCG), "xen", "test"... */
  readonly domainType: string;
  /** Current vCPUs (`<vcpu current>` when set, else `<vcpu>`). */
  readonly vcpus: number;
  /** `<memory>` (the maximum) in bytes. */
  readonly memoryBytes: number;
  /** In XML order. */
  readonly disks: readonly DomainDisk[];
  /** cowherd's record in `<metadata>`, for clones cowherd made (lineage, operation). */
  readonly clone?: CloneMetadata;
}

/** What `virsh uri`, `version --daemon` and `capabilities` say, for hypervisor detection. */
export interface HypervisorFacts {
  /** The canonical URI of the connection, for example "qemu:///system". */
  readonly uri: string;
  /** The libvirt driver ("QEMU", "Xen", "TEST"...), from "Using API". */
  readonly driver: string;
  /** Library version on the agent's side. */
  readonly libraryVersion: string;
  /** The daemon's version, when there is a daemon. */
  readonly daemonVersion?: string;
  /** The hypervisor name and version from "Running hypervisor", for example "QEMU" and "7.2.22". */
  readonly hypervisorName: string;
  readonly hypervisorVersion: string;
  /** Domain types the host offers for any guest architecture (capabilities), for example ["qemu"] or ["qemu", "kvm"]. */
  readonly domainTypes: readonly string[];
  /** Guest OS types offered ("hvm", "xen"...). */
  readonly osTypes: readonly string[];
}

/** One line of `virsh event`: something happened to a domain, or the watch was restarted and may have missed events. */
export type LibvirtEvent =
  | { readonly kind: 'domain'; readonly domain: string; readonly event: string; readonly detail: string }
  | { readonly kind: 'reconnected' };

/** A running event watch. */
export interface EventWatch {
  stop(): Promise<void>;
}

/** The libvirt operations the agent needs. */
export interface Libvirt {
  /** The connection URI as configured. */
  readonly uri: string;
  /** Every domain (active and inactive). Domains that vanish while being read are left out. */
  listDomains(): Promise<DomainInfo[]>;
  /** One domain by name or UUID; throws LibvirtError 'domain-not-found'. */
  domain(nameOrUuid: string): Promise<DomainInfo>;
  /**
   * Many domains by name or UUID in one go (one virsh process per batch); undefined for one that does not
   * exist. Optional: fakes may leave it out (callers then filter listDomains).
   */
  domainsMany?(namesOrUuids: readonly string[]): Promise<Array<DomainInfo | undefined>>;
  /** The domain's current XML (`dumpxml`). */
  domainXml(nameOrUuid: string): Promise<string>;
  /**
   * The persistent definitions (`dumpxml --inactive`) of many domains in one go (one virsh process); '' for a
   * domain that is gone. Optional: fakes may leave it out (callers then use domainXml one by one).
   */
  inactiveXmlMany?(uuids: readonly string[]): Promise<string[]>;
  /**
   * Redefines many existing domains in one virsh process, each `define` followed by its `dumpxml --inactive`:
   * returns, per document, the persistent definition libvirt holds afterwards ('' when none), by which the
   * caller tells whether its redefinition took (virsh goes on after a failed define, and a batch cannot say
   * which one failed). Optional: fakes may leave it out.
   */
  redefineMany?(documents: readonly string[]): Promise<string[]>;
  /** Facts for hypervisor detection. */
  hypervisorFacts(): Promise<HypervisorFacts>;
  /**
   * Follows every domain event (`virsh event --all --loop`) until stopped. Resolves once the watch is
   * connected. When the watch breaks (libvirtd restarted), it reconnects with backoff and then emits
   * `reconnected`: events in between were lost, so the caller should re-read everything.
   */
  watchEvents(onEvent: (event: LibvirtEvent) => void): Promise<EventWatch>;
  /** Defines (or redefines) a persistent domain from XML. */
  define(xml: string): Promise<void>;
  /** Asks the guest to shut down (ACPI); returns at once. Optional: fakes may leave it out. */
  shutdown?(nameOrUuid: string): Promise<void>;
  /** Resumes a paused domain. Optional: fakes may leave it out. */
  resume?(nameOrUuid: string): Promise<void>;
  /**
   * Defines many domains in one go (one virsh process: ~1.6 ms a domain instead of ~25). Returns, per
   * document, undefined when it is defined, or the error. Optional: fakes may leave it out.
   */
  defineMany?(documents: readonly string[]): Promise<Array<Error | undefined>>;
  start(nameOrUuid: string): Promise<void>;
  /** Hard power-off. */
  destroy(nameOrUuid: string): Promise<void>;
  /** Removes the definition (not the disks). */
  undefine(nameOrUuid: string): Promise<void>;
}

/** What went wrong in a libvirt call. */
export type LibvirtErrorKind =
  /** No domain with that name or UUID. */
  | 'domain-not-found'
  /** libvirtd is unreachable or refused the connection. */
  | 'connection-failed'
  /** The operation does not fit the domain's state (starting a running domain, destroying a stopped one). */
  | 'operation-invalid'
  /** The XML or an argument was rejected. */
  | 'invalid-argument'
  /** virsh did not answer in time. */
  | 'timeout'
  /** Anything else libvirt reported. */
  | 'operation-failed';

/** Thrown when a libvirt call fails; `kind` says how, `message` carries virsh's own words. */
export class LibvirtError extends Error {
  override readonly name = 'LibvirtError';
  constructor(
    readonly kind: LibvirtErrorKind,
    message: string,
    cause?: unknown,
  ) {
    super(message, { cause });
  }
}

/** Maps virsh's stderr (with LC_ALL=C) to an error kind. */
export function classifyVirshError(stderr: string, timedOut = false): LibvirtErrorKind {
  if (timedOut) return 'timeout';
  if (/failed to get domain|Domain not found|no domain with matching/i.test(stderr)) return 'domain-not-found';
  if (
    /failed to connect|Failed to connect socket|no connection driver available|authentication (failed|unavailable)|End of file while reading data|Cannot recv data|Cannot write data|unable to connect|no valid connection/i.test(
      stderr,
    )
  ) {
    return 'connection-failed';
  }
  if (/Requested operation is not valid|is already active|is not running|domain is already running/i.test(stderr)) return 'operation-invalid';
  if (/XML error|XML document failed to validate|unsupported configuration|invalid argument|Failed to parse/i.test(stderr)) return 'invalid-argument';
  return 'operation-failed';
}

/**
 * Quotes one argument for virsh's own command-line parser (used when several commands share one virsh
 * process): single quotes keep everything literal, including `;`, `#`, `"` and backslashes; a single quote
 * is closed, escaped and reopened, as in POSIX sh. An argument that starts with `--` is still read as an
 * option even when quoted, so pass values through their option (`--domain <value>`).
 */
export function quoteVirshArgument(value: string): string {
  return `'${value.replaceAll("'", "'\\''")}'`;
}

/** Joins commands (argument arrays) into one virsh command line, every argument quoted. */
export function virshCommandLine(commands: readonly (readonly string[])[]): string {
  return commands.map((command) => command.map(quoteVirshArgument).join(' ')).join('; ');
}

const xml = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@',
  parseTagValue: false,
  parseAttributeValue: false,
  // Elements that may repeat are always arrays, so one disk and two disks look alike.
  isArray: (_name, jpath) => ['domain.devices.disk', 'capabilities.guest', 'capabilities.guest.arch.domain'].includes(String(jpath)),
});

type XmlNode = Record<string, unknown>;

function node(value: unknown): XmlNode | undefined {
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as XmlNode) : undefined;
}

function text(value: unknown): string | undefined {
  if (typeof value === 'string') return value.trim();
  const element = node(value);
  const inner = element?.['#text'];
  return typeof inner === 'string' ? inner.trim() : inner === undefined ? undefined : String(inner);
}

function attribute(value: unknown, name: string): string | undefined {
  const found = node(value)?.[`@${name}`];
  return typeof found === 'string' ? found : undefined;
}

const MEMORY_UNITS: Record<string, number> = {
  b: 1,
  bytes: 1,
  kb: 1e3,
  k: 1024,
  kib: 1024,
  mb: 1e6,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  gb: 1e9,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  tb: 1e12,
  t: 1024 ** 4,
  tib: 1024 ** 4,
};

/** `<memory unit='KiB'>65536</memory>` in bytes (libvirt's default unit is KiB). */
function memoryBytes(value: unknown): number {
  const amount = Number(text(value) ?? '0');
  const unit = (attribute(value, 'unit') ?? 'KiB').toLowerCase();
  const factor = MEMORY_UNITS[unit];
  if (factor === undefined || !Number.isFinite(amount))
    throw new LibvirtError('operation-failed', `unknown memory amount ${JSON.stringify(text(value))} ${unit}`);
  return amount * factor;
}

/** A domain's definition from its XML (everything but the state). */
export type DomainDefinition = Omit<DomainInfo, 'state'>;

/** Parses domain XML (`virsh dumpxml`). */
export function parseDomainXml(document: string): DomainDefinition {
  const domain = node(xml.parse(document)['domain']);
  const name = text(domain?.['name']);
  const uuid = text(domain?.['uuid']);
  if (!domain || !name || !uuid) throw new LibvirtError('operation-failed', 'domain XML without <name> or <uuid>');
  const vcpu = domain['vcpu'];
  const disks: DomainDisk[] = [];
  for (const entry of (node(domain['devices'])?.['disk'] as unknown[] | undefined) ?? []) {
    const type = attribute(entry, 'type') ?? 'file';
    const source = node(entry)?.['source'];
    const sourcePath =
      type === 'block' ? attribute(source, 'dev') : type === 'dir' ? attribute(source, 'dir') : type === 'file' ? attribute(source, 'file') : undefined;
    const format = attribute(node(entry)?.['driver'], 'type');
    disks.push({
      target: attribute(node(entry)?.['target'], 'dev') ?? '',
      device: attribute(entry, 'device') ?? 'disk',
      type,
      ...(sourcePath ? { sourcePath } : {}),
      ...(format ? { format } : {}),
    });
  }
  const clone = cloneMetadataOf(document);
  return {
    name,
    uuid: uuid.toLowerCase(),
    ...(clone === undefined ? {} : { clone }),
    domainType: attribute(domain, 'type') ?? '',
    vcpus: Number(attribute(vcpu, 'current') ?? text(vcpu) ?? '0'),
    memoryBytes: memoryBytes(domain['memory']),
    disks,
  };
}

/** Parses `virsh domstate` output. */
export function parseDomainState(output: string): DomainState {
  const state = output.trim().split('\n')[0]?.trim() ?? '';
  return (DOMAIN_STATES as readonly string[]).includes(state) ? (state as DomainState) : 'no state';
}

/** Parses `virsh version --daemon` and `capabilities` output. */
export function parseHypervisorFacts(uri: string, version: string, capabilities: string): HypervisorFacts {
  const line = (label: string): string[] => new RegExp(`^${label}:\\s*(\\S+)\\s*(\\S*)`, 'm').exec(version)?.slice(1) ?? ['', ''];
  const [driver = ''] = line('Using API');
  const [, libraryVersion = ''] = line('Using library');
  const [hypervisorName = '', hypervisorVersion = ''] = line('Running hypervisor');
  const [daemonVersion = ''] = line('Running against daemon');
  const domainTypes = new Set<string>();
  const osTypes = new Set<string>();
  const guests = (node(xml.parse(capabilities)['capabilities'])?.['guest'] as unknown[] | undefined) ?? [];
  for (const guest of guests) {
    const osType = text(node(guest)?.['os_type']);
    if (osType) osTypes.add(osType);
    for (const domain of (node(node(guest)?.['arch'])?.['domain'] as unknown[] | undefined) ?? []) {
      const type = attribute(domain, 'type');
      if (type) domainTypes.add(type);
    }
  }
  return {
    uri: uri.trim(),
    driver,
    libraryVersion,
    ...(daemonVersion ? { daemonVersion } : {}),
    hypervisorName,
    hypervisorVersion,
    domainTypes: [...domainTypes].sort(),
    osTypes: [...osTypes].sort(),
  };
}

/**
 * Parses one line of `virsh event --all --loop`: `event 'lifecycle' for domain 'vm-1': Started Booted`.
 * Domain names may contain quotes; the shortest name that leaves a well-formed rest wins.
 */
export function parseEventLine(line: string): LibvirtEvent | undefined {
  const match = /^event '([^']+)' for domain '(.*?)'(?:: (.*))?$/.exec(line.trim());
  if (!match) return undefined;
  return { kind: 'domain', event: match[1]!, domain: match[2]!, detail: match[3] ?? '' };
}

/** Options of {@link VirshLibvirt}. */
export interface VirshLibvirtOptions {
  /** libvirt connection URI, for example "qemu:///system" or "test:///default". */
  readonly uri: string;
  /** Timeout of each virsh process. Default 30 s. */
  readonly timeoutMs?: number;
  /** Domains per batched virsh process in listDomains. Default 200 (keeps the command line far below 128 KiB). */
  readonly batchSize?: number;
  readonly log?: Logger;
  /** The virsh binary. Default "virsh". */
  readonly virsh?: string;
  /**
   * Where the domain XML for `virsh define` is written, a private directory per call removed after it (virsh
   * cannot read it from Node's stdin). Default the system's temp directory; the agent gives its image
   * directory's `.define`, which it empties when it starts (a process killed mid-define leaves its files).
   */
  readonly workDirectory?: string;
}

// virsh translates states and messages; the parsers and error mapping read the C locale.
const VIRSH_ENV = { LC_ALL: 'C', LANG: 'C' } as const;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** {@link Libvirt} through `virsh -c URI`. */
export class VirshLibvirt implements Libvirt {
  readonly uri: string;
  private readonly timeoutMs: number;
  private readonly batchSize: number;
  private readonly virsh: string;
  private readonly log: Logger | undefined;
  private readonly workDirectory: string;

  constructor(options: VirshLibvirtOptions) {
    this.uri = options.uri;
    this.workDirectory = options.workDirectory ?? tmpdir();
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.batchSize = options.batchSize ?? 200;
    this.virsh = options.virsh ?? 'virsh';
    this.log = options.log;
  }

  /** Runs one virsh command given as arguments (no virsh-side parsing at all). */
  private async run(args: readonly string[]): Promise<string> {
    try {
      return await runCommand(this.virsh, ['-q', '-c', this.uri, ...args], { timeoutMs: this.timeoutMs, env: VIRSH_ENV });
    } catch (error) {
      throw toLibvirtError(error);
    }
  }

  /**
   * Runs several commands in one virsh process and returns each command's stdout. virsh goes on after a
   * failed command (printing to stderr, which runCommand only hands over on failure) and exits with the
   * last command's status, so a failed command shows as an empty section. With `mustSucceed: false` a final
   * `echo` keeps the exit status 0; otherwise the last command's failure is thrown as a LibvirtError.
   */
  private async runBatch(commands: readonly (readonly string[])[], mustSucceed: boolean): Promise<string[]> {
    const nonce = randomBytes(8).toString('hex');
    // With -q, virsh's echo prints no newline: markers are found as plain strings.
    const marker = `@@cowherd-${nonce}@@`;
    const endMarker = `@@cowherd-${nonce}-end@@`;
    const all = [...commands.flatMap((command) => [['echo', marker], command]), ...(mustSucceed ? [] : [['echo', endMarker]])];
    const stdout = await this.run([virshCommandLine(all)]);
    if (!mustSucceed && !stdout.includes(endMarker)) throw new LibvirtError('operation-failed', 'virsh stopped in the middle of a batch');
    const parts = stdout.replace(endMarker, '').split(marker);
    parts.shift();
    while (parts.length < commands.length) parts.push('');
    return parts;
  }

  async listDomains(): Promise<DomainInfo[]> {
    const uuids = await this.listUuids();
    const domains: DomainInfo[] = [];
    const missing: string[] = [];
    for (let start = 0; start < uuids.length; start += this.batchSize) {
      const batch = uuids.slice(start, start + this.batchSize);
      const sections = await this.runBatch(
        batch.flatMap((uuid) => [
          ['domstate', '--domain', uuid],
          ['dumpxml', '--domain', uuid],
        ]),
        false,
      );
      batch.forEach((uuid, index) => {
        const state = sections[2 * index] ?? '';
        const document = sections[2 * index + 1] ?? '';
        if (document.trim() === '' || state.trim() === '') missing.push(uuid);
        else domains.push({ ...parseDomainXml(document), state: parseDomainState(state) });
      });
    }
    if (missing.length > 0) {
      // Usually undefined between `list` and `dumpxml`. But an empty section might also be a lost connection,
      // and leaving a live domain out of a full snapshot would delete its record: re-check each one.
      const still = new Set(await this.listUuids());
      for (const uuid of missing) {
        if (!still.has(uuid)) continue;
        try {
          domains.push(await this.domain(uuid));
        } catch (error) {
          if (!(error instanceof LibvirtError && error.kind === 'domain-not-found')) throw error;
        }
      }
      this.log?.debug({ missing }, 'domains vanished while listing');
    }
    return domains;
  }

  private async listUuids(): Promise<string[]> {
    return (await this.run(['list', '--all', '--uuid']))
      .split('\n')
      .map((line) => line.trim().toLowerCase())
      .filter((line) => UUID.test(line));
  }

  async domain(nameOrUuid: string): Promise<DomainInfo> {
    // dumpxml last: when the domain does not exist, its failure is virsh's exit status, with stderr.
    const [state = '', document = ''] = await this.runBatch(
      [
        ['domstate', '--domain', nameOrUuid],
        ['dumpxml', '--domain', nameOrUuid],
      ],
      true,
    );
    if (state.trim() === '' || document.trim() === '') {
      throw new LibvirtError('domain-not-found', `domain ${JSON.stringify(nameOrUuid)} changed while being read`);
    }
    return { ...parseDomainXml(document), state: parseDomainState(state) };
  }

  async domainXml(nameOrUuid: string): Promise<string> {
    return this.run(['dumpxml', '--domain', nameOrUuid]);
  }

  async domainsMany(namesOrUuids: readonly string[]): Promise<Array<DomainInfo | undefined>> {
    const domains: Array<DomainInfo | undefined> = [];
    for (let start = 0; start < namesOrUuids.length; start += this.batchSize) {
      const batch = namesOrUuids.slice(start, start + this.batchSize);
      const sections = await this.runBatch(
        batch.flatMap((id) => [
          ['domstate', '--domain', id],
          ['dumpxml', '--domain', id],
        ]),
        false,
      );
      batch.forEach((_id, index) => {
        const state = sections[2 * index] ?? '';
        const document = sections[2 * index + 1] ?? '';
        domains.push(document.trim() === '' || state.trim() === '' ? undefined : { ...parseDomainXml(document), state: parseDomainState(state) });
      });
    }
    return domains;
  }

  async redefineMany(documents: readonly string[]): Promise<string[]> {
    if (documents.length === 0) return [];
    const directory = await mkdtemp(join(this.workDirectory, 'cowherd-define-'));
    try {
      const entries = await Promise.all(
        documents.map(async (document, index) => {
          const file = join(directory, `domain-${index}.xml`);
          await writeFile(file, document, { mode: 0o600 });
          return { file, uuid: parseDomainXml(document).uuid };
        }),
      );
      const results: string[] = [];
      for (let start = 0; start < entries.length; start += this.batchSize) {
        const batch = entries.slice(start, start + this.batchSize);
        const sections = await this.runBatch(
          batch.flatMap(({ file, uuid }) => [
            ['define', '--file', file],
            ['dumpxml', '--inactive', '--domain', uuid],
          ]),
          false,
        );
        for (const [index] of batch.entries()) {
          const document = sections[2 * index + 1] ?? '';
          results.push(document.trim() === '' ? '' : document);
        }
      }
      return results;
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  }

  async inactiveXmlMany(uuids: readonly string[]): Promise<string[]> {
    const documents: string[] = [];
    for (let start = 0; start < uuids.length; start += this.batchSize) {
      const batch = uuids.slice(start, start + this.batchSize);
      const sections = await this.runBatch(
        batch.map((uuid) => ['dumpxml', '--inactive', '--domain', uuid]),
        false,
      );
      for (const [index] of batch.entries()) documents.push((sections[index] ?? '').trim() === '' ? '' : sections[index]!);
    }
    return documents;
  }

  async hypervisorFacts(): Promise<HypervisorFacts> {
    const [uri = '', version = '', capabilities = ''] = await this.runBatch([['uri'], ['version', '--daemon'], ['capabilities']], true);
    if (!version.trim() || !capabilities.trim()) throw new LibvirtError('operation-failed', 'virsh version or capabilities printed nothing');
    return parseHypervisorFacts(uri.trim() || this.uri, version, capabilities);
  }

  async watchEvents(onEvent: (event: LibvirtEvent) => void): Promise<EventWatch> {
    const marker = `@@cowherd-events-${randomBytes(8).toString('hex')}@@`;
    const start = (reconnecting: boolean): Promise<Daemon> =>
      // No -q here: with it, echo prints no newline and the first event would share the marker's line.
      startDaemon(this.virsh, ['-c', this.uri, `echo ${marker}; event --all --loop`], {
        readyPattern: new RegExp(marker),
        readyTimeoutMs: this.timeoutMs,
        env: VIRSH_ENV,
        // A killed agent must not leave its watcher behind (the restarted agent starts its own).
        dieWithParent: true,
        onLine: (line) => {
          // Announce a reconnection at the marker, in line order: before any event the new process prints.
          if (reconnecting && line.includes(marker)) onEvent({ kind: 'reconnected' });
          const rest = line.replace(marker, '');
          const event = parseEventLine(rest);
          if (event) onEvent(event);
          else if (rest.trim() !== '') this.log?.debug({ line: rest }, 'virsh event: unrecognized line');
        },
      });
    let stopped = false;
    let daemon = await start(false).catch((error: unknown) => {
      throw toLibvirtError(error);
    });
    let retryTimer: NodeJS.Timeout | undefined;
    let backoffMs = 500;
    const follow = (current: Daemon): void => {
      void current.exited.then((code) => {
        if (stopped) return;
        this.log?.warn({ code, output: current.output().slice(-500) }, 'virsh event exited; reconnecting');
        const reconnect = (): void => {
          retryTimer = undefined;
          if (stopped) return;
          start(true).then(
            (next) => {
              if (stopped) {
                void next.stop(1_000);
                return;
              }
              daemon = next;
              backoffMs = 500;
              follow(next);
            },
            (error: unknown) => {
              this.log?.warn({ err: error, retryInMs: backoffMs }, 'virsh event cannot connect');
              retryTimer = setTimeout(reconnect, backoffMs);
              backoffMs = Math.min(30_000, backoffMs * 2);
            },
          );
        };
        retryTimer = setTimeout(reconnect, backoffMs);
      });
    };
    follow(daemon);
    return {
      stop: async () => {
        stopped = true;
        clearTimeout(retryTimer);
        await daemon.stop(2_000);
      },
    };
  }

  async define(document: string): Promise<void> {
    // `virsh define /dev/stdin` fails from Node (stdin is a socketpair): go through a private temp file.
    const directory = await mkdtemp(join(this.workDirectory, 'cowherd-define-'));
    try {
      const file = join(directory, 'domain.xml');
      await writeFile(file, document, { mode: 0o600 });
      await this.run(['define', '--file', file]);
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  }

  async defineMany(documents: readonly string[]): Promise<Array<Error | undefined>> {
    if (documents.length === 0) return [];
    const directory = await mkdtemp(join(this.workDirectory, 'cowherd-define-'));
    try {
      const files = await Promise.all(
        documents.map(async (document, index) => {
          const file = join(directory, `domain-${index}.xml`);
          await writeFile(file, document, { mode: 0o600 });
          return file;
        }),
      );
      const results: Array<Error | undefined> = new Array(documents.length).fill(undefined);
      for (let start = 0; start < files.length; start += this.batchSize) {
        const batch = files.slice(start, start + this.batchSize);
        // virsh goes on after a failed define; which ones failed is read back from the domain list, and
        // each failure is then repeated alone to get its error.
        await this.runBatch(
          batch.map((file) => ['define', '--file', file]),
          false,
        );
      }
      const defined = new Set(
        (await this.run(['list', '--all', '--name']))
          .split('\n')
          .map((line) => line.trim())
          .filter((line) => line !== ''),
      );
      await Promise.all(
        documents.map(async (document, index) => {
          const name = parseDomainXml(document).name;
          if (defined.has(name)) return;
          results[index] = await this.run(['define', '--file', files[index]!]).then(
            () => undefined,
            (error: unknown) => error as Error,
          );
        }),
      );
      return results;
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  }

  async start(nameOrUuid: string): Promise<void> {
    await this.run(['start', '--domain', nameOrUuid]);
  }

  async destroy(nameOrUuid: string): Promise<void> {
    await this.run(['destroy', '--domain', nameOrUuid]);
  }

  async undefine(nameOrUuid: string): Promise<void> {
    await this.run(['undefine', '--domain', nameOrUuid]);
  }

  async shutdown(nameOrUuid: string): Promise<void> {
    await this.run(['shutdown', '--domain', nameOrUuid]);
  }

  async resume(nameOrUuid: string): Promise<void> {
    await this.run(['resume', '--domain', nameOrUuid]);
  }
}

function toLibvirtError(error: unknown): LibvirtError {
  if (error instanceof LibvirtError) return error;
  if (error instanceof CommandError) {
    // A batch repeats the same error once per failed command.
    const detail =
      [
        ...new Set(
          error.stderr
            .split('\n')
            .map((line) => line.trim())
            .filter((line) => line !== ''),
        ),
      ].join(' | ') || error.message;
    return new LibvirtError(classifyVirshError(error.stderr, error.timedOut), detail, error);
  }
  return new LibvirtError('operation-failed', (error as Error).message ?? String(error), error);
}

/** cowherd's clone record of a domain document; undefined when absent or unreadable (never fatal here). */
function cloneMetadataOf(document: string): CloneMetadata | undefined {
  if (!document.includes(CLONE_METADATA_NAMESPACE)) return undefined;
  try {
    return readCloneMetadata(document);
  } catch {
    return undefined;
  }
}
