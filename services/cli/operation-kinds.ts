/**
 * The long-running operations the CLI starts, each with its metadata and response types, the service that
 * runs it, and how its metadata reads as progress lines: one table, used by the commands that start them and
 * by `cowherd operations` for any operation found later.
 */
import {
  CloneResult_State,
  CloneVirtualMachinesMetadata,
  CloneVirtualMachinesResponse,
  type CloneResult,
  RebaseVirtualMachinesMetadata,
  RebaseVirtualMachinesResponse,
  StopVirtualMachineMetadata,
  type RebaseResult,
} from '../gen/cowherd/cloning/v1/cloning_service.js';
import { imagePublishStageToJSON } from '../gen/cowherd/common/v1/types.js';
import {
  DeleteImageMetadata,
  DistributeImageMetadata,
  DistributeImageResponse,
  imageImportStageToJSON,
  ImportImageMetadata,
  PublishImageMetadata,
} from '../gen/cowherd/distribution/v1/distribution_service.js';
import { Image, imageReplica_StateToJSON, VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import { Empty } from '../gen/google/protobuf/empty.js';
import { bareId, shortVirtualMachineName } from './fleet-reads.js';
import type { OperationShape } from './operation-wait.js';
import { enumWord, formatBytes } from './output.js';
import { describeTransfer, describeUnreachable, fractionOf, type ProgressLine } from './progress.js';

/** PublishImage: the stage and the bytes exported or hashed. */
export const PUBLISH_OPERATION: OperationShape<PublishImageMetadata, Image> = {
  title: 'publish image',
  service: 'distribution',
  typeNames: { metadata: PublishImageMetadata.$type, response: Image.$type },
  metadata: PublishImageMetadata,
  response: Image,
  render: (metadata) => {
    const stage = metadata ? enumWord(imagePublishStageToJSON(metadata.stage), 'IMAGE_PUBLISH_STAGE_') : 'STARTING';
    const fraction = stage === 'DONE' ? 1 : fractionOf(metadata?.progress);
    return [
      {
        key: 'publish',
        label: `${metadata?.image ?? 'image'}  ${stage.padEnd(16)}`,
        text: describeTransfer(metadata?.progress),
        ...(fraction === undefined ? {} : { fraction }),
      },
    ];
  },
};

/** ImportImage: the stage (downloading, converting, hashing, creating the torrent) with bytes and rate, and the probed format. */
export const IMPORT_OPERATION: OperationShape<ImportImageMetadata, Image> = {
  title: 'import image',
  service: 'distribution',
  typeNames: { metadata: ImportImageMetadata.$type, response: Image.$type },
  metadata: ImportImageMetadata,
  response: Image,
  render: (metadata) => {
    const stage = metadata ? enumWord(imageImportStageToJSON(metadata.stage), 'IMAGE_IMPORT_STAGE_') : 'STARTING';
    const fraction = stage === 'DONE' ? 1 : fractionOf(metadata?.progress);
    return [
      {
        key: 'import',
        label: `${metadata?.image ?? 'image'}  ${stage.padEnd(16)}`,
        text: [describeTransfer(metadata?.progress), metadata?.sourceFormat ? `(${metadata.sourceFormat})` : ''].filter(Boolean).join('  '),
        ...(fraction === undefined ? {} : { fraction }),
      },
    ];
  },
};

/** DistributeImage: one bar per target host (state, bytes, rate, peers, ETA) and a summary line. */
export const DISTRIBUTE_OPERATION: OperationShape<DistributeImageMetadata, DistributeImageResponse> = {
  title: 'distribute image',
  service: 'distribution',
  typeNames: { metadata: DistributeImageMetadata.$type, response: DistributeImageResponse.$type },
  metadata: DistributeImageMetadata,
  response: DistributeImageResponse,
  render: (metadata) => {
    if (!metadata) return [{ key: 'summary', text: 'starting…' }];
    const width = Math.max(4, ...metadata.transfers.map((transfer) => bareId(transfer.host).length));
    const lines: ProgressLine[] = metadata.transfers.map((transfer) => {
      const state = enumWord(imageReplica_StateToJSON(transfer.state), 'STATE_');
      const fraction = state === 'AVAILABLE' ? 1 : fractionOf(transfer.progress);
      // An unreachable host says so instead of showing a rate and ETA nobody measures.
      const unreachable = transfer.hostUnreachable && !transfer.error;
      const text = transfer.error
        ? transfer.error.message
        : unreachable
          ? describeUnreachable(transfer.progress, transfer.deadlineTime)
          : describeTransfer(transfer.progress);
      return {
        key: transfer.host,
        label: `${bareId(transfer.host).padEnd(width)}  ${(unreachable ? 'UNREACHABLE' : state).padEnd(12)}`,
        text,
        fraction: fraction ?? 0,
      };
    });
    lines.push({
      key: 'summary',
      text: `${metadata.image}: ${metadata.hostsDone}/${metadata.hostsTotal} hosts done, ${metadata.hostsFailed} failed, ${formatBytes(metadata.bytesTotal)} each`,
    });
    return lines;
  },
};

/** DeleteImage: hosts whose replica is gone. */
export const DELETE_IMAGE_OPERATION: OperationShape<DeleteImageMetadata, Empty> = {
  title: 'delete image',
  service: 'distribution',
  typeNames: { metadata: DeleteImageMetadata.$type, response: Empty.$type },
  metadata: DeleteImageMetadata,
  response: Empty,
  render: (metadata) => [
    {
      key: 'delete',
      text: `deleting ${metadata?.image ?? 'image'}: ${metadata?.hostsDone ?? 0}/${metadata?.hostsTotal ?? 0} hosts done${metadata?.pendingHosts.length ? `, waiting for ${metadata.pendingHosts.map(bareId).join(', ')}` : ''}`,
    },
  ],
};

/** Clone lines of streamed clones at most: the result table lists every clone at the end. */
const STREAMED_CLONE_LINES = 20;

/**
 * CloneVirtualMachines: a bar for the clones, one per host the image is being brought to, and one per clone that
 * streams (or streamed) its base: `streaming 37%`, then `done` (or `failed` with why).
 */
export const CLONE_OPERATION: OperationShape<CloneVirtualMachinesMetadata, CloneVirtualMachinesResponse> = {
  title: 'clone',
  service: 'cloning',
  typeNames: { metadata: CloneVirtualMachinesMetadata.$type, response: CloneVirtualMachinesResponse.$type },
  metadata: CloneVirtualMachinesMetadata,
  response: CloneVirtualMachinesResponse,
  render: (metadata) => {
    if (!metadata) return [{ key: 'clones', label: 'clones', text: 'starting…', fraction: 0 }];
    const settled = metadata.doneCount + metadata.failedCount;
    const streaming = metadata.clones.filter(isStreaming);
    const lines: ProgressLine[] = [
      {
        key: 'clones',
        label: 'clones',
        text: `${metadata.doneCount}/${metadata.totalCount} done, ${streaming.length > 0 ? `${streaming.length} streaming, ` : ''}${metadata.failedCount} failed`,
        fraction: metadata.totalCount > 0 ? settled / metadata.totalCount : 0,
      },
    ];
    for (const transfer of metadata.imageTransfers) {
      const state = enumWord(imageReplica_StateToJSON(transfer.state), 'STATE_');
      const fraction = state === 'AVAILABLE' ? 1 : fractionOf(transfer.progress);
      const text = transfer.hostUnreachable ? describeUnreachable(transfer.progress, transfer.deadlineTime) : describeTransfer(transfer.progress);
      const streamingHere = streaming.filter((clone) => clone.host === transfer.host).length;
      lines.push({
        key: `transfer:${transfer.host}`,
        label: `image to ${bareId(transfer.host)}  ${(transfer.hostUnreachable ? 'UNREACHABLE' : state).padEnd(12)}`,
        text: `${text}  (${streamingHere > 0 ? `${streamingHere} clone(s) streaming` : `${transfer.waitingCloneCount} clone(s) waiting`})`,
        fraction: fraction ?? 0,
      });
    }
    lines.push(...streamedCloneLines(metadata.clones));
    return lines;
  },
};

function isStreaming(clone: CloneResult): boolean {
  return clone.state === CloneResult_State.STATE_STREAMING;
}

/**
 * A line per clone that streams or streamed its base (it has base_progress), streaming ones first, at most
 * {@link STREAMED_CLONE_LINES}: `streaming 37%` with the bar, then `done` or `failed: <why>`.
 */
function streamedCloneLines(clones: readonly CloneResult[]): ProgressLine[] {
  const streamed = clones.filter((clone) => clone.baseProgress !== undefined || isStreaming(clone));
  const ordered = [...streamed.filter(isStreaming), ...streamed.filter((clone) => !isStreaming(clone))];
  const lines = ordered.slice(0, STREAMED_CLONE_LINES).map((clone): ProgressLine => {
    const label = `${bareId(clone.host)}/${clone.domainName}`;
    if (clone.state === CloneResult_State.STATE_DONE) return { key: `clone:${label}`, label, text: 'done', fraction: 1 };
    if (clone.state === CloneResult_State.STATE_FAILED) return { key: `clone:${label}`, label, text: `failed: ${clone.error?.message ?? 'unknown error'}` };
    const fraction = fractionOf(clone.baseProgress);
    return {
      key: `clone:${label}`,
      label,
      text:
        fraction === undefined
          ? 'streaming'
          : `streaming ${Math.floor(fraction * 100)}% of its base (${formatBytes(clone.baseProgress?.bytesDone)} / ${formatBytes(clone.baseProgress?.bytesTotal)})`,
      fraction: fraction ?? 0,
    };
  });
  const more = ordered.length - lines.length;
  if (more > 0) lines.push({ key: 'clone:more', text: `… ${more} more clone(s) streamed or streaming` });
  return lines;
}

/**
 * RebaseVirtualMachines: a bar for the clones (done and failed of the total), a line per clone that is
 * moving now (canaries first), and the distributions of the target version the operation started.
 */
export const REBASE_OPERATION: OperationShape<RebaseVirtualMachinesMetadata, RebaseVirtualMachinesResponse> = {
  title: 'rebase VMs',
  service: 'cloning',
  typeNames: { metadata: RebaseVirtualMachinesMetadata.$type, response: RebaseVirtualMachinesResponse.$type },
  metadata: RebaseVirtualMachinesMetadata,
  response: RebaseVirtualMachinesResponse,
  render: (metadata) => {
    if (!metadata) return [{ key: 'rebase', label: 'rebase', text: 'starting…', fraction: 0 }];
    const settled = metadata.doneCount + metadata.failedCount;
    const waiting = metadata.results.filter((result) => result.pending).length;
    const lines: ProgressLine[] = [
      {
        key: 'rebase',
        label: `rebase onto ${bareId(metadata.targetImageVersion)}`,
        text: `${metadata.doneCount}/${metadata.totalCount} done, ${metadata.failedCount} failed${waiting > 0 ? `, ${waiting} waiting or moving` : ''}`,
        fraction: metadata.totalCount > 0 ? settled / metadata.totalCount : 0,
      },
    ];
    if (metadata.distributeOperations.length > 0 && settled === 0)
      lines.push({
        key: 'distribute',
        text: `bringing ${bareId(metadata.targetImageVersion)} to the hosts first (${metadata.distributeOperations.join(', ')})`,
      });
    // Settled clones, failures first, at most 20 lines: the result table lists every clone at the end.
    const failed = (result: RebaseResult): boolean => result.status !== undefined && result.status.code !== 0;
    const settledResults = metadata.results.filter((result) => !result.pending);
    for (const result of [...settledResults.filter(failed), ...settledResults.filter((result) => !failed(result))].slice(0, 20)) {
      lines.push({
        key: result.virtualMachine,
        text: `${shortVirtualMachineName(result.virtualMachine)}${result.canary ? ' (canary)' : ''}: ${failed(result) ? `FAILED ${result.status!.message}` : `${bareId(result.previousImageVersion) || '?'} -> ${bareId(result.imageVersion)}${result.restarted ? ', started' : ''}`}`,
      });
    }
    return lines;
  },
};

/** StopVirtualMachine: graceful until a deadline, or forced. */
export const STOP_OPERATION: OperationShape<StopVirtualMachineMetadata, VirtualMachine> = {
  title: 'stop VM',
  service: 'cloning',
  typeNames: { metadata: StopVirtualMachineMetadata.$type, response: VirtualMachine.$type },
  metadata: StopVirtualMachineMetadata,
  response: VirtualMachine,
  render: (metadata) => [
    {
      key: 'stop',
      text: `stopping ${shortVirtualMachineName(metadata?.virtualMachine ?? '')}${metadata?.force ? ' (force)' : metadata?.deadlineTime ? ` (graceful, until ${metadata.deadlineTime.toISOString().slice(11, 19)} UTC)` : ''}…`,
    },
  ],
};

/** Every kind, to recognise an operation by its metadata type. */
export const OPERATION_KINDS: readonly OperationShape<unknown, unknown>[] = [
  PUBLISH_OPERATION,
  IMPORT_OPERATION,
  DISTRIBUTE_OPERATION,
  DELETE_IMAGE_OPERATION,
  CLONE_OPERATION,
  REBASE_OPERATION,
  STOP_OPERATION,
] as unknown as readonly OperationShape<unknown, unknown>[];

/** The kind of an operation from its metadata's type URL; undefined for kinds this CLI does not know. */
export function operationKindOf(typeUrl: string | undefined): OperationShape<unknown, unknown> | undefined {
  return OPERATION_KINDS.find((kind) => typeUrl === `type.googleapis.com/${kind.typeNames.metadata}`);
}
