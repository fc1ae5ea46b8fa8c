/**
 * `cowherd vms clone --stream`: the flag asks for DELIVERY_STREAM (and only with --image), the help says what it
 * does, and the clone operation's progress shows each streaming clone with how much of its base has arrived,
 * then done (or failed).
 *
 *   node --import tsx --test test/unit/cli-clone-stream.test.ts
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseCommandLine, renderHelp, UsageError, type CommandSpec } from '../../services/cli/command-line.js';
import { CLONE_OPERATION } from '../../services/cli/operation-kinds.js';
import { ArgumentReader } from '../../services/cli/resource-arguments.js';
import { cloneRequest, VMS_COMMAND } from '../../services/cli/vms-commands.js';
import type { CliContext } from '../../services/cli/cli-context.js';
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesRequest_Delivery,
} from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { ImageReplica_State } from '../../services/gen/cowherd/inventory/v1/resources.js';

const MiB = 1024 * 1024;
const ROOT: CommandSpec<CliContext> = { name: 'cowherd', summary: 'test root', subcommands: [VMS_COMMAND] };

function requestOf(...words: string[]) {
  const parsed = parseCommandLine(ROOT, [], ['vms', 'clone', ...words]);
  assert.equal(parsed.kind, 'run');
  if (parsed.kind !== 'run') throw new Error('not a run');
  return cloneRequest(parsed.invocation, new ArgumentReader(parsed.invocation.command));
}

describe('vms clone --stream', () => {
  it('asks for DELIVERY_STREAM; without it the service default (DISTRIBUTE)', () => {
    assert.equal(requestOf('--image', 'debian-12', '--count', '3', '--stream').delivery, CloneVirtualMachinesRequest_Delivery.DELIVERY_STREAM);
    assert.equal(requestOf('--image', 'debian-12', '--count', '3').delivery, CloneVirtualMachinesRequest_Delivery.DELIVERY_UNSPECIFIED);
  });

  it('is a usage error for a VM source, before any call', () => {
    assert.throws(
      () => requestOf('--source-vm', 'kvm-01/golden', '--stream'),
      (error: unknown) => error instanceof UsageError && /--stream needs --image/.test(error.message),
    );
  });

  it('is in the help', () => {
    const parsed = parseCommandLine(ROOT, [], ['vms', 'clone', '--help']);
    assert.equal(parsed.kind, 'help');
    const help = renderHelp(parsed.command, []);
    assert.match(help, /--stream\s+where a host lacks the image, make \(and start\) its clones as soon as the image starts arriving/);
    assert.match(help, /streaming 37%/);
  });
});

describe('clone progress with streaming clones', () => {
  const base = (done: number) => ({ bytesDone: String(done), bytesTotal: String(100 * MiB) });
  const metadata = CloneVirtualMachinesMetadata.fromPartial({
    totalCount: 4,
    doneCount: 2,
    failedCount: 1,
    clones: [
      { index: 1, host: 'hosts/kvm-01', domainName: 'web-1', state: CloneResult_State.STATE_STREAMING, baseProgress: base(37 * MiB) },
      { index: 2, host: 'hosts/kvm-01', domainName: 'web-2', state: CloneResult_State.STATE_DONE, baseProgress: base(100 * MiB) },
      { index: 3, host: 'hosts/kvm-02', domainName: 'web-3', state: CloneResult_State.STATE_DONE },
      {
        index: 4,
        host: 'hosts/kvm-03',
        domainName: 'web-4',
        state: CloneResult_State.STATE_FAILED,
        baseProgress: base(5 * MiB),
        error: {
          code: 4,
          message: 'image stream of images/debian-12/versions/1 to hosts/kvm-03 failed: no space left; the streaming clone was deleted',
          details: [],
        },
      },
    ],
    imageTransfers: [{ host: 'hosts/kvm-01', state: ImageReplica_State.STATE_TRANSFERRING, progress: base(37 * MiB), waitingCloneCount: 1 }],
  });

  it('shows each streaming clone with how much of its base arrived, then done or failed', () => {
    const lines = CLONE_OPERATION.render(metadata);
    assert.equal(lines[0]!.text, '2/4 done, 1 streaming, 1 failed');
    const transfer = lines.find((line) => line.key === 'transfer:hosts/kvm-01')!;
    assert.match(transfer.text, /\(1 clone\(s\) streaming\)$/);
    const byLabel = new Map(lines.filter((line) => line.key.startsWith('clone:')).map((line) => [line.label, line]));
    assert.deepEqual([...byLabel.keys()], ['kvm-01/web-1', 'kvm-01/web-2', 'kvm-03/web-4'], 'streaming first; clones that never streamed have no line');
    assert.equal(byLabel.get('kvm-01/web-1')!.text, 'streaming 37% of its base (37 MiB / 100 MiB)');
    assert.equal(byLabel.get('kvm-01/web-1')!.fraction, 0.37);
    assert.equal(byLabel.get('kvm-01/web-2')!.text, 'done');
    assert.match(byLabel.get('kvm-03/web-4')!.text, /^failed: image stream of .* failed/);
  });

  it('a clone operation without streaming reads as before', () => {
    const plain = CloneVirtualMachinesMetadata.fromPartial({
      totalCount: 2,
      doneCount: 1,
      clones: [{ index: 1, host: 'hosts/kvm-02', domainName: 'web-1', state: CloneResult_State.STATE_DONE }],
      imageTransfers: [{ host: 'hosts/kvm-01', state: ImageReplica_State.STATE_TRANSFERRING, progress: base(MiB), waitingCloneCount: 1 }],
    });
    const lines = CLONE_OPERATION.render(plain);
    assert.equal(lines.length, 2);
    assert.equal(lines[0]!.text, '1/2 done, 0 failed');
    assert.match(lines[1]!.text, /\(1 clone\(s\) waiting\)$/);
  });
});
