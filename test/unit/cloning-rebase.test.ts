// RebaseVirtualMachines against a fake fleet and fake agents: bad requests are refused with their field before an
// operation exists; the selection is the managed clones of the target's image (AND the caller's filter), canaries
// spread over hosts and listed first; the operation distributes the target first, moves canaries, stops with
// ABORTED when a canary fails, moves the rest in waves of max_per_host per host, and counts clones already on the
// target as done.
//
//   node --import tsx --test test/unit/cloning-rebase.test.ts
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { RebaseClonesRequest, RebaseClonesResponse } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { RebaseVirtualMachinesMetadata, RebaseVirtualMachinesRequest } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { Host, Host_State, Image, Image_State, ImageReplica, VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import type { OperationContext } from '../../services/common/domain/operations.js';
import type { RebaseFleetView } from '../../services/cloning/fleet-view.js';
import { rebaseOperationKind, type RebaseCheckpoint } from '../../services/cloning/rebase-operation.js';
import { checkRebaseShape, planRebase, selectionFilter } from '../../services/cloning/rebase-plan.js';

const log = createLogger({ service: 'cloning-rebase-test', level: 'silent' });

/** 3 clones on each of two hosts, on version 1 of debian-12; the target version 2 is AVAILABLE on kvm-01 only. */
function fleet(options: { onTarget?: string[] } = {}): RebaseFleetView & { filters: string[] } {
  const vms = ['kvm-01', 'kvm-02'].flatMap((host) =>
    [1, 2, 3].map((index) => {
      const name = `hosts/${host}/virtualMachines/web-${host}-${index}`;
      const version = options.onTarget?.includes(name) ? 'images/debian-12/versions/2' : 'images/debian-12/versions/1';
      return VirtualMachine.fromPartial({ name, host: `hosts/${host}`, managed: true, sourceImage: 'images/debian-12', sourceImageVersion: version });
    }),
  );
  const filters: string[] = [];
  return {
    filters,
    getVirtualMachine: async () => undefined,
    getImage: async (name) => {
      if (name === 'images/debian-12/versions/2' || name === 'images/debian-12')
        return Image.fromPartial({ name: 'images/debian-12/versions/2', version: '2', state: Image_State.STATE_AVAILABLE });
      if (name === 'images/debian-12/versions/3') return Image.fromPartial({ name, version: '3', state: Image_State.STATE_PUBLISHING });
      return undefined;
    },
    listHosts: async () =>
      ['kvm-01', 'kvm-02'].map((id) =>
        Host.fromPartial({ name: `hosts/${id}`, state: Host_State.STATE_READY, hypervisor: Hypervisor.HYPERVISOR_KVM, agentEndpoint: `${id}:1` }),
      ),
    listReplicas: async (version) => (version === 'images/debian-12/versions/2' ? [ImageReplica.fromPartial({ host: 'hosts/kvm-01' })] : []),
    domainNamesInUse: async () => new Map(),
    listVirtualMachines: async (parent, filter) => {
      filters.push(filter);
      return vms.filter((vm) => parent === 'hosts/-' || vm.host === parent);
    },
  };
}

function request(fields: Partial<RebaseVirtualMachinesRequest> = {}): RebaseVirtualMachinesRequest {
  return RebaseVirtualMachinesRequest.fromPartial({ parent: 'hosts/-', targetImageVersion: 'images/debian-12/versions/2', ...fields });
}

function contextFor(req: RebaseVirtualMachinesRequest, metadata: RebaseVirtualMachinesMetadata) {
  const controller = new AbortController();
  let current = { metadata, state: undefined as RebaseCheckpoint | undefined };
  const context: OperationContext<RebaseVirtualMachinesRequest, RebaseVirtualMachinesMetadata, RebaseCheckpoint> = {
    name: 'operations/5b1c',
    request: req,
    get state() {
      return current.state;
    },
    get metadata() {
      return current.metadata;
    },
    signal: controller.signal,
    log,
    checkpoint: async (update) => {
      current = { metadata: update.metadata ?? current.metadata, state: update.state ?? current.state };
    },
    cancelRequested: () => false,
  };
  return { context, controller, last: () => current };
}

/** Agents that move every clone unless told to fail one; records the calls in order. */
function agents(failing: ReadonlySet<string> = new Set()) {
  const calls: Array<{ host: string; request: RebaseClonesRequest }> = [];
  return {
    calls,
    rebaseClones: async (host: Host, req: RebaseClonesRequest): Promise<RebaseClonesResponse> => {
      calls.push({ host: host.name, request: req });
      return {
        results: req.virtualMachines.map((name) => ({
          virtualMachine: name,
          virtualMachineState: undefined,
          status: failing.has(name) ? { code: GrpcStatus.INTERNAL, message: 'hypervisor said no', details: [] } : undefined,
          previousImageVersion: 'images/debian-12/versions/1',
          restarted: req.restart,
          swapDuration: undefined,
        })),
      };
    },
  };
}

function codeOf(error: unknown): [number | undefined, string | undefined] {
  return error instanceof CowherdError ? [error.code, error.field] : [undefined, undefined];
}

describe('RebaseVirtualMachines refuses bad requests before any operation exists', () => {
  for (const [fields, code, field] of [
    [{ parent: 'hosts' }, GrpcStatus.INVALID_ARGUMENT, 'parent'],
    [{ targetImageVersion: 'debian-12' }, GrpcStatus.INVALID_ARGUMENT, 'target_image_version'],
    [{ canaryCount: 101 }, GrpcStatus.INVALID_ARGUMENT, 'canary_count'],
    [{ canaryCount: -1 }, GrpcStatus.INVALID_ARGUMENT, 'canary_count'],
    [{ maxPerHost: 101 }, GrpcStatus.INVALID_ARGUMENT, 'max_per_host'],
    [{ shutdownTimeout: { seconds: '3601', nanos: 0 } }, GrpcStatus.INVALID_ARGUMENT, 'shutdown_timeout'],
    [{ filter: 'source_image = "images/ubuntu-24"' }, GrpcStatus.INVALID_ARGUMENT, 'filter'],
    [{ targetImageVersion: 'images/debian-12/versions/9' }, GrpcStatus.NOT_FOUND, undefined],
    [{ targetImageVersion: 'images/debian-12/versions/3' }, GrpcStatus.FAILED_PRECONDITION, undefined],
    [{ parent: 'hosts/kvm-09' }, GrpcStatus.FAILED_PRECONDITION, undefined],
  ] as const) {
    it(`${JSON.stringify(fields)} -> ${GrpcStatus[code]} ${field ?? ''}`, async () => {
      const error = await planRebase(request(fields as Partial<RebaseVirtualMachinesRequest>), fleet()).then(
        () => undefined,
        (caught: unknown) => caught,
      );
      assert.deepEqual(codeOf(error), [code, field]);
    });
  }

  it('applies the defaults: one canary, four per host, two minutes', () => {
    const settings = checkRebaseShape(request());
    assert.deepEqual([settings.canaryCount, settings.maxPerHost, settings.shutdownTimeoutMs], [1, 4, 120_000]);
  });

  it("selects managed clones of the target's image, AND the caller's filter", () => {
    assert.equal(selectionFilter('', 'debian-12'), 'source_image = "images/debian-12" AND managed = true');
    assert.equal(
      selectionFilter('source_image_version = "images/debian-12/versions/1"', 'debian-12'),
      'source_image_version = "images/debian-12/versions/1" AND source_image = "images/debian-12" AND managed = true',
    );
  });
});

describe('the rebase operation', () => {
  it('plans canaries spread over hosts, first; counts clones on the target as done', async () => {
    const metadata = await planRebase(request({ canaryCount: 2 }), fleet({ onTarget: ['hosts/kvm-01/virtualMachines/web-kvm-01-1'] }));
    assert.equal(metadata.targetImageVersion, 'images/debian-12/versions/2');
    assert.deepEqual(
      metadata.results.filter((result) => result.canary).map((result) => result.virtualMachine),
      ['hosts/kvm-01/virtualMachines/web-kvm-01-2', 'hosts/kvm-02/virtualMachines/web-kvm-02-1'],
    );
    assert.equal(metadata.results[0]!.canary && metadata.results[1]!.canary, true);
    const done = metadata.results.find((result) => result.virtualMachine.endsWith('web-kvm-01-1'))!;
    assert.deepEqual([done.pending, done.status?.code], [false, GrpcStatus.OK]);
    assert.equal(metadata.doneCount, 1);
  });

  it('distributes the target where it is missing, moves canaries, then the rest in waves of max_per_host', async () => {
    const req = request({ canaryCount: 2, maxPerHost: 2, restart: true });
    const metadata = await planRebase(req, fleet());
    const fake = agents();
    const delivered: string[] = [];
    const kind = rebaseOperationKind({
      fleet: fleet(),
      agents: fake,
      imageDelivery: { bringImageToHost: async ({ image, host }) => void delivered.push(`${image}@${host}`) },
    });
    const { context, last } = contextFor(req, metadata);
    const response = await kind.run(context);
    assert.deepEqual(delivered, ['images/debian-12/versions/2@hosts/kvm-02']);
    // Two canary calls (one per host), then per host the remaining 2 in one wave.
    assert.deepEqual(
      fake.calls.map((call) => `${call.host}:${call.request.virtualMachines.length}`),
      ['hosts/kvm-01:1', 'hosts/kvm-02:1', 'hosts/kvm-01:2', 'hosts/kvm-02:2'],
    );
    assert.equal(fake.calls[0]!.request.imageVersion, 'images/debian-12/versions/2');
    assert.equal(fake.calls[0]!.request.operation, 'operations/5b1c');
    assert.equal(response.results.length, 6);
    assert.ok(response.results.every((result) => !result.pending && result.status?.code === GrpcStatus.OK && result.restarted));
    assert.ok(response.results.every((result) => result.imageVersion === 'images/debian-12/versions/2'));
    assert.ok(response.results.every((result) => result.previousImageVersion === 'images/debian-12/versions/1'));
    assert.deepEqual([last().metadata.doneCount, last().metadata.failedCount], [6, 0]);
  });

  it('stops after a failed canary: the rest fail ABORTED and are never sent to an agent', async () => {
    const req = request({ canaryCount: 2 });
    const metadata = await planRebase(req, fleet());
    const fake = agents(new Set(['hosts/kvm-02/virtualMachines/web-kvm-02-1']));
    const kind = rebaseOperationKind({ fleet: fleet(), agents: fake, imageDelivery: { bringImageToHost: async () => undefined } });
    const { context } = contextFor(req, metadata);
    const response = await kind.run(context);
    assert.equal(fake.calls.length, 2);
    const byName = new Map(response.results.map((result) => [result.virtualMachine, result]));
    assert.equal(byName.get('hosts/kvm-01/virtualMachines/web-kvm-01-1')!.status?.code, GrpcStatus.OK);
    assert.equal(byName.get('hosts/kvm-02/virtualMachines/web-kvm-02-1')!.status?.code, GrpcStatus.INTERNAL);
    const rest = response.results.filter((result) => !result.canary);
    assert.equal(rest.length, 4);
    assert.ok(rest.every((result) => result.status?.code === GrpcStatus.ABORTED && /canary failed/.test(result.status.message)));
    assert.ok(rest.every((result) => result.imageVersion === 'images/debian-12/versions/1'));
  });

  it('a cancelled operation sends no further wave', async () => {
    const req = request({ canaryCount: 1, maxPerHost: 1 });
    const metadata = await planRebase(req, fleet());
    const fake = agents();
    const { context, controller } = contextFor(req, metadata);
    const kind = rebaseOperationKind({
      fleet: fleet(),
      agents: {
        rebaseClones: async (host, agentRequest) => {
          controller.abort(new CowherdError(GrpcStatus.CANCELLED, 'cancelled', { reason: ErrorReason.ERROR_REASON_UNSPECIFIED }));
          return fake.rebaseClones(host, agentRequest);
        },
      },
      imageDelivery: { bringImageToHost: async () => undefined },
    });
    await assert.rejects(kind.run(context), (error: unknown) => codeOf(error)[0] === GrpcStatus.CANCELLED);
    assert.equal(fake.calls.length, 1);
  });
});
