/**
 * The lineage rule of the agent's start and delete: a VM whose disks are the base of clones is neither started
 * nor deleted (FAILED_PRECONDITION, VIRTUAL_MACHINE_HAS_DEPENDENTS, naming them); reflink copies of its disks
 * read nothing through them and do not hold it. libvirt is a small fake (domains and the calls made).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import type { DomainInfo, Libvirt } from '../../services/agent/hypervisor/index.js';
import { VmLifecycle } from '../../services/agent/vm-lifecycle.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';

const HOST = 'kvm-01';
const SOURCE = `hosts/${HOST}/virtualMachines/golden`;

function domain(name: string, uuidDigit: number, clone?: { diskBackend: 'qcow2-overlay' | 'reflink-copy' }): DomainInfo {
  return {
    name,
    uuid: `00000000-0000-4000-8000-00000000000${uuidDigit}`,
    state: 'shut off',
    domainType: 'qemu',
    vcpus: 1,
    memoryBytes: 64 * 1024 * 1024,
    disks: [],
    ...(clone ? { clone: { source: { virtualMachine: SOURCE }, operation: '', requestId: '', diskBackend: clone.diskBackend } } : {}),
  } as unknown as DomainInfo;
}

describe('starting and deleting a VM that clones were made from', () => {
  let directory: string;
  before(async () => {
    directory = await mkdtemp(join(tmpdir(), 'cowherd-lifecycle-'));
  });
  after(async () => {
    await rm(directory, { recursive: true, force: true });
  });

  const lifecycle = (domains: DomainInfo[], calls: string[]): VmLifecycle => {
    const libvirt = {
      listDomains: async () => domains,
      domain: async (uuid: string) => domains.find((candidate) => candidate.uuid === uuid)!,
      start: async (uuid: string) => void calls.push(`start ${uuid}`),
      undefine: async (uuid: string) => void calls.push(`undefine ${uuid}`),
    } as unknown as Libvirt;
    return new VmLifecycle({ host: HOST, imageDirectory: directory, libvirt, log: createLogger({ service: 'test', level: 'silent' }) });
  };

  it('refuses start and delete while an overlay clone reads through its disks, naming the clone', async () => {
    const calls: string[] = [];
    const vms = lifecycle([domain('golden', 1), domain('overlay-1', 2, { diskBackend: 'qcow2-overlay' })], calls);
    for (const attempt of [() => vms.start(SOURCE), () => vms.delete(SOURCE, true)]) {
      await assert.rejects(attempt(), (error: unknown) => {
        assert.ok(error instanceof CowherdError);
        assert.equal(error.code, GrpcStatus.FAILED_PRECONDITION);
        assert.equal(error.reason, ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_HAS_DEPENDENTS);
        assert.match(error.message, /1 clones use/);
        return true;
      });
    }
    assert.deepEqual(calls, [], 'nothing started or undefined');
  });

  it('starts a VM whose only clones are reflink copies of its disks', async () => {
    const calls: string[] = [];
    const vms = lifecycle(
      [domain('golden', 1), domain('copy-1', 2, { diskBackend: 'reflink-copy' }), domain('copy-2', 3, { diskBackend: 'reflink-copy' })],
      calls,
    );
    await vms.start(SOURCE);
    assert.deepEqual(calls, ['start 00000000-0000-4000-8000-000000000001']);
  });
});
