/**
 * Resource names from what operators type: `kvm-01` or `hosts/kvm-01`, `debian-12` or `images/debian-12`,
 * an image version `debian-12/versions/3` or `images/debian-12/versions/stable` (number or alias),
 * `kvm-01/web-1` or `hosts/kvm-01/virtualMachines/web-1`, durations like `90s`, `10m`, `1h`, sizes like
 * `10G`, disk backends like `reflink-copy`. Malformed input is a usage error (exit 2) before any call.
 */
import { DiskBackend } from '../gen/cowherd/common/v1/types.js';
import type { Duration } from '../gen/google/protobuf/duration.js';
import {
  HOST_ID,
  HOST_NAME,
  IMAGE_ALIAS,
  IMAGE_ID,
  IMAGE_NAME,
  parseImageReference,
  VIRTUAL_MACHINE_ID,
  VIRTUAL_MACHINE_NAME,
} from '../common/domain/resource-names.js';
import { UsageError, type CommandSpec } from './command-line.js';

/** The words `--disk-backend` takes and the DiskBackend each names (`vms show` and `images show` print them too). */
export const DISK_BACKEND_WORDS: ReadonlyArray<readonly [string, DiskBackend]> = [
  ['qcow2-overlay', DiskBackend.DISK_BACKEND_QCOW2_OVERLAY],
  ['vhd-differencing', DiskBackend.DISK_BACKEND_VHD_DIFFERENCING],
  ['reflink-copy', DiskBackend.DISK_BACKEND_REFLINK_COPY],
];

/** A DiskBackend as the CLI words it (`reflink-copy`); `fallback` for UNSPECIFIED. */
export function diskBackendWord(backend: DiskBackend, fallback: string): string {
  return DISK_BACKEND_WORDS.find(([, known]) => known === backend)?.[0] ?? fallback;
}

/** Parses command arguments, reporting errors against `command`. */
export class ArgumentReader {
  constructor(private readonly command: readonly CommandSpec<never>[]) {}

  fail(message: string): never {
    throw new UsageError(message, this.command);
  }

  /** `reflink-copy`, `qcow2-overlay` or `vhd-differencing` -> its DiskBackend. */
  diskBackend(raw: string, what: string): DiskBackend {
    const found = DISK_BACKEND_WORDS.find(([word]) => word === raw);
    return found ? found[1] : this.fail(`${what} must be ${DISK_BACKEND_WORDS.map(([word]) => word).join(', ')}, got ${JSON.stringify(raw)}`);
  }

  /** `kvm-01` or `hosts/kvm-01` -> `hosts/kvm-01`. */
  host(raw: string, what = 'host'): string {
    const host = HOST_NAME.parse(raw)?.host ?? raw;
    if (!HOST_ID.test(host)) this.fail(`${what} ${JSON.stringify(raw)} is not a host id (lowercase letters, digits and dashes, like kvm-01)`);
    return HOST_NAME.format({ host });
  }

  /** `h1,h2` (or repeated) -> hosts/h1, hosts/h2, without duplicates. */
  hosts(raw: readonly string[], what = '--hosts'): string[] {
    const names = raw
      .flatMap((value) => value.split(','))
      .map((value) => value.trim())
      .filter((value) => value !== '');
    if (names.length === 0) this.fail(`${what} needs at least one host`);
    const hosts = names.map((name) => this.host(name, `${what} entry`));
    const duplicate = hosts.find((host, index) => hosts.indexOf(host) !== index);
    if (duplicate) this.fail(`${what} names ${duplicate} twice`);
    return hosts;
  }

  /** `debian-12` or `images/debian-12` -> `images/debian-12`. */
  image(raw: string, what = 'image'): string {
    return IMAGE_NAME.format({ image: this.imageId(IMAGE_NAME.parse(raw)?.image ?? raw, what) });
  }

  /**
   * An image or one of its versions, as the services take it from callers: `debian-12` or `images/debian-12`
   * (its latest version) -> `images/debian-12`; `debian-12/versions/3` or `images/debian-12/versions/stable`
   * (a number or an alias) -> `images/debian-12/versions/3`, `images/debian-12/versions/stable`.
   */
  imageOrVersion(raw: string, what = 'image'): string {
    const reference = parseImageReference(raw.startsWith('images/') ? raw : `images/${raw}`);
    if (!reference) {
      const id = raw.replace(/^images\//, '').split('/')[0]!;
      if (!IMAGE_ID.test(id)) this.imageId(id, what);
      this.fail(`${what} ${JSON.stringify(raw)} must be <image> or <image>/versions/<number|alias>, like debian-12 or debian-12/versions/3`);
    }
    if (reference.version !== undefined) return `images/${reference.id}/versions/${reference.version}`;
    return reference.alias === undefined || raw.replace(/^images\//, '') === reference.id
      ? `images/${reference.id}`
      : `images/${reference.id}/versions/${reference.alias}`;
  }

  /** An alias name (`stable`): a lowercase DNS label that does not start with a digit. */
  alias(raw: string, what = 'alias'): string {
    if (!IMAGE_ALIAS.test(raw))
      this.fail(`${what} ${JSON.stringify(raw)} is not an alias (lowercase letters, digits and dashes, starting with a letter, like stable)`);
    return raw;
  }

  /** `3` -> 3: a version number (1 to 999999999). */
  versionNumber(raw: string, what = 'version'): number {
    return this.integer(raw, what, 1, 999_999_999);
  }

  /** `10G`, `512M`, `1.5T`, `10GiB`, `4096` (bytes) -> bytes; binary units (K = 1024). */
  bytes(raw: string, what: string, min: number, max: number): number {
    const bytes = parseBytes(raw);
    if (bytes === undefined) this.fail(`${what} must be a size like 10G, 512M or 1T (binary units), got ${JSON.stringify(raw)}`);
    if (bytes < min || bytes > max) this.fail(`${what} must be from ${formatSize(min)} to ${formatSize(max)}, got ${JSON.stringify(raw)}`);
    return bytes;
  }

  /** A bare image id. */
  imageId(raw: string, what = 'image id'): string {
    if (!IMAGE_ID.test(raw)) this.fail(`${what} ${JSON.stringify(raw)} is not an image id (lowercase letters, digits and dashes, like debian-12)`);
    return raw;
  }

  /** `kvm-01/web-1` or `hosts/kvm-01/virtualMachines/web-1` -> the full name. */
  virtualMachine(raw: string, what = 'VM'): string {
    if (VIRTUAL_MACHINE_NAME.matches(raw)) return raw;
    // The short form: each id checked on its own, so that the message names the one that is wrong.
    const [host, vm, ...rest] = raw.split('/');
    if (host === undefined || vm === undefined || host === '' || vm === '' || rest.length > 0) {
      this.fail(`${what} ${JSON.stringify(raw)} must be <host>/<vm>, like kvm-01/web-1`);
    }
    if (!HOST_ID.test(host)) this.fail(`${what} ${JSON.stringify(raw)}: ${JSON.stringify(host)} is not a host id`);
    if (!VIRTUAL_MACHINE_ID.test(vm)) this.fail(`${what} ${JSON.stringify(raw)}: ${JSON.stringify(vm)} is not a VM name`);
    return VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: vm });
  }

  /** A positive integer within [min, max]. */
  integer(raw: string, what: string, min: number, max: number): number {
    if (!/^\d+$/.test(raw) || Number(raw) < min || Number(raw) > max)
      this.fail(`${what} must be a whole number from ${min} to ${max}, got ${JSON.stringify(raw)}`);
    return Number(raw);
  }

  /** `500ms`, `90s`, `10m`, `1h`, or plain seconds -> milliseconds. */
  durationMs(raw: string, what: string): number {
    const ms = parseDurationMs(raw);
    if (ms === undefined || ms <= 0) this.fail(`${what} must be a duration like 30s, 10m or 1h, got ${JSON.stringify(raw)}`);
    return ms;
  }

  /** `key=value` pairs -> a map. */
  labels(raw: readonly string[], what = '--label'): Record<string, string> {
    const labels: Record<string, string> = {};
    for (const pair of raw) {
      const equals = pair.indexOf('=');
      if (equals <= 0) this.fail(`${what} must be key=value, got ${JSON.stringify(pair)}`);
      labels[pair.slice(0, equals)] = pair.slice(equals + 1);
    }
    return labels;
  }
}

/** Milliseconds of `500ms`, `90s`, `10m`, `1h`, `1h30m` or plain seconds; undefined when malformed. */
export function parseDurationMs(raw: string): number | undefined {
  if (/^\d+(\.\d+)?$/.test(raw)) return Number(raw) * 1000;
  const parts = /^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$/.exec(raw);
  if (!parts || raw === '') return undefined;
  const [, hours, minutes, seconds, millis] = parts;
  return Number(hours ?? 0) * 3_600_000 + Number(minutes ?? 0) * 60_000 + Number(seconds ?? 0) * 1000 + Number(millis ?? 0);
}

const SIZE_UNITS: Readonly<Record<string, number>> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** Bytes of `10G`, `512M`, `1.5T`, `10GiB`, `10GB` (binary either way) or plain bytes; undefined when malformed or not whole. */
export function parseBytes(raw: string): number | undefined {
  const parts = /^(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?$/i.exec(raw.trim());
  if (!parts) return undefined;
  const bytes = Number(parts[1]) * SIZE_UNITS[(parts[2] ?? '').toUpperCase()]!;
  return Number.isSafeInteger(bytes) ? bytes : undefined;
}

/** 10737418240 -> "10G" when whole, else bytes; for messages about sizes. */
function formatSize(bytes: number): string {
  for (const unit of ['T', 'G', 'M', 'K'] as const)
    if (bytes >= SIZE_UNITS[unit]! && bytes % SIZE_UNITS[unit]! === 0) return `${bytes / SIZE_UNITS[unit]!}${unit}`;
  return `${bytes} bytes`;
}

/** A protobuf Duration from milliseconds. */
export function toDuration(ms: number): Duration {
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 };
}
