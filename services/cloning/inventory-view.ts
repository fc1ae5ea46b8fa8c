/**
 * The FleetView over InventoryService, called with the cloning service's own identity (services may call
 * every inventory read method). NOT_FOUND becomes undefined; an inventory that does not answer is
 * UNAVAILABLE to cloning's callers, never a bare INTERNAL.
 */
import { Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { ErrorReason } from '../gen/cowherd/common/v1/error_reason.js';
import type { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { ImageView, type Host, type Image, type ImageReplica, type VirtualMachine } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/platform/errors.js';
import { readAllPages } from '../common/platform/list-pages.js';
import { EVERY_HOST } from '../common/domain/resource-names.js';
import type { RebaseFleetView } from './fleet-view.js';

const PAGE_SIZE = 1000;

type Callback<Res> = (error: ServiceError | null, response: Res) => void;
type UnaryMethod<Req, Res> = (request: Req, metadata: Metadata, options: { deadline: number }, callback: Callback<Res>) => unknown;

/** A FleetView reading from the inventory; `deadlineMs` bounds each call (default 15 s). */
export function createInventoryFleetView(client: InventoryServiceClient, deadlineMs = 15_000): RebaseFleetView {
  /** `callerField`: the request field whose caller-given value the inventory checks (its INVALID_ARGUMENT is relayed naming it). */
  const call = <Req, Res>(method: UnaryMethod<Req, Res>, request: Req, callerField?: string): Promise<Res> =>
    new Promise((resolve, reject) => {
      method.call(client, request, new Metadata(), { deadline: Date.now() + deadlineMs }, (error, response) =>
        error ? reject(inventoryError(error, callerField)) : resolve(response),
      );
    });
  const orUndefined = async <T>(promise: Promise<T>): Promise<T | undefined> => {
    try {
      return await promise;
    } catch (error) {
      if (error instanceof CowherdError && error.code === GrpcStatus.NOT_FOUND) return undefined;
      throw error;
    }
  };
  return {
    getVirtualMachine: (name) => orUndefined(call<{ name: string }, VirtualMachine>(client.getVirtualMachine, { name })),
    getImage: (name) => orUndefined(call<{ name: string; view: ImageView }, Image>(client.getImage, { name, view: ImageView.IMAGE_VIEW_BASIC })),
    listHosts: () =>
      readAllPages<Host>(async (pageToken) => {
        const response = await call(client.listHosts, { pageSize: PAGE_SIZE, pageToken, filter: '' });
        return { items: response.hosts, nextPageToken: response.nextPageToken };
      }),
    listReplicas: (imageVersion) =>
      readAllPages<ImageReplica>(async (pageToken) => {
        const response = await call(client.listImageReplicas, {
          parent: EVERY_HOST,
          pageSize: PAGE_SIZE,
          pageToken,
          filter: `image_version = ${JSON.stringify(imageVersion)} AND state = AVAILABLE`,
        });
        return { items: response.imageReplicas, nextPageToken: response.nextPageToken };
      }),
    listVirtualMachines: (parent, filter) =>
      readAllPages<VirtualMachine>(async (pageToken) => {
        const response = await call(client.listVirtualMachines, { parent, pageSize: PAGE_SIZE, pageToken, filter }, 'filter');
        return { items: response.virtualMachines, nextPageToken: response.nextPageToken };
      }),
    domainNamesInUse: async () => {
      const machines = await readAllPages<VirtualMachine>(async (pageToken) => {
        const response = await call(client.listVirtualMachines, { parent: EVERY_HOST, pageSize: PAGE_SIZE, pageToken, filter: '' });
        return { items: response.virtualMachines, nextPageToken: response.nextPageToken };
      });
      return new Map(machines.map((machine) => [machine.domainName, machine.name]));
    },
  };
}

function inventoryError(error: ServiceError, callerField: string | undefined): CowherdError {
  const cause = error;
  switch (error.code) {
    case GrpcStatus.NOT_FOUND:
      return new CowherdError(GrpcStatus.NOT_FOUND, error.details, { reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND, cause });
    case GrpcStatus.INVALID_ARGUMENT:
      // Only a caller's filter reaches the inventory unchecked (RebaseVirtualMachines): relay which part is wrong.
      if (callerField !== undefined)
        return new CowherdError(GrpcStatus.INVALID_ARGUMENT, error.details, { reason: ErrorReason.ERROR_REASON_INVALID_FIELD, field: callerField, cause });
      return new CowherdError(GrpcStatus.INTERNAL, 'internal error', { reason: ErrorReason.ERROR_REASON_INTERNAL, cause });
    case GrpcStatus.UNAVAILABLE:
    case GrpcStatus.DEADLINE_EXCEEDED:
    case GrpcStatus.RESOURCE_EXHAUSTED:
      return new CowherdError(GrpcStatus.UNAVAILABLE, 'the inventory is not answering; retry', { reason: ErrorReason.ERROR_REASON_INTERNAL, cause });
    default:
      return new CowherdError(GrpcStatus.INTERNAL, 'internal error', { reason: ErrorReason.ERROR_REASON_INTERNAL, cause });
  }
}
