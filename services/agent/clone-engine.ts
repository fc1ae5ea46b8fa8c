/**
 * Making clones on this host (AgentService.CreateClones): one child per disk of the source, made by the
 * request's disk backend (hypervisor/disk-backends.ts: by default a qcow2 overlay on KVM, a VHD differencing
 * disk on Xen; `reflink-copy` a reflink copy of the base without a chain, refused for the whole batch before
 * anything is made where the clones directory cannot reflink), in the clone's own directory, the domain XML
 * rendered from the sanitized template, defined in libvirt, started if asked, clone.done or clone.failed
 * published. A clone that fails is rolled back completely: its domain undefined, its directory removed.
 * With a guest configuration, each clone also gets its NoCloud seed disk (`cidata.iso` in its directory,
 * attached read-only): cloud-init in the guest takes its hostname, instance-id (the clone's UUID), SSH keys,
 * user-data and network-config from it. The documents are secrets: never logged, only their digest kept.
 * Layout under the image directory (image-directory/layout.ts): `images/<image>/` holds a replica (disk
 * files and `domain-template.xml`), `clones/<domain>/` a clone's children and files.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import type { CreateCloneResult, CreateClonesRequest } from '../gen/cowherd/agent/v1/agent_service.js';
import { VirtualMachine, VirtualMachine_State, type GuestConfiguration } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError, toStatus } from '../common/platform/errors.js';
import { mapLimited } from '../common/platform/concurrency.js';
import { CLONE_DONE, CLONE_FAILED } from '../common/domain/event-types.js';
import type { EventPublisher } from '../common/platform/events.js';
import type { Logger } from '../common/platform/logger.js';
import { cloneDuration } from '../common/platform/metrics.js';
import {
  HOST_IMAGE_NAME,
  HOST_NAME,
  IMAGE_NAME,
  imageNameOfKey,
  imageVersionNameOfKey,
  VIRTUAL_MACHINE_ID,
  VIRTUAL_MACHINE_NAME,
} from '../common/domain/resource-names.js';
import { checkGuestConfiguration, guestConfigurationDigest, PLACEHOLDER_UUID, renderGuestIdentity } from '../common/domain/guest-configuration.js';
import {
  attachDataDisk,
  attachSeedImage,
  buildSeedImage,
  childDiskFormat,
  diskBackendChoice,
  diskBackendFor,
  diskBackendValue,
  SEED_SYSTEM_AREA_BYTES,
  LibvirtError,
  protectBase,
  reflinkSupported,
  renderClone,
  sanitizeDomainTemplate,
  templateDisks,
  type CloneMetadata,
  type DiskBackend,
  type DiskBackendName,
  type DiskDriver,
  type DomainInfo,
  type HypervisorKind,
  type Libvirt,
  type RenderedClone,
} from './hypervisor/index.js';
import {
  cloneDataDiskFile,
  cloneDefinitionFile,
  cloneDirectory as cloneDirectoryOf,
  cloneDiskFile,
  cloneSeedFile,
  clonesDirectory,
  isInsideImageDirectory,
  overlayPrototypeFile,
  replicaDirectory as replicaDirectoryOf,
  replicaFile,
  templateFile,
} from './image-directory/index.js';
import type { StreamedClones, StreamedSource } from './streamed-clones.js';
/** Clones per request at most (the proto's limit). */
export const MAX_CLONES_PER_REQUEST = 1000;

/** The largest persistent data disk a clone may get: 16 TiB. */
export const MAX_DATA_DISK_BYTES = 16 * 2 ** 40;
const MIB = 2 ** 20;

/**
 * The size of the data disk made for `data_disk_bytes`: 0 for none; rounded up to a whole MiB (qcow2 and VHD
 * sizes are sector multiples, and a MiB keeps partition tools aligned). INVALID_ARGUMENT (`data_disk_bytes`)
 * when negative, not an integer or above 16 TiB.
 */
export function dataDiskSize(requested: number | string): number {
  const bytes = Number(requested);
  if (!Number.isSafeInteger(bytes) || bytes < 0 || bytes > MAX_DATA_DISK_BYTES)
    throw CowherdError.invalidArgument('data_disk_bytes', `must be 0 (no data disk) to ${MAX_DATA_DISK_BYTES} (16 TiB)`);
  return Math.ceil(bytes / MIB) * MIB;
}

/** What the engine needs. */
export interface CloneEngineOptions {
  readonly host: string;
  readonly imageDirectory: string;
  readonly hypervisor: HypervisorKind;
  readonly libvirt: Libvirt;
  readonly events: Pick<EventPublisher, 'publish'>;
  readonly log: Logger;
  /**
   * The verified directory of an image's replica (image-transfers.ts cloneBase: its files checked against
   * their fingerprint first, FAILED_PRECONDITION when damaged, the newest generation after a repair).
   * Default `<image dir>/images/<image>`.
   */
  readonly replicaBase?: (imageId: string) => Promise<string>;
  /** Called once per batch with the storage key of the replica clones were made from (its last_use_time). */
  readonly onReplicaUsed?: (imageKey: string) => Promise<void>;
  /** Streaming clones (CreateClonesRequest.stream): the source of a replica still arriving (streamed-clones.ts). */
  readonly streamed?: Pick<StreamedClones, 'source' | 'linkBootFiles'>;
}

interface ResolvedSource {
  readonly metadata: CloneMetadata['source'];
  readonly template: string;
  readonly disks: ReadonlyArray<{ target: string; base: string; format: 'qcow2' | 'raw' | 'vpc' }>;
  readonly replicaDirectory?: string;
  /** The storage key of the image version cloned from; absent for a virtual machine's clones. */
  readonly imageKey?: string;
  /** Set for streaming clones: the disks' bases are NBD URIs of the streaming server, boot files are linked. */
  readonly streamed?: StreamedSource;
}

/** The key under which the batch's empty data disk waits among the prototypes. */
const DATA_DISK_PROTOTYPE = '.data';

/** The lineage record of a batch's clones (the backend too: a reflink copy depends on no base, see dependents.ts). */
function cloneMetadataOf(source: ResolvedSource, request: CreateClonesRequest, backend: DiskBackend): CloneMetadata {
  return {
    source: source.metadata,
    operation: request.operation,
    requestId: request.requestId,
    ...(source.imageKey === undefined ? {} : { imageVersion: imageVersionNameOfKey(source.imageKey) }),
    diskBackend: backend.name,
  };
}

/** A child to make: the base disk, its file in the clone directory, and the libvirt driver it is rendered with. */
interface ChildDisk {
  readonly target: string;
  readonly path: string;
  readonly driver: DiskDriver;
}

/** Children made and XML rendered in parallel, this many clones at a time (qemu-img is a process each). */
const PREPARE_CONCURRENCY = 4;

/** A clone after preparation: ready to define, already there (a retry), or failed. */
type PreparedClone =
  | { readonly kind: 'new'; readonly name: string; readonly cloneDirectory: string; readonly rendered: RenderedClone; readonly overlays: readonly string[] }
  | { readonly kind: 'existing'; readonly name: string; readonly domain: DomainInfo }
  | { readonly kind: 'failed'; readonly name: string; readonly error: unknown };

/** Makes clones; one instance per agent. */
export class CloneEngine {
  /** The batch last started for each request_id, while it runs. */
  private readonly batches = new Map<string, Promise<CreateCloneResult[]>>();

  constructor(private readonly options: CloneEngineOptions) {}

  /**
   * The backend a request's clones are made with: its `disk_backend`, else this host's standard (qcow2 overlays
   * on KVM, VHD differencing disks on Xen). INVALID_ARGUMENT (`disk_backend`) for an unknown value;
   * FAILED_PRECONDITION (HYPERVISOR_MISMATCH) for one this hypervisor does not run.
   */
  private backendOf(request: CreateClonesRequest): DiskBackend {
    return diskBackendFor(this.options.hypervisor, diskBackendChoice(request.diskBackend));
  }

  /**
   * The whole batch's check of a backend that needs more than the base's format: for `reflink-copy`, that the
   * clones directory's file system makes reflink copies (probed once per file system) and that every base is
   * on that file system. FAILED_PRECONDITION (HYPERVISOR_MISMATCH) naming the reason, before anything is made.
   * `probeDirectory` is where to probe: the clones directory (made first by a real call), or the image directory
   * while it does not exist yet (validate_only makes nothing).
   */
  private async checkBackendHere(backend: DiskBackend, source: ResolvedSource, probeDirectory: string): Promise<void> {
    if (backend.name !== 'reflink-copy') return;
    const refuse = (message: string, metadata: Record<string, string>): CowherdError =>
      CowherdError.failedPrecondition(message, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH, { disk_backend: 'REFLINK_COPY', ...metadata });
    if (!(await reflinkSupported(probeDirectory)))
      throw refuse(
        `disk_backend REFLINK_COPY: the file system of ${probeDirectory} on ${HOST_NAME.format({ host: this.options.host })} cannot make reflink copies (btrfs, or xfs made with reflink=1, can); clone with QCOW2_OVERLAY there`,
        { directory: probeDirectory },
      );
    const device = (await stat(probeDirectory)).dev;
    for (const disk of source.disks) {
      const base = await stat(disk.base).catch(() => undefined);
      if (base !== undefined && base.dev !== device)
        throw refuse(
          `disk_backend REFLINK_COPY: disk ${disk.target}'s base ${disk.base} is on another file system than ${probeDirectory}; a reflink copy cannot cross file systems`,
          {
            disk: disk.target,
            directory: probeDirectory,
          },
        );
    }
  }

  /** Each disk's child: its file (named by the backend's child format: `vda.raw` for a reflink copy of a raw base) and driver. */
  private childDisks(backend: DiskBackend, source: ResolvedSource, cloneDirectory: string): ChildDisk[] {
    return source.disks.map((disk) => {
      const format = childDiskFormat(backend, disk.format);
      return { target: disk.target, path: cloneDiskFile(cloneDirectory, disk.target, format.extension), driver: format.driver };
    });
  }

  /**
   * Makes a batch (see {@link makeBatch}). A request whose request_id names a batch still running waits for it
   * and then runs: it finds that batch's clones and returns them. Without this, a cloning replica that took
   * an operation over while the first attempt was still running here (a graceful stop releases the lease at
   * once; the agent does not stop for a cancelled call) raced it: every clone the first attempt had not yet
   * defined came back ALREADY_EXISTS, with a clone.failed next to the first attempt's clone.done.
   */
  async createClones(request: CreateClonesRequest): Promise<CreateCloneResult[]> {
    if (request.requestId === '') return this.makeBatch(request);
    const key = request.requestId;
    const previous = this.batches.get(key);
    const batch = (previous ?? Promise.resolve()).catch(() => undefined).then(() => this.makeBatch(request));
    this.batches.set(key, batch);
    try {
      return await batch;
    } finally {
      if (this.batches.get(key) === batch) this.batches.delete(key);
    }
  }

  /**
   * CreateClones with validate_only: every whole-call check of a real call, the disk formats for this
   * hypervisor, one clone's domain XML rendered with the paths it would get, and the names against the
   * host's domains; creates nothing (no directory, child, domain or event). Throws what a real call would.
   */
  async check(request: CreateClonesRequest): Promise<void> {
    this.checkNames(request);
    dataDiskSize(request.dataDiskBytes);
    this.checkGuest(request);
    const backend = this.backendOf(request);
    const source = await this.resolveSource(request, backend);
    for (const disk of source.disks) backend.checkBase(disk);
    const clones = clonesDirectory(this.options.imageDirectory);
    const existingClones = await stat(clones).then(
      () => true,
      () => false,
    );
    await this.checkBackendHere(backend, source, existingClones ? clones : this.options.imageDirectory);
    const name = request.clones[0]!.domainName;
    const cloneDirectory = cloneDirectoryOf(this.options.imageDirectory, name);
    await renderClone(source.template, {
      name,
      hypervisor: this.options.hypervisor,
      cloneDirectory,
      disks: this.childDisks(backend, source, cloneDirectory),
      ...(source.replicaDirectory === undefined ? {} : { imageDirectory: source.replicaDirectory }),
      metadata: cloneMetadataOf(source, request, backend),
    });
    const existing = new Set((await this.options.libvirt.listDomains()).map((domain) => domain.name));
    request.clones.forEach((clone, index) => {
      if (existing.has(clone.domainName)) {
        throw new CowherdError(
          GrpcStatus.ALREADY_EXISTS,
          `a domain named ${clone.domainName} already exists on ${HOST_NAME.format({ host: this.options.host })}`,
          { reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NAME_TAKEN, field: `clones[${index}].domain_name`, metadata: { domain: clone.domainName } },
        );
      }
    });
  }

  /** INVALID_ARGUMENT unless there are 1 to 1000 clones with valid, distinct names. */
  private checkNames(request: CreateClonesRequest): void {
    if (request.clones.length === 0 || request.clones.length > MAX_CLONES_PER_REQUEST)
      throw CowherdError.invalidArgument('clones', `must hold 1 to ${MAX_CLONES_PER_REQUEST} clones`);
    const names = new Set<string>();
    request.clones.forEach((clone, index) => {
      if (!VIRTUAL_MACHINE_ID.test(clone.domainName))
        throw CowherdError.invalidArgument(`clones[${index}].domain_name`, `must match ${VIRTUAL_MACHINE_ID.source}`);
      if (names.has(clone.domainName)) throw CowherdError.invalidArgument(`clones[${index}].domain_name`, 'repeats another clone of this request');
      names.add(clone.domainName);
    });
  }

  /**
   * INVALID_ARGUMENT (naming the field) unless the guest configuration is valid for every clone of the
   * request, `{uuid}` standing in for the UUIDs not drawn yet; and unless the digest, when given, is the
   * configuration's. Returns the digest ('' without a configuration or digest).
   */
  private checkGuest(request: CreateClonesRequest): string {
    const configuration = request.guestConfiguration;
    const given = request.guestConfigurationDigest ?? '';
    if (configuration === undefined) {
      if (given !== '' && !/^[0-9a-f]{64}$/.test(given)) throw CowherdError.invalidArgument('guest_configuration_digest', 'must be a lowercase hex SHA-256');
      return given;
    }
    checkGuestConfiguration(configuration);
    request.clones.forEach((clone, position) =>
      renderGuestIdentity(configuration, { name: clone.domainName, index: clone.index || position + 1, host: this.options.host, uuid: PLACEHOLDER_UUID }),
    );
    const digest = guestConfigurationDigest(configuration);
    if (given !== '' && given !== digest) throw CowherdError.invalidArgument('guest_configuration_digest', 'is not the SHA-256 of guest_configuration');
    return digest;
  }

  /** Validates the request, resolves the source once, then makes each clone; results in request order. */
  private async makeBatch(request: CreateClonesRequest): Promise<CreateCloneResult[]> {
    this.checkNames(request);
    const dataDiskBytes = dataDiskSize(request.dataDiskBytes);
    const guestDigest = this.checkGuest(request);
    const backend = this.backendOf(request);
    const startedAt = performance.now();
    const source = await this.resolveSource(request, backend);
    if (backend.name === 'reflink-copy') {
      // Once for the batch, before any clone's directory or file exists: nothing half-made where it cannot work.
      await mkdir(clonesDirectory(this.options.imageDirectory), { recursive: true });
      await this.checkBackendHere(backend, source, clonesDirectory(this.options.imageDirectory));
    }
    // A streamed base is the replica's file still being written by the fetch (it is protected once complete).
    // A reflink copy reads nothing through its base: a source VM's disks stay as they are.
    if (!source.streamed && backend.name !== 'reflink-copy') for (const disk of source.disks) await protectBase(disk.base);
    // One look at the host's domains for the whole batch (not one virsh call per clone).
    const existing = new Map((await this.options.libvirt.listDomains()).map((domain) => [domain.name, domain]));
    // Prepare every clone (directory, children, XML) with a few in parallel, define them in one virsh
    // process, then start the ones asked for: ~6 ms a clone instead of ~30 with a process per step.
    const listedAt = performance.now();
    // KVM: one qcow2 overlay per base disk made by qemu-img, copied byte for byte for every clone. A
    // qcow2 header holds no per-file identity, so overlays of one base with the same options are
    // identical; a 196 KiB copy costs ~0.2 ms where a qemu-img process costs ~6 ms.
    const prototypes = backend.copiesChildren && request.clones.length > 1 ? await this.makePrototypes(backend, source) : new Map<string, string>();
    let prepared: PreparedClone[];
    try {
      // The empty data disk likewise: made once, copied per clone (an empty qcow2 is its header alone).
      if (dataDiskBytes > 0 && request.clones.length > 1 && backend.copiesChildren) {
        const path = overlayPrototypeFile(this.options.imageDirectory, randomUUID(), 'data');
        prototypes.set(DATA_DISK_PROTOTYPE, path);
        await backend.createEmptyDisk(path, dataDiskBytes);
      }
      prepared = await mapLimited(
        request.clones.map((clone, position) => ({ clone, index: clone.index || position + 1 })),
        PREPARE_CONCURRENCY,
        ({ clone, index }) =>
          this.prepare(backend, source, clone.domainName, index, request, existing.get(clone.domainName), prototypes, guestDigest, dataDiskBytes),
      );
    } finally {
      for (const prototype of prototypes.values()) await rm(prototype, { force: true });
    }
    const preparedAt = performance.now();
    const toDefine = prepared.filter((item): item is PreparedClone & { kind: 'new' } => item.kind === 'new');
    const defineErrors = this.options.libvirt.defineMany
      ? await this.options.libvirt.defineMany(toDefine.map((item) => item.rendered.xml))
      : await Promise.all(
          toDefine.map((item) =>
            this.options.libvirt.define(item.rendered.xml).then(
              () => undefined,
              (error: unknown) => error as Error,
            ),
          ),
        );
    const definedAt = performance.now();
    const defineError = new Map(toDefine.map((item, index) => [item.name, defineErrors[index]]));
    // Starts one after another (at most two TCG guests boot well on two cores); events go out together.
    const results: CreateCloneResult[] = [];
    const publishing: Array<Promise<void>> = [];
    for (const [index, item] of prepared.entries()) {
      const result = await this.finish(source, backend, item, request.clones[index]!.start, request, defineError.get(item.name), publishing, guestDigest);
      // A clone's time is its batch's until it stands defined (and started if asked); found again on a retry: not made now.
      if (item.kind !== 'existing') cloneDuration.observe({ result: result.virtualMachine ? 'done' : 'failed' }, (performance.now() - startedAt) / 1000);
      results.push(result);
    }
    // Every clone.done and clone.failed is recorded before the call answers. A record that cannot be written
    // (the outbox's disk) fails the call, saying what a retry does: clones made are kept and found again.
    await Promise.all(publishing).catch((error: unknown) => {
      const full = /ENOSPC|no space left/i.test(String((error as Error).message));
      throw new CowherdError(
        full ? GrpcStatus.RESOURCE_EXHAUSTED : GrpcStatus.UNAVAILABLE,
        `the clones of this batch were made or rolled back, but their events could not be recorded (${(error as Error).message}); a retry with the same request_id returns the clones and records their events`,
        {
          reason: full ? ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE : ErrorReason.ERROR_REASON_INTERNAL,
          cause: error,
        },
      );
    });
    if (source.imageKey !== undefined && results.some((result) => result.virtualMachine)) await this.options.onReplicaUsed?.(source.imageKey);
    const round = (ms: number): number => Math.round(ms * 10) / 10;
    this.options.log.info(
      {
        clones: results.length,
        failed: results.filter((result) => result.status && result.status.code !== 0).length,
        sourceMs: round(listedAt - startedAt),
        prepareMs: round(preparedAt - listedAt),
        defineMs: round(definedAt - preparedAt),
        finishMs: round(performance.now() - definedAt),
        operation: request.operation,
      },
      'clone batch done',
    );
    return results;
  }

  private async resolveSource(request: CreateClonesRequest, backend: DiskBackend): Promise<ResolvedSource> {
    const source = request.source;
    if (source?.$case === 'image') {
      const id = IMAGE_NAME.parse(source.value)?.image;
      if (!id) throw CowherdError.invalidArgument('image', 'must be images/{image}');
      // A reflink copy needs the base's complete file: never streamed (the streaming server is not asked at all).
      const streams = request.stream && backend.name !== 'reflink-copy';
      const streamed = streams && this.options.streamed ? await this.options.streamed.source(id) : undefined;
      if (streamed) return { metadata: { image: imageNameOfKey(id) }, template: streamed.template, disks: streamed.disks, imageKey: id, streamed };
      const notStreamed = (error: unknown): never => {
        if (request.stream && !streams && error instanceof CowherdError && error.reason === ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST)
          throw CowherdError.failedPrecondition(
            `${error.message}; disk_backend REFLINK_COPY does not stream: a reflink copy needs the replica's complete files (clone once it is AVAILABLE, or with QCOW2_OVERLAY to stream)`,
            ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST,
            { ...error.metadata, disk_backend: 'REFLINK_COPY' },
          );
        throw error;
      };
      const replicaDirectory = this.options.replicaBase
        ? await this.options.replicaBase(id).catch(notStreamed)
        : replicaDirectoryOf(this.options.imageDirectory, id);
      const template = await readFile(templateFile(replicaDirectory), 'utf8').catch(() =>
        notStreamed(
          CowherdError.failedPrecondition(
            `${source.value} has no replica on ${HOST_NAME.format({ host: this.options.host })}`,
            ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST,
          ),
        ),
      );
      const disks = templateDisks(template).map((disk) => ({ target: disk.target, base: replicaFile(replicaDirectory, disk.fileName), format: disk.format }));
      return { metadata: { image: imageNameOfKey(id) }, template, disks, replicaDirectory, imageKey: id };
    }
    if (source?.$case === 'virtualMachine') {
      const ids = VIRTUAL_MACHINE_NAME.parse(source.value);
      if (!ids) throw CowherdError.invalidArgument('virtual_machine', 'must be hosts/{host}/virtualMachines/{vm}');
      if (ids.host !== this.options.host)
        throw CowherdError.invalidArgument(
          'virtual_machine',
          `is on ${HOST_NAME.format({ host: ids.host })}, not on this host (${HOST_NAME.format({ host: this.options.host })})`,
        );
      const domain = await this.options.libvirt.domain(ids.virtualMachine).catch((error: unknown) => {
        throw error instanceof LibvirtError && error.kind === 'domain-not-found' ? CowherdError.notFound(source.value) : error;
      });
      if (domain.state !== 'shut off')
        throw CowherdError.failedPrecondition(
          `${source.value} is ${domain.state}; only a powered-off VM can be cloned`,
          ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING,
        );
      const exported = sanitizeDomainTemplate(await this.options.libvirt.domainXml(domain.uuid));
      const disks = exported.disks.map((disk) => {
        if (!this.inside(disk.sourcePath)) {
          throw new CowherdError(
            GrpcStatus.FAILED_PRECONDITION,
            `${source.value}'s disk ${disk.target} (${disk.sourcePath}) is outside the image directory ${this.options.imageDirectory}`,
            {
              reason: ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY,
              metadata: { path: disk.sourcePath },
            },
          );
        }
        return { target: disk.target, base: disk.sourcePath, format: disk.format };
      });
      // The template names image files; a VM's clones point at the VM's own disks, so render from its paths.
      // Direct-boot files likewise: the clones boot the VM's own kernel, which the template names by its
      // file name in one directory inside the image directory (what a clone of a direct-boot image boots:
      // `images/<image>/boot-kernel`). Anything else is refused here, before anything is made.
      const bootDirectories = new Set(exported.bootFiles.map((file) => dirname(file.sourcePath)));
      for (const file of exported.bootFiles) {
        const refuse = (problem: string): CowherdError =>
          new CowherdError(GrpcStatus.FAILED_PRECONDITION, `${source.value} boots <${file.element}> ${file.sourcePath}, which ${problem}`, {
            reason: ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY,
            metadata: { path: file.sourcePath, element: file.element },
          });
        if (!this.inside(file.sourcePath))
          throw refuse(`is outside the image directory ${this.options.imageDirectory}; clone an image published from it instead`);
        if (basename(file.sourcePath) !== file.fileName || bootDirectories.size > 1)
          throw refuse(
            `cowherd cannot point clones at: clones of a virtual machine boot files named ${exported.bootFiles.map((other) => other.fileName).join(', ')} in one directory (those of an image replica); clone an image published from it instead`,
          );
      }
      const [bootDirectory] = bootDirectories;
      return {
        metadata: { virtualMachine: source.value },
        template: exported.xml,
        disks,
        ...(bootDirectory === undefined ? {} : { replicaDirectory: bootDirectory }),
      };
    }
    throw CowherdError.invalidArgument('source', 'must name an image or a virtual machine');
  }

  /** Everything before libvirt: name check, directory, children, rendered XML. Never throws. */
  private async prepare(
    backend: DiskBackend,
    source: ResolvedSource,
    name: string,
    index: number,
    request: CreateClonesRequest,
    existing: DomainInfo | undefined,
    prototypes: ReadonlyMap<string, string>,
    guestDigest: string,
    dataDiskBytes: number,
  ): Promise<PreparedClone> {
    const cloneDirectory = cloneDirectoryOf(this.options.imageDirectory, name);
    let directoryMade = false;
    try {
      if (existing) {
        // A retried request finds the clones it already made (same request_id in their metadata).
        if (request.requestId !== '' && existing.clone?.requestId === request.requestId) return { kind: 'existing', name, domain: existing };
        throw new CowherdError(GrpcStatus.ALREADY_EXISTS, `a domain named ${name} already exists on ${HOST_NAME.format({ host: this.options.host })}`, {
          reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NAME_TAKEN,
          metadata: { domain: name },
        });
      }
      if (request.guestConfiguration === undefined && (request.guestConfigurationDigest ?? '') !== '')
        throw CowherdError.failedPrecondition(
          `${name} was requested with a guest configuration that this call does not carry (it is never stored, and the operation was resumed elsewhere); it was not made, request it again`,
          ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
          { domain: name },
        );
      await mkdir(clonesDirectory(this.options.imageDirectory), { recursive: true });
      await mkdir(cloneDirectory).catch((error: NodeJS.ErrnoException) => {
        if (error.code === 'EEXIST')
          throw new CowherdError(GrpcStatus.ALREADY_EXISTS, `${cloneDirectory} already exists`, {
            reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NAME_TAKEN,
          });
        throw error;
      });
      directoryMade = true;
      const wanted = this.childDisks(backend, source, cloneDirectory);
      const children = await Promise.all(source.disks.map((disk, position) => this.makeChild(backend, disk, wanted[position]!, prototypes.get(disk.target))));
      // A streaming clone boots files linked into its own directory: the replica's directory exists only once it is complete.
      const bootDirectory =
        source.streamed && source.streamed.bootFiles.length > 0
          ? await this.options.streamed!.linkBootFiles(source.streamed, join(cloneDirectory, 'boot'))
          : source.replicaDirectory;
      let rendered = await renderClone(source.template, {
        name,
        hypervisor: this.options.hypervisor,
        cloneDirectory,
        disks: children,
        ...(bootDirectory === undefined ? {} : { imageDirectory: bootDirectory }),
        metadata: cloneMetadataOf(source, request, backend),
      });
      const overlays = children.map((child) => child.path);
      if (dataDiskBytes > 0) {
        const made = await this.makeDataDisk(backend, cloneDirectory, dataDiskBytes, prototypes.get(DATA_DISK_PROTOTYPE), rendered.xml);
        rendered = { ...rendered, xml: made.xml };
        overlays.push(made.path);
      }
      if (request.guestConfiguration !== undefined) rendered = await this.writeSeed(request.guestConfiguration, guestDigest, rendered, cloneDirectory, index);
      await writeFile(cloneDefinitionFile(cloneDirectory), rendered.xml, { mode: 0o644 });
      return { kind: 'new', name, cloneDirectory, rendered, overlays };
    } catch (error) {
      if (directoryMade) await rm(cloneDirectory, { recursive: true, force: true }).catch(() => undefined);
      return { kind: 'failed', name, error };
    }
  }

  /**
   * The clone's NoCloud seed: its identity rendered with its UUID, the ISO image written (0600: it holds
   * the user-data) into its directory, and attached read-only to its XML. Removed with the directory.
   */
  private async writeSeed(
    configuration: GuestConfiguration,
    digest: string,
    rendered: RenderedClone,
    cloneDirectory: string,
    index: number,
  ): Promise<RenderedClone> {
    const identity = renderGuestIdentity(configuration, { name: rendered.name, index, host: this.options.host, uuid: rendered.uuid });
    const seedPath = cloneSeedFile(cloneDirectory);
    const image = buildSeedImage([
      { name: 'meta-data', content: identity.metaData },
      { name: 'user-data', content: identity.userData },
      ...(identity.networkConfig === undefined ? [] : [{ name: 'network-config', content: identity.networkConfig }]),
    ]);
    // The first 32 KiB (ISO 9660's system area) are zeros: written as a hole, the file takes 24 KiB of disk.
    const handle = await open(seedPath, 'wx', 0o600);
    try {
      await handle.write(image, SEED_SYSTEM_AREA_BYTES, image.length - SEED_SYSTEM_AREA_BYTES, SEED_SYSTEM_AREA_BYTES);
    } finally {
      await handle.close();
    }
    const attached = await attachSeedImage(rendered.xml, { seedPath, cloneDirectory, hypervisor: this.options.hypervisor, digest });
    return { ...rendered, xml: attached.xml };
  }

  /**
   * The clone's persistent data disk in its directory (`data.qcow2` or `data.vhd`): the batch's empty disk
   * copied, or made here, then attached on the system disk's bus. Removed with the directory on any failure.
   */
  private async makeDataDisk(
    backend: DiskBackend,
    cloneDirectory: string,
    bytes: number,
    prototype: string | undefined,
    xml: string,
  ): Promise<{ xml: string; path: string }> {
    const path = cloneDataDiskFile(cloneDirectory, backend.extension);
    await backend.createEmptyDisk(path, bytes, prototype);
    const attached = await attachDataDisk(xml, { diskPath: path, cloneDirectory, hypervisor: this.options.hypervisor });
    return { xml: attached.xml, path };
  }

  /** One qemu-img overlay per base disk, in the clones directory (same file system, so copies are cheap). */
  private async makePrototypes(backend: DiskBackend, source: ResolvedSource): Promise<Map<string, string>> {
    await mkdir(clonesDirectory(this.options.imageDirectory), { recursive: true });
    const prototypes = new Map<string, string>();
    try {
      for (const disk of source.disks) {
        // A base this backend cannot use fails each clone in prepare(), with the reason.
        if (!backend.accepts(disk.format)) continue;
        const path = overlayPrototypeFile(this.options.imageDirectory, randomUUID(), disk.target);
        await backend.createChild(disk, path);
        prototypes.set(disk.target, path);
      }
    } catch (error) {
      for (const path of prototypes.values()) await rm(path, { force: true });
      throw error;
    }
    return prototypes;
  }

  private async makeChild(backend: DiskBackend, disk: ResolvedSource['disks'][number], child: ChildDisk, prototype?: string): Promise<ChildDisk> {
    await backend.createChild(disk, child.path, prototype);
    return child;
  }

  /** After the batch define: start if asked, publish, or roll back and report. */
  private async finish(
    source: ResolvedSource,
    backend: DiskBackend,
    item: PreparedClone,
    start: boolean,
    request: CreateClonesRequest,
    defineError: Error | undefined,
    publishing: Array<Promise<void>>,
    guestDigest: string,
  ): Promise<CreateCloneResult> {
    const name = item.name;
    const log = this.options.log.child({ clone: name, operation: request.operation });
    if (item.kind === 'existing') {
      const running = item.domain.state === 'running';
      const overlays = item.domain.disks.map((disk) => disk.sourcePath ?? '');
      const vm = this.toVirtualMachine(
        name,
        item.domain.uuid,
        running ? VirtualMachine_State.STATE_RUNNING : VirtualMachine_State.STATE_SHUT_OFF,
        source,
        overlays,
        guestDigest,
        item.domain.clone?.diskBackend,
      );
      // Recorded again with the same id: if the first attempt died between the define and the record,
      // this is the clone.done it owed; if not, the stream drops the repeat.
      publishing.push(this.publishDone(vm, item.domain.uuid, overlays, running, request, source));
      return { domainName: name, virtualMachine: vm, status: undefined, streaming: source.streamed !== undefined, started: running };
    }
    let failure: unknown = item.kind === 'failed' ? item.error : defineError === undefined ? undefined : hypervisorError(defineError);
    if (failure === undefined && item.kind === 'new') {
      let started = false;
      let startError: unknown;
      if (start) {
        try {
          await this.options.libvirt.start(name);
          started = true;
        } catch (error) {
          // The clone stays defined; the result says the start failed.
          startError = error;
        }
      }
      const vm = this.toVirtualMachine(
        name,
        item.rendered.uuid,
        started ? VirtualMachine_State.STATE_RUNNING : VirtualMachine_State.STATE_SHUT_OFF,
        source,
        item.overlays,
        guestDigest,
        backend.name,
      );
      publishing.push(this.publishDone(vm, item.rendered.uuid, [...item.overlays], started, request, source));
      log.debug({ started, overlays: item.overlays.length }, 'clone made');
      return {
        domainName: name,
        virtualMachine: vm,
        status: startError === undefined ? undefined : toStatus(hypervisorError(startError)),
        streaming: source.streamed !== undefined,
        started,
      };
    }
    if (item.kind === 'new') {
      // Defined nothing (the define failed): remove what was prepared.
      await rm(item.cloneDirectory, { recursive: true, force: true }).catch((error: unknown) =>
        log.error({ err: error }, 'rollback: removing the clone directory failed'),
      );
    }
    failure = failure instanceof LibvirtError ? hypervisorError(failure) : failure;
    log.warn({ err: failure }, 'clone failed and was rolled back');
    const status = toStatus(failure);
    // One clone.failed per clone of an operation (or request); a request with neither is its own occurrence.
    // No catch: publish only records the event (the outbox sends it), and a record that cannot be written
    // fails the call, whose retry with the same request_id records it again.
    const occurrence = request.operation || request.requestId || randomUUID();
    publishing.push(
      this.options.events.publish(
        CLONE_FAILED,
        {
          virtualMachine: VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: name }),
          host: HOST_NAME.format({ host: this.options.host }),
          domainName: name,
          uuid: '',
          image: 'image' in source.metadata ? source.metadata.image : '',
          sourceVirtualMachine: 'virtualMachine' in source.metadata ? source.metadata.virtualMachine : '',
          overlays: [],
          status,
          operation: request.operation,
          occurTime: new Date(),
        },
        { host: this.options.host, id: `clone.failed/${occurrence}/${this.options.host}/${name}` },
      ),
    );
    return { domainName: name, virtualMachine: undefined, status, streaming: false, started: false };
  }

  private toVirtualMachine(
    name: string,
    uuid: string,
    state: VirtualMachine_State,
    source: ResolvedSource,
    overlays: readonly string[],
    guestDigest: string,
    diskBackend: DiskBackendName | undefined,
  ): VirtualMachine {
    const image = 'image' in source.metadata ? source.metadata.image : '';
    const imageVersion = source.imageKey === undefined ? '' : imageVersionNameOfKey(source.imageKey);
    return VirtualMachine.fromPartial({
      name: VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: name }),
      host: HOST_NAME.format({ host: this.options.host }),
      domainName: name,
      uuid,
      state,
      sourceImage: image,
      sourceImageVersion: imageVersion,
      managed: true,
      ...(guestDigest === '' ? {} : { guestConfigurationDigest: guestDigest }),
      lineage: {
        image,
        imageVersion,
        replica: source.imageKey === undefined ? '' : HOST_IMAGE_NAME.format({ host: this.options.host, image: source.imageKey }),
        sourceVirtualMachine: 'virtualMachine' in source.metadata ? source.metadata.virtualMachine : '',
        overlays: [...overlays],
        diskBackend: diskBackendValue(diskBackend),
      },
    });
  }

  /**
   * Records clone.done; resolves once it is durable in the outbox, which publishes it until JetStream has
   * it. The id names the clone (operation or request, host, domain), so a retry that finds the clone
   * records the same id and the stream keeps one. A record that cannot be written fails the call.
   */
  private async publishDone(
    vm: VirtualMachine,
    uuid: string,
    overlays: string[],
    started: boolean,
    request: CreateClonesRequest,
    source: ResolvedSource,
  ): Promise<void> {
    await this.options.events.publish(
      CLONE_DONE,
      {
        imageVersion: source.imageKey === undefined ? '' : imageVersionNameOfKey(source.imageKey),
        virtualMachine: vm.name,
        host: vm.host,
        domainName: vm.domainName,
        uuid,
        image: 'image' in source.metadata ? source.metadata.image : '',
        sourceVirtualMachine: 'virtualMachine' in source.metadata ? source.metadata.virtualMachine : '',
        overlays,
        started,
        operation: request.operation,
        occurTime: new Date(),
        diskBackend: vm.lineage?.diskBackend ?? diskBackendValue(undefined),
      },
      { host: this.options.host, id: `clone.done/${request.operation || request.requestId || uuid}/${this.options.host}/${vm.domainName}` },
    );
  }

  private inside(path: string): boolean {
    return isInsideImageDirectory(this.options.imageDirectory, path);
  }
}

function hypervisorError(error: unknown): CowherdError {
  if (error instanceof CowherdError) return error;
  return new CowherdError(GrpcStatus.INTERNAL, `libvirt: ${(error as Error).message}`, { reason: ErrorReason.ERROR_REASON_HYPERVISOR_ERROR, cause: error });
}
