/**
 * The tiny guest that boot tests run under TCG (scripts/guest-kernel.sh): Debian's kernel as an uncompressed
 * vmlinux for direct kernel boot and a busybox initramfs whose /init writes a marker block to /dev/vda and
 * powers off. Built once per state directory and cached (the first build downloads the kernel package, ~70 MB).
 * When a clone has a NoCloud seed disk (label `cidata`), /init first mounts it and prints its identity on the
 * console: {@link guestIdentityLines} reads those lines back. A clone with a persistent data disk gets its "file"
 * there (block 0, `cowherd-data-<instance-id or marker>`, written on the first boot only), and every boot prints
 * which system its disk held (the marker its image's master wrote): {@link guestDataLine}, {@link guestSystemLine}.
 * With `cowherd.reads=<count>x<KiB>@<span MiB>` on the kernel command line ({@link guestReadsWord}), /init first
 * reads a fixed scattered set of blocks from /dev/vda ({@link guestReadOffsets}) and prints how long that took
 * ({@link guestReadsLine}).
 * The kit's stamp holds the script's hash, so a changed /init rebuilds the initramfs by itself.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { REPOSITORY } from './processes.js';

const run = promisify(execFile);

/** Where /init writes the marker block on /dev/vda (bytes); scripts/guest-kernel.sh's MARKER_OFFSET. */
export const MARKER_OFFSET = 1024 * 1024;
/** The size of the marker block: the text, then zeros. */
export const MARKER_BLOCK = 4096;

/** The files of the guest kit. */
export interface GuestKit {
  /** Uncompressed ELF kernel, booted through its PVH entry (`<os><kernel>`). */
  readonly kernel: string;
  /** gzip'd cpio initramfs (`<os><initrd>`). */
  readonly initrd: string;
  /** The same kernel as Debian ships it (bzImage), slower to boot under TCG. */
  readonly vmlinuz: string;
  /** The kernel release, e.g. "6.1.0-56-amd64". */
  readonly version: string;
}

let pending: Promise<GuestKit> | undefined;

/** Builds the kit if needed (idempotent, cached on disk and per process) and returns its paths. */
export function guestKit(options: { timeoutMs?: number } = {}): Promise<GuestKit> {
  pending ??= buildGuestKit(options.timeoutMs ?? 300_000).catch((error: unknown) => {
    pending = undefined;
    throw error;
  });
  return pending;
}

async function buildGuestKit(timeoutMs: number): Promise<GuestKit> {
  const { stdout } = await run('bash', [join(REPOSITORY, 'scripts/guest-kernel.sh')], {
    timeout: timeoutMs,
    maxBuffer: 16 * 1024 * 1024,
    env: { ...process.env, LC_ALL: 'C' },
  }).catch((error: unknown) => {
    const { stderr } = error as { stderr?: string };
    throw new Error(`scripts/guest-kernel.sh failed: ${(error as Error).message}${stderr ? `\n${stderr.slice(-4000)}` : ''}`, { cause: error });
  });
  const values = new Map<string, string>();
  for (const line of stdout.split('\n')) {
    const match = /^(COWHERD_GUEST_[A-Z]+)=(.*)$/.exec(line);
    if (match) values.set(match[1]!, match[2]!);
  }
  const value = (key: string): string => {
    const found = values.get(key);
    if (!found) throw new Error(`scripts/guest-kernel.sh printed no ${key}: ${stdout}`);
    return found;
  };
  return {
    kernel: value('COWHERD_GUEST_KERNEL'),
    initrd: value('COWHERD_GUEST_INITRD'),
    vmlinuz: value('COWHERD_GUEST_VMLINUZ'),
    version: value('COWHERD_GUEST_VERSION'),
  };
}

/** The block /init writes for `marker` (the `marker=` word of the kernel command line). */
export function markerBlock(marker: string): Buffer {
  const block = Buffer.alloc(MARKER_BLOCK);
  block.write(`cowherd-was-here-${marker}\n`, 'latin1');
  return block;
}

/** What /init printed of a clone's seed disk (scripts/guest-kernel.sh): undefined fields when it printed none. */
export interface GuestIdentityLines {
  readonly hostname?: string;
  readonly instanceId?: string;
  readonly seedFiles?: readonly string[];
  readonly userDataSha256?: string;
}

/** Reads the `cowherd-guest: hostname|instance-id|seed files|user-data sha256 ...` lines of a console log. */
export function guestIdentityLines(consoleOutput: string): GuestIdentityLines {
  const value = (key: string): string | undefined => new RegExp(`^cowherd-guest: ${key} (.*?)\\s*$`, 'm').exec(consoleOutput)?.[1];
  const files = value('seed files');
  const hostname = value('hostname');
  const instanceId = value('instance-id');
  const userDataSha256 = value('user-data sha256');
  return {
    ...(hostname === undefined ? {} : { hostname }),
    ...(instanceId === undefined ? {} : { instanceId }),
    ...(files === undefined ? {} : { seedFiles: files.split(/\s+/).filter((name) => name !== '') }),
    ...(userDataSha256 === undefined ? {} : { userDataSha256 }),
  };
}

/**
 * The text of the data disk's "file" that /init printed (`cowherd-guest: data <text>`); undefined without a data
 * disk. With several boots in one log, the last one's.
 */
export function guestDataLine(consoleOutput: string): string | undefined {
  return [...consoleOutput.matchAll(/^cowherd-guest: data (.*?)\s*$/gm)].at(-1)?.[1];
}

/**
 * What the system disk held at MARKER_OFFSET before this boot wrote (`cowherd-guest: system <text>`): for a clone,
 * `cowherd-was-here-<marker>` of its image version's master. With several boots in one log, the last one's.
 */
export function guestSystemLine(consoleOutput: string): string | undefined {
  const all = [...consoleOutput.matchAll(/^cowherd-guest: system (.*?)\s*$/gm)];
  return all.at(-1)?.[1];
}

/**
 * The scattered reads a boot makes before its marker (`cowherd.reads=<count>x<KiB>@<span MiB>`, scripts/
 * guest-kernel.sh): `count` blocks of `blockKib` KiB spread evenly over the first `spanMib` MiB of /dev/vda.
 */
export interface GuestReads {
  readonly count: number;
  readonly blockKib: number;
  readonly spanMib: number;
}

/** The kernel command line word for `reads`, e.g. `cowherd.reads=64x1024@1024`; throws when /init would refuse it. */
export function guestReadsWord(reads: GuestReads): string {
  checkGuestReads(reads);
  return `cowherd.reads=${reads.count}x${reads.blockKib}@${reads.spanMib}`;
}

/** Reads `<count>x<KiB>@<span MiB>` (with or without the `cowherd.reads=` prefix); throws on another form. */
export function parseGuestReads(text: string): GuestReads {
  const match = /^(?:cowherd\.reads=)?(\d+)x(\d+)@(\d+)$/.exec(text.trim());
  if (!match) throw new Error(`${JSON.stringify(text)} is not <count>x<KiB>@<span MiB>`);
  const reads = { count: Number(match[1]), blockKib: Number(match[2]), spanMib: Number(match[3]) };
  checkGuestReads(reads);
  return reads;
}

function checkGuestReads(reads: GuestReads): void {
  for (const [name, value] of Object.entries(reads))
    if (!Number.isSafeInteger(value) || value <= 0) throw new Error(`guest reads: ${name} must be a positive integer`);
  if (reads.count * reads.blockKib > reads.spanMib * 1024)
    throw new Error(`guest reads: ${reads.count} blocks of ${reads.blockKib} KiB do not fit in ${reads.spanMib} MiB`);
}

/**
 * The byte offsets /init reads, in the order it reads them (the same arithmetic as its `read_blocks`): block k
 * starts at k x floor(span x 1024 / count) KiB; the order is k = (j x stride) mod count, stride the first
 * integer from floor(count x 618 / 1000) (at least 1) that is coprime with count.
 */
export function guestReadOffsets(reads: GuestReads): number[] {
  checkGuestReads(reads);
  const spacingKib = Math.floor((reads.spanMib * 1024) / reads.count);
  const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));
  let stride = Math.max(1, Math.floor((reads.count * 618) / 1000));
  while (gcd(stride, reads.count) !== 1) stride++;
  return Array.from({ length: reads.count }, (_, j) => ((j * stride) % reads.count) * spacingKib * 1024);
}

/** What /init printed of its cowherd.reads= blocks. */
export interface GuestReadsLine {
  readonly count: number;
  readonly bytes: number;
  /** From the first read's start to the last one's end (10 ms steps: /proc/uptime). */
  readonly milliseconds: number;
  /** The slowest single block, when /init printed it. */
  readonly slowestMilliseconds?: number;
  /** Where the slowest block starts on /dev/vda (bytes). */
  readonly slowestOffset?: number;
}

/**
 * Reads `cowherd-guest: read <count> blocks <bytes> bytes in <ms> ms` (and `cowherd-guest: slowest read <ms> ms at
 * byte <offset>`) from a console log; undefined when the boot made no such reads (or has not finished them). With
 * several boots in one log, the last one's.
 */
export function guestReadsLine(consoleOutput: string): GuestReadsLine | undefined {
  const read = [...consoleOutput.matchAll(/^cowherd-guest: read (\d+) blocks (\d+) bytes in (\d+) ms\s*$/gm)].at(-1);
  if (read === undefined) return undefined;
  const slowest = /^cowherd-guest: slowest read (\d+) ms at byte (\d+)\s*$/m.exec(consoleOutput.slice(read.index));
  return {
    count: Number(read[1]),
    bytes: Number(read[2]),
    milliseconds: Number(read[3]),
    ...(slowest === null ? {} : { slowestMilliseconds: Number(slowest[1]), slowestOffset: Number(slowest[2]) }),
  };
}
