/** AgentService handlers: thin wrappers over the agent's modules. RPCs not built yet answer UNIMPLEMENTED. */
import type { AgentServiceService } from '../gen/cowherd/agent/v1/agent_service.js';
import type { Handlers } from '../common/rpc.js';
import { TransferProgress } from '../gen/cowherd/common/v1/types.js';
import { Image, Image_State, ImageReplica, ImageReplica_State } from '../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../common/errors.js';
import type { Logger } from '../common/logger.js';
import type { CloneEngine } from './clone-engine.js';
import { exportImage, toImageFiles } from './image-export.js';
import type { Libvirt } from './libvirt.js';
import type { VmLifecycle } from './vm-lifecycle.js';

/** How long a graceful stop waits when the caller names no timeout. */
const DEFAULT_STOP_TIMEOUT_MS = 120_000;

/** What exporting needs besides the request. */
export interface ExportDeps {
  readonly libvirt: Libvirt;
  readonly imageDirectory: string;
  readonly host: string;
  readonly log: Logger;
}

/** The handlers this agent serves. */
export function agentHandlers(clones: CloneEngine, vms: VmLifecycle, replicas: { delete(name: string): Promise<void> }, exporter: ExportDeps): Partial<Handlers<typeof AgentServiceService>> {
  return {
    exportImage: async (request, context, send) => {
      const id = /^images\/([^/]+)$/.exec(request.image)?.[1];
      if (!id) throw CowherdError.invalidArgument('image', 'must be images/{image}');
      let sending: Promise<void> = Promise.resolve();
      const exported = await exportImage({
        libvirt: exporter.libvirt,
        imageDirectory: exporter.imageDirectory,
        host: exporter.host,
        virtualMachine: request.virtualMachine,
        image: id,
        signal: context.signal,
        log: exporter.log,
        onProgress: (progress) => {
          // In order, and never more than one message in flight.
          sending = sending.then(() => send({ response: { $case: 'progress', value: { stage: progress.stage, progress: TransferProgress.fromPartial({ bytesDone: String(progress.bytesDone), bytesTotal: String(progress.bytesTotal) }) } } })).catch(() => undefined);
        },
      });
      await sending;
      const now = new Date();
      await send({
        response: {
          $case: 'result',
          value: {
            image: Image.fromPartial({ name: request.image, files: toImageFiles(exported.files), domainTemplate: exported.domainTemplate, state: Image_State.STATE_AVAILABLE, sourceVirtualMachine: request.virtualMachine, originHost: `hosts/${exporter.host}`, createTime: now, updateTime: now }),
            replica: ImageReplica.fromPartial({ name: `hosts/${exporter.host}/${request.image}`, image: request.image, host: `hosts/${exporter.host}`, state: ImageReplica_State.STATE_AVAILABLE, path: exported.directory, origin: true, createTime: now, updateTime: now }),
            webSeedUrl: '',
          },
        },
      });
    },
    deleteImageReplica: async (request) => {
      await replicas.delete(request.name);
      return {};
    },
    createClones: async (request) => ({ results: await clones.createClones(request) }),
    startVirtualMachine: (request) => vms.start(request.name),
    stopVirtualMachine: (request) => vms.stop(request.name, request.force, request.timeout ? (Number(request.timeout.seconds) + request.timeout.nanos / 1e9) * 1000 : DEFAULT_STOP_TIMEOUT_MS),
    deleteVirtualMachine: async (request) => {
      await vms.delete(request.name, request.force);
      return {};
    },
  };
}
