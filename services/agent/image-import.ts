/**
 * Importing a disk file into an immutable image replica (the agent's half of ImportImage before the torrent):
 * the same result as an export (image-export.ts), from a file instead of a powered-off VM. The input is a file
 * under the import directory (COWHERD_IMPORT_DIR) or an http(s) download; it is probed, converted to this
 * host's format, given a domain template, hashed and made read-only, all in the hidden work directory
 * `<image dir>/images/.<image>.partial-<random>` (the export's), renamed to `images/<image>` only when complete.
 * A failure or a cancel removes the work directory: nothing of a failed import stays, a wrong checksum
 * included.
 *
 * Decisions:
 * - Paths from callers are relative to the import directory and resolved once: no absolute path, no `.` or
 *   `..` segment, the real path (symlinks resolved) inside the import directory's real path, a regular file.
 *   The real path is what qemu-img reads, so a symlink swapped in after the check is not followed; a
 *   directory component swapped by someone who can write the import directory could still race the check,
 *   so the import directory is the admin's, like the image directory (root-owned, not world-writable).
 * - The format is probed from the content (`qemu-img info` without `-f`), never taken from the name, and only
 *   qcow2, raw, vmdk, vpc and vhdx are accepted. Anything that makes qemu-img open another file is refused:
 *   a backing file (qcow2, vmdk, vhdx), a qcow2 external data file, a vmdk whose extents are other files
 *   (monolithicFlat, split descriptors), a differencing VHD (qemu-img ignores its parent). Encrypted images
 *   are refused (no key to give). The probe runs under prlimit (1 GiB address space, 30 s CPU), as OpenStack
 *   probes uploaded images: qemu-img's parsers see untrusted bytes here.
 * - Downloads go to `download.part` in the work directory (the image directory's file system, so there is
 *   space for it and no copy afterwards), hashed (SHA-256) while they arrive, bounded by max_bytes, an overall
 *   timeout and a stall watchdog (no byte for `stallMs`), redirects followed by hand (at most 5, http(s)
 *   only). The digest is compared before the file is ever opened by qemu-img: a file that fails the checksum is
 *   never parsed.
 * - The conversion is the export's: qcow2 on KVM, VHD (vpc, dynamic, force_size) on Xen, zeros skipped, no
 *   compression, progress from the output's allocated blocks against `qemu-img measure`.
 */
import { createHash, randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { chmod, copyFile, lstat, mkdir, open, realpath, rename, rm, stat, statfs, writeFile } from 'node:fs/promises';
import { basename, isAbsolute, join, relative } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CommandError, runCommand } from '../common/platform/child-process.js';
import { CowherdError } from '../common/platform/errors.js';
import type { Logger } from '../common/platform/logger.js';
import { IMAGE_KEY, IMAGE_NAME } from '../common/domain/resource-names.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { DiskFormat } from '../gen/cowherd/common/v1/types.js';
import {
  ImageImportStage,
  ImportImageDomain_DiskBus,
  ImportImageDomain_Firmware,
  type ImportImageDomain,
} from '../gen/cowherd/distribution/v1/distribution_service.js';
import { ImageFile_Role } from '../gen/cowherd/inventory/v1/resources.js';
import { readVhdInfo, renderImportDomain, sanitizeDomainTemplate, type Libvirt } from './hypervisor/index.js';
import {
  exportLockKey,
  exportWorkDirectories,
  exportWorkDirectory,
  fsyncDirectory,
  hashAndSync,
  imagesDirectory,
  pathExists,
  removeTree,
  replicaDirectory,
  replicaFile,
  TEMPLATE_FILE,
} from './image-directory/index.js';
import type { ExportedImage, ExportedImageFile } from './image-export.js';

/** Where the disk comes from. */
export type ImportSource =
  | { readonly kind: 'path'; readonly path: string }
  | { readonly kind: 'url'; readonly uri: string; readonly sha256: string; readonly maxBytes: number };

/** The domain template: parameters to render, or the caller's XML to sanitize. */
export type ImportTemplate = { readonly kind: 'domain'; readonly domain: ImportImageDomain } | { readonly kind: 'xml'; readonly xml: string };

/** Progress of an import: the stage, the bytes of that stage, the download rate. */
export interface ImportProgress {
  readonly stage: ImageImportStage;
  readonly bytesDone: number;
  /** 0 while unknown (a download without Content-Length). */
  readonly bytesTotal: number;
  /** Bytes per second over the last few seconds (downloads; 0 otherwise). */
  readonly rateBytesPerSecond: number;
  /** The probed input format, once known. */
  readonly sourceFormat: string;
}

/** Download limits (agent configuration). */
export interface DownloadLimits {
  /** The most bytes a request may ask for (and the default when it asks for none). */
  readonly maxBytes: number;
  /** A download that receives nothing for this long fails. */
  readonly stallMs: number;
  /** A download that takes longer than this fails. */
  readonly timeoutMs: number;
}

/** Options of {@link importImage}. */
export interface ImportImageOptions {
  readonly libvirt: Pick<Libvirt, 'hypervisorFacts'>;
  readonly imageDirectory: string;
  /** COWHERD_IMPORT_DIR: the only place local files are imported from. */
  readonly importDirectory: string;
  readonly hypervisor: 'kvm' | 'xen';
  /** The image id (not `images/{id}`). */
  readonly image: string;
  readonly source: ImportSource;
  readonly template: ImportTemplate;
  readonly download: DownloadLimits;
  readonly onProgress?: (progress: ImportProgress) => void;
  /** Aborting kills qemu-img or the download and removes the work directory; the import throws CANCELLED. */
  readonly signal?: AbortSignal;
  readonly log?: Logger;
  /** Default 250 ms. */
  readonly progressIntervalMs?: number;
  /** Per qemu-img convert. Default 6 hours. */
  readonly convertTimeoutMs?: number;
  /** The HTTP client (tests give their own). Default: global fetch. */
  readonly fetch?: typeof fetch;
}

/** Input formats accepted, as qemu-img names them. */
export const IMPORT_FORMATS = ['qcow2', 'raw', 'vmdk', 'vpc', 'vhdx'] as const;
/** What {@link parseQemuImageInfo} returns. */
export interface ProbedImage {
  readonly format: (typeof IMPORT_FORMATS)[number];
  readonly virtualSizeBytes: number;
  readonly actualSizeBytes: number;
}

const DOWNLOAD_FILE = 'download.part';
const MAX_PATH_LENGTH = 1024;
const MAX_URL_LENGTH = 2048;
const MAX_DOMAIN_XML_BYTES = 1024 * 1024;
const MAX_REDIRECTS = 5;
const DEFAULT_CONVERT_TIMEOUT_MS = 6 * 60 * 60 * 1000;
const SHA256_HEX = /^[0-9a-f]{64}$/;
const PROBE_ADDRESS_SPACE_BYTES = 1024 * 1024 * 1024;
const PROBE_CPU_SECONDS = 30;
/** Target device names that make good file names ("vda.qcow2", as the export's). */
const SIMPLE_TARGET = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
/** Imports running in this process, by work-directory prefix, each with a promise that settles when it has cleaned up. */
const running = new Map<string, Promise<void>>();
/**
 * How long a second import of an id waits for a first one to end. When distribution's replica dies, its
 * stream ends and the agent cancels the import; the replica that takes the operation over asks again at once,
 * and must find the first import's cleanup done rather than fail on it.
 */
const RUNNING_IMPORT_WAIT_MS = 30_000;

// ---------------------------------------------------------------------------------------------------------
// Request checks (pure: unit-tested, and run before anything is touched)

/**
 * Checks a caller's path relative to the import directory, lexically: not empty, at most 1024 characters, not
 * absolute, no empty, `.` or `..` segment, no control characters. Returns it. Throws INVALID_ARGUMENT naming `field`.
 */
export function checkImportPath(value: string, field: string): string {
  if (typeof value !== 'string' || value === '') throw CowherdError.invalidArgument(field, 'is required: a path relative to the import directory');
  if (value.length > MAX_PATH_LENGTH) throw CowherdError.invalidArgument(field, `must be at most ${MAX_PATH_LENGTH} characters`);
  if (/[\u0000-\u001f\u007f]/.test(value)) throw CowherdError.invalidArgument(field, 'must not contain control characters');
  if (value.startsWith('/') || isAbsolute(value)) throw CowherdError.invalidArgument(field, 'must be relative to the import directory, not absolute');
  if (value.split('/').some((segment) => segment === '' || segment === '.' || segment === '..'))
    throw CowherdError.invalidArgument(field, 'must not contain "..", "." or empty path segments');
  return value;
}

/** Checks a download URL: http(s), no credentials, at most 2048 characters. Throws INVALID_ARGUMENT naming `url.uri`. */
export function checkImportUrl(value: string): URL {
  if (typeof value !== 'string' || value === '') throw CowherdError.invalidArgument('url.uri', 'is required');
  if (value.length > MAX_URL_LENGTH) throw CowherdError.invalidArgument('url.uri', `must be at most ${MAX_URL_LENGTH} characters`);
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw CowherdError.invalidArgument('url.uri', 'is not a URL');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw CowherdError.invalidArgument('url.uri', 'must be an http:// or https:// URL');
  if (url.username !== '' || url.password !== '') throw CowherdError.invalidArgument('url.uri', 'must not carry a user name or password');
  return url;
}

/** Checks an expected SHA-256 (64 hex digits, any case); returns it in lowercase. */
export function checkSha256(value: string): string {
  const lower = typeof value === 'string' ? value.toLowerCase() : '';
  if (!SHA256_HEX.test(lower)) throw CowherdError.invalidArgument('url.sha256', 'must be the SHA-256 of the file: 64 hex digits');
  return lower;
}

/** The URL as logs and metadata may show it: no query or fragment (they may hold tokens). */
export function displayUrl(value: string): string {
  try {
    const url = new URL(value);
    return `${url.protocol}//${url.host}${url.pathname}`;
  } catch {
    return '';
  }
}

/**
 * Resolves a checked import path to the real path of a regular file inside the import directory. Throws
 * NOT_FOUND when nothing is there, INVALID_ARGUMENT naming `field` for a path that leaves the import
 * directory through a symbolic link or is not a regular file.
 */
export async function resolveImportFile(importDirectory: string, value: string, field: string): Promise<{ path: string; sizeBytes: number }> {
  checkImportPath(value, field);
  const realDirectory = await realpath(importDirectory).catch((error: unknown) => {
    throw new CowherdError(GrpcStatus.FAILED_PRECONDITION, `the import directory ${importDirectory} cannot be read on this host`, {
      reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
      cause: error,
    });
  });
  let real: string;
  try {
    real = await realpath(join(realDirectory, value));
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      // A dangling symlink is as much an escape as a resolving one; anything else is simply missing.
      const entry = await lstat(join(realDirectory, value)).catch(() => undefined);
      if (entry?.isSymbolicLink()) throw CowherdError.invalidArgument(field, 'is a symbolic link that leads nowhere inside the import directory');
      throw new CowherdError(GrpcStatus.NOT_FOUND, `${field} ${value} not found in the import directory`, {
        reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND,
        field,
        metadata: { resource: value },
      });
    }
    if (code === 'ELOOP') throw CowherdError.invalidArgument(field, 'has too many levels of symbolic links');
    throw CowherdError.invalidArgument(field, `cannot be resolved: ${(error as Error).message}`);
  }
  const inside = relative(realDirectory, real);
  if (inside === '' || inside.startsWith('..') || isAbsolute(inside))
    throw CowherdError.invalidArgument(field, 'leads out of the import directory through a symbolic link');
  const info = await stat(real);
  if (!info.isFile()) throw CowherdError.invalidArgument(field, 'is not a regular file');
  return { path: real, sizeBytes: info.size };
}

/**
 * Reads `qemu-img info --output=json` of an input file and refuses what cowherd cannot import safely (see the
 * module comment). `field` names the source in errors (INVALID_ARGUMENT). `file` is the probed file's path,
 * which vmdk extents must all be.
 */
export function parseQemuImageInfo(json: string, field: string, file: string): ProbedImage {
  let info: Record<string, unknown>;
  try {
    info = JSON.parse(json) as Record<string, unknown>;
  } catch {
    throw CowherdError.invalidArgument(field, 'could not be probed: qemu-img printed no JSON');
  }
  const format = typeof info['format'] === 'string' ? info['format'] : '';
  if (!(IMPORT_FORMATS as readonly string[]).includes(format))
    throw CowherdError.invalidArgument(field, `is a ${format || 'unknown'} file; cowherd imports ${IMPORT_FORMATS.join(', ')}`);
  if (info['backing-filename'] !== undefined || info['full-backing-filename'] !== undefined || info['backing-filename-format'] !== undefined)
    throw CowherdError.invalidArgument(field, `has a backing file (${String(info['backing-filename'] ?? '')}); import a flattened image`);
  if (info['encrypted'] === true) throw CowherdError.invalidArgument(field, 'is encrypted');
  const virtualSize = info['virtual-size'];
  if (typeof virtualSize !== 'number' || !Number.isSafeInteger(virtualSize) || virtualSize <= 0)
    throw CowherdError.invalidArgument(field, 'has no virtual size qemu-img can read');
  const specific = (info['format-specific'] as { type?: string; data?: Record<string, unknown> } | undefined)?.data ?? {};
  if (format === 'qcow2' && specific['data-file'] !== undefined) throw CowherdError.invalidArgument(field, 'is a qcow2 image with an external data file');
  if (format === 'vmdk') {
    const extents = Array.isArray(specific['extents']) ? (specific['extents'] as Array<{ filename?: unknown }>) : [];
    if (extents.some((extent) => extent.filename !== file))
      throw CowherdError.invalidArgument(
        field,
        'is a vmdk whose data lives in other files (extents); import a single-file (monolithicSparse or streamOptimized) vmdk',
      );
  }
  const actualSize = info['actual-size'];
  return { format: format as ProbedImage['format'], virtualSizeBytes: virtualSize, actualSizeBytes: typeof actualSize === 'number' ? actualSize : virtualSize };
}

// ---------------------------------------------------------------------------------------------------------
// The import

/**
 * Imports the disk of `source` as image `image` on this host. Throws CowherdError (see
 * DistributionService.ImportImage in the proto for the codes); nothing is left behind on failure.
 */
export async function importImage(options: ImportImageOptions): Promise<ExportedImage> {
  const { image } = options;
  if (typeof image !== 'string' || !IMAGE_KEY.test(image))
    throw CowherdError.invalidArgument('image', `must be an image storage key matching ${IMAGE_KEY.source}`);
  const sourceField = options.source.kind === 'path' ? 'import_path' : 'url.uri';
  // Request checks first: nothing is touched for a bad request.
  if (options.source.kind === 'path') checkImportPath(options.source.path, 'import_path');
  else {
    checkImportUrl(options.source.uri);
    checkSha256(options.source.sha256);
    if (!(options.source.maxBytes >= 0)) throw CowherdError.invalidArgument('url.max_bytes', 'must not be negative');
    if (options.source.maxBytes > options.download.maxBytes)
      throw CowherdError.invalidArgument('url.max_bytes', `must be at most ${options.download.maxBytes} on this host (COWHERD_IMPORT_MAX_BYTES)`);
  }
  if (options.template.kind === 'xml' && Buffer.byteLength(options.template.xml) > MAX_DOMAIN_XML_BYTES)
    throw CowherdError.invalidArgument('domain_xml', 'must be at most 1 MiB');

  const imagesRoot = imagesDirectory(options.imageDirectory);
  const finalDirectory = replicaDirectory(options.imageDirectory, image);
  const lockKey = exportLockKey(options.imageDirectory, image);
  const earlier = running.get(lockKey);
  if (earlier) {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([earlier, new Promise<void>((resolve) => (timer = setTimeout(resolve, RUNNING_IMPORT_WAIT_MS)))]);
    clearTimeout(timer);
    if (running.has(lockKey)) throw alreadyExists(image, 'an import of this image is running on this host');
  }
  let release!: () => void;
  running.set(
    lockKey,
    new Promise<void>((resolve) => {
      release = resolve;
    }),
  );
  let workDirectory: string | undefined;
  let sourceFormat = '';
  try {
    throwIfAborted(options.signal);
    await mkdir(imagesRoot, { recursive: true });
    if (await pathExists(finalDirectory)) throw alreadyExists(image, `${finalDirectory} already exists`);
    for (const stale of await exportWorkDirectories(options.imageDirectory, image)) {
      options.log?.warn({ image, directory: basename(stale) }, 'removing the work directory of an interrupted export or import');
      await removeTree(stale);
    }
    const targetFormat = options.hypervisor === 'xen' ? 'vpc' : 'qcow2';
    const progress = new ProgressReporter(options.onProgress, options.progressIntervalMs ?? 250);

    // A local file is resolved (and refused) before anything is made.
    const local = options.source.kind === 'path' ? await resolveImportFile(options.importDirectory, options.source.path, 'import_path') : undefined;

    workDirectory = exportWorkDirectory(options.imageDirectory, image, randomBytes(6).toString('hex'));
    await mkdir(workDirectory, { mode: 0o700 });
    const work = workDirectory;

    let input: string;
    if (options.source.kind === 'url') {
      input = replicaFile(work, DOWNLOAD_FILE);
      progress.start(ImageImportStage.IMAGE_IMPORT_STAGE_DOWNLOADING, 0);
      await download(options.source, input, {
        limits: options.download,
        fetch: options.fetch ?? fetch,
        signal: options.signal,
        freeBytes: () => freeBytesOf(imagesRoot),
        onBytes: (done, total) => progress.update(done, total),
      });
      progress.finish();
    } else input = local!.path;

    // Probe: the content decides the format.
    const probed = await probe(input, sourceField, options.signal);
    sourceFormat = probed.format;
    progress.sourceFormat = sourceFormat;
    if (probed.format === 'vpc') {
      const vhd = await readVhdInfo(input).catch((error: unknown) => {
        throw CowherdError.invalidArgument(sourceField, `is not a readable VHD: ${(error as Error).message}`);
      });
      if (vhd.diskType === 'differencing') throw CowherdError.invalidArgument(sourceField, 'is a differencing VHD; import a flattened (dynamic or fixed) VHD');
    }

    // The template (needs the disk's file name, nothing of the conversion).
    const template = await buildTemplate(options, targetFormat, work);
    const disk = template.disk;
    const output = replicaFile(work, disk.fileName);

    // CONVERTING.
    const estimatedBytes = await estimate(input, probed, targetFormat);
    const freeBytes = await freeBytesOf(imagesRoot);
    const needed = estimatedBytes + template.bootFiles.reduce((sum, file) => sum + file.sizeBytes, 0);
    if (freeBytes < needed) throw insufficientSpace(needed, freeBytes, imagesRoot);
    progress.start(ImageImportStage.IMAGE_IMPORT_STAGE_CONVERTING, estimatedBytes);
    let converting = true;
    const poll = setInterval(
      () => void allocatedBytes(output).then((bytes) => converting && progress.update(Math.min(bytes, estimatedBytes))),
      Math.max(50, options.progressIntervalMs ?? 250),
    );
    try {
      await convert(input, probed.format, output, targetFormat, sourceField, options);
    } finally {
      converting = false;
      clearInterval(poll);
    }
    if (options.source.kind === 'url') await rm(input, { force: true });
    for (const bootFile of template.bootFiles) {
      throwIfAborted(options.signal);
      await copyFile(bootFile.sourcePath, replicaFile(work, bootFile.fileName), fsConstants.COPYFILE_EXCL);
    }
    await writeFile(replicaFile(work, TEMPLATE_FILE), template.xml, { flag: 'wx', mode: 0o644 });
    progress.finish();

    // HASHING (and fsync), then read-only.
    const fileNames = [disk.fileName, ...template.bootFiles.map((file) => file.fileName), TEMPLATE_FILE];
    const sizes = await Promise.all(fileNames.map(async (name) => (await stat(replicaFile(work, name))).size));
    const totalBytes = sizes.reduce((sum, size) => sum + size, 0);
    progress.start(ImageImportStage.IMAGE_IMPORT_STAGE_HASHING, totalBytes);
    let hashedBytes = 0;
    const hashes: string[] = [];
    for (const name of fileNames) {
      hashes.push(
        await hashAndSync(
          replicaFile(work, name),
          () => throwIfAborted(options.signal),
          (bytes) => {
            hashedBytes += bytes;
            progress.update(hashedBytes);
          },
        ),
      );
    }
    progress.finish();
    const virtualSize = await outputVirtualSize(output, targetFormat);
    for (const name of fileNames) await chmod(replicaFile(work, name), 0o444);
    await chmod(work, 0o555);

    throwIfAborted(options.signal);
    await rename(work, finalDirectory).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOTEMPTY' || error.code === 'EEXIST') throw alreadyExists(image, `${finalDirectory} appeared during the import`);
      throw error;
    });
    workDirectory = undefined;
    await fsyncDirectory(imagesRoot);

    const files: ExportedImageFile[] = [
      {
        path: disk.fileName,
        role: ImageFile_Role.ROLE_DISK,
        format: targetFormat === 'vpc' ? DiskFormat.DISK_FORMAT_VHD : DiskFormat.DISK_FORMAT_QCOW2,
        sizeBytes: sizes[0]!,
        sha256: hashes[0]!,
        virtualSizeBytes: virtualSize,
        targetDevice: disk.target,
      },
      ...template.bootFiles.map((file, index) => ({
        path: file.fileName,
        role: ImageFile_Role.ROLE_UNSPECIFIED,
        format: DiskFormat.DISK_FORMAT_UNSPECIFIED,
        sizeBytes: sizes[1 + index]!,
        sha256: hashes[1 + index]!,
        virtualSizeBytes: 0,
        targetDevice: '',
        bootFile: file.element,
      })),
      {
        path: TEMPLATE_FILE,
        role: ImageFile_Role.ROLE_DOMAIN_TEMPLATE,
        format: DiskFormat.DISK_FORMAT_UNSPECIFIED,
        sizeBytes: sizes[fileNames.length - 1]!,
        sha256: hashes[fileNames.length - 1]!,
        virtualSizeBytes: 0,
        targetDevice: '',
      },
    ];
    options.log?.info(
      { image, source: options.source.kind === 'path' ? options.source.path : displayUrl(options.source.uri), sourceFormat, files: files.length, totalBytes },
      'image imported',
    );
    return { directory: finalDirectory, files, domainTemplate: template.xml, domainType: template.domainType, totalBytes };
  } catch (error) {
    if (workDirectory !== undefined)
      await removeTree(workDirectory).catch((cleanupError: unknown) =>
        options.log?.error({ err: cleanupError, workDirectory }, 'import: removing the work directory failed'),
      );
    if (options.signal?.aborted && !(error instanceof CowherdError && error.code === GrpcStatus.CANCELLED)) throw cancelled(error);
    throw error;
  } finally {
    running.delete(lockKey);
    release();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Template

interface ImportTemplateResult {
  readonly xml: string;
  readonly domainType: string;
  readonly disk: { readonly target: string; readonly fileName: string };
  readonly bootFiles: readonly { element: 'kernel' | 'initrd' | 'dtb'; sourcePath: string; fileName: string; sizeBytes: number }[];
}

/** The domain template, rendered or the caller's, through the sanitizer every published template passes. */
async function buildTemplate(options: ImportImageOptions, targetFormat: 'qcow2' | 'vpc', work: string): Promise<ImportTemplateResult> {
  const extension = targetFormat === 'vpc' ? 'vhd' : 'qcow2';
  const diskFileName = ({ index, target }: { index: number; target: string }) => `${SIMPLE_TARGET.test(target) ? target : `disk-${index}`}.${extension}`;
  let xml: string;
  let field: string;
  const bootPaths = new Map<string, string>();
  if (options.template.kind === 'domain') {
    field = 'domain';
    const domain = options.template.domain;
    const domainType = options.hypervisor === 'xen' ? 'xen' : await kvmDomainType(options.libvirt);
    // Boot files are import paths; the rendered XML names them by their real paths, which the sanitizer turns into file names.
    const kernel = domain.kernelPath === '' ? undefined : await resolveImportFile(options.importDirectory, domain.kernelPath, 'domain.kernel_path');
    const initrd = domain.initrdPath === '' ? undefined : await resolveImportFile(options.importDirectory, domain.initrdPath, 'domain.initrd_path');
    if (kernel) bootPaths.set(kernel.path, kernel.path);
    if (initrd) bootPaths.set(initrd.path, initrd.path);
    const network = domain.network === '' ? 'default' : domain.network;
    xml = renderImportDomain({
      domainType,
      vcpus: domain.vcpus === 0 ? 1 : domain.vcpus,
      memoryMib: Number(domain.memoryMib) === 0 ? 1024 : Number(domain.memoryMib),
      firmware: domain.firmware === ImportImageDomain_Firmware.FIRMWARE_UEFI ? 'uefi' : 'bios',
      diskBus: diskBusOf(domain.diskBus, options.hypervisor),
      diskPath: join(work, 'disk'),
      diskFormat: targetFormat,
      ...(network === 'none' ? {} : { network }),
      ...(kernel ? { kernelPath: kernel.path } : {}),
      ...(initrd ? { initrdPath: initrd.path } : {}),
      ...(domain.kernelCommandLine === '' ? {} : { kernelCommandLine: domain.kernelCommandLine }),
    });
  } else {
    field = 'domain_xml';
    xml = options.template.xml;
  }
  let sanitized: ReturnType<typeof sanitizeDomainTemplate>;
  try {
    sanitized = sanitizeDomainTemplate(xml, { diskFileName, imageFormat: targetFormat });
  } catch (error) {
    // The sanitizer's INVALID_ARGUMENT names its own fields; for the caller, the field is the XML.
    if (error instanceof CowherdError && error.code === GrpcStatus.INVALID_ARGUMENT)
      throw CowherdError.invalidArgument(field, error.message, error.reason, error);
    throw error;
  }
  const allowedTypes = options.hypervisor === 'xen' ? ['xen'] : ['kvm', 'qemu'];
  if (!allowedTypes.includes(sanitized.domainType))
    throw CowherdError.invalidArgument(
      field,
      `is a ${sanitized.domainType} domain; this host takes ${allowedTypes.join(' or ')} domains`,
      ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
    );
  if (sanitized.disks.length !== 1)
    throw CowherdError.invalidArgument(field, `must have exactly one file disk with a source (the imported disk), not ${sanitized.disks.length}`);
  const bootFiles: ImportTemplateResult['bootFiles'][number][] = [];
  for (const bootFile of sanitized.bootFiles) {
    if (bootFile.element === 'dtb' && field === 'domain') continue;
    // Caller XML names boot files relative to the import directory, like import_path.
    const resolved =
      field === 'domain' && bootPaths.has(bootFile.sourcePath)
        ? { path: bootFile.sourcePath, sizeBytes: (await stat(bootFile.sourcePath)).size }
        : await resolveImportFile(options.importDirectory, bootFile.sourcePath, `${field}: <${bootFile.element}>`);
    bootFiles.push({ element: bootFile.element, sourcePath: resolved.path, fileName: bootFile.fileName, sizeBytes: resolved.sizeBytes });
  }
  return {
    xml: sanitized.xml,
    domainType: sanitized.domainType,
    disk: { target: sanitized.disks[0]!.target, fileName: sanitized.disks[0]!.fileName },
    bootFiles,
  };
}

function diskBusOf(bus: ImportImageDomain_DiskBus, hypervisor: 'kvm' | 'xen'): 'virtio' | 'sata' | 'ide' | 'xen' {
  switch (bus) {
    case ImportImageDomain_DiskBus.DISK_BUS_VIRTIO:
      return 'virtio';
    case ImportImageDomain_DiskBus.DISK_BUS_SATA:
      return 'sata';
    case ImportImageDomain_DiskBus.DISK_BUS_IDE:
      return 'ide';
    case ImportImageDomain_DiskBus.DISK_BUS_UNSPECIFIED:
      return hypervisor === 'xen' ? 'xen' : 'virtio';
    default:
      throw CowherdError.invalidArgument('domain.disk_bus', 'is not a known bus');
  }
}

/** "kvm" when libvirt offers it on this host, else "qemu" (TCG): a template of a type the host lacks cannot be defined. */
async function kvmDomainType(libvirt: Pick<Libvirt, 'hypervisorFacts'>): Promise<'kvm' | 'qemu'> {
  const facts = await libvirt.hypervisorFacts().catch(() => undefined);
  return facts?.domainTypes.includes('kvm') ? 'kvm' : 'qemu';
}

// ---------------------------------------------------------------------------------------------------------
// Download

interface DownloadOptions {
  readonly limits: DownloadLimits;
  readonly fetch: typeof fetch;
  readonly signal: AbortSignal | undefined;
  readonly freeBytes: () => Promise<number>;
  readonly onBytes: (done: number, total: number) => void;
}

/** Streams `source` into `file` (created, 0600), hashing on the way; throws after removing nothing (the caller removes the work directory). */
async function download(source: Extract<ImportSource, { kind: 'url' }>, file: string, options: DownloadOptions): Promise<void> {
  const maxBytes = source.maxBytes > 0 ? source.maxBytes : options.limits.maxBytes;
  const expected = checkSha256(source.sha256);
  const shown = displayUrl(source.uri);
  const controller = new AbortController();
  let why: CowherdError | undefined;
  const abort = (error: CowherdError) => {
    why ??= error;
    controller.abort(error);
  };
  const onCallerAbort = () => abort(cancelled(options.signal?.reason));
  options.signal?.addEventListener('abort', onCallerAbort, { once: true });
  if (options.signal?.aborted) onCallerAbort();
  const overall = setTimeout(
    () => abort(transferFailed(`${shown}: the download took longer than ${Math.round(options.limits.timeoutMs / 1000)} s`)),
    options.limits.timeoutMs,
  );
  let stall: NodeJS.Timeout | undefined;
  const armStall = () => {
    clearTimeout(stall);
    stall = setTimeout(() => abort(transferFailed(`${shown}: no data for ${Math.round(options.limits.stallMs / 1000)} s`)), options.limits.stallMs);
  };
  try {
    armStall();
    let url = checkImportUrl(source.uri);
    let response: Response;
    for (let hops = 0; ; hops += 1) {
      response = await options.fetch(url, { redirect: 'manual', signal: controller.signal, headers: { 'accept-encoding': 'identity' } });
      if (![301, 302, 303, 307, 308].includes(response.status)) break;
      await response.body?.cancel().catch(() => undefined);
      const location = response.headers.get('location');
      if (!location || hops >= MAX_REDIRECTS)
        throw transferFailed(`${shown}: ${location ? `more than ${MAX_REDIRECTS} redirects` : 'a redirect without a Location'}`);
      const next = new URL(location, url);
      if (next.protocol !== 'http:' && next.protocol !== 'https:') throw transferFailed(`${shown}: redirected to a ${next.protocol} URL`);
      url = next;
    }
    if (!response.ok || !response.body) throw transferFailed(`${shown}: HTTP ${response.status} ${response.statusText}`.trim());
    const lengthHeader = response.headers.get('content-length');
    const length = lengthHeader !== null && /^\d+$/.test(lengthHeader) ? Number(lengthHeader) : 0;
    if (length > maxBytes) throw tooLarge(shown, maxBytes);
    if (length > 0) {
      const free = await options.freeBytes();
      if (free < length) throw insufficientSpace(length, free, file);
    }
    const hash = createHash('sha256');
    const handle = await open(file, 'wx', 0o600);
    let received = 0;
    try {
      for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
        armStall();
        received += chunk.byteLength;
        if (received > maxBytes) throw tooLarge(shown, maxBytes);
        hash.update(chunk);
        await handle.write(chunk);
        options.onBytes(received, length);
      }
      await handle.sync();
    } finally {
      await handle.close();
    }
    if (length > 0 && received !== length) throw transferFailed(`${shown}: the response ended after ${received} of ${length} bytes`);
    const actual = hash.digest('hex');
    if (actual !== expected) {
      throw new CowherdError(GrpcStatus.DATA_LOSS, `${shown}: the download's SHA-256 is ${actual}, not the expected ${expected}; nothing was kept`, {
        reason: ErrorReason.ERROR_REASON_VERIFICATION_FAILED,
        field: 'url.sha256',
        metadata: { expectedSha256: expected, actualSha256: actual, url: shown },
      });
    }
  } catch (error) {
    if (why) throw why;
    if (error instanceof CowherdError) throw error;
    if ((error as NodeJS.ErrnoException).code === 'ENOSPC') throw insufficientSpace(0, 0, file);
    throw transferFailed(`${shown}: ${describeFetchError(error)}`, error);
  } finally {
    clearTimeout(overall);
    clearTimeout(stall);
    options.signal?.removeEventListener('abort', onCallerAbort);
  }
}

function describeFetchError(error: unknown): string {
  const cause = (error as { cause?: { code?: string; message?: string } })?.cause;
  return cause?.code ?? cause?.message ?? (error as Error)?.message ?? String(error);
}

// ---------------------------------------------------------------------------------------------------------
// qemu-img

async function qemuImg(args: readonly string[], options: { timeoutMs?: number; signal?: AbortSignal | undefined } = {}): Promise<string> {
  return runCommand('qemu-img', args, { timeoutMs: options.timeoutMs ?? 60_000, env: { LC_ALL: 'C' }, ...(options.signal ? { signal: options.signal } : {}) });
}

/**
 * `qemu-img info` without `-f`: the content decides. The file is untrusted, so the parser runs under limits
 * (1 GiB of address space, 30 s of CPU, as OpenStack runs it on uploaded images): a crafted header that makes
 * qemu-img allocate or loop without end fails the probe instead of the host.
 */
async function probe(file: string, field: string, signal: AbortSignal | undefined): Promise<ProbedImage> {
  let json: string;
  try {
    json = await runCommand(
      'prlimit',
      [`--as=${PROBE_ADDRESS_SPACE_BYTES}`, `--cpu=${PROBE_CPU_SECONDS}`, '--', 'qemu-img', 'info', '--output=json', '--', file],
      {
        timeoutMs: 60_000,
        env: { LC_ALL: 'C' },
        ...(signal ? { signal } : {}),
      },
    );
  } catch (error) {
    throwIfAborted(signal, error);
    const detail = error instanceof CommandError ? (error.stderr.trim().split('\n').pop() ?? error.message) : (error as Error).message;
    throw CowherdError.invalidArgument(field, `cannot be read as a disk image: ${detail}`, ErrorReason.ERROR_REASON_INVALID_FIELD, error);
  }
  return parseQemuImageInfo(json, field, file);
}

/** The converted file's expected size (progress and the space check). */
async function estimate(file: string, probed: ProbedImage, targetFormat: 'qcow2' | 'vpc'): Promise<number> {
  if (targetFormat === 'qcow2') {
    try {
      const measured = JSON.parse(await qemuImg(['measure', '--output=json', '-f', probed.format, '-O', 'qcow2', '--', file])) as { required?: number };
      if (typeof measured.required === 'number') return Math.max(1, measured.required);
    } catch {
      // measure knows every input format qemu-img reads; if it fails anyway, the allocated size will do.
    }
  }
  return Math.max(1, Math.min(probed.actualSizeBytes, probed.virtualSizeBytes) + 2 * 1024 * 1024);
}

async function convert(
  input: string,
  format: string,
  output: string,
  targetFormat: 'qcow2' | 'vpc',
  field: string,
  options: ImportImageOptions,
): Promise<void> {
  throwIfAborted(options.signal);
  const outputOptions = targetFormat === 'vpc' ? ['-o', 'subformat=dynamic,force_size=on'] : [];
  try {
    await qemuImg(['convert', '-f', format, '-O', targetFormat, ...outputOptions, '--', input, output], {
      timeoutMs: options.convertTimeoutMs ?? DEFAULT_CONVERT_TIMEOUT_MS,
      signal: options.signal,
    });
  } catch (error) {
    throwIfAborted(options.signal, error);
    const stderr = error instanceof CommandError ? error.stderr : String((error as Error)?.message ?? error);
    if (/No space left/i.test(stderr)) throw insufficientSpace(0, 0, output);
    throw CowherdError.invalidArgument(
      field,
      `could not be converted: ${stderr.trim().split('\n').pop() ?? ''}`,
      ErrorReason.ERROR_REASON_INVALID_FIELD,
      error,
    );
  }
}

async function outputVirtualSize(file: string, format: 'qcow2' | 'vpc'): Promise<number> {
  const info = JSON.parse(await qemuImg(['info', '--output=json', '-f', format, '--', file])) as { 'virtual-size'?: number };
  return info['virtual-size'] ?? 0;
}

// ---------------------------------------------------------------------------------------------------------
// Files, progress, errors

async function allocatedBytes(file: string): Promise<number> {
  try {
    return (await stat(file)).blocks * 512;
  } catch {
    return 0;
  }
}

async function freeBytesOf(directory: string): Promise<number> {
  const space = await statfs(directory);
  return space.bavail * space.bsize;
}

/** Monotonic progress per stage with a rate over the last few seconds, at most every `intervalMs`. */
class ProgressReporter {
  sourceFormat = '';
  private stage = ImageImportStage.IMAGE_IMPORT_STAGE_UNSPECIFIED;
  private total = 0;
  private done = 0;
  private lastReport = 0;
  private samples: { time: number; done: number }[] = [];

  constructor(
    private readonly onProgress: ((progress: ImportProgress) => void) | undefined,
    private readonly intervalMs: number,
  ) {}

  start(stage: ImageImportStage, total: number): void {
    this.stage = stage;
    this.total = total;
    this.done = 0;
    this.samples = [{ time: performance.now(), done: 0 }];
    this.emit();
  }

  update(done: number, total?: number): void {
    if (total !== undefined && total > 0) this.total = total;
    const clamped = this.total > 0 ? Math.min(done, this.total) : done;
    if (clamped <= this.done) return;
    this.done = clamped;
    if (performance.now() - this.lastReport >= this.intervalMs) this.emit();
  }

  finish(): void {
    if (this.total === 0 || this.total < this.done) this.total = this.done;
    this.done = this.total;
    this.emit();
  }

  private emit(): void {
    const now = performance.now();
    this.lastReport = now;
    this.samples.push({ time: now, done: this.done });
    // A rate over the last 5 s.
    while (this.samples.length > 2 && now - this.samples[0]!.time > 5000) this.samples.shift();
    const first = this.samples[0]!;
    const seconds = (now - first.time) / 1000;
    const rate = seconds > 0.2 ? Math.round((this.done - first.done) / seconds) : 0;
    this.onProgress?.({ stage: this.stage, bytesDone: this.done, bytesTotal: this.total, rateBytesPerSecond: rate, sourceFormat: this.sourceFormat });
  }
}

function alreadyExists(image: string, why: string): CowherdError {
  return new CowherdError(GrpcStatus.ALREADY_EXISTS, `${IMAGE_NAME.format({ image })} already exists on this host: ${why}`, {
    reason: ErrorReason.ERROR_REASON_ALREADY_EXISTS,
    metadata: { resource: IMAGE_NAME.format({ image }) },
  });
}

function transferFailed(message: string, cause?: unknown): CowherdError {
  return new CowherdError(GrpcStatus.UNAVAILABLE, message, { reason: ErrorReason.ERROR_REASON_TRANSFER_FAILED, cause });
}

function tooLarge(url: string, maxBytes: number): CowherdError {
  return new CowherdError(GrpcStatus.FAILED_PRECONDITION, `${url} is larger than ${maxBytes} bytes (url.max_bytes)`, {
    reason: ErrorReason.ERROR_REASON_TRANSFER_FAILED,
    metadata: { maxBytes: String(maxBytes) },
  });
}

function insufficientSpace(needed: number, free: number, where: string): CowherdError {
  return new CowherdError(
    GrpcStatus.RESOURCE_EXHAUSTED,
    needed > 0 ? `the import needs about ${needed} bytes; ${where} has ${free} free` : `no space left while importing into ${where}`,
    { reason: ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE, metadata: { requiredBytes: String(needed), freeBytes: String(free) } },
  );
}

function cancelled(cause: unknown): CowherdError {
  return new CowherdError(GrpcStatus.CANCELLED, 'the import was cancelled', { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT, cause });
}

function throwIfAborted(signal: AbortSignal | undefined, cause?: unknown): void {
  if (signal?.aborted) throw cancelled(cause ?? signal.reason);
}
