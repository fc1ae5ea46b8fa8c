// CloneVirtualMachines against a fake fleet and fake agents: every bad request is refused with its code and
// field before an operation exists; placement and names are fixed in the initial metadata; the operation
// (OperationKind.run driven with a fake OperationContext) reports partial failures per clone, fails as a
// whole only when nothing could be attempted, and when resumed from its checkpoint does not ask the agents
// of finished hosts again.
//
//   node --import tsx --test test/unit/cloning-clone-operation.test.ts
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import type { CreateClonesRequest, CreateClonesResponse } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest,
  CloneVirtualMachinesRequest_Delivery,
  Placement_Strategy,
  type CloneVirtualMachinesResponse,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { ErrorReason, errorReasonToJSON } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { HostTransfer } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import {
  Host,
  Host_State,
  Image,
  Image_State,
  ImageReplica,
  ImageReplica_State,
  VirtualMachine,
  VirtualMachine_State,
} from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Operation } from '../../services/gen/google/longrunning/operations.js';
import { ErrorInfo } from '../../services/gen/google/rpc/error_details.js';
import type { Status } from '../../services/gen/google/rpc/status.js';
import { CowherdError, toServiceError } from '../../services/common/platform/errors.js';
import type { EventType } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import type { OperationContext } from '../../services/common/domain/operations.js';
import { typeUrlOf } from '../../services/common/platform/type-urls.js';
import type { AgentPort } from '../../services/cloning/agents.js';
import { agentRequestId, cloneOperationKind, type CloneCheckpoint, type CloneOperationDeps } from '../../services/cloning/clone-operation.js';
import type { ImageDelivery, ImageDeliveryProgress } from '../../services/cloning/image-delivery-port.js';
import { planClones } from '../../services/cloning/clone-plan.js';
import type { FleetView } from '../../services/cloning/fleet-view.js';
import { cloningHandlers } from '../../services/cloning/handlers.js';
import { HOST_IMAGE_NAME, HOST_NAME, hostOf, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const log = createLogger({ service: 'cloning-test', level: 'silent' });

// ---------------------------------------------------------------------------------------------- fakes

/** The inventory as a few maps. */
class FakeFleet implements FleetView {
  readonly hosts = new Map<string, Host>();
  readonly images = new Map<string, Image>();
  readonly machines = new Map<string, VirtualMachine>();
  readonly replicas: ImageReplica[] = [];

  host(id: string, fields: Partial<Host> = {}): this {
    this.hosts.set(
      HOST_NAME.format({ host: id }),
      Host.fromPartial({
        name: HOST_NAME.format({ host: id }),
        state: Host_State.STATE_READY,
        hypervisor: Hypervisor.HYPERVISOR_KVM,
        agentEndpoint: `${id}:7445`,
        ...fields,
      }),
    );
    return this;
  }

  image(id: string, fields: Partial<Image> = {}): this {
    this.images.set(
      IMAGE_NAME.format({ image: id }),
      Image.fromPartial({ name: IMAGE_NAME.format({ image: id }), state: Image_State.STATE_AVAILABLE, hypervisor: Hypervisor.HYPERVISOR_KVM, ...fields }),
    );
    return this;
  }

  replica(image: string, host: string, state = ImageReplica_State.STATE_AVAILABLE): this {
    this.replicas.push(
      ImageReplica.fromPartial({ name: HOST_IMAGE_NAME.format({ host, image }), image: IMAGE_NAME.format({ image }), host: HOST_NAME.format({ host }), state }),
    );
    return this;
  }

  machine(host: string, domainName: string, state = VirtualMachine_State.STATE_SHUT_OFF): this {
    const name = VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: domainName });
    this.machines.set(name, VirtualMachine.fromPartial({ name, host: HOST_NAME.format({ host }), domainName, state }));
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
    // As the inventory's `image_version` filter: the exact version (numbered) against the replica's name.
    const parsed = IMAGE_NAME.parse(image);
    const wanted = parsed ? IMAGE_NAME.format(parsed) : image;
    return this.replicas.filter((replica) => replica.image === wanted && replica.state === ImageReplica_State.STATE_AVAILABLE);
  }
  async domainNamesInUse(): Promise<ReadonlyMap<string, string>> {
    return new Map([...this.machines.values()].map((machine) => [machine.domainName, machine.name]));
  }
}

type AgentBehaviour = (request: CreateClonesRequest, signal: AbortSignal | undefined) => Promise<CreateClonesResponse>;

/** Agents that make every clone unless a host has its own behaviour; counts calls and concurrency. */
class FakeAgents implements Pick<AgentPort, 'createClones' | 'deleteVirtualMachine'> {
  readonly calls: Array<{ host: string; request: CreateClonesRequest }> = [];
  readonly behaviours = new Map<string, AgentBehaviour>();
  /** DeleteVirtualMachine calls as `<virtual machine> force=<force>`. */
  readonly deletes: string[] = [];
  /** Errors DeleteVirtualMachine throws, by virtual machine. */
  readonly deleteErrors = new Map<string, ServiceError>();
  running = 0;
  maxRunning = 0;
  delayMs = 0;

  async createClones(host: Host, request: CreateClonesRequest, signal?: AbortSignal): Promise<CreateClonesResponse> {
    this.calls.push({ host: host.name, request });
    this.running += 1;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    try {
      if (this.delayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.delayMs));
      const behaviour = this.behaviours.get(host.name);
      return behaviour ? await behaviour(request, signal) : makeAll(host.name, request);
    } finally {
      this.running -= 1;
    }
  }

  async deleteVirtualMachine(_host: Host, name: string, force: boolean): Promise<void> {
    this.deletes.push(`${name} force=${force}`);
    const error = this.deleteErrors.get(name);
    if (error) throw error;
  }

  hostsCalled(): string[] {
    return this.calls.map((call) => call.host);
  }
}

function makeAll(
  host: string,
  request: CreateClonesRequest,
  failing: ReadonlyMap<string, Status> = new Map(),
  options: { streaming?: boolean } = {},
): CreateClonesResponse {
  return {
    results: request.clones.map((clone) => {
      const status = failing.get(clone.domainName);
      if (status) return { domainName: clone.domainName, virtualMachine: undefined, status, streaming: false, started: false };
      return {
        domainName: clone.domainName,
        virtualMachine: VirtualMachine.fromPartial({
          name: VIRTUAL_MACHINE_NAME.format({ host: hostOf(host) ?? host, virtualMachine: clone.domainName }),
          domainName: clone.domainName,
          uuid: `uuid-${clone.domainName}`,
          lineage: { overlays: [`/var/lib/cowherd/clones/${clone.domainName}/vda.qcow2`] },
        }),
        status: { code: 0, message: '', details: [] },
        started: clone.start,
        streaming: options.streaming ?? false,
      };
    }),
  };
}

function grpcError(code: GrpcStatus, error: CowherdError | string): ServiceError {
  const serviceError = toServiceError(typeof error === 'string' ? new CowherdError(code, error, { reason: ErrorReason.ERROR_REASON_INTERNAL }) : error);
  return Object.assign(new Error(serviceError.details), serviceError, { code }) as unknown as ServiceError;
}

/** Records published events. */
class FakeEvents {
  readonly published: Array<{ kind: string; payload: unknown; id: string }> = [];
  async publish<T>(type: EventType<T>, payload: T, options: { host?: string; id: string }): Promise<void> {
    this.published.push({ kind: type.kind, payload, id: options.id });
  }
}

type Context = OperationContext<CloneVirtualMachinesRequest, CloneVirtualMachinesMetadata, CloneCheckpoint>;

/** An OperationContext that keeps checkpoints in memory and refuses overlapping writes, as the KV-backed one would. */
function fakeContext(request: CloneVirtualMachinesRequest, metadata: CloneVirtualMachinesMetadata, state?: CloneCheckpoint) {
  const controller = new AbortController();
  const checkpoints: Array<{ metadata: CloneVirtualMachinesMetadata; state: CloneCheckpoint | undefined }> = [];
  let current = { metadata, state };
  let writing = false;
  const context: Context = {
    name: 'operations/0b6f2c8e-9a43-4a55-9d1e-3f1c2a7b5d10',
    request,
    state,
    get metadata() {
      return current.metadata;
    },
    signal: controller.signal,
    log,
    checkpoint: async (update) => {
      if (controller.signal.aborted) throw controller.signal.reason;
      assert.equal(writing, false, 'checkpoints must not overlap');
      writing = true;
      await new Promise((resolve) => setImmediate(resolve));
      writing = false;
      current = { metadata: update.metadata ?? current.metadata, state: update.state ?? current.state };
      checkpoints.push({ metadata: CloneVirtualMachinesMetadata.fromPartial(current.metadata), state: current.state });
    },
    cancelRequested: () => false,
  };
  return { context, controller, checkpoints, last: () => current };
}

/** Plans a request against the fleet (names drawn from a counter), as the handler does. */
async function plan(fleet: FleetView, fields: Partial<CloneVirtualMachinesRequest>) {
  const request = CloneVirtualMachinesRequest.fromPartial(fields);
  let counter = 0;
  const metadata = await planClones(request, { fleet, random: () => `r${String(counter++).padStart(5, '0')}`, now: () => new Date('2024-05-01T10:00:00Z') });
  return { request, metadata };
}

function run(deps: CloneOperationDeps, context: Context): Promise<CloneVirtualMachinesResponse> {
  return cloneOperationKind(deps).run(context);
}

function reasonOf(status: Status | undefined): string {
  const info = status?.details.find((detail) => detail.typeUrl === typeUrlOf(ErrorInfo));
  return info ? ErrorInfo.decode(info.value).reason : '';
}

const image = (id: string) => ({ $case: 'image' as const, value: IMAGE_NAME.format({ image: id }) });
const hostsPlacement = (...ids: string[]) => ({
  strategy: Placement_Strategy.STRATEGY_HOSTS,
  hosts: ids.map((id) => HOST_NAME.format({ host: id })),
  maxClonesPerHost: 0,
});

function standardFleet(): FakeFleet {
  return new FakeFleet()
    .host('kvm-01')
    .host('kvm-02')
    .host('kvm-03')
    .host('xen-01', { hypervisor: Hypervisor.HYPERVISOR_XEN })
    .host('gone-01', { state: Host_State.STATE_UNREACHABLE })
    .host('drain-01', { state: Host_State.STATE_DRAINING, draining: true })
    .image('debian-12')
    .image('half', { state: Image_State.STATE_PUBLISHING })
    .replica('debian-12', 'kvm-02')
    .replica('debian-12', 'kvm-03')
    .replica('debian-12', 'gone-01')
    .machine('kvm-01', 'golden')
    .machine('kvm-01', 'busy', VirtualMachine_State.STATE_RUNNING)
    .machine('kvm-02', 'app-2', VirtualMachine_State.STATE_RUNNING);
}

// ---------------------------------------------------------------------------------------------- validation

describe('CloneVirtualMachines refuses bad requests before any operation exists', () => {
  const cases: Array<{ name: string; request: Partial<CloneVirtualMachinesRequest>; code: GrpcStatus; field?: string; reason?: ErrorReason }> = [
    { name: 'no source', request: { count: 1 }, code: GrpcStatus.INVALID_ARGUMENT, field: 'source' },
    {
      name: 'malformed image',
      request: { source: { $case: 'image', value: 'images/Debian_12' }, count: 1 },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'image',
    },
    {
      name: 'malformed virtual machine',
      request: { source: { $case: 'virtualMachine', value: 'hosts/kvm-01/golden' }, count: 1 },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'virtual_machine',
    },
    { name: 'count 0', request: { source: image('debian-12'), count: 0 }, code: GrpcStatus.INVALID_ARGUMENT, field: 'count' },
    { name: 'count 1001', request: { source: image('debian-12'), count: 1001 }, code: GrpcStatus.INVALID_ARGUMENT, field: 'count' },
    {
      name: 'HOSTS without hosts',
      request: { source: image('debian-12'), count: 1, placement: hostsPlacement() },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.hosts',
    },
    {
      name: 'malformed host',
      request: { source: image('debian-12'), count: 1, placement: { ...hostsPlacement('kvm-01'), hosts: ['hosts/kvm-01', 'host/kvm-02'] } },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.hosts[1]',
    },
    {
      name: 'repeated host',
      request: { source: image('debian-12'), count: 1, placement: hostsPlacement('kvm-01', 'kvm-01') },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.hosts[1]',
    },
    {
      name: 'WHERE_IMAGE_IS for a virtual machine',
      request: {
        source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/golden' },
        count: 1,
        placement: { strategy: Placement_Strategy.STRATEGY_WHERE_IMAGE_IS, hosts: [], maxClonesPerHost: 0 },
      },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.strategy',
    },
    {
      name: 'WHERE_IMAGE_IS with hosts',
      request: {
        source: image('debian-12'),
        count: 1,
        placement: { strategy: Placement_Strategy.STRATEGY_WHERE_IMAGE_IS, hosts: ['hosts/kvm-01'], maxClonesPerHost: 0 },
      },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.hosts',
    },
    {
      name: 'a virtual machine cloned onto another host',
      request: { source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/golden' }, count: 1, placement: hostsPlacement('kvm-02') },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.hosts[0]',
    },
    {
      name: 'negative max_clones_per_host',
      request: { source: image('debian-12'), count: 1, placement: { strategy: Placement_Strategy.STRATEGY_UNSPECIFIED, hosts: [], maxClonesPerHost: -1 } },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.max_clones_per_host',
    },
    {
      name: 'no room under max_clones_per_host',
      request: { source: image('debian-12'), count: 5, placement: { ...hostsPlacement('kvm-01', 'kvm-02'), maxClonesPerHost: 2 } },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'placement.max_clones_per_host',
    },
    {
      name: 'unknown placeholder',
      request: { source: image('debian-12'), count: 1, nameTemplate: '{name}-{index}' },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'name_template',
    },
    {
      name: 'same name for every clone',
      request: { source: image('debian-12'), count: 3, nameTemplate: 'web-{host}' },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'name_template',
    },
    {
      name: 'name too long',
      request: { source: image('debian-12'), count: 1, nameTemplate: `${'x'.repeat(60)}-{index}-{random}` },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'name_template',
    },
    { name: 'unknown image', request: { source: image('ubuntu'), count: 1 }, code: GrpcStatus.NOT_FOUND, reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND },
    {
      name: 'unknown virtual machine',
      request: { source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/nope' }, count: 1 },
      code: GrpcStatus.NOT_FOUND,
      reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND,
    },
    {
      name: 'unknown host',
      request: { source: image('debian-12'), count: 1, placement: hostsPlacement('kvm-99') },
      code: GrpcStatus.NOT_FOUND,
      reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND,
    },
    {
      name: 'image still publishing',
      request: { source: image('half'), count: 1 },
      code: GrpcStatus.FAILED_PRECONDITION,
      reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    },
    {
      name: 'running source virtual machine',
      request: { source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/busy' }, count: 1 },
      code: GrpcStatus.FAILED_PRECONDITION,
      reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_RUNNING,
    },
    {
      name: 'host of the wrong hypervisor',
      request: { source: image('debian-12'), count: 2, placement: hostsPlacement('kvm-01', 'xen-01') },
      code: GrpcStatus.FAILED_PRECONDITION,
      reason: ErrorReason.ERROR_REASON_HYPERVISOR_MISMATCH,
    },
    {
      name: 'UNREACHABLE host',
      request: { source: image('debian-12'), count: 1, placement: hostsPlacement('gone-01') },
      code: GrpcStatus.FAILED_PRECONDITION,
      reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    },
    {
      name: 'DRAINING host',
      request: { source: image('debian-12'), count: 1, placement: hostsPlacement('drain-01') },
      code: GrpcStatus.FAILED_PRECONDITION,
      reason: ErrorReason.ERROR_REASON_RESOURCE_STATE_CONFLICT,
    },
    {
      name: 'streaming clones of a virtual machine',
      request: {
        source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/golden' },
        count: 1,
        delivery: CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM,
      },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'delivery',
    },
    {
      name: 'unknown delivery',
      request: { source: image('debian-12'), count: 1, delivery: 7 as CloneVirtualMachinesRequest_Delivery },
      code: GrpcStatus.INVALID_ARGUMENT,
      field: 'delivery',
    },
    {
      name: 'explicit name taken',
      request: { source: image('debian-12'), count: 3, nameTemplate: 'app-{index}' },
      code: GrpcStatus.ALREADY_EXISTS,
      reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NAME_TAKEN,
    },
  ];

  for (const testCase of cases) {
    it(`${testCase.name} -> ${GrpcStatus[testCase.code]}${testCase.field ? ` (${testCase.field})` : ''}`, async () => {
      const started: unknown[] = [];
      const handlers = cloningHandlers({
        fleet: standardFleet(),
        operations: { start: async (...args: unknown[]) => (started.push(args), Operation.fromPartial({ name: 'operations/x' })) },
        kind: cloneOperationKind({ fleet: standardFleet(), agents: new FakeAgents() }),
      });
      await assert.rejects(handlers.cloneVirtualMachines!(CloneVirtualMachinesRequest.fromPartial(testCase.request), undefined as never), (error: unknown) => {
        assert.ok(error instanceof CowherdError, String(error));
        assert.equal(GrpcStatus[error.code], GrpcStatus[testCase.code], error.message);
        if (testCase.field) assert.equal(error.field, testCase.field, error.message);
        assert.equal(error.reason, testCase.reason ?? ErrorReason.ERROR_REASON_INVALID_FIELD, error.message);
        return true;
      });
      assert.equal(started.length, 0, 'no operation was created');
    });
  }

  it('starts one operation with the plan as its metadata and the request_id', async () => {
    const started: Array<{ metadata: CloneVirtualMachinesMetadata; requestId: string }> = [];
    const fleet = standardFleet();
    const handlers = cloningHandlers({
      fleet,
      operations: {
        start: async (_kind: unknown, _request: unknown, metadata: unknown, requestId: string) => {
          started.push({ metadata: metadata as CloneVirtualMachinesMetadata, requestId });
          return Operation.fromPartial({ name: 'operations/x' });
        },
      },
      kind: cloneOperationKind({ fleet, agents: new FakeAgents() }),
      random: () => 'abc123',
    });
    const operation = await handlers.cloneVirtualMachines!(
      CloneVirtualMachinesRequest.fromPartial({ source: image('debian-12'), count: 1, requestId: 'req-1' }),
      undefined as never,
    );
    assert.equal(operation.name, 'operations/x');
    assert.equal(started.length, 1);
    assert.equal(started[0]!.requestId, 'req-1');
    assert.deepEqual(
      started[0]!.metadata.clones.map((clone) => [clone.index, clone.host, clone.domainName, clone.state]),
      [[1, 'hosts/kvm-02', 'debian-12-abc123', CloneResult_State.STATE_PENDING]],
    );
  });

  it('returns the operation of a known request_id without planning again', async () => {
    const fleet = standardFleet();
    let planned = false;
    const spyFleet: FleetView = { ...bind(fleet), listHosts: async () => ((planned = true), fleet.listHosts()) };
    const handlers = cloningHandlers({
      fleet: spyFleet,
      operations: { start: async () => Operation.fromPartial({ name: 'operations/first' }) },
      kind: cloneOperationKind({ fleet, agents: new FakeAgents() }),
      requestIdUsed: async (requestId) => requestId === 'req-1',
    });
    // The explicit names are taken by now (by the first operation's clones): a re-plan would refuse it.
    fleet.machine('kvm-02', 'web-1').machine('kvm-03', 'web-3');
    const operation = await handlers.cloneVirtualMachines!(
      CloneVirtualMachinesRequest.fromPartial({ source: image('debian-12'), count: 2, nameTemplate: 'web-{index}', requestId: 'req-1' }),
      undefined as never,
    );
    assert.equal(operation.name, 'operations/first');
    assert.equal(planned, false);
  });
});

function bind(fleet: FakeFleet): FleetView {
  return {
    getVirtualMachine: (name) => fleet.getVirtualMachine(name),
    getImage: (name) => fleet.getImage(name),
    listHosts: () => fleet.listHosts(),
    listReplicas: (name) => fleet.listReplicas(name),
    domainNamesInUse: () => fleet.domainNamesInUse(),
  };
}

// ---------------------------------------------------------------------------------------------- planning

describe('planning', () => {
  it('spreads WHERE_IMAGE_IS over READY hosts holding the image, then the others when a limit leaves clones over', async () => {
    const fleet = standardFleet();
    const { metadata } = await plan(fleet, { source: image('debian-12'), count: 3 });
    assert.deepEqual(
      metadata.clones.map((clone) => clone.host),
      ['hosts/kvm-02', 'hosts/kvm-03', 'hosts/kvm-02'],
    );
    const limited = await plan(fleet, {
      source: image('debian-12'),
      count: 5,
      placement: { strategy: Placement_Strategy.STRATEGY_WHERE_IMAGE_IS, hosts: [], maxClonesPerHost: 2 },
    });
    // gone-01 holds a replica but is UNREACHABLE; drain-01 and xen-01 never take clones of a KVM image.
    assert.deepEqual(
      limited.metadata.clones.map((clone) => clone.host),
      ['hosts/kvm-02', 'hosts/kvm-03', 'hosts/kvm-02', 'hosts/kvm-03', 'hosts/kvm-01'],
    );
    assert.equal(limited.metadata.totalCount, 5);
    assert.equal(limited.metadata.source, 'images/debian-12');
  });

  it('puts the clones of a virtual machine on its host, named after its domain', async () => {
    const { metadata } = await plan(standardFleet(), {
      source: { $case: 'virtualMachine', value: 'hosts/kvm-01/virtualMachines/golden' },
      count: 2,
      nameTemplate: '{source}-{host}-{index}',
      // DISTRIBUTE is what a virtual machine's clones get anyway: accepted, unlike STREAM.
      delivery: CloneVirtualMachinesRequest_Delivery.DELIVERY_DISTRIBUTE,
    });
    assert.deepEqual(
      metadata.clones.map((clone) => [clone.host, clone.domainName]),
      [
        ['hosts/kvm-01', 'golden-kvm-01-1'],
        ['hosts/kvm-01', 'golden-kvm-01-2'],
      ],
    );
  });

  it('draws a new {random} for a name that is taken', async () => {
    const fleet = standardFleet().machine('kvm-03', 'debian-12-r00000');
    const { metadata } = await plan(fleet, { source: image('debian-12'), count: 2 });
    assert.deepEqual(
      metadata.clones.map((clone) => clone.domainName),
      ['debian-12-r00001', 'debian-12-r00002'],
    );
  });
});

// ---------------------------------------------------------------------------------------------- the operation

describe('the clone operation', () => {
  it('makes the clones host by host with request_id <operation>/<host> and reports each one', async () => {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const { request, metadata } = await plan(fleet, {
      source: image('debian-12'),
      count: 4,
      placement: hostsPlacement('kvm-02', 'kvm-03'),
      nameTemplate: 'web-{index}',
      start: true,
    });
    const { context, checkpoints } = fakeContext(request, metadata);
    const response = await run({ fleet, agents, now: () => new Date('2024-05-01T10:01:00Z') }, context);

    assert.deepEqual(agents.hostsCalled().sort(), ['hosts/kvm-02', 'hosts/kvm-03']);
    const kvm02 = agents.calls.find((call) => call.host === 'hosts/kvm-02')!.request;
    assert.equal(kvm02.requestId, `${context.name}/hosts/kvm-02`);
    assert.equal(kvm02.requestId, agentRequestId(context.name, 'hosts/kvm-02'));
    assert.equal(kvm02.operation, context.name);
    // Agents get the exact version the operation fixed, numbered.
    assert.deepEqual(kvm02.source, { $case: 'image', value: 'images/debian-12/versions/1' });
    assert.deepEqual(kvm02.clones, [
      { domainName: 'web-1', start: true, index: 0 },
      { domainName: 'web-3', start: true, index: 0 },
    ]);

    assert.deepEqual(
      response.clones.map((clone) => [clone.index, clone.host, clone.domainName, clone.state, clone.virtualMachine, clone.started]),
      [
        [1, 'hosts/kvm-02', 'web-1', CloneResult_State.STATE_DONE, 'hosts/kvm-02/virtualMachines/web-1', true],
        [2, 'hosts/kvm-03', 'web-2', CloneResult_State.STATE_DONE, 'hosts/kvm-03/virtualMachines/web-2', true],
        [3, 'hosts/kvm-02', 'web-3', CloneResult_State.STATE_DONE, 'hosts/kvm-02/virtualMachines/web-3', true],
        [4, 'hosts/kvm-03', 'web-4', CloneResult_State.STATE_DONE, 'hosts/kvm-03/virtualMachines/web-4', true],
      ],
    );
    assert.equal(response.clones[0]!.uuid, 'uuid-web-1');
    assert.deepEqual(response.clones[0]!.overlays, ['/var/lib/cowherd/clones/web-1/vda.qcow2']);
    const final = checkpoints.at(-1)!;
    assert.equal(final.metadata.doneCount, 4);
    assert.equal(final.metadata.failedCount, 0);
    assert.deepEqual(final.metadata.updateTime, new Date('2024-05-01T10:01:00Z'));
    assert.deepEqual(final.metadata.startTime, new Date('2024-05-01T10:00:00Z'));
    assert.deepEqual(final.state, { finishedHosts: { 'hosts/kvm-02': true, 'hosts/kvm-03': true }, imageVersion: 'images/debian-12/versions/1' });
  });

  it('reports partial failures per clone and still succeeds', async () => {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const events = new FakeEvents();
    const taken = new CowherdError(GrpcStatus.ALREADY_EXISTS, 'web-4 exists', { reason: ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NAME_TAKEN });
    agents.behaviours.set('hosts/kvm-02', async (request) =>
      makeAll('hosts/kvm-02', request, new Map([['web-4', { code: taken.code, message: taken.message, details: [] }]])),
    );
    agents.behaviours.set('hosts/kvm-01', async () => {
      throw grpcError(GrpcStatus.UNAVAILABLE, 'connection refused');
    });
    // Round robin: kvm-02 takes web-1 and web-4, kvm-03 web-2 and web-5, kvm-01 web-3 and web-6.
    const { request, metadata } = await plan(fleet, {
      source: image('debian-12'),
      count: 6,
      placement: hostsPlacement('kvm-02', 'kvm-03', 'kvm-01'),
      nameTemplate: 'web-{index}',
    });
    fleet.replica('debian-12', 'kvm-01');
    const { context } = fakeContext(request, metadata);
    // Tried once: the retries while an agent does not answer have tests of their own below.
    const response = await run({ fleet, agents, events, agentRetryMs: 0 }, context);

    const states = response.clones.map((clone) => [clone.domainName, clone.host, CloneResult_State[clone.state]]);
    assert.deepEqual(states, [
      ['web-1', 'hosts/kvm-02', 'STATE_DONE'],
      ['web-2', 'hosts/kvm-03', 'STATE_DONE'],
      ['web-3', 'hosts/kvm-01', 'STATE_FAILED'],
      ['web-4', 'hosts/kvm-02', 'STATE_FAILED'],
      ['web-5', 'hosts/kvm-03', 'STATE_DONE'],
      ['web-6', 'hosts/kvm-01', 'STATE_FAILED'],
    ]);
    // One clone of kvm-02 failed at the agent; its sibling is DONE.
    assert.equal(response.clones[3]!.error?.code, GrpcStatus.ALREADY_EXISTS);
    assert.equal(response.clones[0]!.error, undefined);
    // kvm-01's agent never answered: its clones fail with UNAVAILABLE (HOST_UNREACHABLE).
    for (const clone of [response.clones[2]!, response.clones[5]!]) {
      assert.equal(clone.error?.code, GrpcStatus.UNAVAILABLE);
      assert.equal(reasonOf(clone.error), errorReasonToJSON(ErrorReason.ERROR_REASON_HOST_UNREACHABLE));
      assert.equal(clone.virtualMachine, '');
    }
    // clone.failed is published by cloning only for the clones no agent answered for (agents publish their own).
    assert.deepEqual(
      events.published.map((event) => event.id),
      [`clone.failed/${context.name}/kvm-01/web-3`, `clone.failed/${context.name}/kvm-01/web-6`],
    );
  });

  it('asks an agent that did not answer again with the same request_id, and reports the clones the first attempt made', async () => {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const events = new FakeEvents();
    // The agent made the clones, then died before answering (its restart refuses connections for a moment).
    let attempts = 0;
    agents.behaviours.set('hosts/kvm-02', async (request) => {
      attempts += 1;
      if (attempts === 1) throw grpcError(GrpcStatus.UNAVAILABLE, 'connect ECONNREFUSED');
      return makeAll('hosts/kvm-02', request);
    });
    const { request, metadata } = await plan(fleet, { source: image('debian-12'), count: 2, placement: hostsPlacement('kvm-02'), nameTemplate: 'web-{index}' });
    const { context } = fakeContext(request, metadata);
    const response = await run({ fleet, agents, events }, context);

    assert.deepEqual(
      response.clones.map((clone) => CloneResult_State[clone.state]),
      ['STATE_DONE', 'STATE_DONE'],
    );
    assert.deepEqual(agents.hostsCalled(), ['hosts/kvm-02', 'hosts/kvm-02']);
    assert.equal(agents.calls[0]!.request.requestId, agents.calls[1]!.request.requestId);
    assert.deepEqual(events.published, [], 'no clone.failed for clones that exist');
  });

  it('stops asking an agent that does not answer once the inventory calls its host UNREACHABLE', async () => {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const events = new FakeEvents();
    agents.behaviours.set('hosts/kvm-02', async () => {
      // The heartbeats stop with the answers.
      fleet.host('kvm-02', { state: Host_State.STATE_UNREACHABLE });
      throw grpcError(GrpcStatus.UNAVAILABLE, 'connect ECONNREFUSED');
    });
    const { request, metadata } = await plan(fleet, { source: image('debian-12'), count: 1, placement: hostsPlacement('kvm-02'), nameTemplate: 'web-{index}' });
    const { context } = fakeContext(request, metadata);
    await assert.rejects(run({ fleet, agents, events }, context), (error: unknown) => {
      assert.ok(error instanceof CowherdError);
      assert.equal(error.code, GrpcStatus.UNAVAILABLE);
      assert.equal(error.reason, ErrorReason.ERROR_REASON_HOST_UNREACHABLE);
      assert.match(error.message, /hosts\/kvm-02 is UNREACHABLE/);
      return true;
    });
    assert.equal(agents.calls.length, 1, 'no second call to a host the inventory gave up on');
  });

  it('fails clones on a host without the image with IMAGE_NOT_ON_HOST, and the whole operation when nothing could be attempted', async () => {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const events = new FakeEvents();
    const { request, metadata } = await plan(fleet, { source: image('debian-12'), count: 2, placement: hostsPlacement('kvm-01'), nameTemplate: 'web-{index}' });
    const { context, checkpoints } = fakeContext(request, metadata);
    await assert.rejects(run({ fleet, agents, events }, context), (error: unknown) => {
      assert.ok(error instanceof CowherdError);
      assert.equal(error.code, GrpcStatus.FAILED_PRECONDITION);
      assert.equal(error.reason, ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST);
      assert.match(error.message, /not wired/);
      return true;
    });
    assert.equal(agents.calls.length, 0);
    const final = checkpoints.at(-1)!.metadata;
    assert.equal(final.failedCount, 2);
    assert.equal(reasonOf(final.clones[0]!.error), 'ERROR_REASON_IMAGE_NOT_ON_HOST');
    assert.equal(events.published.length, 2);
  });

  it('asks through the image delivery hook for a host without the image', async () => {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const asked: string[] = [];
    const { request, metadata } = await plan(fleet, {
      source: image('debian-12'),
      count: 2,
      placement: hostsPlacement('kvm-01', 'kvm-02'),
      nameTemplate: 'web-{index}',
    });
    const { context } = fakeContext(request, metadata);
    const response = await run(
      { fleet, agents, imageDelivery: { bringImageToHost: async ({ image: name, host }) => void asked.push(`${name}@${host}`) } },
      context,
    );
    assert.deepEqual(asked, ['images/debian-12/versions/1@hosts/kvm-01']);
    assert.deepEqual(
      response.clones.map((clone) => clone.state),
      [CloneResult_State.STATE_DONE, CloneResult_State.STATE_DONE],
    );
  });

  it('asks at most 8 hosts at a time', async () => {
    const fleet = new FakeFleet().image('debian-12');
    const ids = Array.from({ length: 20 }, (_, i) => `kvm-${String(i).padStart(2, '0')}`);
    for (const id of ids) fleet.host(id).replica('debian-12', id);
    const agents = new FakeAgents();
    agents.delayMs = 5;
    const { request, metadata } = await plan(fleet, { source: image('debian-12'), count: 40 });
    const { context } = fakeContext(request, metadata);
    const response = await run({ fleet, agents }, context);
    assert.equal(response.clones.filter((clone) => clone.state === CloneResult_State.STATE_DONE).length, 40);
    assert.equal(agents.calls.length, 20);
    assert.equal(agents.maxRunning, 8);
  });

  it('resumed from its checkpoint, does not ask the agents of finished hosts again', async () => {
    const fleet = standardFleet();
    const firstAgents = new FakeAgents();
    const { request, metadata } = await plan(fleet, {
      source: image('debian-12'),
      count: 4,
      placement: hostsPlacement('kvm-02', 'kvm-03'),
      nameTemplate: 'web-{index}',
    });
    const first = fakeContext(request, metadata);
    // kvm-03's call is under way when this replica stops: the agent may have made clones, the run pauses.
    firstAgents.behaviours.set('hosts/kvm-03', async (agentRequest) => {
      first.controller.abort(new Error('replica stopping'));
      makeAll('hosts/kvm-03', agentRequest);
      throw grpcError(GrpcStatus.CANCELLED, 'call cancelled');
    });
    await assert.rejects(run({ fleet, agents: firstAgents, hostConcurrency: 1 }, first.context), /replica stopping/);
    assert.deepEqual(firstAgents.hostsCalled(), ['hosts/kvm-02', 'hosts/kvm-03']);
    const saved = first.last();
    assert.deepEqual(saved.state, { finishedHosts: { 'hosts/kvm-02': true }, imageVersion: 'images/debian-12/versions/1' });

    const secondAgents = new FakeAgents();
    const second = fakeContext(request, saved.metadata, saved.state);
    const response = await run({ fleet, agents: secondAgents }, second.context);
    assert.deepEqual(secondAgents.hostsCalled(), ['hosts/kvm-03']);
    assert.equal(secondAgents.calls[0]!.request.requestId, `${first.context.name}/hosts/kvm-03`);
    assert.deepEqual(
      secondAgents.calls[0]!.request.clones.map((clone) => clone.domainName),
      ['web-2', 'web-4'],
    );
    assert.deepEqual(
      response.clones.map((clone) => [clone.domainName, CloneResult_State[clone.state], clone.uuid]),
      [
        ['web-1', 'STATE_DONE', 'uuid-web-1'],
        ['web-2', 'STATE_DONE', 'uuid-web-2'],
        ['web-3', 'STATE_DONE', 'uuid-web-3'],
        ['web-4', 'STATE_DONE', 'uuid-web-4'],
      ],
    );
  });

  it('ends with the cancellation when cancelled, keeping what was recorded', async () => {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const { request, metadata } = await plan(fleet, {
      source: image('debian-12'),
      count: 2,
      placement: hostsPlacement('kvm-02', 'kvm-03'),
      nameTemplate: 'web-{index}',
    });
    const { context, controller, last } = fakeContext(request, metadata);
    const cancelled = new CowherdError(GrpcStatus.CANCELLED, 'operation cancelled by request', { reason: ErrorReason.ERROR_REASON_OPERATION_CONFLICT });
    agents.behaviours.set('hosts/kvm-03', async () => {
      controller.abort(cancelled);
      throw grpcError(GrpcStatus.CANCELLED, 'call cancelled');
    });
    await assert.rejects(run({ fleet, agents, hostConcurrency: 1 }, context), (error: unknown) => error === cancelled);
    assert.deepEqual(last().state, { finishedHosts: { 'hosts/kvm-02': true }, imageVersion: 'images/debian-12/versions/1' });
  });
});

// ---------------------------------------------------------------------------------------------- streaming clones

const MiB = 1024 * 1024;

/** One host's delivery as the test drives it. */
interface ScriptedTransfer {
  readonly operation: string;
  readonly onProgress: ((progress: ImageDeliveryProgress) => void) | undefined;
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
}

/**
 * An ImageDelivery whose transfers the test scripts: `report` is a progress report of the DistributeImage
 * operation (the host's replica state and bytes), `arrive` ends it with the replica AVAILABLE, `fail` with an error.
 */
class FakeDelivery implements ImageDelivery {
  readonly asked: Array<{ image: string; host: string; operation: string }> = [];
  private readonly transfers = new Map<string, ScriptedTransfer>();

  bringImageToHost(
    request: { image: string; host: string; operation: string; onProgress?: (progress: ImageDeliveryProgress) => void },
    signal: AbortSignal,
  ): Promise<void> {
    this.asked.push({ image: request.image, host: request.host, operation: request.operation });
    return new Promise((resolve, reject) => {
      this.transfers.set(request.host, { operation: request.operation, onProgress: request.onProgress, resolve, reject });
      signal.addEventListener('abort', () => reject(signal.reason), { once: true });
    });
  }

  report(host: string, state: ImageReplica_State, bytesDone: number, bytesTotal = 40 * MiB): void {
    this.transfer(host).onProgress?.({
      operation: 'operations/distribute-1',
      transfer: HostTransfer.fromPartial({
        host,
        state,
        progress: { bytesDone: String(bytesDone), bytesTotal: String(bytesTotal), rateBytesPerSecond: String(4 * MiB), peers: 2 },
      }),
      deadline: new Date('2024-05-01T10:30:00Z'),
    });
  }

  arrive(host: string): void {
    this.transfer(host).resolve();
  }

  fail(host: string, error: unknown): void {
    this.transfer(host).reject(error);
  }

  private transfer(host: string): ScriptedTransfer {
    const transfer = this.transfers.get(host);
    assert.ok(transfer, `no delivery to ${host} was asked for`);
    return transfer;
  }
}

/** Waits (a few ms at a time, 2 s at most) until `condition` holds. */
async function until(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 2_000;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

function statesOf(metadata: Pick<CloneVirtualMachinesMetadata, 'clones'>): string[] {
  return [...metadata.clones].sort((a, b) => a.index - b.index).map((clone) => `${clone.domainName}:${CloneResult_State[clone.state]}`);
}

function infoOf(status: Status | undefined): ErrorInfo | undefined {
  const info = status?.details.find((detail) => detail.typeUrl === typeUrlOf(ErrorInfo));
  return info ? ErrorInfo.decode(info.value) : undefined;
}

const STREAM = CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM;

describe('streaming clones (DELIVERY_STREAM)', () => {
  /** kvm-01 lacks the image, kvm-02 holds it; web-1 and web-3 go to kvm-01, web-2 to kvm-02. */
  async function streamingSetup(fields: Partial<CloneVirtualMachinesRequest> = {}) {
    const fleet = standardFleet();
    const agents = new FakeAgents();
    const events = new FakeEvents();
    const delivery = new FakeDelivery();
    agents.behaviours.set('hosts/kvm-01', async (request) => makeAll('hosts/kvm-01', request, new Map(), { streaming: request.stream }));
    const { request, metadata } = await plan(fleet, {
      source: image('debian-12'),
      count: 3,
      placement: hostsPlacement('kvm-01', 'kvm-02'),
      nameTemplate: 'web-{index}',
      start: true,
      delivery: STREAM,
      ...fields,
    });
    const harness = fakeContext(request, metadata);
    const deps: CloneOperationDeps = { fleet, agents, events, imageDelivery: delivery };
    return { fleet, agents, events, delivery, request, deps, ...harness };
  }

  const kvm01Calls = (agents: FakeAgents) => agents.calls.filter((call) => call.host === 'hosts/kvm-01');

  it('makes the clones once the replica is TRANSFERRING, with stream=true; STREAMING with the base progress; DONE once AVAILABLE', async () => {
    const { agents, events, delivery, deps, context, checkpoints, last } = await streamingSetup();
    const running = run(deps, context);

    await until(() => delivery.asked.length === 1, 'the image is asked for');
    assert.deepEqual(delivery.asked, [{ image: 'images/debian-12/versions/1', host: 'hosts/kvm-01', operation: context.name }]);
    // The host that holds the image clones as today, without stream.
    await until(() => agents.calls.some((call) => call.host === 'hosts/kvm-02'), 'kvm-02 is asked');
    assert.equal(agents.calls.find((call) => call.host === 'hosts/kvm-02')!.request.stream, false);

    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_PENDING, 0);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(kvm01Calls(agents).length, 0, 'nothing is made on a PENDING replica');
    assert.deepEqual(statesOf(last().metadata), ['web-1:STATE_WAITING_FOR_IMAGE', 'web-2:STATE_DONE', 'web-3:STATE_WAITING_FOR_IMAGE']);

    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_TRANSFERRING, 10 * MiB);
    await until(() => last().metadata.clones.some((clone) => clone.state === CloneResult_State.STATE_STREAMING), 'the clones stream');
    const call = kvm01Calls(agents)[0]!.request;
    assert.equal(call.stream, true);
    assert.equal(call.requestId, agentRequestId(context.name, 'hosts/kvm-01'));
    assert.deepEqual(
      call.clones.map((clone) => clone.domainName),
      ['web-1', 'web-3'],
    );
    const streaming = last();
    assert.deepEqual(statesOf(streaming.metadata), ['web-1:STATE_STREAMING', 'web-2:STATE_DONE', 'web-3:STATE_STREAMING']);
    const web1 = streaming.metadata.clones.find((clone) => clone.domainName === 'web-1')!;
    assert.equal(web1.virtualMachine, 'hosts/kvm-01/virtualMachines/web-1');
    assert.equal(web1.started, true);
    assert.equal(web1.baseProgress?.bytesDone, String(10 * MiB));
    assert.equal(web1.baseProgress?.bytesTotal, String(40 * MiB));
    assert.equal(streaming.metadata.doneCount, 1, 'STREAMING clones are not DONE yet');
    assert.deepEqual(streaming.state?.streamingHosts, ['hosts/kvm-01']);
    assert.equal(streaming.state?.finishedHosts['hosts/kvm-01'], undefined, 'the host is not finished while its clones stream');
    // The transfer stays in the metadata while the streaming clones wait for it.
    assert.equal(streaming.metadata.imageTransfers[0]?.waitingCloneCount, 2);

    // A state change is written at once, with the streaming clones' base progress.
    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_VERIFYING, 40 * MiB);
    await until(() => last().metadata.imageTransfers[0]?.state === ImageReplica_State.STATE_VERIFYING, 'VERIFYING is written');
    for (const clone of last().metadata.clones.filter((candidate) => candidate.host === 'hosts/kvm-01')) {
      assert.equal(clone.state, CloneResult_State.STATE_STREAMING);
      assert.equal(clone.baseProgress?.bytesDone, String(40 * MiB));
    }

    delivery.arrive('hosts/kvm-01');
    const response = await running;
    assert.deepEqual(statesOf(response), ['web-1:STATE_DONE', 'web-2:STATE_DONE', 'web-3:STATE_DONE']);
    const done = response.clones[0]!;
    assert.deepEqual([done.baseProgress?.bytesDone, done.baseProgress?.bytesTotal], [String(40 * MiB), String(40 * MiB)]);
    assert.equal(response.clones[1]!.baseProgress, undefined, 'a clone that did not stream has no base progress');
    const final = checkpoints.at(-1)!;
    assert.deepEqual(final.state, { finishedHosts: { 'hosts/kvm-01': true, 'hosts/kvm-02': true }, imageVersion: 'images/debian-12/versions/1' });
    assert.deepEqual(final.metadata.imageTransfers, []);
    assert.equal(final.metadata.doneCount, 3);
    assert.equal(kvm01Calls(agents).length, 1, 'the agent is asked once');
    assert.deepEqual(agents.deletes, []);
    assert.deepEqual(events.published, []);
  });

  it('deletes the streaming clones and fails them when the image stream fails for good', async () => {
    const { agents, events, delivery, deps, context } = await streamingSetup();
    // web-3 is gone already (NOT_FOUND counts as deleted).
    agents.deleteErrors.set('hosts/kvm-01/virtualMachines/web-3', grpcError(GrpcStatus.NOT_FOUND, CowherdError.notFound('hosts/kvm-01/virtualMachines/web-3')));
    const running = run(deps, context);
    await until(() => delivery.asked.length === 1, 'the image is asked for');
    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_TRANSFERRING, 5 * MiB);
    await until(() => kvm01Calls(agents).length === 1, 'the clones are made');
    await new Promise((resolve) => setTimeout(resolve, 20));
    delivery.fail(
      'hosts/kvm-01',
      new CowherdError(GrpcStatus.DEADLINE_EXCEEDED, 'hosts/kvm-01 made no progress for 600 s (TRANSFERRING, 5242880 bytes)', {
        reason: ErrorReason.ERROR_REASON_PROGRESS_DEADLINE_EXCEEDED,
        metadata: { host: 'hosts/kvm-01' },
      }),
    );
    const response = await running;

    assert.deepEqual(statesOf(response), ['web-1:STATE_FAILED', 'web-2:STATE_DONE', 'web-3:STATE_FAILED']);
    assert.deepEqual(agents.deletes.sort(), ['hosts/kvm-01/virtualMachines/web-1 force=true', 'hosts/kvm-01/virtualMachines/web-3 force=true']);
    for (const clone of [response.clones[0]!, response.clones[2]!]) {
      assert.equal(clone.error?.code, GrpcStatus.DEADLINE_EXCEEDED);
      assert.match(
        clone.error?.message ?? '',
        /^image stream of images\/debian-12\/versions\/1 to hosts\/kvm-01 failed: .*no progress.*; the streaming clone was deleted$/,
      );
      const info = infoOf(clone.error);
      assert.equal(info?.reason, 'ERROR_REASON_PROGRESS_DEADLINE_EXCEEDED');
      assert.equal(info?.metadata['delivery'], 'STREAM');
      assert.equal(info?.metadata['clone_deleted'], 'true');
      assert.equal(clone.virtualMachine, '', 'nothing is left of it');
      assert.equal(clone.started, false);
    }
    assert.deepEqual(events.published.map((event) => event.id).sort(), [
      `clone.failed/${context.name}/kvm-01/web-1`,
      `clone.failed/${context.name}/kvm-01/web-3`,
    ]);
  });

  it('says so when a streaming clone could not be deleted, and keeps its name', async () => {
    const { agents, delivery, deps, context } = await streamingSetup({ count: 1, placement: hostsPlacement('kvm-01') });
    agents.deleteErrors.set('hosts/kvm-01/virtualMachines/web-1', grpcError(GrpcStatus.INTERNAL, 'virsh undefine failed'));
    const running = run(deps, context);
    await until(() => delivery.asked.length === 1, 'the image is asked for');
    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_TRANSFERRING, 5 * MiB);
    await until(() => kvm01Calls(agents).length === 1, 'the clone is made');
    await new Promise((resolve) => setTimeout(resolve, 20));
    delivery.fail('hosts/kvm-01', CowherdError.failedPrecondition('sha256 mismatch', ErrorReason.ERROR_REASON_VERIFICATION_FAILED));
    const [clone] = (await running).clones;
    assert.equal(clone!.state, CloneResult_State.STATE_FAILED);
    assert.equal(clone!.virtualMachine, 'hosts/kvm-01/virtualMachines/web-1');
    assert.match(
      clone!.error?.message ?? '',
      /^image stream of .* failed: sha256 mismatch; the streaming clone could not be deleted \(.*virsh undefine failed\)/,
    );
    assert.equal(infoOf(clone!.error)?.metadata['clone_deleted'], 'false');
    assert.equal(infoOf(clone!.error)?.reason, 'ERROR_REASON_VERIFICATION_FAILED');
  });

  it('resumed by another replica, keeps STREAMING clones STREAMING and waits for AVAILABLE without asking the agent again', async () => {
    const first = await streamingSetup();
    const running = run(first.deps, first.context);
    await until(() => first.delivery.asked.length === 1, 'the image is asked for');
    first.delivery.report('hosts/kvm-01', ImageReplica_State.STATE_TRANSFERRING, 10 * MiB);
    await until(() => first.last().state?.streamingHosts?.length === 1, 'the clones stream');
    first.controller.abort(new Error('replica stopping'));
    await assert.rejects(running, /replica stopping/);
    const saved = first.last();
    assert.deepEqual(statesOf(saved.metadata), ['web-1:STATE_STREAMING', 'web-2:STATE_DONE', 'web-3:STATE_STREAMING']);

    const agents = new FakeAgents();
    const delivery = new FakeDelivery();
    const second = fakeContext(first.request, saved.metadata, saved.state);
    const resumed = run({ fleet: first.fleet, agents, events: first.events, imageDelivery: delivery }, second.context);
    await until(() => delivery.asked.length === 1, 'the resumed run follows the delivery');
    // The same clone operation and host: image-delivery.ts derives the same DistributeImage request_id from them.
    assert.deepEqual(delivery.asked, [{ image: 'images/debian-12/versions/1', host: 'hosts/kvm-01', operation: first.context.name }]);
    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_VERIFYING, 40 * MiB);
    await until(() => second.checkpoints.length > 0, 'the resumed run writes progress');
    assert.deepEqual(statesOf(second.last().metadata), ['web-1:STATE_STREAMING', 'web-2:STATE_DONE', 'web-3:STATE_STREAMING']);
    assert.equal(second.last().metadata.clones[0]!.baseProgress?.bytesDone, String(40 * MiB));
    assert.deepEqual(second.last().state?.streamingHosts, ['hosts/kvm-01']);

    delivery.arrive('hosts/kvm-01');
    const response = await resumed;
    assert.deepEqual(statesOf(response), ['web-1:STATE_DONE', 'web-2:STATE_DONE', 'web-3:STATE_DONE']);
    assert.equal(response.clones[0]!.uuid, 'uuid-web-1', 'the clone the first run recorded');
    assert.deepEqual(agents.calls, [], 'no agent is asked again');
    assert.deepEqual(second.last().state, {
      finishedHosts: { 'hosts/kvm-01': true, 'hosts/kvm-02': true },
      imageVersion: 'images/debian-12/versions/1',
    });
  });

  it('resumed after the replica became AVAILABLE in the inventory, makes the streaming clones DONE at once', async () => {
    const first = await streamingSetup({ count: 1, placement: hostsPlacement('kvm-01') });
    const running = run(first.deps, first.context);
    await until(() => first.delivery.asked.length === 1, 'the image is asked for');
    first.delivery.report('hosts/kvm-01', ImageReplica_State.STATE_TRANSFERRING, 10 * MiB);
    await until(() => first.last().state?.streamingHosts?.length === 1, 'the clone streams');
    first.controller.abort(new Error('replica stopping'));
    await assert.rejects(running, /replica stopping/);

    first.fleet.replica('debian-12', 'kvm-01');
    const delivery = new FakeDelivery();
    const saved = first.last();
    const second = fakeContext(first.request, saved.metadata, saved.state);
    const response = await run({ fleet: first.fleet, agents: new FakeAgents(), imageDelivery: delivery }, second.context);
    assert.deepEqual(statesOf(response), ['web-1:STATE_DONE']);
    assert.deepEqual(delivery.asked, []);
  });

  it('asks again once the replica is AVAILABLE when the agent cannot stream from it yet (IMAGE_NOT_ON_HOST)', async () => {
    const { agents, delivery, deps, context, last } = await streamingSetup({ count: 1, placement: hostsPlacement('kvm-01') });
    let attempts = 0;
    agents.behaviours.set('hosts/kvm-01', async (request) => {
      attempts += 1;
      if (attempts === 1)
        throw grpcError(
          GrpcStatus.FAILED_PRECONDITION,
          CowherdError.failedPrecondition('no replica of images/debian-12/versions/1 here', ErrorReason.ERROR_REASON_IMAGE_NOT_ON_HOST),
        );
      return makeAll('hosts/kvm-01', request);
    });
    const running = run(deps, context);
    await until(() => delivery.asked.length === 1, 'the image is asked for');
    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_TRANSFERRING, 1 * MiB);
    await until(() => attempts === 1 && last().metadata.clones[0]!.state === CloneResult_State.STATE_WAITING_FOR_IMAGE, 'the refusal is seen');
    delivery.arrive('hosts/kvm-01');
    const response = await running;
    assert.deepEqual(statesOf(response), ['web-1:STATE_DONE']);
    assert.equal(agents.calls.length, 2);
    assert.equal(agents.calls[0]!.request.requestId, agents.calls[1]!.request.requestId);
    assert.equal(response.clones[0]!.baseProgress, undefined);
  });

  it('fails the clones as DISTRIBUTE does when the delivery fails before the replica is streamable', async () => {
    const { agents, events, delivery, deps, context } = await streamingSetup({ count: 1, placement: hostsPlacement('kvm-01') });
    const running = run(deps, context);
    await until(() => delivery.asked.length === 1, 'the image is asked for');
    delivery.fail('hosts/kvm-01', CowherdError.failedPrecondition('no space on hosts/kvm-01', ErrorReason.ERROR_REASON_INSUFFICIENT_SPACE));
    await assert.rejects(running, /no space on hosts\/kvm-01/);
    assert.deepEqual(agents.calls, []);
    assert.deepEqual(agents.deletes, []);
    assert.equal(events.published.length, 1);
  });

  it('DISTRIBUTE (the default) is unchanged: the clones wait for AVAILABLE and the agent gets stream=false', async () => {
    const { agents, delivery, deps, context } = await streamingSetup({
      count: 1,
      placement: hostsPlacement('kvm-01'),
      delivery: CloneVirtualMachinesRequest_Delivery.DELIVERY_UNSPECIFIED,
    });
    const running = run(deps, context);
    await until(() => delivery.asked.length === 1, 'the image is asked for');
    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_TRANSFERRING, 10 * MiB);
    delivery.report('hosts/kvm-01', ImageReplica_State.STATE_VERIFYING, 40 * MiB);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(agents.calls.length, 0, 'nothing is made before AVAILABLE');
    delivery.arrive('hosts/kvm-01');
    const response = await running;
    assert.equal(agents.calls[0]!.request.stream, false);
    assert.deepEqual(statesOf(response), ['web-1:STATE_DONE']);
    assert.equal(response.clones[0]!.baseProgress, undefined);
  });
});
