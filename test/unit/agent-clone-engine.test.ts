/**
 * CloneEngine with real qemu-img and a fake libvirt: a request repeated (same request_id) while the first
 * attempt still runs, as when a cloning replica takes an operation over from one that stopped mid-batch.
 */
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { CloneEngine } from '../../services/agent/clone-engine.js';
import { readCloneMetadata } from '../../services/agent/hypervisor/index.js';
import type { DomainInfo, Libvirt } from '../../services/agent/hypervisor/libvirt.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { writeTinyReplica } from '../harness/index.js';

const log = createLogger({ service: 'test', level: 'silent' });

describe('CloneEngine', () => {
  it('a retry of a batch that is still running waits for it and returns its clones: each made once, one clone.done each, no clone.failed', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-test-engine-'));
    try {
      await writeTinyReplica(directory);
      // A libvirt whose define takes a while and whose domain list shows what was defined (with the clone metadata).
      const defined: DomainInfo[] = [];
      const define = async (xml: string): Promise<void> => {
        await new Promise((resolve) => setTimeout(resolve, 200));
        const name = /<name>([^<]+)<\/name>/.exec(xml)![1]!;
        const clone = readCloneMetadata(xml);
        defined.push({
          name,
          uuid: /<uuid>([^<]+)<\/uuid>/.exec(xml)![1]!,
          state: 'shut off',
          domainType: 'qemu',
          vcpus: 1,
          memoryBytes: 64 * 1024 * 1024,
          disks: [],
          ...(clone ? { clone } : {}),
        } as DomainInfo);
      };
      const libvirt = { uri: 'test:///default', listDomains: async () => [...defined], define } as unknown as Libvirt;
      const events: Array<{ kind: string; domainName: string; id: string; diskBackend?: number }> = [];
      const publish = async (type: { kind: string }, payload: { domainName: string; diskBackend?: number }, options: { id: string }): Promise<void> => {
        events.push({ kind: type.kind, domainName: payload.domainName, id: options.id, diskBackend: payload.diskBackend });
      };
      const engine = new CloneEngine({ host: 'kvm-01', imageDirectory: directory, hypervisor: 'kvm', libvirt, events: { publish } as never, log });
      const names = Array.from({ length: 8 }, (_, index) => `retry-${index}`);
      const request = {
        source: { $case: 'image' as const, value: 'images/tiny' },
        clones: names.map((domainName) => ({ domainName, start: false, index: 0 })),
        operation: 'operations/00000000-0000-4000-8000-000000000001',
        requestId: 'operations/00000000-0000-4000-8000-000000000001/hosts/kvm-01',
        validateOnly: false,
        stream: false,
        diskBackend: 0,
        guestConfiguration: undefined,
        guestConfigurationDigest: '',
        dataDiskBytes: '0',
      };

      const first = engine.createClones(request);
      await new Promise((resolve) => setTimeout(resolve, 20));
      const second = engine.createClones(request);
      const [firstResults, secondResults] = await Promise.all([first, second]);

      for (const results of [firstResults, secondResults]) {
        assert.deepEqual(
          results.map((result) => result.domainName),
          names,
        );
        assert.deepEqual(
          results.map((result) => result.status?.code ?? 0),
          names.map(() => 0),
          JSON.stringify(results.map((result) => result.status?.message)),
        );
      }
      assert.deepEqual(
        secondResults.map((result) => result.virtualMachine?.uuid),
        firstResults.map((result) => result.virtualMachine?.uuid),
        'the retry returns the clones the first attempt made',
      );
      assert.deepEqual(defined.map((domain) => domain.name).sort(), [...names].sort(), 'each clone defined once');
      assert.deepEqual((await readdir(join(directory, 'clones'))).sort(), [...names].sort(), 'one directory per clone, no prototypes left');
      // The retry records the clone.done of each clone it finds again, under the same id (the stream keeps
      // one): one logical clone.done per clone.
      const done = events.filter((event) => event.kind === 'clone.done');
      assert.deepEqual([...new Set(done.map((event) => event.id))].length, names.length, 'one clone.done id per clone');
      assert.deepEqual([...new Set(done.map((event) => event.domainName))].sort(), [...names].sort(), 'a clone.done for every clone');
      assert.deepEqual(
        [...new Set(done.map((event) => event.diskBackend))],
        [DiskBackend.DISK_BACKEND_QCOW2_OVERLAY],
        'clone.done says how the disks were made (the first attempt and the retry alike)',
      );
      assert.deepEqual(
        events.filter((event) => event.kind !== 'clone.done'),
        [],
        'no clone.failed',
      );

      // Another request_id for the same names is still refused: the wait is per request_id only.
      const other = await engine.createClones({ ...request, clones: [{ index: 0, domainName: names[0]!, start: false }], requestId: 'another' });
      assert.equal(other[0]!.status?.message.includes('already exists'), true);
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });
});
