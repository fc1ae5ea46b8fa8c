// Version resolution in cloning: CloneVirtualMachines resolves the caller's image name once (GetImage's
// `version`), and the operation uses only the exact numbered name from then on, for replicas, delivery and the
// agents, even when a newer version is published before the run; data_disk_bytes is checked and passed on.
//
//   node --import tsx --test test/unit/cloning-rebase-versions.test.ts
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { CreateClonesRequest, CreateClonesResponse } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { CloneVirtualMachinesMetadata, CloneVirtualMachinesRequest, Placement_Strategy } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { Host, Host_State, Image, Image_State, ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import type { OperationContext } from '../../services/common/domain/operations.js';
import { cloneOperationKind, ImageVersionPins, versionPinKey, type CloneCheckpoint } from '../../services/cloning/clone-operation.js';
import { planClonesWithGuest } from '../../services/cloning/clone-plan.js';
import type { FleetView } from '../../services/cloning/fleet-view.js';

const log = createLogger({ service: 'cloning-versions-test', level: 'silent' });

/** debian-12 at `latest` version `latest.value`; version 2 AVAILABLE on kvm-01 only. */
function fleet(latest: { value: number }): FleetView {
  return {
    getVirtualMachine: async () => undefined,
    getImage: async (name) => {
      const version = name === 'images/debian-12' ? latest.value : Number(/versions\/(\d+)$/.exec(name)?.[1] ?? NaN);
      if (!Number.isInteger(version)) return undefined;
      return Image.fromPartial({
        name: `images/debian-12/versions/${version}`,
        version: String(version),
        state: Image_State.STATE_AVAILABLE,
        hypervisor: Hypervisor.HYPERVISOR_KVM,
      });
    },
    listHosts: async () =>
      ['kvm-01', 'kvm-02'].map((id) =>
        Host.fromPartial({ name: `hosts/${id}`, state: Host_State.STATE_READY, hypervisor: Hypervisor.HYPERVISOR_KVM, agentEndpoint: `${id}:1` }),
      ),
    listReplicas: async (version) => (version === 'images/debian-12/versions/2' ? [ImageReplica.fromPartial({ host: 'hosts/kvm-01' })] : []),
    domainNamesInUse: async () => new Map(),
  };
}

function request(fields: Partial<CloneVirtualMachinesRequest> = {}): CloneVirtualMachinesRequest {
  return CloneVirtualMachinesRequest.fromPartial({
    source: { $case: 'image', value: 'images/debian-12' },
    count: 2,
    nameTemplate: 'web-{index}',
    placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: ['hosts/kvm-01', 'hosts/kvm-02'] },
    ...fields,
  });
}

function contextFor(req: CloneVirtualMachinesRequest, metadata: CloneVirtualMachinesMetadata) {
  let current = { metadata, state: undefined as CloneCheckpoint | undefined };
  const context: OperationContext<CloneVirtualMachinesRequest, CloneVirtualMachinesMetadata, CloneCheckpoint> = {
    name: 'operations/7e2a',
    request: req,
    get state() {
      return current.state;
    },
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
  return { context, last: () => current };
}

function agents() {
  const calls: CreateClonesRequest[] = [];
  return {
    calls,
    createClones: async (_host: Host, req: CreateClonesRequest): Promise<CreateClonesResponse> => {
      calls.push(req);
      return {
        results: req.clones.map((clone) => ({ domainName: clone.domainName, virtualMachine: undefined, status: undefined, streaming: false, started: false })),
      };
    },
  };
}

describe('CloneVirtualMachines clones one exact version', () => {
  it('resolves images/{image} to its latest number, and keeps it when a newer version is published before the run', async () => {
    const latest = { value: 2 };
    const view = fleet(latest);
    const req = request({ dataDiskBytes: String(2 ** 20) });
    const plan = await planClonesWithGuest(req, { fleet: view });
    assert.equal(plan.imageVersion, 'images/debian-12/versions/2');
    assert.equal(plan.metadata.source, 'images/debian-12', "the metadata keeps the caller's name");
    const pins = new ImageVersionPins();
    const unpin = pins.pin(versionPinKey(plan.metadata), plan.imageVersion!);
    latest.value = 3; // published meanwhile
    const fake = agents();
    const delivered: string[] = [];
    const kind = cloneOperationKind({
      fleet: view,
      agents: fake,
      versionPins: pins,
      imageDelivery: { bringImageToHost: async ({ image, host }) => void delivered.push(`${image}@${host}`) },
    });
    const { context, last } = contextFor(req, plan.metadata);
    await kind.run(context);
    unpin();
    assert.deepEqual(
      fake.calls.map((call) => [call.source, call.dataDiskBytes]),
      [
        [{ $case: 'image', value: 'images/debian-12/versions/2' }, String(2 ** 20)],
        [{ $case: 'image', value: 'images/debian-12/versions/2' }, String(2 ** 20)],
      ],
    );
    assert.deepEqual(delivered, ['images/debian-12/versions/2@hosts/kvm-02'], 'only the host without version 2 gets it delivered');
    assert.equal(last().state?.imageVersion, 'images/debian-12/versions/2');
  });

  it('without a pin, the first run resolves the name and checkpoints the version before any clone', async () => {
    const latest = { value: 2 };
    const req = request({ source: { $case: 'image', value: 'images/debian-12/versions/2' } });
    const plan = await planClonesWithGuest(req, { fleet: fleet(latest) });
    const fake = agents();
    const { context, last } = contextFor(req, plan.metadata);
    await cloneOperationKind({ fleet: fleet(latest), agents: fake, imageDelivery: { bringImageToHost: async () => undefined } }).run(context);
    assert.equal(last().state?.imageVersion, 'images/debian-12/versions/2');
    assert.ok(fake.calls.every((call) => call.source?.$case === 'image' && call.source.value === 'images/debian-12/versions/2'));
  });

  for (const bytes of ['-1', String(16 * 2 ** 40 + 1)]) {
    it(`data_disk_bytes ${bytes} is INVALID_ARGUMENT naming data_disk_bytes`, async () => {
      const error = await planClonesWithGuest(request({ dataDiskBytes: bytes }), { fleet: fleet({ value: 2 }) }).then(
        () => undefined,
        (caught: unknown) => caught,
      );
      assert.ok(error instanceof CowherdError);
      assert.deepEqual([error.code, error.field], [GrpcStatus.INVALID_ARGUMENT, 'data_disk_bytes']);
    });
  }

  it('an unknown version or alias is NOT_FOUND, a malformed name INVALID_ARGUMENT naming image', async () => {
    const unknown = await planClonesWithGuest(request({ source: { $case: 'image', value: 'images/debian-12/versions/stable' } }), {
      fleet: fleet({ value: 2 }),
    }).then(
      () => undefined,
      (caught: unknown) => caught,
    );
    assert.equal((unknown as CowherdError).code, GrpcStatus.NOT_FOUND);
    const malformed = await planClonesWithGuest(request({ source: { $case: 'image', value: 'images/debian-12/versions/' } }), {
      fleet: fleet({ value: 2 }),
    }).then(
      () => undefined,
      (caught: unknown) => caught,
    );
    assert.deepEqual([(malformed as CowherdError).code, (malformed as CowherdError).field], [GrpcStatus.INVALID_ARGUMENT, 'image']);
  });
});
