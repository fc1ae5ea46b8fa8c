/**
 * The CLI's progress lines for a DistributeImage or clone operation: a host the metadata marks unreachable
 * says UNREACHABLE, with what it held and its deadline, and no rate, peers or ETA.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { CLONE_OPERATION, DISTRIBUTE_OPERATION } from '../../services/cli/operation-kinds.js';
import { CloneVirtualMachinesMetadata } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributeImageMetadata } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { ImageReplica_State } from '../../services/gen/cowherd/inventory/v1/resources.js';

const MiB = 1024 * 1024;
const progress = {
  bytesDone: String(12 * MiB),
  bytesTotal: String(40 * MiB),
  rateBytesPerSecond: String(3 * MiB),
  uploadRateBytesPerSecond: '0',
  peers: 2,
  eta: { seconds: '9', nanos: 0 },
};
const deadline = new Date('2026-12-04T23:10:05Z');

describe('progress lines of unreachable hosts', () => {
  it('DistributeImage: UNREACHABLE, the bytes held and the deadline; a reachable host keeps its rate', () => {
    const metadata = DistributeImageMetadata.fromPartial({
      image: 'images/debian',
      bytesTotal: String(40 * MiB),
      hostsTotal: 2,
      transfers: [
        { host: 'hosts/kvm-1', state: ImageReplica_State.STATE_TRANSFERRING, progress, hostUnreachable: true, deadlineTime: deadline },
        { host: 'hosts/kvm-2', state: ImageReplica_State.STATE_TRANSFERRING, progress },
      ],
    });
    const [gone, alive] = DISTRIBUTE_OPERATION.render(metadata);
    assert.match(gone!.label ?? '', /kvm-1\s+UNREACHABLE/);
    assert.equal(gone!.text, 'host unreachable  12 MiB / 40 MiB held  fails at 23:10:05 UTC unless it comes back');
    assert.match(alive!.label ?? '', /kvm-2\s+TRANSFERRING/);
    assert.match(alive!.text, /MiB\/s.*2 peers.*ETA/);
  });

  it('CloneVirtualMachines: the image transfer of an unreachable host', () => {
    const metadata = CloneVirtualMachinesMetadata.fromPartial({
      totalCount: 2,
      imageTransfers: [
        { host: 'hosts/kvm-1', state: ImageReplica_State.STATE_TRANSFERRING, progress, waitingCloneCount: 2, hostUnreachable: true, deadlineTime: deadline },
      ],
    });
    const line = CLONE_OPERATION.render(metadata)[1]!;
    assert.match(line.label ?? '', /image to kvm-1\s+UNREACHABLE/);
    assert.doesNotMatch(line.text, /ETA|peers|\/s/);
    assert.match(line.text, /2 clone\(s\) waiting/);
  });
});
