/** DistributionService handlers: checks, then long-running operations or direct calls. */
import type { DistributionServiceService } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { ImagePublishStage } from '../gen/cowherd/common/v1/types.js';
import type { OperationManager } from '../common/domain/operations.js';
import type { Handlers } from '../common/platform/rpc.js';
import { checkDeleteImage, collectReplicas, deleteReplica, type DeletionDeps, type deleteImageOperationKind } from './deletion.js';
import { checkPublish, publishingRecord, type PublishDeps, type publishOperationKind } from './publish.js';
import { claimVersion, updateImage } from './image-heads.js';
import { collectImageGarbage, type GarbageDeps } from './garbage.js';
import { checkImport, initialImportMetadata, type importOperationKind } from './import.js';
import { checkDistribute, initialDistributeMetadata, type DistributeDeps, type distributeOperationKind } from './distribute.js';

/** What the handlers need. */
export interface DistributionHandlersDeps {
  readonly deps: PublishDeps & DeletionDeps & DistributeDeps & GarbageDeps;
  readonly operations: Pick<OperationManager, 'start' | 'findByRequestId'>;
  readonly publish: ReturnType<typeof publishOperationKind>;
  readonly importImage: ReturnType<typeof importOperationKind>;
  readonly deleteImage: ReturnType<typeof deleteImageOperationKind>;
  readonly distribute: ReturnType<typeof distributeOperationKind>;
}

/** The implemented handlers. */
export function distributionHandlers(options: DistributionHandlersDeps): Partial<Handlers<typeof DistributionServiceService>> {
  const { deps, operations } = options;
  return {
    publishImage: async (request) => {
      // A retried request_id returns its operation even though the image name is now taken.
      const existing = await operations.findByRequestId(options.publish.kind, request.requestId);
      if (existing) return operations.start(options.publish, request, undefined as never, request.requestId);
      const { host } = await checkPublish(request, deps);
      const now = new Date();
      // The version is claimed before the operation exists: a refusal (another version PUBLISHING) is this call's error.
      const claimed = await claimVersion(deps, request.imageId, (name, version) => publishingRecord(request, host, name, version, now));
      return startClaimed(
        deps,
        claimed,
        options.publish,
        request,
        {
          image: claimed.name,
          sourceVirtualMachine: request.sourceVirtualMachine,
          originHost: host.name,
          stage: ImagePublishStage.IMAGE_PUBLISH_STAGE_EXPORTING,
          progress: undefined,
          startTime: now,
          updateTime: now,
        },
        request.requestId,
      );
    },
    importImage: async (request) => {
      // A retried request_id returns its operation even though the image name is now taken.
      const existing = await operations.findByRequestId(options.importImage.kind, request.requestId);
      if (existing) return operations.start(options.importImage, request, undefined as never, request.requestId);
      const host = await checkImport(request, deps);
      const now = new Date();
      const claimed = await claimVersion(deps, request.imageId, (name, version) => publishingRecord(request, host, name, version, now));
      return startClaimed(deps, claimed, options.importImage, request, initialImportMetadata(request, host, claimed.name), request.requestId);
    },
    distributeImage: async (request) => {
      const existing = await operations.findByRequestId(options.distribute.kind, request.requestId);
      if (existing) return operations.start(options.distribute, request, undefined as never, request.requestId);
      const { image, hosts } = await checkDistribute(request, deps);
      // The request is stored as given (hosts/- stays hosts/-, so that a retry matches it); the resolved hosts are in the metadata.
      return operations.start(options.distribute, request, initialDistributeMetadata(image, hosts), request.requestId);
    },
    deleteImage: async (request) => {
      const existing = await operations.findByRequestId(options.deleteImage.kind, request.requestId);
      if (existing) return operations.start(options.deleteImage, request, undefined as never, request.requestId);
      const target = await checkDeleteImage(deps, request);
      const now = new Date();
      return operations.start(
        options.deleteImage,
        request,
        { image: target, hostsTotal: 0, hostsDone: 0, pendingHosts: [], startTime: now, updateTime: now },
        request.requestId,
      );
    },
    deleteImageReplica: async (request) => {
      await deleteReplica(deps, request.name);
      return {};
    },
    collectImageReplicas: (request) => collectReplicas(deps, request),
    updateImage: (request) => updateImage(deps, request),
    collectImageGarbage: (request) => collectImageGarbage(deps, request),
  };

  /** Starts the operation of a claimed version; when that fails, the claim (its PUBLISHING record) goes again. */
  async function startClaimed<Req, Meta>(
    deps: DistributionHandlersDeps['deps'],
    claimed: { key: string; revision: number },
    kind: Parameters<typeof operations.start<Req, Meta>>[0],
    request: Req,
    metadata: Meta,
    requestId: string,
  ) {
    try {
      return await operations.start(kind, request, metadata, requestId);
    } catch (error) {
      await deps.images.delete(claimed.key, claimed.revision).catch(() => undefined);
      throw error;
    }
  }
}
