// The disk backend of a CloneVirtualMachines request end to end above the agent: planning validates
// `disk_backend` (INVALID_ARGUMENT naming it for an unknown value, a backend the source's hypervisor does not
// run, REFLINK_COPY with DELIVERY_STREAM), takes the image's default_disk_backend when the request sets none,
// places reflink clones only on hosts whose image directory makes reflink copies (FAILED_PRECONDITION for a named
// host that cannot), and fixes the backend in the operation's metadata; the operation passes it to every agent.
// UpdateImage sets the image default (checked against the image's hypervisor), the image view and every version's
// record carry it; `cowherd vms clone --disk-backend` and `cowherd images update --default-disk-backend` ask for it.
//
//   node --import tsx --test test/unit/cloning-disk-backend.test.ts
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { CreateClonesRequest, CreateClonesResponse } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest,
  CloneVirtualMachinesRequest_Delivery,
  Placement_Strategy,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { DiskBackend, Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import {
  Host,
  Host_State,
  Image,
  Image_State,
  ImageHead,
  ImageReplica,
  ImageReplica_State,
  VirtualMachine,
  VirtualMachine_State,
} from '../../services/gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { findImageVersion, imageViewOf } from '../../services/common/domain/image-versions.js';
import type { OperationContext } from '../../services/common/domain/operations.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';
import { cloneOperationKind, type CloneCheckpoint } from '../../services/cloning/clone-operation.js';
import { planClones } from '../../services/cloning/clone-plan.js';
import type { FleetView } from '../../services/cloning/fleet-view.js';
import { parseCommandLine, renderHelp, UsageError, type CommandSpec } from '../../services/cli/command-line.js';
import type { CliContext } from '../../services/cli/cli-context.js';
import { IMAGES_COMMAND } from '../../services/cli/images-commands.js';
import { ArgumentReader } from '../../services/cli/resource-arguments.js';
import { cloneRequest, VMS_COMMAND } from '../../services/cli/vms-commands.js';
import { KvConflictError, type KvStore } from '../../services/common/platform/kv.js';
import { updateImage } from '../../services/distribution/image-heads.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** The inventory as a few maps; kvm-r1 and kvm-r2 make reflink copies, kvm-01 cannot. */
class FakeFleet implements FleetView {
  readonly hosts = new Map<string, Host>();
  readonly images = new Map<string, Image>();
  readonly machines = new Map<string, VirtualMachine>();
  readonly replicas: ImageReplica[] = [];

  constructor() {
    this.host('kvm-01').host('kvm-r1', { imageDirectoryReflinks: true }).host('kvm-r2', { imageDirectoryReflinks: true });
    this.host('xen-01', { hypervisor: Hypervisor.HYPERVISOR_XEN });
    this.image('deb').image('deb-fast', { defaultDiskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY });
    this.image('xen-img', { hypervisor: Hypervisor.HYPERVISOR_XEN });
    this.replica('deb', 'kvm-01').replica('deb', 'kvm-r1').replica('deb-fast', 'kvm-r1');
    for (const [host, name] of [
      ['kvm-01', 'golden'],
      ['kvm-r1', 'golden-r'],
    ] as const) {
      const vm = VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: name });
      this.machines.set(
        vm,
        VirtualMachine.fromPartial({ name: vm, host: HOST_NAME.format({ host }), domainName: name, state: VirtualMachine_State.STATE_SHUT_OFF }),
      );
    }
  }

  host(id: string, fields: Partial<Host> = {}): this {
    const name = HOST_NAME.format({ host: id });
    this.hosts.set(
      name,
      Host.fromPartial({ name, state: Host_State.STATE_READY, hypervisor: Hypervisor.HYPERVISOR_KVM, agentEndpoint: `${id}:7445`, ...fields }),
    );
    return this;
  }
  image(id: string, fields: Partial<Image> = {}): this {
    const name = IMAGE_NAME.format({ image: id });
    this.images.set(name, Image.fromPartial({ name, state: Image_State.STATE_AVAILABLE, hypervisor: Hypervisor.HYPERVISOR_KVM, ...fields }));
    return this;
  }
  replica(image: string, host: string): this {
    this.replicas.push(
      ImageReplica.fromPartial({
        name: HOST_IMAGE_NAME.format({ host, image }),
        image: IMAGE_NAME.format({ image }),
        host: HOST_NAME.format({ host }),
        state: ImageReplica_State.STATE_AVAILABLE,
      }),
    );
    return this;
  }
  async getVirtualMachine(name: string): Promise<VirtualMachine | undefined> {
    return this.machines.get(name);
  }
  async getImage(name: string): Promise<Image | undefined> {
    return this.images.get(name);
  }
  async listHosts(): Promise<Host[]> {
    return [...this.hosts.values()];
  }
  async listReplicas(image: string): Promise<ImageReplica[]> {
    const parsed = IMAGE_NAME.parse(image);
    const wanted = parsed ? IMAGE_NAME.format(parsed) : image;
    return this.replicas.filter((replica) => replica.image === wanted);
  }
  async domainNamesInUse(): Promise<ReadonlyMap<string, string>> {
    return new Map([...this.machines.values()].map((machine) => [machine.domainName, machine.name]));
  }
}

const image = (id: string) => ({ $case: 'image' as const, value: IMAGE_NAME.format({ image: id }) });
const onHosts = (...ids: string[]) => ({
  strategy: Placement_Strategy.STRATEGY_HOSTS,
  hosts: ids.map((id) => HOST_NAME.format({ host: id })),
  maxClonesPerHost: 0,
});

async function plan(fields: Partial<CloneVirtualMachinesRequest>, fleet: FleetView = new FakeFleet(), checks: CreateClonesRequest[] = []) {
  let counter = 0;
  return planClones(CloneVirtualMachinesRequest.fromPartial({ count: 1, ...fields }), {
    fleet,
    random: () => `r${String(counter++).padStart(5, '0')}`,
    now: () => new Date('2026-12-05T10:00:00Z'),
    checkOnHost: async (_host, check) => void checks.push(check),
  });
}

/** INVALID_ARGUMENT naming `disk_backend`, with the message matching. */
function namesDiskBackend(pattern: RegExp): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof CowherdError, String(error));
    assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, error.message);
    assert.equal(error.field, 'disk_backend');
    assert.match(error.message, pattern);
    return true;
  };
}

describe('planning a clone request with a disk backend', () => {
  it('refuses a value that is no DiskBackend, and a backend the source does not run on, naming disk_backend', async () => {
    await assert.rejects(plan({ source: image('deb'), diskBackend: 9 as DiskBackend }), namesDiskBackend(/not a known disk backend/));
    await assert.rejects(
      plan({ source: image('deb'), diskBackend: DiskBackend.DISK_BACKEND_VHD_DIFFERENCING }),
      namesDiskBackend(/VHD_DIFFERENCING does not run on KVM hosts, which images\/deb is for/),
    );
    await assert.rejects(
      plan({ source: image('xen-img'), diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY }),
      namesDiskBackend(/REFLINK_COPY does not run on XEN hosts/),
    );
    await assert.rejects(
      plan({ source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/golden' }, diskBackend: DiskBackend.DISK_BACKEND_VHD_DIFFERENCING }),
      namesDiskBackend(/VHD_DIFFERENCING does not run on KVM/),
    );
  });

  it('refuses REFLINK_COPY with DELIVERY_STREAM: asked for, or as the image default unless the request picks QCOW2_OVERLAY', async () => {
    const stream = CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM;
    await assert.rejects(
      plan({ source: image('deb'), diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY, delivery: stream }),
      namesDiskBackend(/cannot be used with DELIVERY_STREAM/),
    );
    await assert.rejects(plan({ source: image('deb-fast'), delivery: stream }), namesDiskBackend(/default_disk_backend is REFLINK_COPY, which cannot stream/));
    const overlay = await plan({ source: image('deb-fast'), delivery: stream, diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY });
    assert.equal(overlay.diskBackend, DiskBackend.DISK_BACKEND_QCOW2_OVERLAY);
  });

  it("fixes the backend in the metadata: the request's, else the image's default, else UNSPECIFIED (the hosts' standard)", async () => {
    assert.equal((await plan({ source: image('deb') })).diskBackend, DiskBackend.DISK_BACKEND_UNSPECIFIED);
    assert.equal((await plan({ source: image('deb-fast') })).diskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
    assert.equal(
      (await plan({ source: image('deb-fast'), diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY, placement: onHosts('kvm-01') })).diskBackend,
      DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
    );
    assert.equal((await plan({ source: image('deb'), diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY })).diskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
  });

  it('places reflink clones only where the image directory makes reflink copies', async () => {
    // deb is on kvm-01 (no reflinks) and kvm-r1: spread over the hosts that hold it and can, then over the others that can.
    const spread = await plan({ source: image('deb'), count: 4, diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY });
    assert.deepEqual([...new Set(spread.clones.map((clone) => clone.host))].sort(), ['hosts/kvm-r1']);
    const wider = await plan({
      source: image('deb'),
      count: 4,
      diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY,
      placement: { strategy: Placement_Strategy.STRATEGY_WHERE_IMAGE_IS, hosts: [], maxClonesPerHost: 2 },
    });
    assert.deepEqual(
      wider.clones.map((clone) => clone.host),
      ['hosts/kvm-r1', 'hosts/kvm-r1', 'hosts/kvm-r2', 'hosts/kvm-r2'],
      'overflow goes to another host that can reflink, never to kvm-01',
    );
    const standard = await plan({ source: image('deb'), count: 4 });
    assert.deepEqual([...new Set(standard.clones.map((clone) => clone.host))].sort(), ['hosts/kvm-01', 'hosts/kvm-r1'], 'other backends are placed as before');
    const refusal = (error: unknown): boolean => {
      assert.ok(error instanceof CowherdError);
      assert.equal(error.code, GrpcStatus.FAILED_PRECONDITION);
      assert.equal(error.reason, ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH);
      assert.match(error.message, /hosts\/kvm-01's image directory cannot make reflink copies/);
      return true;
    };
    await assert.rejects(plan({ source: image('deb'), diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY, placement: onHosts('kvm-r1', 'kvm-01') }), refusal);
    await assert.rejects(
      plan({ source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/golden' }, diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY }),
      refusal,
    );
    const noHost = new FakeFleet();
    for (const id of ['kvm-r1', 'kvm-r2']) noHost.host(id);
    await assert.rejects(
      plan({ source: image('deb'), diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY }, noHost),
      /no READY HYPERVISOR_KVM host whose image directory makes reflink copies/,
    );
  });

  it("asks a virtual machine's agent to check the request with its backend", async () => {
    const checks: CreateClonesRequest[] = [];
    const metadata = await plan(
      { source: { $case: 'virtualMachine', value: 'hosts/kvm-r1/virtualMachines/golden-r' }, diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY },
      new FakeFleet(),
      checks,
    );
    assert.equal(metadata.diskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
    assert.deepEqual(
      checks.map((check) => [check.validateOnly, check.diskBackend]),
      [[true, DiskBackend.DISK_BACKEND_REFLINK_COPY]],
    );
  });
});

describe('the clone operation passes the backend to the agents', () => {
  it("every host's CreateClones carries the metadata's backend (the image default fixed at planning)", async () => {
    const fleet = new FakeFleet();
    const request = CloneVirtualMachinesRequest.fromPartial({ source: image('deb-fast'), count: 2, placement: onHosts('kvm-r1', 'kvm-r2') });
    fleet.replica('deb-fast', 'kvm-r2');
    let counter = 0;
    const metadata = await planClones(request, { fleet, random: () => `r${String(counter++).padStart(5, '0')}`, now: () => new Date('2026-12-05T10:00:00Z') });
    // The image's default changes after planning: the operation keeps what was planned.
    fleet.images.set('images/deb-fast', { ...fleet.images.get('images/deb-fast')!, defaultDiskBackend: DiskBackend.DISK_BACKEND_UNSPECIFIED });
    const calls: CreateClonesRequest[] = [];
    const agents = {
      createClones: async (_host: Host, agentRequest: CreateClonesRequest): Promise<CreateClonesResponse> => {
        calls.push(agentRequest);
        return {
          results: agentRequest.clones.map((clone) => ({
            domainName: clone.domainName,
            virtualMachine: VirtualMachine.fromPartial({ name: `hosts/x/virtualMachines/${clone.domainName}`, domainName: clone.domainName }),
            status: undefined,
            started: false,
            streaming: false,
          })),
        };
      },
    };
    let current = { metadata, state: undefined as CloneCheckpoint | undefined };
    const context: OperationContext<CloneVirtualMachinesRequest, CloneVirtualMachinesMetadata, CloneCheckpoint> = {
      name: 'operations/6c1d0f7e-2f0b-4d55-9a43-1b2c3d4e5f60',
      request,
      state: undefined,
      get metadata() {
        return current.metadata;
      },
      signal: new AbortController().signal,
      log,
      checkpoint: async (update) => {
        current = { metadata: update.metadata ?? current.metadata, state: update.state ?? current.state };
      },
      cancelRequested: () => false,
    };
    const response = await cloneOperationKind({ fleet, agents }).run(context);
    assert.deepEqual(
      response.clones.map((clone) => clone.state),
      [CloneResult_State.STATE_DONE, CloneResult_State.STATE_DONE],
    );
    assert.deepEqual(
      calls.map((call) => call.diskBackend),
      [DiskBackend.DISK_BACKEND_REFLINK_COPY, DiskBackend.DISK_BACKEND_REFLINK_COPY],
    );
    assert.equal(current.metadata.diskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
  });
});

/** A KV bucket in memory (get, create, update, mutate, list), enough for image-heads.ts. */
function memoryKv<T>(): KvStore<T> {
  const values = new Map<string, { value: T; revision: number }>();
  let sequence = 0;
  const store = {
    get: async (key: string) => {
      const entry = values.get(key);
      return entry ? { key, value: entry.value, revision: entry.revision } : undefined;
    },
    create: async (key: string, value: T) => {
      if (values.has(key)) throw new KvConflictError(key, new Error('key exists'));
      values.set(key, { value, revision: ++sequence });
      return sequence;
    },
    update: async (key: string, value: T) => {
      values.set(key, { value, revision: ++sequence });
      return sequence;
    },
    put: async (key: string, value: T) => {
      values.set(key, { value, revision: ++sequence });
      return sequence;
    },
    list: async () => [...values.entries()].map(([key, entry]) => ({ key, value: entry.value, revision: entry.revision })),
    mutate: async (key: string, change: (current: T | undefined) => T | undefined) => {
      const next = change(values.get(key)?.value);
      if (next === undefined) return store.get(key);
      values.set(key, { value: next, revision: ++sequence });
      return { key, value: next, revision: sequence };
    },
  };
  return store as unknown as KvStore<T>;
}

describe("an image's default disk backend", () => {
  it('UpdateImage sets it (a backend of the image hypervisor, or UNSPECIFIED), keeping the other settings', async () => {
    const images = memoryKv<Image>();
    const heads = memoryKv<ImageHead>();
    const deps = { images, heads };
    await images.put('deb', Image.fromPartial({ name: 'images/deb', state: Image_State.STATE_AVAILABLE, hypervisor: Hypervisor.HYPERVISOR_KVM }));
    await images.put(
      'deb_v2',
      Image.fromPartial({ name: 'images/deb_v2', version: '2', state: Image_State.STATE_AVAILABLE, hypervisor: Hypervisor.HYPERVISOR_KVM }),
    );
    await images.put('xen', Image.fromPartial({ name: 'images/xen', state: Image_State.STATE_AVAILABLE, hypervisor: Hypervisor.HYPERVISOR_XEN }));
    await updateImage(deps, { image: Image.fromPartial({ name: 'images/deb', keepVersions: 5 }), updateMask: ['keep_versions'] });
    const view = await updateImage(deps, {
      image: Image.fromPartial({ name: 'images/deb', defaultDiskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY }),
      updateMask: ['default_disk_backend'],
    });
    assert.deepEqual([view.defaultDiskBackend, view.keepVersions], [DiskBackend.DISK_BACKEND_REFLINK_COPY, 5]);
    const head = (await heads.get('deb'))!.value;
    assert.equal(head.defaultDiskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
    // The view and every version's record carry it (cloning reads whichever the caller named).
    const records = (await images.list())
      .filter((entry) => entry.key.startsWith('deb'))
      .map((entry) => ({ ...entry.value, name: IMAGE_NAME.format({ image: entry.key }) }));
    assert.equal(imageViewOf(records, head)?.defaultDiskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
    assert.equal(findImageVersion(records, head, { id: 'deb', version: 1 })?.defaultDiskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
    const reset = await updateImage(deps, { image: Image.fromPartial({ name: 'images/deb' }), updateMask: ['default_disk_backend'] });
    assert.equal(reset.defaultDiskBackend, DiskBackend.DISK_BACKEND_UNSPECIFIED);
    for (const [name, backend, pattern] of [
      ['images/xen', DiskBackend.DISK_BACKEND_REFLINK_COPY, /REFLINK_COPY does not run on XEN hosts/],
      ['images/deb', DiskBackend.DISK_BACKEND_VHD_DIFFERENCING, /VHD_DIFFERENCING does not run on KVM hosts/],
      ['images/deb', 7 as DiskBackend, /not a known disk backend/],
    ] as const) {
      await assert.rejects(
        updateImage(deps, { image: Image.fromPartial({ name, defaultDiskBackend: backend }), updateMask: ['default_disk_backend'] }),
        (error: unknown) => error instanceof CowherdError && error.field === 'image.default_disk_backend' && pattern.test(error.message),
      );
    }
    await assert.rejects(
      updateImage(deps, { image: Image.fromPartial({ name: 'images/deb' }), updateMask: ['hypervisor'] }),
      (error: unknown) => error instanceof CowherdError && error.field === 'update_mask' && /aliases, keep_versions, default_disk_backend/.test(error.message),
    );
  });
});

describe('the CLI', () => {
  const ROOT: CommandSpec<CliContext> = { name: 'cowherd', summary: 'test root', subcommands: [VMS_COMMAND, IMAGES_COMMAND] };
  const clone = (...words: string[]) => {
    const parsed = parseCommandLine(ROOT, [], ['vms', 'clone', ...words]);
    if (parsed.kind !== 'run') throw new Error('not a run');
    return cloneRequest(parsed.invocation, new ArgumentReader(parsed.invocation.command));
  };

  it('vms clone --disk-backend names the backend; without it the image default / standard; a bad word or --stream with reflink-copy is a usage error', () => {
    assert.equal(clone('--image', 'deb', '--disk-backend', 'reflink-copy').diskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
    assert.equal(clone('--image', 'deb', '--disk-backend', 'qcow2-overlay').diskBackend, DiskBackend.DISK_BACKEND_QCOW2_OVERLAY);
    assert.equal(clone('--image', 'deb', '--disk-backend', 'vhd-differencing').diskBackend, DiskBackend.DISK_BACKEND_VHD_DIFFERENCING);
    assert.equal(clone('--image', 'deb').diskBackend, DiskBackend.DISK_BACKEND_UNSPECIFIED);
    assert.throws(
      () => clone('--image', 'deb', '--disk-backend', 'zfs'),
      (error: unknown) => error instanceof UsageError && /--disk-backend must be qcow2-overlay, vhd-differencing, reflink-copy/.test(error.message),
    );
    assert.throws(
      () => clone('--image', 'deb', '--stream', '--disk-backend', 'reflink-copy'),
      (error: unknown) => error instanceof UsageError && /--stream cannot make reflink copies/.test(error.message),
    );
  });

  it('images update takes --default-disk-backend (and needs one of its options)', () => {
    const parsed = parseCommandLine(ROOT, [], ['images', 'update', 'deb', '--default-disk-backend', 'reflink-copy']);
    assert.equal(parsed.kind, 'run');
    const help = parseCommandLine(ROOT, [], ['images', 'update', '--help']);
    assert.equal(help.kind, 'help');
    if (help.kind === 'help') assert.match(renderHelp(help.command, []), /--default-disk-backend <reflink-copy\|qcow2-overlay\|vhd-differencing\|standard>/);
    const vmsHelp = parseCommandLine(ROOT, [], ['vms', 'clone', '--help']);
    if (vmsHelp.kind === 'help') assert.match(renderHelp(vmsHelp.command, []), /--disk-backend <reflink-copy\|qcow2-overlay\|vhd-differencing>/);
  });
});
