/**
 * Moving clones on this host onto another version of their image (AgentService.RebaseClones, the agent's part
 * of RebaseVirtualMachines / recompose). Per clone: shut down gracefully if it runs; a fresh system-disk overlay
 * on the target replica's disk (made once per call by qemu-img as a prototype, copied per clone, as CreateClones
 * does) written beside the old one as `.<file>.rebase`; the old overlay hard-linked to `.<file>.previous`; the
 * new one renamed over the old path; the domain redefined with the same XML but for its lineage record
 * (imageVersion = target, previousImageVersion = old); `.previous` removed. The domain XML never changes its
 * disk paths, so the rename is the switch:
 *   - a crash before the rename leaves the clone on its old version (the work files are removed by the next
 *     rebase of the clone);
 *   - a crash after it leaves a clone that boots on the new version with a stale lineage record; the next
 *     rebase onto the same target finds the system disk's backing file in the target's replica directory and
 *     only rewrites the record (the disk is the truth, the record follows), so a retry converges;
 *   - a redefinition that fails puts `.previous` back over the path: the clone stays on its old version.
 * Images with several system disks switch one rename per disk; a crash between two of them leaves a mixed
 * clone whose retry makes both new (the first disk's backing file decides which version it stands on).
 * Persistent disks (data_disk_bytes), the seed disk, name, UUID and MACs are never touched, neither base is
 * ever opened for writing, and the overlays are new files (no guest data of the system disk is kept, as in
 * Horizon's recompose). Calls run one at a time on a host: two rebases of one clone never interleave.
 *
 * Each clone keeps its disk backend (its metadata's `diskBackend`; the host's standard when it has none). A
 * `reflink-copy` clone gets a new reflink copy of the target's disk the same way (work file, link, rename), and
 * only when the target's disk has the format of the one it replaces (a raw copy stays raw: the domain XML's
 * driver is not rewritten), else that clone fails with FAILED_PRECONDITION and stays as it is. Its disk has no
 * backing file, so its version is its record's: a crash after the switch leaves the record on the old version,
 * and the retry copies the target again (the same result, one copy more) instead of only rewriting the record.
 */
import { randomUUID } from 'node:crypto';
import { link, mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { RebaseCloneResult, RebaseClonesRequest } from '../gen/cowherd/agent/v1/agent_service.js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { VirtualMachine, VirtualMachine_State } from '../gen/cowherd/inventory/v1/resources.js';
import { CLONE_REBASED } from '../common/domain/event-types.js';
import {
  HOST_IMAGE_NAME,
  HOST_NAME,
  IMAGE_NAME,
  imageNameOfKey,
  imageVersionNameOfKey,
  parseImageKey,
  VIRTUAL_MACHINE_NAME,
} from '../common/domain/resource-names.js';
import { mapLimited } from '../common/platform/concurrency.js';
import { CowherdError, toStatus } from '../common/platform/errors.js';
import type { EventPublisher } from '../common/platform/events.js';
import type { Logger } from '../common/platform/logger.js';
import {
  backingChain,
  cloneImageKey,
  dependsOnBase,
  diskBackendFor,
  imageKeyOfBackingFile,
  LibvirtError,
  readCloneMetadata,
  templateDisks,
  updateCloneMetadata,
  virtualMachineId,
  virtualMachineState,
  withNewInstanceId,
  type DiskBackend,
  type DomainInfo,
  type HypervisorKind,
  type Libvirt,
} from './hypervisor/index.js';
import {
  cloneDefinitionFile,
  cloneDirectory as cloneDirectoryOf,
  cloneSeedFile,
  clonesDirectory,
  overlayPrototypeFile,
  rebaseWorkFile,
  replicaDirectory as replicaDirectoryOf,
  replicaFile,
  templateFile,
} from './image-directory/index.js';

/** Clones per call at most (the proto's limit). */
export const MAX_CLONES_PER_REBASE = 1000;
/** How long a running guest gets to shut down when the call names no timeout (the proto's default). */
export const DEFAULT_SHUTDOWN_TIMEOUT_MS = 120_000;
/** The longest shutdown_timeout a call may ask for. */
export const MAX_SHUTDOWN_TIMEOUT_MS = 3_600_000;
/** Overlays copied and XML rewritten this many clones at a time. */
const PREPARE_CONCURRENCY = 4;
/** How often a shutting-down guest's state is read. */
const SHUTDOWN_POLL_MS = 250;

/** What the rebase job needs. */
export interface CloneRebaseOptions {
  readonly host: string;
  readonly imageDirectory: string;
  readonly hypervisor: HypervisorKind;
  readonly libvirt: Libvirt;
  readonly events: Pick<EventPublisher, 'publish'>;
  readonly log: Logger;
  /**
   * The verified directory of the target replica (image-transfers.ts rebaseBase): FAILED_PRECONDITION
   * (RESOURCE_STATE_CONFLICT) when it is not AVAILABLE; undefined when this host does not track the replica
   * (then `images/<key>` must hold a template, else NOT_FOUND).
   */
  readonly replicaBase?: (imageKey: string) => Promise<string | undefined>;
  /** Called with the target's storage key when any clone moved onto it (its last_use_time). */
  readonly onReplicaUsed?: (imageKey: string) => Promise<void>;
}

/** A system disk of a clone and the base it gets. */
interface SystemDisk {
  readonly target: string;
  /** The overlay's path, kept by the move. */
  readonly path: string;
  readonly base: string;
  readonly format: 'qcow2' | 'raw' | 'vpc';
}

/** One requested clone as the call goes along. */
interface CloneMove {
  readonly index: number;
  readonly name: string;
  domain?: DomainInfo;
  /** How its new system disks are made: the backend its metadata records (the host's standard without one). */
  backend?: DiskBackend;
  systemDisks: SystemDisk[];
  /** The storage key of the version it stands on (its system disk's backing file, else its record). */
  currentKey?: string;
  /** The storage key of the version it moves from (its record's, after a crash between switch and record). */
  previousKey?: string;
  /** Its persistent definition before the move. */
  currentXml?: string;
  /** 'swap': new overlays; 'record': only the lineage record (a crash after the switch); 'none': already there. */
  action: 'swap' | 'record' | 'none';
  /** Already there by this very operation (a retry after the agent died before it answered): its event again. */
  again: boolean;
  wasRunning: boolean;
  error?: unknown;
  /** The new definition. */
  xml?: string;
  /** The seed with its new instance-id, waiting beside the old one. */
  seedWork?: string;
  swapMs: number;
  restarted: boolean;
}

/** RebaseClones for this host; one instance per agent. */
export class CloneRebaser {
  /** Calls run one after another on a host. */
  private queue: Promise<unknown> = Promise.resolve();

  /** The host's standard backend (qcow2 overlays on KVM, VHD differencing disks on Xen): the one whose children a call's prototypes are. */
  private readonly standard: DiskBackend;

  constructor(private readonly options: CloneRebaseOptions) {
    this.standard = diskBackendFor(options.hypervisor);
  }

  /** Validates the whole call, then moves each clone; results in request order. */
  async rebase(request: RebaseClonesRequest): Promise<RebaseCloneResult[]> {
    const run = this.queue.catch(() => undefined).then(() => this.run(request));
    this.queue = run;
    return run;
  }

  private async run(request: RebaseClonesRequest): Promise<RebaseCloneResult[]> {
    const startedAt = performance.now();
    const { targetKey, names, shutdownTimeoutMs } = this.checkRequest(request);
    const replica = await this.targetReplica(targetKey, request.imageVersion);
    const template = await readFile(templateFile(replica), 'utf8').catch(() => {
      throw new CowherdError(GrpcStatus.NOT_FOUND, `${HOST_IMAGE_NAME.format({ host: this.options.host, image: targetKey })} has no domain template`, {
        reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND,
        metadata: { resource: HOST_IMAGE_NAME.format({ host: this.options.host, image: targetKey }) },
      });
    });
    const bases = new Map(templateDisks(template).map((disk) => [disk.target, { base: replicaFile(replica, disk.fileName), format: disk.format }]));
    // Only the named domains are read (half the libvirt round trips of listing a host with as many others);
    // every domain only when a clone's disks show it was ever a clone source (see hasDependents).
    const libvirt = this.options.libvirt;
    const named = libvirt.domainsMany
      ? await libvirt.domainsMany(names)
      : await libvirt.listDomains().then((all) => names.map((name) => all.find((domain) => domain.name === name || domain.uuid === name.toLowerCase())));
    let everyDomain: Promise<DomainInfo[]> | undefined;
    const allDomains = (): Promise<DomainInfo[]> => (everyDomain ??= libvirt.listDomains());
    const moves: CloneMove[] = names.map((name, index) => ({
      index,
      name,
      systemDisks: [],
      action: 'none',
      again: false,
      wasRunning: false,
      swapMs: 0,
      restarted: false,
    }));
    for (const move of moves) {
      try {
        await this.inspect(move, named[move.index], allDomains, targetKey, bases, request.operation);
      } catch (error) {
        move.error = error;
      }
    }
    const inspectedAt = performance.now();
    // Running guests shut down together; one that does not stop in time stays running on its old version.
    await Promise.all(moves.filter((move) => !move.error && move.action === 'swap' && move.wasRunning).map((move) => this.shutDown(move, shutdownTimeoutMs)));
    const stoppedAt = performance.now();
    await this.readDefinitions(moves.filter((move) => !move.error && move.action !== 'none'));
    // Prototypes for the clones of the standard backend only (a reflink copy is as cheap as a prototype would be).
    const swapping = moves.filter((move) => !move.error && move.action === 'swap' && move.backend === this.standard);
    const prototypes = this.standard.copiesChildren && swapping.length > 1 ? await this.makePrototypes(swapping, bases) : new Map<string, string>();
    try {
      await mapLimited(
        moves.filter((move) => !move.error && move.action !== 'none'),
        PREPARE_CONCURRENCY,
        (move) => this.prepare(move, targetKey, prototypes, request.newInstanceId, request.operation),
      );
    } finally {
      for (const prototype of prototypes.values()) await rm(prototype, { force: true });
    }
    const preparedAt = performance.now();
    await this.switchAndRedefine(moves.filter((move) => !move.error && move.action !== 'none' && move.xml !== undefined));
    const definedAt = performance.now();
    const publishing: Array<Promise<void>> = [];
    const results: RebaseCloneResult[] = [];
    for (const move of moves) results.push(await this.finish(move, request, targetKey, publishing));
    await Promise.all(publishing).catch((error: unknown) => {
      throw new CowherdError(
        GrpcStatus.UNAVAILABLE,
        `the clones were moved or left as they were, but their clone.rebased events could not be recorded (${(error as Error).message}); a retry finds them on the version and records the events`,
        { reason: ErrorReason.ERROR_REASON_INTERNAL, cause: error },
      );
    });
    if (moves.some((move) => !move.error && move.action !== 'none')) await this.options.onReplicaUsed?.(targetKey);
    const round = (ms: number): number => Math.round(ms * 10) / 10;
    this.options.log.info(
      {
        clones: moves.length,
        moved: moves.filter((move) => !move.error && move.action === 'swap').length,
        failed: moves.filter((move) => move.error).length,
        inspectMs: round(inspectedAt - startedAt),
        shutdownMs: round(stoppedAt - inspectedAt),
        prepareMs: round(preparedAt - stoppedAt),
        defineMs: round(definedAt - preparedAt),
        finishMs: round(performance.now() - definedAt),
        imageVersion: request.imageVersion,
        operation: request.operation,
      },
      'rebase done',
    );
    return results;
  }

  /** The whole call's INVALID_ARGUMENT checks; the target's key, the clones' ids, the shutdown timeout. */
  private checkRequest(request: RebaseClonesRequest): { targetKey: string; names: string[]; shutdownTimeoutMs: number } {
    const targetKey = /\/versions\/[0-9]+$/.test(request.imageVersion) ? IMAGE_NAME.parse(request.imageVersion)?.image : undefined;
    if (targetKey === undefined) throw CowherdError.invalidArgument('image_version', 'must be images/{image}/versions/{version} with a version number');
    if (request.virtualMachines.length === 0 || request.virtualMachines.length > MAX_CLONES_PER_REBASE)
      throw CowherdError.invalidArgument('virtual_machines', `must hold 1 to ${MAX_CLONES_PER_REBASE} virtual machines`);
    const seen = new Set<string>();
    const names = request.virtualMachines.map((name, index) => {
      const ids = VIRTUAL_MACHINE_NAME.parse(name);
      if (!ids) throw CowherdError.invalidArgument(`virtual_machines[${index}]`, 'must be hosts/{host}/virtualMachines/{virtual_machine}');
      if (ids.host !== this.options.host)
        throw CowherdError.invalidArgument(`virtual_machines[${index}]`, `is on ${HOST_NAME.format({ host: ids.host })}, not on this host`);
      if (seen.has(ids.virtualMachine)) throw CowherdError.invalidArgument(`virtual_machines[${index}]`, 'repeats another virtual machine of this request');
      seen.add(ids.virtualMachine);
      return ids.virtualMachine;
    });
    let shutdownTimeoutMs = DEFAULT_SHUTDOWN_TIMEOUT_MS;
    if (request.shutdownTimeout) {
      shutdownTimeoutMs = Number(request.shutdownTimeout.seconds) * 1000 + request.shutdownTimeout.nanos / 1e6;
      if (!(shutdownTimeoutMs >= 0) || shutdownTimeoutMs > MAX_SHUTDOWN_TIMEOUT_MS || request.shutdownTimeout.nanos < 0)
        throw CowherdError.invalidArgument('shutdown_timeout', 'must be 0 to 1 hour');
      if (shutdownTimeoutMs === 0) shutdownTimeoutMs = DEFAULT_SHUTDOWN_TIMEOUT_MS;
    }
    return { targetKey, names, shutdownTimeoutMs };
  }

  /** The target replica's directory: NOT_FOUND without one, FAILED_PRECONDITION while it is not AVAILABLE. */
  private async targetReplica(key: string, imageVersion: string): Promise<string> {
    const tracked = this.options.replicaBase ? await this.options.replicaBase(key) : undefined;
    if (tracked !== undefined) return tracked;
    const directory = replicaDirectoryOf(this.options.imageDirectory, key);
    const present = await stat(templateFile(directory)).then(
      () => true,
      () => false,
    );
    if (!present) {
      const replica = HOST_IMAGE_NAME.format({ host: this.options.host, image: key });
      throw new CowherdError(GrpcStatus.NOT_FOUND, `${imageVersion} has no replica on ${HOST_NAME.format({ host: this.options.host })}`, {
        reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND,
        metadata: { resource: replica },
      });
    }
    return directory;
  }

  /** Per-clone checks and what the move must do (throws the clone's error). */
  private async inspect(
    move: CloneMove,
    domain: DomainInfo | undefined,
    allDomains: () => Promise<DomainInfo[]>,
    targetKey: string,
    bases: ReadonlyMap<string, { base: string; format: 'qcow2' | 'raw' | 'vpc' }>,
    operation: string,
  ): Promise<void> {
    const name = VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: move.name });
    if (!domain) throw CowherdError.notFound(name);
    move.domain = domain;
    const clone = domain.clone;
    if (!clone)
      throw CowherdError.failedPrecondition(
        `${name} was not made by cowherd; only its clones are rebased`,
        ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NOT_MANAGED,
        {
          virtualMachine: name,
        },
      );
    if (!('image' in clone.source))
      throw CowherdError.invalidArgument(
        `virtual_machines[${move.index}]`,
        `${name} is a clone of a virtual machine (${clone.source.virtualMachine}), not of an image`,
      );
    // CreateClones makes a source VM's disks read-only before it clones them: a clone whose file disks are all
    // writable was never a clone source, and the host's other domains need not be read.
    const everWasSource = await Promise.all(
      domain.disks.map((disk) =>
        disk.type === 'file' && disk.sourcePath !== undefined
          ? stat(disk.sourcePath).then(
              (stats) => (stats.mode & 0o222) === 0,
              () => true,
            )
          : false,
      ),
    );
    const all = everWasSource.some(Boolean) ? await allDomains() : [];
    const dependents = all.filter(
      (other) => other.clone && dependsOnBase(other.clone) && 'virtualMachine' in other.clone.source && other.clone.source.virtualMachine === name,
    );
    if (dependents.length > 0)
      throw CowherdError.failedPrecondition(
        `${dependents.length} clones use ${name}'s disks as their base`,
        ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_HAS_DEPENDENTS,
        {
          dependents: dependents
            .slice(0, 20)
            .map((other) => VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: virtualMachineId(other) }))
            .join(','),
        },
      );
    // The system disks: the clone's own children of template disks (not its persistent disks, not the seed).
    const persistent = new Set(clone.persistentDisks ?? []);
    const own = resolve(cloneDirectoryOf(this.options.imageDirectory, domain.name));
    const children = domain.disks.filter(
      (disk) =>
        disk.type === 'file' &&
        disk.device === 'disk' &&
        disk.sourcePath !== undefined &&
        !persistent.has(disk.target) &&
        dirname(resolve(disk.sourcePath)) === own &&
        resolve(disk.sourcePath) !== resolve(cloneSeedFile(own)),
    );
    let currentKey: string | undefined;
    for (const disk of children) {
      const chain = await backingChain(disk.sourcePath!);
      const base = chain?.at(-1);
      currentKey = base === undefined ? undefined : imageKeyOfBackingFile(base);
      if (currentKey !== undefined) break;
    }
    currentKey ??= cloneImageKey(clone);
    move.currentKey = currentKey;
    const current = currentKey === undefined ? undefined : parseImageKey(currentKey);
    const target = parseImageKey(targetKey)!;
    if (!current || current.id !== target.id)
      throw CowherdError.invalidArgument(
        `virtual_machines[${move.index}]`,
        `${name} is a clone of ${clone.source.image}, not of ${imageNameOfKey(targetKey)}: a clone moves only between versions of its own image`,
      );
    const targets = new Set(children.map((disk) => disk.target));
    if (targets.size !== bases.size || [...bases.keys()].some((target) => !targets.has(target)))
      throw CowherdError.failedPrecondition(
        `${name}'s system disks (${[...targets].join(', ') || 'none'}) are not those of ${imageVersionNameOfKey(targetKey)} (${[...bases.keys()].join(', ')})`,
        ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
        { virtualMachine: name },
      );
    move.systemDisks = children.map((disk) => ({ target: disk.target, path: disk.sourcePath!, ...bases.get(disk.target)! }));
    // The clone's own backend (FAILED_PRECONDITION, HYPERVISOR_MISMATCH, when this host cannot run it).
    const backend = diskBackendFor(this.options.hypervisor, clone.diskBackend);
    move.backend = backend;
    if (backend.name === 'reflink-copy') {
      // The new copy replaces the file under the same name and driver: it must have the format of the old one.
      for (const disk of children) {
        const wanted = bases.get(disk.target)!.format;
        if (disk.format !== undefined && disk.format !== wanted)
          throw CowherdError.failedPrecondition(
            `${name} is a reflink copy whose disk ${disk.target} is ${disk.format}, but ${imageVersionNameOfKey(targetKey)}'s is ${wanted === 'vpc' ? 'VHD' : wanted}: a rebase keeps a reflink copy's format; clone ${imageVersionNameOfKey(targetKey)} instead`,
            ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
            { virtualMachine: name, disk: disk.target },
          );
      }
    }
    if (currentKey !== targetKey) {
      move.action = 'swap';
      move.previousKey = currentKey;
    } else if (clone.imageVersion !== imageVersionNameOfKey(targetKey)) {
      // The disk stands on the target but the record does not say so: a crash after the switch. The record's
      // version (or, for a clone made before versions existed, its image's version 1) is the one it left.
      move.action = 'record';
      const recorded = cloneImageKey(clone);
      if (recorded !== undefined && recorded !== targetKey) move.previousKey = recorded;
    } else if (operation !== '' && clone.rebaseOperation === operation) {
      move.again = true;
      move.previousKey = clone.previousImageVersion ? IMAGE_NAME.parse(clone.previousImageVersion)?.image : undefined;
    }
    move.wasRunning = domain.state !== 'shut off';
    // Work files of a rebase that died (calls run one at a time, so none is in use): never part of the domain.
    for (const disk of move.systemDisks) {
      await rm(rebaseWorkFile(disk.path, 'rebase'), { force: true });
      await rm(rebaseWorkFile(disk.path, 'previous'), { force: true });
    }
    await rm(rebaseWorkFile(cloneSeedFile(own), 'rebase'), { force: true });
  }

  /** The persistent definitions of the clones to change, in one virsh process. */
  private async readDefinitions(moves: CloneMove[]): Promise<void> {
    if (moves.length === 0) return;
    const libvirt = this.options.libvirt;
    const documents = libvirt.inactiveXmlMany
      ? await libvirt.inactiveXmlMany(moves.map((move) => move.domain!.uuid))
      : await Promise.all(moves.map((move) => libvirt.domainXml(move.domain!.uuid).catch(() => '')));
    moves.forEach((move, index) => {
      const xml = documents[index] ?? '';
      if (xml.trim() === '') move.error = CowherdError.notFound(VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: move.name }));
      else move.currentXml = xml;
    });
  }

  /** ACPI shutdown and a wait up to the timeout; DEADLINE_EXCEEDED (the guest keeps running) when it does not stop. */
  private async shutDown(move: CloneMove, timeoutMs: number): Promise<void> {
    const domain = move.domain!;
    const name = VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: move.name });
    try {
      if (!this.options.libvirt.shutdown) throw new LibvirtError('operation-invalid', 'this libvirt cannot shut a guest down gracefully');
      await this.options.libvirt.shutdown(domain.uuid);
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const now = await this.options.libvirt.domain(domain.uuid);
        if (now.state === 'shut off') {
          move.domain = now;
          return;
        }
        if (Date.now() >= deadline)
          throw new CowherdError(
            GrpcStatus.DEADLINE_EXCEEDED,
            `${name} did not shut down within ${Math.round(timeoutMs / 1000)} s; it keeps running on ${imageVersionNameOfKey(move.currentKey!)}`,
            { reason: ErrorReason.ERROR_REASON_HYPERVISOR_ERROR, metadata: { virtualMachine: name } },
          );
        await new Promise((resolveWait) => setTimeout(resolveWait, Math.min(SHUTDOWN_POLL_MS, Math.max(10, deadline - Date.now()))));
      }
    } catch (error) {
      move.error = hypervisorError(error);
    }
  }

  /** One qemu-img overlay per target disk for the whole call, copied per clone (CreateClones' measurement). */
  private async makePrototypes(
    moves: readonly CloneMove[],
    bases: ReadonlyMap<string, { base: string; format: 'qcow2' | 'raw' | 'vpc' }>,
  ): Promise<Map<string, string>> {
    await mkdir(clonesDirectory(this.options.imageDirectory), { recursive: true });
    const prototypes = new Map<string, string>();
    const targets = new Set(moves.flatMap((move) => move.systemDisks.map((disk) => disk.target)));
    try {
      for (const target of targets) {
        const base = bases.get(target)!;
        // A base this backend cannot use fails each clone in prepare(), with the reason.
        if (!this.standard.accepts(base.format)) continue;
        const path = overlayPrototypeFile(this.options.imageDirectory, randomUUID(), target);
        await this.standard.createChild({ target, base: base.base, format: base.format }, path);
        prototypes.set(target, path);
      }
    } catch (error) {
      for (const path of prototypes.values()) await rm(path, { force: true });
      throw error;
    }
    return prototypes;
  }

  /**
   * Before the switch: the new overlays as `.<file>.rebase`, the new definition, the seed with its new
   * instance-id as `.cidata.iso.rebase`. Nothing the clone uses is touched; a failure removes the work files.
   */
  private async prepare(
    move: CloneMove,
    targetKey: string,
    prototypes: ReadonlyMap<string, string>,
    newInstanceId: boolean,
    rebaseOperation: string,
  ): Promise<void> {
    const started = performance.now();
    const domain = move.domain!;
    const work: string[] = [];
    try {
      if (move.action === 'swap') {
        for (const disk of move.systemDisks) {
          // A crashed rebase's leftovers went in inspect().
          const next = rebaseWorkFile(disk.path, 'rebase');
          work.push(next);
          const backend = move.backend ?? this.standard;
          await backend.createChild(disk, next, backend === this.standard ? prototypes.get(disk.target) : undefined);
        }
      }
      if (newInstanceId && move.action === 'swap') {
        const seed = cloneSeedFile(cloneDirectoryOf(this.options.imageDirectory, domain.name));
        const image = await readFile(seed).catch((error: NodeJS.ErrnoException) => {
          if (error.code === 'ENOENT') return undefined;
          throw error;
        });
        // A clone made without a guest configuration has no seed: no instance-id to renew.
        if (image !== undefined) {
          const seedWork = rebaseWorkFile(seed, 'rebase');
          work.push(seedWork);
          await writeFile(seedWork, withNewInstanceId(image, randomUUID()), { mode: 0o600, flag: 'wx' });
          move.seedWork = seedWork;
        }
      }
      move.xml = updateCloneMetadata(move.currentXml!, {
        imageVersion: imageVersionNameOfKey(targetKey),
        ...(move.previousKey === undefined ? {} : { previousImageVersion: imageVersionNameOfKey(move.previousKey) }),
        rebaseOperation,
      });
    } catch (error) {
      for (const path of work) await rm(path, { force: true }).catch(() => undefined);
      move.seedWork = undefined;
      move.error = error instanceof CowherdError ? error : hypervisorError(error);
    }
    move.swapMs += performance.now() - started;
  }

  /**
   * The switch for every prepared clone, then one redefinition of all of them (one virsh process), then the
   * check that each definition carries its new record; a clone whose redefinition failed gets its old overlays
   * back. The seed's new instance-id goes in last, only for clones that moved.
   */
  private async switchAndRedefine(moves: CloneMove[]): Promise<void> {
    if (moves.length === 0) return;
    const started = performance.now();
    const switched: CloneMove[] = [];
    for (const move of moves) {
      const begun = performance.now();
      const done: SystemDisk[] = [];
      try {
        if (move.action === 'swap') {
          for (const disk of move.systemDisks) {
            await link(disk.path, rebaseWorkFile(disk.path, 'previous'));
            await rename(rebaseWorkFile(disk.path, 'rebase'), disk.path);
            done.push(disk);
          }
        }
        switched.push(move);
      } catch (error) {
        await this.undoSwitch(move, done);
        move.error = hypervisorError(error);
      }
      move.swapMs += performance.now() - begun;
    }
    const defineStarted = performance.now();
    const errors = await this.redefine(switched);
    const defineShare = (performance.now() - defineStarted) / Math.max(1, switched.length);
    for (const [index, move] of switched.entries()) {
      const begun = performance.now();
      const error = errors[index];
      if (error) {
        await this.undoSwitch(move, move.action === 'swap' ? move.systemDisks : []);
        move.error = hypervisorError(error);
      } else {
        for (const disk of move.action === 'swap' ? move.systemDisks : []) await rm(rebaseWorkFile(disk.path, 'previous'), { force: true });
        await writeFile(cloneDefinitionFile(cloneDirectoryOf(this.options.imageDirectory, move.domain!.name)), move.xml!, { mode: 0o644 }).catch(
          () => undefined,
        );
      }
      move.swapMs += performance.now() - begun + defineShare;
    }
    this.options.log.debug({ clones: moves.length, ms: Math.round(performance.now() - started) }, 'rebase switch and redefine');
  }

  /** Puts the old overlays back (`.previous` over the path) and removes the work files. */
  private async undoSwitch(move: CloneMove, switchedDisks: readonly SystemDisk[]): Promise<void> {
    for (const disk of switchedDisks) {
      await rename(rebaseWorkFile(disk.path, 'previous'), disk.path).catch((error: unknown) =>
        this.options.log.error({ err: error, clone: move.name, disk: disk.path }, 'rebase rollback: restoring the old overlay failed'),
      );
    }
    for (const disk of move.systemDisks) {
      await rm(rebaseWorkFile(disk.path, 'rebase'), { force: true }).catch(() => undefined);
      await rm(rebaseWorkFile(disk.path, 'previous'), { force: true }).catch(() => undefined);
    }
    if (move.seedWork) await rm(move.seedWork, { force: true }).catch(() => undefined);
    move.seedWork = undefined;
  }

  /**
   * Redefines the clones in one virsh process, each definition read back in the same process (a batch cannot
   * say which define failed); a clone whose record did not take is defined again alone, for its error.
   */
  private async redefine(moves: readonly CloneMove[]): Promise<Array<Error | undefined>> {
    const libvirt = this.options.libvirt;
    const documents = moves.map((move) => move.xml!);
    if (!libvirt.redefineMany)
      return Promise.all(
        documents.map((xml) =>
          libvirt.define(xml).then(
            () => undefined,
            (error: unknown) => error as Error,
          ),
        ),
      );
    const now = await libvirt.redefineMany(documents);
    return Promise.all(
      moves.map(async (move, index) => {
        const wanted = readCloneMetadata(move.xml!)?.imageVersion;
        if (readCloneMetadata(now[index] ?? '')?.imageVersion === wanted) return undefined;
        return libvirt.define(move.xml!).then(
          () => undefined,
          (error: unknown) => error as Error,
        );
      }),
    );
  }

  /** The seed's switch, the restart, the event and the result of one clone. */
  private async finish(move: CloneMove, request: RebaseClonesRequest, targetKey: string, publishing: Array<Promise<void>>): Promise<RebaseCloneResult> {
    const name = VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: move.name });
    const fromKey = move.previousKey ?? move.currentKey;
    const previous = fromKey === undefined ? '' : imageVersionNameOfKey(fromKey);
    const swapDuration = { seconds: String(Math.floor(move.swapMs / 1000)), nanos: Math.round((move.swapMs % 1000) * 1e6) };
    if (move.error) {
      this.options.log.warn({ err: move.error, clone: move.name, operation: request.operation }, 'clone not rebased');
      return {
        virtualMachine: name,
        virtualMachineState: move.domain
          ? this.toVirtualMachine(move.domain, move.currentKey, move.domain.clone?.previousImageVersion ?? '', move.domain.state)
          : undefined,
        status: toStatus(move.error),
        previousImageVersion: previous,
        restarted: false,
        swapDuration: undefined,
      };
    }
    const domain = move.domain!;
    const previousRecorded = move.previousKey !== undefined ? imageVersionNameOfKey(move.previousKey) : (domain.clone?.previousImageVersion ?? '');
    let status;
    if (move.seedWork) {
      const seed = cloneSeedFile(cloneDirectoryOf(this.options.imageDirectory, domain.name));
      await rename(move.seedWork, seed).catch((error: unknown) => {
        status = toStatus(hypervisorError(error));
      });
    }
    const moved = move.action !== 'none' || move.again;
    let state = move.action === 'swap' ? 'shut off' : domain.state;
    if (request.restart && moved && state !== 'running') {
      try {
        await this.options.libvirt.start(domain.uuid);
        move.restarted = true;
        state = 'running';
      } catch (error) {
        // The clone stands on the new version; the result says the start failed.
        status = toStatus(hypervisorError(error));
      }
    }
    if (moved) {
      const operation = request.operation || 'direct';
      publishing.push(
        this.options.events.publish(
          CLONE_REBASED,
          {
            virtualMachine: name,
            host: HOST_NAME.format({ host: this.options.host }),
            imageVersion: imageVersionNameOfKey(targetKey),
            previousImageVersion: previousRecorded,
            overlay: move.systemDisks[0]?.path ?? '',
            restarted: move.restarted,
            operation: request.operation,
            occurTime: new Date(),
          },
          // A retry finds the clone on the target and records the same id: the stream keeps one.
          { host: this.options.host, id: `clone.rebased/${operation}/${this.options.host}/${move.name}/${fromKey}/${targetKey}` },
        ),
      );
    }
    return {
      virtualMachine: name,
      virtualMachineState: this.toVirtualMachine(domain, targetKey, previousRecorded, state),
      status,
      previousImageVersion: previous,
      restarted: move.restarted,
      swapDuration: move.action === 'none' ? undefined : swapDuration,
    };
  }

  /** The clone's record as the result carries it (the reporter follows with disks and sizes). */
  private toVirtualMachine(domain: DomainInfo, key: string | undefined, previousImageVersion: string, state: DomainInfo['state']): VirtualMachine {
    const image = key === undefined ? '' : imageNameOfKey(key);
    const imageVersion = key === undefined ? '' : imageVersionNameOfKey(key);
    return VirtualMachine.fromPartial({
      name: VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: virtualMachineId(domain) }),
      host: HOST_NAME.format({ host: this.options.host }),
      domainName: domain.name,
      uuid: domain.uuid,
      state: virtualMachineState(state) ?? VirtualMachine_State.STATE_OTHER,
      vcpuCount: domain.vcpus,
      memoryBytes: String(domain.memoryBytes),
      managed: domain.clone !== undefined,
      sourceImage: image,
      sourceImageVersion: imageVersion,
      ...(domain.clone?.guestConfigurationDigest === undefined ? {} : { guestConfigurationDigest: domain.clone.guestConfigurationDigest }),
      lineage: {
        image,
        imageVersion,
        previousImageVersion,
        replica: key === undefined ? '' : HOST_IMAGE_NAME.format({ host: this.options.host, image: key }),
        sourceVirtualMachine: '',
        overlays: domain.disks.filter((disk) => disk.type === 'file' && disk.sourcePath !== undefined).map((disk) => disk.sourcePath!),
      },
    });
  }
}

function hypervisorError(error: unknown): CowherdError {
  if (error instanceof CowherdError) return error;
  if (error instanceof LibvirtError && error.kind === 'domain-not-found')
    return new CowherdError(GrpcStatus.NOT_FOUND, error.message, { reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND, cause: error });
  return new CowherdError(GrpcStatus.INTERNAL, `rebase: ${(error as Error).message}`, { reason: ErrorReason.ERROR_REASON_HYPERVISOR_ERROR, cause: error });
}
