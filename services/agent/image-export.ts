/**
 * Exporting a powered-off VM on this host into an immutable image replica (job 2, the agent's half of
 * ExportImage before the torrent): each disk flattened into one standalone file, direct-boot files copied,
 * the sanitized domain XML template written, every file hashed (SHA-256) and made read-only, all in a hidden
 * work directory `<image dir>/images/.<image>.partial-<random>` that is renamed to `<image dir>/images/<image>`
 * only when everything is there. A crash or a failure never leaves a half image under the final name; a
 * failure removes the work directory, and the next export of the same id removes what a crash left.
 *
 * Decisions (measured on the 2-vCPU CI machine, see the agent README):
 * - Target format by hypervisor, whatever the source format: qcow2 for KVM/QEMU domains, VHD ("vpc") for
 *   Xen domains, because that is what the clone engine can put children on (qcow2 overlays, VHD differencing
 *   disks) and because a raw disk would travel through the swarm at its full virtual size (webtorrent knows
 *   no holes, and receivers would write it fully allocated). `qemu-img convert -O qcow2` writes only the
 *   allocated clusters (zeros are detected and skipped), so a 20 GiB raw disk with 1 GiB of data becomes a
 *   ~1 GiB file, and a qcow2 source with a backing chain comes out flattened (the template drops
 *   `<backingStore>`, so a base must stand alone). No compression (`-c`): zlib on one core runs at tens of
 *   MiB/s, several times slower than the copy, and clones would pay the decompression on every read.
 *   `cp --sparse=always` of a raw source would be as fast but keeps the raw size problem above.
 * - No `-U` (force share): without it qemu-img holds a shared read lock on every file of the chain, so libvirt
 *   cannot start the VM (or another VM using the same file) while its disks are copied; a copy from a disk
 *   that is being written would be torn. A lock failure is reported as VIRTUAL_MACHINE_RUNNING.
 * - The source format is always given (`-f`, libvirt's `<driver type>`): probing would trust a header the
 *   guest may have written into a raw disk.
 * - Differencing VHDs are refused: qemu-img ignores their parent and would export garbage (MACHINE.md).
 * - Progress of a copy comes from the output files' allocated blocks against `qemu-img measure`'s required
 *   size (runCommand gives no live output, so `-p` cannot be read); for VHD targets, which measure does not
 *   support, the total is the allocated size of the source chain.
 * - Hashing: node:crypto SHA-256 streaming (~0.7 s per 512 MiB, ~7x faster than sha256sum), at most two files
 *   at once (two cores; copying is finished by then), each file fsynced after it is read so the rename
 *   publishes durable files.
 * - Boot files (kernel, initrd, dtb) have no ImageFile role of their own: they are listed with
 *   ROLE_UNSPECIFIED and `bootFile` set; the proto should gain a ROLE_BOOT_FILE.
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { access, chmod, copyFile, mkdir, rename, stat, statfs, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { basename } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CommandError, runCommand } from '../common/platform/child-process.js';
import { mapLimited } from '../common/platform/concurrency.js';
import { CowherdError } from '../common/platform/errors.js';
import type { Logger } from '../common/platform/logger.js';
import { HOST_NAME, IMAGE_KEY, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { DiskFormat, ImagePublishStage } from '../gen/cowherd/common/v1/types.js';
import { ImageFile_Role, type ImageFile } from '../gen/cowherd/inventory/v1/resources.js';
import { LibvirtError, readVhdInfo, sanitizeDomainTemplate, type DiskFormatName, type DomainTemplate, type Libvirt } from './hypervisor/index.js';
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

/** Progress of an export: the stage and the bytes of that stage. */
export interface ExportProgress {
  /** IMAGE_PUBLISH_STAGE_EXPORTING (copying disks and boot files, writing the template), then HASHING. */
  readonly stage: ImagePublishStage;
  /** Never decreases within a stage; equals bytesTotal in the stage's last report. */
  readonly bytesDone: number;
  /** Fixed for the whole stage (an estimate while EXPORTING, exact while HASHING). */
  readonly bytesTotal: number;
}

/** Options of {@link exportImage}. */
export interface ExportImageOptions {
  readonly libvirt: Pick<Libvirt, 'domain' | 'domainXml'>;
  /** The agent's image directory; the image lands in `<imageDirectory>/images/<image>/`. */
  readonly imageDirectory: string;
  /** This host's id (`hosts/{host}`). */
  readonly host: string;
  /** `hosts/{host}/virtualMachines/{vm}` on this host. */
  readonly virtualMachine: string;
  /** The image id (`[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`), not `images/{id}`. */
  readonly image: string;
  /** Called at each stage's start and end and at most every `progressIntervalMs` in between. */
  readonly onProgress?: (progress: ExportProgress) => void;
  /** Aborting kills qemu-img, stops hashing and removes the work directory; the export throws CANCELLED. */
  readonly signal?: AbortSignal;
  readonly log?: Logger;
  /** Default 250 ms. */
  readonly progressIntervalMs?: number;
  /** Files hashed at once. Default min(2, available parallelism). */
  readonly hashConcurrency?: number;
  /** Per qemu-img convert. Default 6 hours. */
  readonly convertTimeoutMs?: number;
}

/** One file of an exported image. */
export interface ExportedImageFile {
  /** File name inside the image directory. */
  readonly path: string;
  /** ROLE_DISK, ROLE_DOMAIN_TEMPLATE, or ROLE_UNSPECIFIED for boot files (see `bootFile`). */
  readonly role: ImageFile_Role;
  /** Disks only; DISK_FORMAT_UNSPECIFIED otherwise. */
  readonly format: DiskFormat;
  readonly sizeBytes: number;
  /** Lowercase hex. */
  readonly sha256: string;
  /** Disks only (qemu-img info of the exported file); 0 otherwise. */
  readonly virtualSizeBytes: number;
  /** Disks only, e.g. "vda". */
  readonly targetDevice: string;
  /** Boot files only: the `<os>` element that names the file. */
  readonly bootFile?: 'kernel' | 'initrd' | 'dtb';
}

/** What {@link exportImage} returns. */
export interface ExportedImage {
  /** `<imageDirectory>/images/<image>`, read-only (0555, files 0444). */
  readonly directory: string;
  /** Disks in XML order, then boot files, then the template. */
  readonly files: readonly ExportedImageFile[];
  /** The content of domain-template.xml. */
  readonly domainTemplate: string;
  /** `<domain type>` of the source: "kvm", "qemu" or "xen". */
  readonly domainType: string;
  /** Sum of every file's size. */
  readonly totalBytes: number;
}

/** The proto form of the exported files (int64 as strings); boot files keep ROLE_UNSPECIFIED. */
export function toImageFiles(files: readonly ExportedImageFile[]): ImageFile[] {
  return files.map((file) => ({
    path: file.path,
    role: file.role,
    format: file.format,
    sizeBytes: String(file.sizeBytes),
    sha256: file.sha256,
    virtualSizeBytes: String(file.virtualSizeBytes),
    targetDevice: file.targetDevice,
  }));
}

const FILE_NAME_EXTENSION: Readonly<Record<DiskFormatName, string>> = { qcow2: 'qcow2', raw: 'img', vpc: 'vhd' };
const DISK_FORMAT: Readonly<Record<DiskFormatName, DiskFormat>> = {
  qcow2: DiskFormat.DISK_FORMAT_QCOW2,
  raw: DiskFormat.DISK_FORMAT_RAW,
  vpc: DiskFormat.DISK_FORMAT_VHD,
};
/** Target device names that make good file names ("vda.qcow2", as the proto's example). */
const SIMPLE_TARGET = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const DEFAULT_CONVERT_TIMEOUT_MS = 6 * 60 * 60 * 1000;
/** Exports running in this process, by work-directory prefix: a second export of the same id must not clean up the first's work. */
const running = new Set<string>();

interface PlannedDisk {
  readonly target: string;
  readonly sourcePath: string;
  readonly sourceFormat: DiskFormatName;
  readonly targetFormat: DiskFormatName;
  readonly fileName: string;
  /** Expected size of the exported file (progress and the space check). */
  readonly estimatedBytes: number;
}

interface PlannedBootFile {
  readonly element: 'kernel' | 'initrd' | 'dtb';
  readonly sourcePath: string;
  readonly fileName: string;
  readonly sizeBytes: number;
}

/**
 * Exports the powered-off VM `virtualMachine` as image `image`. Throws CowherdError: INVALID_ARGUMENT
 * (INVALID_FIELD, HOST_MISMATCH) for bad names; NOT_FOUND (RESOURCE_NOT_FOUND) for the VM; FAILED_PRECONDITION
 * (VIRTUAL_MACHINE_RUNNING when it is not shut off or a disk is locked by a running VM; UNTRUSTED_DOMAIN_XML
 * for what sanitizeDomainTemplate refuses and for differencing VHDs; RESOURCE_STATE_CONFLICT when a disk or
 * boot file cannot be read); ALREADY_EXISTS (ALREADY_EXISTS) when the image directory exists or an export of
 * that id is running; RESOURCE_EXHAUSTED (INSUFFICIENT_SPACE); CANCELLED when the signal aborts. Nothing is
 * left behind on failure.
 */
export async function exportImage(options: ExportImageOptions): Promise<ExportedImage> {
  const { image, host } = options;
  if (typeof image !== 'string' || !IMAGE_KEY.test(image))
    throw CowherdError.invalidArgument('image', `must be an image storage key matching ${IMAGE_KEY.source}`);
  const ids = VIRTUAL_MACHINE_NAME.parse(options.virtualMachine ?? '');
  if (!ids) throw CowherdError.invalidArgument('virtual_machine', 'must be hosts/{host}/virtualMachines/{virtual_machine}');
  if (ids.host !== host) {
    throw CowherdError.invalidArgument(
      'virtual_machine',
      `is on ${HOST_NAME.format({ host: ids.host })}, not on this host (${HOST_NAME.format({ host })})`,
      ErrorReason.ERROR_REASON_HOST_MISMATCH,
    );
  }
  const domainName = ids.virtualMachine;
  const imagesRoot = imagesDirectory(options.imageDirectory);
  const finalDirectory = replicaDirectory(options.imageDirectory, image);
  const lockKey = exportLockKey(options.imageDirectory, image);
  if (running.has(lockKey)) throw alreadyExists(image, 'an export of this image is running on this host');
  running.add(lockKey);
  let workDirectory: string | undefined;
  try {
    throwIfAborted(options.signal);
    await mkdir(imagesRoot, { recursive: true });
    if (await pathExists(finalDirectory)) throw alreadyExists(image, `${finalDirectory} already exists`);
    // What a crashed export of this id left (no export of it runs in this process: the lock above).
    await removeStalePartials(options.imageDirectory, image, options.log);

    // The VM: there, powered off, publishable.
    const domain = await options.libvirt.domain(domainName).catch((error: unknown) => {
      throw error instanceof LibvirtError && error.kind === 'domain-not-found' ? CowherdError.notFound(options.virtualMachine) : hypervisorError(error);
    });
    if (domain.state !== 'shut off') {
      throw CowherdError.failedPrecondition(
        `${options.virtualMachine} is ${domain.state}; only a powered-off VM can be exported`,
        ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING,
        { virtualMachine: options.virtualMachine },
      );
    }
    const xml = await options.libvirt.domainXml(domain.uuid).catch((error: unknown) => {
      throw hypervisorError(error);
    });
    const targetFormat: DiskFormatName = domain.domainType === 'xen' ? 'vpc' : 'qcow2';
    // Disk file names follow the target format, e.g. "vda.qcow2".
    const sanitized = sanitizeDomainTemplate(xml, {
      diskFileName: ({ index, target }) => `${SIMPLE_TARGET.test(target) ? target : `disk-${index}`}.${FILE_NAME_EXTENSION[targetFormat]}`,
      imageFormat: targetFormat,
    });
    const template = sanitized.xml;

    // Every source readable, before anything is written.
    const disks: PlannedDisk[] = [];
    for (const disk of sanitized.disks) disks.push(await planDisk(disk, targetFormat, options.virtualMachine));
    const bootFiles: PlannedBootFile[] = [];
    for (const bootFile of sanitized.bootFiles)
      bootFiles.push({ ...bootFile, sizeBytes: await readableFileSize(bootFile.sourcePath, `<${bootFile.element}>`) });
    const exportBytes =
      disks.reduce((sum, disk) => sum + disk.estimatedBytes, 0) + bootFiles.reduce((sum, file) => sum + file.sizeBytes, 0) + Buffer.byteLength(template);
    const space = await statfs(imagesRoot);
    const freeBytes = space.bavail * space.bsize;
    if (freeBytes < exportBytes) {
      throw new CowherdError(GrpcStatus.RESOURCE_EXHAUSTED, `the image needs about ${exportBytes} bytes; ${imagesRoot} has ${freeBytes} free`, {
        reason: ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE,
        metadata: { requiredBytes: String(exportBytes), freeBytes: String(freeBytes) },
      });
    }

    workDirectory = exportWorkDirectory(options.imageDirectory, image, randomBytes(6).toString('hex'));
    await mkdir(workDirectory, { mode: 0o700 });

    const progress = new ProgressReporter(options.onProgress, options.progressIntervalMs ?? 250);
    const work = workDirectory;
    // EXPORTING.
    progress.start(ImagePublishStage.IMAGE_PUBLISH_STAGE_EXPORTING, exportBytes);
    let finishedBytes = 0;
    for (const disk of disks) {
      const output = replicaFile(work, disk.fileName);
      const base = finishedBytes;
      let copying = true;
      const poll = setInterval(
        () => {
          void allocatedBytes(output).then((bytes) => copying && progress.update(base + Math.min(bytes, disk.estimatedBytes)));
        },
        Math.max(50, options.progressIntervalMs ?? 250),
      );
      try {
        await convertDisk(disk, output, options);
      } finally {
        copying = false;
        clearInterval(poll);
      }
      finishedBytes += disk.estimatedBytes;
      progress.update(finishedBytes);
    }
    for (const bootFile of bootFiles) {
      throwIfAborted(options.signal);
      await copyFile(bootFile.sourcePath, replicaFile(work, bootFile.fileName), fsConstants.COPYFILE_EXCL).catch((error: unknown) => {
        throw unreadable(`<${bootFile.element}> ${bootFile.sourcePath}`, error);
      });
      finishedBytes += bootFile.sizeBytes;
      progress.update(finishedBytes);
    }
    await writeFile(replicaFile(work, TEMPLATE_FILE), template, { flag: 'wx', mode: 0o644 });
    progress.finish();

    // HASHING (and fsync), then read-only.
    const fileNames = [...disks.map((disk) => disk.fileName), ...bootFiles.map((file) => file.fileName), TEMPLATE_FILE];
    const sizes = await Promise.all(fileNames.map(async (name) => (await stat(replicaFile(work, name))).size));
    const totalBytes = sizes.reduce((sum, size) => sum + size, 0);
    progress.start(ImagePublishStage.IMAGE_PUBLISH_STAGE_HASHING, totalBytes);
    let hashedBytes = 0;
    const concurrency = Math.max(1, options.hashConcurrency ?? Math.min(2, availableParallelism()));
    const hashes = await mapLimited(fileNames, concurrency, (name) =>
      hashAndSync(
        replicaFile(work, name),
        () => throwIfAborted(options.signal),
        (bytes) => {
          hashedBytes += bytes;
          progress.update(hashedBytes);
        },
      ),
    );
    progress.finish();
    const virtualSizes = await Promise.all(disks.map((disk) => virtualSize(replicaFile(work, disk.fileName), disk.targetFormat)));
    for (const name of fileNames) await chmod(replicaFile(work, name), 0o444);
    await chmod(work, 0o555);

    throwIfAborted(options.signal);
    await rename(work, finalDirectory).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOTEMPTY' || error.code === 'EEXIST') throw alreadyExists(image, `${finalDirectory} appeared during the export`);
      throw error;
    });
    workDirectory = undefined;
    await fsyncDirectory(imagesRoot);

    const files: ExportedImageFile[] = [
      ...disks.map((disk, index) => ({
        path: disk.fileName,
        role: ImageFile_Role.ROLE_DISK,
        format: DISK_FORMAT[disk.targetFormat],
        sizeBytes: sizes[index]!,
        sha256: hashes[index]!,
        virtualSizeBytes: virtualSizes[index]!,
        targetDevice: disk.target,
      })),
      ...bootFiles.map((file, index) => ({
        path: file.fileName,
        role: ImageFile_Role.ROLE_UNSPECIFIED,
        format: DiskFormat.DISK_FORMAT_UNSPECIFIED,
        sizeBytes: sizes[disks.length + index]!,
        sha256: hashes[disks.length + index]!,
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
    options.log?.info({ image, virtualMachine: options.virtualMachine, files: files.length, totalBytes }, 'image exported');
    return { directory: finalDirectory, files, domainTemplate: template, domainType: sanitized.domainType, totalBytes };
  } catch (error) {
    if (workDirectory !== undefined)
      await removeTree(workDirectory).catch((cleanupError: unknown) =>
        options.log?.error({ err: cleanupError, workDirectory }, 'export: removing the work directory failed'),
      );
    if (options.signal?.aborted && !(error instanceof CowherdError && error.code === GrpcStatus.CANCELLED)) throw cancelled(error);
    throw error;
  } finally {
    running.delete(lockKey);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Disks

interface QemuImageInfo {
  readonly filename?: string;
  readonly format?: string;
  readonly 'virtual-size'?: number;
  readonly 'actual-size'?: number;
}

async function qemuImg(args: readonly string[], options: { timeoutMs?: number; signal?: AbortSignal | undefined } = {}): Promise<string> {
  return runCommand('qemu-img', args, { timeoutMs: options.timeoutMs ?? 60_000, env: { LC_ALL: 'C' }, ...(options.signal ? { signal: options.signal } : {}) });
}

/** Checks that the disk and its whole chain can be read (and are not in use) and estimates the exported size. */
async function planDisk(disk: DomainTemplate['disks'][number], targetFormat: DiskFormatName, virtualMachine: string): Promise<PlannedDisk> {
  const what = `disk ${disk.target} (${disk.sourcePath})`;
  await readableFileSize(disk.sourcePath, `disk ${disk.target}`);
  if (disk.format === 'vpc') {
    const vhd = await readVhdInfo(disk.sourcePath).catch((error: unknown) => {
      throw unreadable(what, error);
    });
    if (vhd.diskType === 'differencing') {
      throw new CowherdError(GrpcStatus.FAILED_PRECONDITION, `${what} is a differencing VHD, which qemu-img cannot flatten (it ignores the parent)`, {
        reason: ErrorReason.ERROR_REASON_UNTRUSTED_DOMAIN_XML,
        metadata: { element: 'devices/disk', path: disk.sourcePath },
      });
    }
  }
  let chain: QemuImageInfo[];
  try {
    // No -U: a disk that a running VM holds must fail here, not be copied torn.
    const parsed = JSON.parse(await qemuImg(['info', '--backing-chain', '--output=json', '-f', disk.format, '--', disk.sourcePath])) as
      | QemuImageInfo
      | QemuImageInfo[];
    chain = Array.isArray(parsed) ? parsed : [parsed];
  } catch (error) {
    throw diskError(what, virtualMachine, error);
  }
  const top = chain[0];
  if (!top || typeof top['virtual-size'] !== 'number') throw unreadable(what, new Error('qemu-img info printed no virtual size'));
  let estimatedBytes: number;
  if (targetFormat === 'qcow2') {
    try {
      const measured = JSON.parse(await qemuImg(['measure', '--output=json', '-f', disk.format, '-O', 'qcow2', '--', disk.sourcePath])) as {
        required?: number;
      };
      estimatedBytes = measured.required ?? 0;
    } catch (error) {
      throw diskError(what, virtualMachine, error);
    }
  } else {
    // measure knows no VHD: the data in the chain, at most the virtual size, plus VHD metadata.
    const data = chain.reduce((sum, layer) => sum + (layer['actual-size'] ?? 0), 0);
    estimatedBytes = Math.min(data, top['virtual-size']) + 2 * 1024 * 1024;
  }
  return {
    target: disk.target,
    sourcePath: disk.sourcePath,
    sourceFormat: disk.format,
    targetFormat,
    fileName: disk.fileName,
    estimatedBytes: Math.max(estimatedBytes, 1),
  };
}

/** `qemu-img convert` into a standalone file: backing chain flattened, zeros skipped, no compression. */
async function convertDisk(disk: PlannedDisk, output: string, options: ExportImageOptions): Promise<void> {
  throwIfAborted(options.signal);
  // VHD: force_size keeps the exact virtual size (otherwise rounded to a CHS geometry).
  const outputOptions = disk.targetFormat === 'vpc' ? ['-o', 'subformat=dynamic,force_size=on'] : [];
  try {
    await qemuImg(['convert', '-f', disk.sourceFormat, '-O', disk.targetFormat, ...outputOptions, '--', disk.sourcePath, output], {
      timeoutMs: options.convertTimeoutMs ?? DEFAULT_CONVERT_TIMEOUT_MS,
      signal: options.signal,
    });
  } catch (error) {
    throwIfAborted(options.signal, error);
    throw diskError(`disk ${disk.target} (${disk.sourcePath})`, options.virtualMachine, error);
  }
}

async function virtualSize(file: string, format: DiskFormatName): Promise<number> {
  const info = JSON.parse(await qemuImg(['info', '--output=json', '-f', format, '--', file])) as QemuImageInfo;
  return info['virtual-size'] ?? 0;
}

function diskError(what: string, virtualMachine: string, error: unknown): CowherdError {
  const stderr = error instanceof CommandError ? error.stderr : String((error as Error)?.message ?? error);
  if (/lock/i.test(stderr)) {
    return new CowherdError(
      GrpcStatus.FAILED_PRECONDITION,
      `${what} is in use (locked by a running VM?); ${virtualMachine} must stay powered off during the export`,
      {
        reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING,
        metadata: { virtualMachine },
        cause: error,
      },
    );
  }
  if (/No space left/i.test(stderr)) {
    return new CowherdError(GrpcStatus.RESOURCE_EXHAUSTED, `no space left while exporting ${what}`, {
      reason: ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE,
      cause: error,
    });
  }
  return unreadable(what, error);
}

// ---------------------------------------------------------------------------------------------------------
// Template

// ---------------------------------------------------------------------------------------------------------
// Files

async function readableFileSize(file: string, what: string): Promise<number> {
  try {
    await access(file, fsConstants.R_OK);
    const info = await stat(file);
    if (!info.isFile()) throw new Error('not a regular file');
    return info.size;
  } catch (error) {
    throw unreadable(`${what} (${file})`, error);
  }
}

async function allocatedBytes(file: string): Promise<number> {
  try {
    return (await stat(file)).blocks * 512;
  } catch {
    return 0;
  }
}

async function removeStalePartials(imageDirectory: string, image: string, log: Logger | undefined): Promise<void> {
  for (const directory of await exportWorkDirectories(imageDirectory, image)) {
    log?.warn({ image, directory: basename(directory) }, 'removing the work directory of an interrupted export');
    await removeTree(directory);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Progress, errors, helpers

/** Reports monotonic progress per stage, at most every `intervalMs` between a stage's start and finish. */
class ProgressReporter {
  private stage = ImagePublishStage.IMAGE_PUBLISH_STAGE_UNSPECIFIED;
  private total = 0;
  private done = 0;
  private lastReport = 0;

  constructor(
    private readonly onProgress: ((progress: ExportProgress) => void) | undefined,
    private readonly intervalMs: number,
  ) {}

  start(stage: ImagePublishStage, total: number): void {
    this.stage = stage;
    this.total = total;
    this.done = 0;
    this.emit();
  }

  update(done: number): void {
    const clamped = Math.min(done, this.total);
    if (clamped <= this.done) return;
    this.done = clamped;
    if (performance.now() - this.lastReport >= this.intervalMs) this.emit();
  }

  finish(): void {
    this.done = this.total;
    this.emit();
  }

  private emit(): void {
    this.lastReport = performance.now();
    this.onProgress?.({ stage: this.stage, bytesDone: this.done, bytesTotal: this.total });
  }
}

function alreadyExists(image: string, why: string): CowherdError {
  return new CowherdError(GrpcStatus.ALREADY_EXISTS, `${IMAGE_NAME.format({ image })} already exists on this host: ${why}`, {
    reason: ErrorReason.ERROR_REASON_ALREADY_EXISTS,
    metadata: { resource: IMAGE_NAME.format({ image }) },
  });
}

function unreadable(what: string, error: unknown): CowherdError {
  const detail = error instanceof CommandError ? (error.stderr.trim().split('\n').pop() ?? error.message) : String((error as Error)?.message ?? error);
  return new CowherdError(GrpcStatus.FAILED_PRECONDITION, `cannot read ${what}: ${detail}`, {
    reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    cause: error,
  });
}

function hypervisorError(error: unknown): CowherdError {
  if (error instanceof CowherdError) return error;
  return new CowherdError(GrpcStatus.INTERNAL, `libvirt: ${(error as Error).message}`, { reason: ErrorReason.ERROR_REASON_HYPERVISOR_ERROR, cause: error });
}

function cancelled(cause: unknown): CowherdError {
  return new CowherdError(GrpcStatus.CANCELLED, 'the export was cancelled', { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT, cause });
}

function throwIfAborted(signal: AbortSignal | undefined, cause?: unknown): void {
  if (signal?.aborted) throw cancelled(cause ?? signal.reason);
}
