/**
 * Reflink clones end to end on real parts (NATS, CA, inventory, distribution, cloning, two agents on the private
 * libvirtd, qemu-img): one agent's image directory is on an xfs made with reflink=1 in a loop-mounted file (made
 * by this test before anything starts), the other's on /tmp (ext4). The xfs host reports that it makes reflink
 * copies, the ext4 host that it does not. An image imported there gets REFLINK_COPY as its default; clones made
 * through CloneVirtualMachines are qcow2 files without a backing file holding the base's bytes, recorded as
 * reflink copies, and neither the agent's nor the inventory's dependents of the replica list them (an overlay
 * clone of the same image is listed, as a control). Once the overlay clone is gone the image is deleted (its
 * replica removed by the agent's DeleteImageReplica) while the reflink clones stay, their disks unchanged. The
 * same request for the ext4 host is refused: by cloning before any operation, and by the agent itself
 * (FAILED_PRECONDITION) with nothing made. No domain is started (libvirtd does not see mounts made after it
 * started: MACHINE.md).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { cp, mkdir, readdir, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { AgentServiceClient, type CreateCloneResult } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest,
  CloneVirtualMachinesResponse,
  Placement_Strategy,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { ImportImageDomain, ImportImageRequest } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Image, ImageFile_Role, type Host, type ImageReplica, type VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../../services/gen/google/longrunning/operations.js';
import { createClient } from '../../services/common/platform/client.js';
import { readServiceError } from '../../services/common/platform/errors.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { unpack } from '../../services/common/domain/operations.js';
import { HOST_IMAGE_NAME, HOST_NAME, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';
import { startCloneStack, type CloneStack, type StackAgent } from '../harness/clone-stack.js';
import { call, failure, waitFor } from '../harness/grpc.js';
import { Resources } from '../harness/index.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const MKFS_XFS = '/usr/sbin/mkfs.xfs';
const sha256 = async (file: string): Promise<string> =>
  createHash('sha256')
    .update(await readFile(file))
    .digest('hex');
const qemuImgInfo = async (file: string): Promise<{ format: string; 'backing-filename'?: string }> =>
  JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', file])).stdout);

const skip =
  process.getuid?.() !== 0 ? 'needs root (libvirtd, loop mount)' : !existsSync(MKFS_XFS) ? `needs ${MKFS_XFS} (scripts/install.sh installs it)` : false;

describe('reflink clones on an xfs image directory', { skip, timeout: 600_000 }, () => {
  const resources = new Resources();
  const suffix = Math.random().toString(36).slice(2, 7);
  const xfsHost = `rf-xfs-${suffix}`;
  const ext4Host = `rf-ext4-${suffix}`;
  const imageId = `rf-img-${suffix}`;
  const reflinkNames = [`rfc-${suffix}-1`, `rfc-${suffix}-2`];
  const overlayName = `rfo-${suffix}-1`;
  let stack: CloneStack;
  let ext4: StackAgent;
  /** The xfs host's agent as distribution calls it (replicas). */
  let xfsAgent: AgentServiceClient;
  /** The ext4 host's agent as cloning calls it (clones). */
  let ext4Agent: AgentServiceClient;
  let baseFile: string;
  let baseSha256: string;

  before(async () => {
    // The loop mount first: before libvirtd and the agents start (they would not all see a later one).
    const scratch = await resources.tempDir('cowherd-reflink-it-');
    const mountPoint = join(scratch, 'mnt');
    const loopFile = join(scratch, 'xfs.img');
    await mkdir(mountPoint);
    await writeFile(loopFile, '');
    await truncate(loopFile, 400 * MiB);
    await run(MKFS_XFS, ['-q', '-m', 'reflink=1', loopFile], { timeout: 60_000 });
    await run('mount', ['-o', 'loop', loopFile, mountPoint], { timeout: 30_000 });
    resources.defer(async () => {
      await run('umount', [mountPoint], { timeout: 30_000 }).catch(() => run('umount', ['-l', mountPoint], { timeout: 30_000 }));
    });
    // Two agents share the libvirtd: each counts only the domains with a disk in its own image directory.
    const scope = { COWHERD_DOMAIN_SCOPE: 'image-directory' };
    stack = await startCloneStack(resources, xfsHost, { firstAgentEnv: { ...scope, COWHERD_IMAGE_DIR: join(mountPoint, 'images-root') } });
    ext4 = await stack.addAgent(ext4Host, scope);
    await stack.waitHostsReady([xfsHost, ext4Host]);
    const as = async (service: string) =>
      mutualTlsChannelCredentialsFromPem({ ...(await stack.pki.credentials('service', service)), caPem: stack.pki.ca.certificatePem });
    xfsAgent = createClient(AgentServiceClient, stack.agent.address, await as('distribution'), { defaultDeadlineMs: 120_000 });
    ext4Agent = createClient(AgentServiceClient, ext4.process.address, await as('cloning'), { defaultDeadlineMs: 120_000 });
    resources.defer(() => {
      xfsAgent.close();
      ext4Agent.close();
    });
    stack.track(...reflinkNames, overlayName, `rfx-${suffix}-1`);
  });
  after(() => resources.release());

  const getHost = (host: string) => call<Host>((cb) => stack.inventory.getHost({ name: HOST_NAME.format({ host }) }, cb));
  const getVm = (host: string, name: string) =>
    call<VirtualMachine>((cb) => stack.inventory.getVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: name }) }, cb));

  async function clone(name: string, fields: Partial<CloneVirtualMachinesRequest>): Promise<{ operation: Operation; response: CloneVirtualMachinesResponse }> {
    const started = await call<Operation>((cb) =>
      stack.cloning.cloneVirtualMachines(
        CloneVirtualMachinesRequest.fromPartial({
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [HOST_NAME.format({ host: xfsHost })], maxClonesPerHost: 0 },
          nameTemplate: name,
          ...fields,
        }),
        cb,
      ),
    );
    const operation = await stack.wait(started.name, 180_000);
    assert.equal(operation.result?.$case, 'response', JSON.stringify(operation.result));
    return { operation, response: unpack(CloneVirtualMachinesResponse, operation.result.value) };
  }

  it('each host reports whether its image directory makes reflink copies', async () => {
    assert.equal((await getHost(xfsHost)).imageDirectoryReflinks, true);
    assert.equal((await getHost(ext4Host)).imageDirectoryReflinks, false);
  });

  it('imports an image on the xfs host and makes REFLINK_COPY its default', async () => {
    const raw = join(stack.imageDirectory, 'import', 'disk.raw');
    await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=8', 'status=none']);
    await run('truncate', ['-s', '32M', raw]);
    const started = await call<Operation>((cb) =>
      stack.distribution.importImage(
        ImportImageRequest.fromPartial({
          imageId,
          host: HOST_NAME.format({ host: xfsHost }),
          source: { $case: 'importPath', value: 'disk.raw' },
          template: { $case: 'domain', value: ImportImageDomain.fromPartial({ vcpus: 1, memoryMib: '128' }) },
          description: 'reflink test image',
        }),
        cb,
      ),
    );
    const done = await stack.wait(started.name, 180_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    const imported = unpack(Image, done.result.value);
    const disk = imported.files.find((file) => file.role === ImageFile_Role.ROLE_DISK)!;
    baseFile = join(stack.imageDirectory, 'images', imageId, disk.path);
    baseSha256 = await sha256(baseFile);
    assert.equal((await qemuImgInfo(baseFile)).format, 'qcow2', 'an import is converted to qcow2 on KVM');

    const view = await call<Image>((cb) =>
      stack.distribution.updateImage(
        {
          image: Image.fromPartial({ name: IMAGE_NAME.format({ image: imageId }), defaultDiskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY }),
          updateMask: ['default_disk_backend'],
        },
        cb,
      ),
    );
    assert.equal(view.defaultDiskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY);
  });

  it("clones by the image's default are qcow2 reflink copies without a backing file, holding the base's bytes", async () => {
    const { operation, response } = await clone(`rfc-${suffix}-{index}`, { count: 2 });
    assert.equal(unpack(CloneVirtualMachinesMetadata, operation.metadata!).diskBackend, DiskBackend.DISK_BACKEND_REFLINK_COPY, 'fixed in the metadata');
    assert.deepEqual(
      response.clones.map((result) => [result.domainName, result.state]),
      reflinkNames.map((name) => [name, CloneResult_State.STATE_DONE]),
      JSON.stringify(response.clones.map((result) => result.error?.message)),
    );
    for (const name of reflinkNames) {
      const child = join(stack.imageDirectory, 'clones', name, 'vda.qcow2');
      const info = await qemuImgInfo(child);
      assert.equal(info.format, 'qcow2');
      assert.equal(info['backing-filename'], undefined, 'no backing chain');
      assert.equal(await sha256(child), baseSha256, "the base's bytes");
      const xml = (await stack.virsh('dumpxml', '--inactive', name)).stdout;
      assert.match(xml, /<cowherd:diskBackend>reflink-copy<\/cowherd:diskBackend>/);
      assert.match(xml, new RegExp(`<driver name=.qemu. type=.qcow2.\\s*/>\\s*<source file=.${child}.`));
    }
    // The overlay clone of the same image (the request overrides the default): the control for dependents.
    const overlay = await clone(overlayName, { count: 1, diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY });
    assert.equal(overlay.response.clones[0]?.state, CloneResult_State.STATE_DONE, JSON.stringify(overlay.response.clones[0]?.error));
    assert.equal((await qemuImgInfo(join(stack.imageDirectory, 'clones', overlayName, 'vda.qcow2')))['backing-filename'], baseFile);
  });

  it("neither the agent's nor the inventory's dependents of the replica list the reflink clones; their lineage says where they came from", async () => {
    const replicaName = HOST_IMAGE_NAME.format({ host: xfsHost, image: imageId });
    const overlayVm = VIRTUAL_MACHINE_NAME.format({ host: xfsHost, virtualMachine: overlayName });
    const live = await call<ImageReplica>((cb) => xfsAgent.getImageReplica({ name: replicaName }, cb));
    assert.deepEqual(live.dependentVirtualMachines, [overlayVm]);
    for (const name of reflinkNames) {
      const vm = await waitFor(`${name}'s lineage in inventory`, async () => {
        const found = await getVm(xfsHost, name);
        return found.lineage?.diskBackend === DiskBackend.DISK_BACKEND_REFLINK_COPY ? found : undefined;
      });
      assert.equal(vm.lineage?.replica, replicaName);
      assert.equal(vm.lineage?.imageVersion, `images/${imageId}/versions/1`);
    }
    await waitFor(`${overlayName} in inventory`, async () => ((await getVm(xfsHost, overlayName)).lineage?.replica === replicaName ? true : undefined));
    const recorded = await call<ImageReplica>((cb) => stack.inventory.getImageReplica({ name: replicaName }, cb));
    assert.deepEqual(recorded.dependentVirtualMachines, [overlayVm]);
  });

  it('refuses reflink copies for the ext4 host: in cloning before any operation, and in the agent with nothing made', async () => {
    const planned = await failure((cb) =>
      stack.cloning.cloneVirtualMachines(
        CloneVirtualMachinesRequest.fromPartial({
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          placement: { strategy: Placement_Strategy.STRATEGY_HOSTS, hosts: [HOST_NAME.format({ host: ext4Host })], maxClonesPerHost: 0 },
          count: 1,
          diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY,
        }),
        cb,
      ),
    );
    assert.equal(planned.code, GrpcStatus.FAILED_PRECONDITION, planned.message);
    assert.equal(planned.reason, 'ERROR_REASON_HYPERVISOR_MISMATCH');
    assert.match(planned.message, /cannot make reflink copies/);

    // The agent checks for itself: the same replica on the ext4 host (laid out as distribution leaves one).
    await cp(join(stack.imageDirectory, 'images', imageId), join(ext4.imageDirectory, 'images', imageId), { recursive: true });
    const name = `rfx-${suffix}-1`;
    const refused = await failure<{ results: CreateCloneResult[] }>((cb) =>
      ext4Agent.createClones(
        {
          source: { $case: 'image', value: IMAGE_NAME.format({ image: imageId }) },
          clones: [{ domainName: name, start: false, index: 0 }],
          operation: '',
          requestId: '',
          validateOnly: false,
          stream: false,
          diskBackend: DiskBackend.DISK_BACKEND_REFLINK_COPY,
          guestConfiguration: undefined,
          guestConfigurationDigest: '',
          dataDiskBytes: '0',
        },
        cb,
      ),
    );
    assert.equal(refused.code, GrpcStatus.FAILED_PRECONDITION, refused.message);
    assert.equal(refused.reason, 'ERROR_REASON_HYPERVISOR_MISMATCH');
    assert.match(refused.message, /REFLINK_COPY: the file system of .* cannot make reflink copies/);
    const clones = join(ext4.imageDirectory, 'clones');
    assert.deepEqual(existsSync(clones) ? await readdir(clones) : [], [], 'no clone directory');
    assert.doesNotMatch((await stack.virsh('list', '--all', '--name')).stdout, new RegExp(name), 'no domain');
  });

  it('deletes the image under the reflink clones once the overlay clone is gone; their disks keep their bytes', async () => {
    await waitFor(`${overlayName} in inventory`, async () => getVm(xfsHost, overlayName));
    await call((cb) =>
      stack.cloning.deleteVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host: xfsHost, virtualMachine: overlayName }), force: false }, cb),
    );
    // The inventory learns of the removal from the agent's report; until then the image counts as used.
    const until = Date.now() + 30_000;
    let deletion: Operation | undefined;
    while (!deletion && Date.now() < until) {
      deletion = await call<Operation>((cb) => stack.distribution.deleteImage({ name: IMAGE_NAME.format({ image: imageId }), requestId: '' }, cb)).catch(
        async (error: ServiceError) => {
          const refused = readServiceError(error);
          assert.equal(refused.reason, 'ERROR_REASON_IMAGE_IN_USE', refused.message);
          assert.equal(
            refused.metadata['dependents'],
            VIRTUAL_MACHINE_NAME.format({ host: xfsHost, virtualMachine: overlayName }),
            'only the overlay clone holds it',
          );
          await new Promise((resolve) => setTimeout(resolve, 300));
          return undefined;
        },
      );
    }
    assert.ok(deletion, 'the image can be deleted while reflink clones of it exist');
    const done = await stack.wait(deletion.name, 120_000, stack.distributionOperations);
    assert.equal(done.result?.$case, 'response', JSON.stringify(done.result));
    assert.equal(existsSync(join(stack.imageDirectory, 'images', imageId)), false, "the replica's files are gone");
    assert.equal(
      (await failure((cb) => xfsAgent.getImageReplica({ name: HOST_IMAGE_NAME.format({ host: xfsHost, image: imageId }) }, cb))).code,
      GrpcStatus.NOT_FOUND,
    );
    for (const name of reflinkNames) {
      const child = join(stack.imageDirectory, 'clones', name, 'vda.qcow2');
      assert.equal(await sha256(child), baseSha256, `${name} still holds the base's bytes`);
      await run('qemu-img', ['check', '-q', '-U', child]);
      assert.match((await stack.virsh('dumpxml', '--inactive', name)).stdout, new RegExp(child), `${name} is still defined`);
    }
  });
});
