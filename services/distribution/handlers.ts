/** DistributionService handlers: checks, then long-running operations or direct calls. */
import type { DistributionServiceService } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { ImagePublishStage } from '../gen/cowherd/common/v1/types.js';
import type { OperationManager } from '../common/domain/operations.js';
import type { Handlers } from '../common/platform/rpc.js';
import { IMAGE_NAME } from '../common/domain/resource-names.js';
import { checkDeleteImage, collectReplicas, deleteReplica, type DeletionDeps, type deleteImageOperationKind } from './deletion.js';
import { checkPublish, type PublishDeps, type publishOperationKind } from './publish.js';
import { checkImport, initialImportMetadata, type importOperationKind } from './import.js';
import { checkDistribute, initialDistributeMetadata, type DistributeDeps, type distributeOperationKind } from './distribute.js';

/** What the handlers need. */
export interface DistributionHandlersDeps {
  readonly deps: PublishDeps & DeletionDeps & DistributeDeps;
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
      return operations.start(
        options.publish,
        request,
        {
          image: IMAGE_NAME.format({ image: request.imageId }),
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
      return operations.start(options.importImage, request, initialImportMetadata(request, host), request.requestId);
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
      await checkDeleteImage(deps, request);
      const now = new Date();
      return operations.start(
        options.deleteImage,
        request,
        { image: request.name, hostsTotal: 0, hostsDone: 0, pendingHosts: [], startTime: now, updateTime: now },
        request.requestId,
      );
    },
    deleteImageReplica: async (request) => {
      await deleteReplica(deps, request.name);
      return {};
    },
    collectImageReplicas: (request) => collectReplicas(deps, request),
  };
}
