/**
 * Powering VMs on and off and deleting them on this host, with the lineage rules: a VM whose disks are
 * the bases of clones is never started (writing to its disks would corrupt the clones) nor deleted; only
 * cowherd-managed VMs are deleted (their clone directory goes with them) unless forced, and a forced
 * delete of an unmanaged VM removes only its libvirt definition, never a file.
 */
import { rm } from 'node:fs/promises';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import { VirtualMachine, VirtualMachine_State } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import type { Logger } from '../common/platform/logger.js';
import { HOST_NAME, VIRTUAL_MACHINE_ID, VIRTUAL_MACHINE_NAME } from '../common/domain/resource-names.js';
import { dependsOnBase, LibvirtError, virtualMachineId, virtualMachineState, type DomainInfo, type Libvirt } from './hypervisor/index.js';
import { cloneDirectory } from './image-directory/index.js';

/** What the lifecycle needs. */
export interface VmLifecycleOptions {
  readonly host: string;
  readonly imageDirectory: string;
  readonly libvirt: Libvirt;
  readonly log: Logger;
  /** Called before a powered-off VM is started (a streaming clone is settled on its replica or served again). */
  readonly beforeStart?: (domain: DomainInfo) => Promise<void>;
}

/** Start, stop and delete for this host's VMs. */
export class VmLifecycle {
  constructor(private readonly options: VmLifecycleOptions) {}

  /** Starts (or resumes) a VM; refuses one that clones depend on. */
  async start(name: string): Promise<VirtualMachine> {
    const { domain, all } = await this.find(name);
    this.refuseDependents(name, all);
    if (domain.state === 'paused') await this.options.libvirt.resume?.(domain.uuid);
    else if (domain.state !== 'running') {
      await this.options.beforeStart?.(domain);
      await this.options.libvirt.start(domain.uuid).catch(hypervisorError);
    }
    return this.current(domain.uuid);
  }

  /** Destroys with force; otherwise asks for an ACPI shutdown and waits up to `timeoutMs`. */
  async stop(name: string, force: boolean, timeoutMs: number): Promise<VirtualMachine> {
    const { domain } = await this.find(name);
    if (domain.state === 'shut off') return this.current(domain.uuid);
    if (force || !this.options.libvirt.shutdown) {
      await this.options.libvirt.destroy(domain.uuid).catch(hypervisorError);
      return this.current(domain.uuid);
    }
    await this.options.libvirt.shutdown(domain.uuid).catch(hypervisorError);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const now = await this.options.libvirt.domain(domain.uuid);
      if (now.state === 'shut off') return this.toVm(now);
      if (Date.now() >= deadline)
        throw new CowherdError(
          GrpcStatus.DEADLINE_EXCEEDED,
          `${name} did not shut down within ${Math.round(timeoutMs / 1000)} s; it keeps running (stop with force to power it off)`,
          { reason: ErrorReason.ERROR_REASON_HYPERVISOR_ERROR },
        );
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }

  /** Undefines a VM and removes the clone directory cowherd made for it; a missing VM is success. */
  async delete(name: string, force: boolean): Promise<void> {
    let found: { domain: DomainInfo; all: DomainInfo[] };
    try {
      found = await this.find(name);
    } catch (error) {
      if (error instanceof CowherdError && error.code === GrpcStatus.NOT_FOUND) return;
      throw error;
    }
    const { domain, all } = found;
    this.refuseDependents(name, all);
    const managed = domain.clone !== undefined;
    if (!managed && !force)
      throw CowherdError.failedPrecondition(
        `${name} was not made by cowherd; delete it with force to remove only its libvirt definition`,
        ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NOT_MANAGED,
      );
    if (domain.state !== 'shut off') {
      if (!force)
        throw CowherdError.failedPrecondition(
          `${name} is ${domain.state}; stop it first or delete with force`,
          ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING,
        );
      await this.options.libvirt.destroy(domain.uuid).catch(hypervisorError);
    }
    await this.options.libvirt.undefine(domain.uuid).catch(hypervisorError);
    if (managed && VIRTUAL_MACHINE_ID.test(domain.name)) {
      // Only the clone's own directory: its overlays, XML, NVRAM and logs. Never a base.
      await rm(cloneDirectory(this.options.imageDirectory, domain.name), { recursive: true, force: true });
    }
    this.options.log.info({ vm: name, managed, force }, 'virtual machine deleted');
  }

  private async find(name: string): Promise<{ domain: DomainInfo; all: DomainInfo[] }> {
    const ids = VIRTUAL_MACHINE_NAME.parse(name);
    if (!ids) throw CowherdError.invalidArgument('name', 'must be hosts/{host}/virtualMachines/{vm}');
    if (ids.host !== this.options.host) throw CowherdError.invalidArgument('name', `is on ${HOST_NAME.format({ host: ids.host })}, not on this host`);
    const all = await this.options.libvirt.listDomains();
    const id = ids.virtualMachine;
    const domain = all.find((candidate) => candidate.name === id || candidate.uuid === id.toLowerCase());
    if (!domain) throw CowherdError.notFound(name);
    return { domain, all };
  }

  private refuseDependents(name: string, all: readonly DomainInfo[]): void {
    const dependents = all
      // A reflink copy of the VM's disks shares blocks with them but reads nothing through them: not a dependent.
      .filter((domain) => domain.clone && dependsOnBase(domain.clone) && 'virtualMachine' in domain.clone.source && domain.clone.source.virtualMachine === name)
      .map((domain) => this.nameOf(domain));
    if (dependents.length > 0) {
      throw CowherdError.failedPrecondition(
        `${dependents.length} clones use ${name}'s disks as their base`,
        ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_HAS_DEPENDENTS,
        { dependents: dependents.slice(0, 20).join(',') },
      );
    }
  }

  /** A domain's resource name: by its name when that is a `{virtualMachine}` id, else by its UUID (as the reporter names it). */
  private nameOf(domain: Pick<DomainInfo, 'name' | 'uuid'>): string {
    return VIRTUAL_MACHINE_NAME.format({ host: this.options.host, virtualMachine: virtualMachineId(domain) });
  }

  private async current(uuid: string): Promise<VirtualMachine> {
    return this.toVm(await this.options.libvirt.domain(uuid));
  }

  private toVm(domain: DomainInfo): VirtualMachine {
    return VirtualMachine.fromPartial({
      name: this.nameOf(domain),
      host: HOST_NAME.format({ host: this.options.host }),
      domainName: domain.name,
      uuid: domain.uuid,
      state: virtualMachineState(domain.state) ?? VirtualMachine_State.STATE_OTHER,
      vcpuCount: domain.vcpus,
      memoryBytes: String(domain.memoryBytes),
      managed: domain.clone !== undefined,
    });
  }
}

function hypervisorError(error: unknown): never {
  if (error instanceof LibvirtError && error.kind === 'domain-not-found')
    throw new CowherdError(GrpcStatus.NOT_FOUND, error.message, { reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND });
  throw new CowherdError(GrpcStatus.INTERNAL, `libvirt: ${(error as Error).message}`, { reason: ErrorReason.ERROR_REASON_HYPERVISOR_ERROR, cause: error });
}
