/**
 * When the agent looks at libvirt to settle streaming clones: once after it starts, then only while a replica
 * that a streaming clone here is backed by is complete (every look lists and dumps every domain). Real overlays
 * (qemu-img) on a stream URI; libvirt and the replicas' states are small fakes.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { createLogger } from '../../services/common/platform/logger.js';
import type { DomainInfo } from '../../services/agent/hypervisor/index.js';
import { readBackingFileName } from '../../services/agent/hypervisor/index.js';
import { replicaDirectory, streamBackingUri } from '../../services/agent/image-directory/index.js';
import { StreamedClones, type StreamedClonesOptions } from '../../services/agent/streamed-clones.js';

const run = promisify(execFile);
const KEY = 'abc123';

describe('settling streaming clones', () => {
  let root: string;
  let overlay: string;
  let replicaPath: string;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'cowherd-settle-'));
    await mkdir(join(root, 'clones', 'vm1'), { recursive: true });
    await mkdir(replicaDirectory(root, KEY), { recursive: true });
    replicaPath = join(replicaDirectory(root, KEY), 'vda.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', replicaPath, '64M']);
    overlay = join(root, 'clones', 'vm1', 'vda.qcow2');
    // -u: the stream's socket is not there (nothing serves it in this test).
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', streamBackingUri(root, KEY, 'vda.qcow2'), '-F', 'qcow2', overlay, '64M']);
  });

  after(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('looks at libvirt once after a start, not while the replica arrives, and settles a shut-off clone once it is complete', async () => {
    let available = false;
    let state: DomainInfo['state'] = 'running';
    let looks = 0;
    const domain = (): DomainInfo =>
      ({
        name: 'vm1',
        uuid: '00000000-0000-4000-8000-000000000001',
        state,
        disks: [{ type: 'file', device: 'disk', target: 'vda', sourcePath: overlay }],
      }) as unknown as DomainInfo;
    const options: StreamedClonesOptions = {
      imageDirectory: root,
      hypervisor: 'kvm',
      transfers: {
        streamSource: () => (available ? { kind: 'available' } : ({ kind: 'arriving' } as ReturnType<StreamedClonesOptions['transfers']['streamSource']>)),
        whenAvailable: async () => {},
        pieceHolders: () => undefined,
        isAvailable: () => available,
      },
      libvirt: {
        listDomains: async () => {
          looks += 1;
          return [domain()];
        },
      },
      log: createLogger({ service: 'test', level: 'silent' }),
      settleGraceMs: 0,
    };
    const streamed = new StreamedClones(options);
    try {
      await streamed.settleAll();
      assert.equal(looks, 1, 'the first look: an agent that restarted may have streaming clones');
      await streamed.settleAll();
      await streamed.settleAll();
      assert.equal(looks, 1, 'no look while the only streamed replica still arrives');

      available = true;
      await streamed.settleAll();
      assert.equal(looks, 2, 'the replica is complete: look');
      assert.match((await readBackingFileName(overlay)) ?? '', /^nbd\+unix:/, 'a running clone keeps reading through the stream');
      await streamed.settleAll();
      assert.equal(looks, 3, 'and look again while the clone still runs on the stream');

      state = 'shut off';
      await streamed.settleAll();
      assert.equal(looks, 4);
      assert.equal(await readBackingFileName(overlay), replicaPath, 'shut off: the overlay names the local replica');
      await streamed.settleAll();
      assert.equal(looks, 5, 'one more look finds nothing streamed');
      await streamed.settleAll();
      await streamed.settleAll();
      assert.equal(looks, 5, 'nothing streamed left: no more looks');
    } finally {
      streamed.stop();
    }
  });
});
