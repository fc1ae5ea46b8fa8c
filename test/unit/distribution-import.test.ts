// Unit tests of services/distribution/import.ts with an in-memory catalog, fake events and a fake agent
// stream: request checks name their field before anything changes; a finished import registers what a publish
// registers (image, origin replica generation 1, image.published, image.available); a failed one leaves no
// record and no event, and asks the agent to remove a replica it finished; a cancel ends the agent's stream.
//
//   node --import tsx --test test/unit/distribution-import.test.ts
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { describe, test } from 'node:test';
import { status as GrpcStatus, Metadata } from '@grpc/grpc-js';
import { ImportImageResponse } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import {
  ImageImportStage,
  ImportImageDomain,
  ImportImageMetadata,
  ImportImageRequest,
} from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { Host, Host_State, Image, Image_State, type ImageReplica } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { CowherdError, toStatus } from '../../services/common/platform/errors.js';
import type { KvStore } from '../../services/common/platform/kv.js';
import { Status as StatusCodec } from '../../services/gen/google/rpc/status.js';
import type { OperationContext } from '../../services/common/domain/operations.js';
import { checkImport, importOperationKind, importSourceText, type ImportState } from '../../services/distribution/import.js';
import type { PublishDeps } from '../../services/distribution/publish.js';

function memoryKv<T>(): KvStore<T> & { values: Map<string, T> } {
  const values = new Map<string, T>();
  let revision = 0;
  return {
    values,
    get: async (key: string) => (values.has(key) ? { value: values.get(key)!, revision: ++revision } : undefined),
    put: async (key: string, value: T) => void values.set(key, value),
    delete: async (key: string) => void values.delete(key),
    mutate: async (key: string, change: (current: T | undefined) => T | undefined) => {
      const next = change(values.get(key));
      if (next === undefined) return undefined;
      values.set(key, next);
      return { value: next, revision: ++revision };
    },
  } as unknown as KvStore<T> & { values: Map<string, T> };
}

class FakeStream extends EventEmitter {
  cancelled = false;
  cancel(): void {
    this.cancelled = true;
    this.emit('error', Object.assign(new Error('Cancelled on client'), { code: GrpcStatus.CANCELLED }));
  }
}

const host = Host.fromPartial({ name: 'hosts/h1', state: Host_State.STATE_READY, hypervisor: Hypervisor.HYPERVISOR_KVM, agentEndpoint: 'localhost:1' });

function setup(script: (stream: FakeStream) => void) {
  const images = memoryKv<Image>();
  const replicas = memoryKv<ImageReplica>();
  const events: Array<{ type: string; id: string; payload: Record<string, unknown> }> = [];
  const deletedReplicas: string[] = [];
  const streams: FakeStream[] = [];
  const deps = {
    images,
    heads: memoryKv<unknown>(),
    replicas,
    inventory: { getHost: async (name: string) => (name === host.name ? host : undefined), getVirtualMachine: async () => undefined },
    agents: {
      clientFor: () => ({
        importImage: () => {
          const stream = new FakeStream();
          streams.push(stream);
          setImmediate(() => script(stream));
          return stream;
        },
        deleteImageReplica: (request: { name: string }, callback: (error: null) => void) => {
          deletedReplicas.push(request.name);
          callback(null);
        },
      }),
    },
    events: {
      publish: async (type: { typeName: string }, payload: Record<string, unknown>, options: { id: string }) =>
        void events.push({ type: type.typeName, id: options.id, payload }),
    },
    trackerAnnounceUrl: 'http://tracker/announce',
    exportStallMs: 5000,
  } as unknown as PublishDeps;
  return { deps, images, replicas, events, deletedReplicas, streams };
}

function context(request: ImportImageRequest, signal = new AbortController().signal): OperationContext<ImportImageRequest, ImportImageMetadata, ImportState> {
  let metadata = ImportImageMetadata.fromPartial({ image: `images/${request.imageId}`, startTime: new Date() });
  let state: ImportState | undefined;
  return {
    name: 'operations/op-1',
    request,
    get state() {
      return state;
    },
    get metadata() {
      return metadata;
    },
    signal,
    log: { error: () => undefined, warn: () => undefined, info: () => undefined } as never,
    checkpoint: async (update) => {
      if (update.metadata) metadata = update.metadata;
      if (update.state) state = update.state;
    },
    cancelRequested: () => false,
  };
}

const request = (fields: Partial<ImportImageRequest> = {}) =>
  ImportImageRequest.fromPartial({
    imageId: 'debian',
    host: 'hosts/h1',
    source: { $case: 'importPath', value: 'debian.qcow2' },
    template: { $case: 'domain', value: ImportImageDomain.fromPartial({}) },
    ...fields,
  });

const result = ImportImageResponse.fromPartial({
  response: {
    $case: 'result',
    value: {
      image: {
        name: 'images/debian',
        files: [
          { path: 'vda.qcow2', sizeBytes: '100', sha256: 'a'.repeat(64) },
          { path: 'domain-template.xml', sizeBytes: '10', sha256: 'b'.repeat(64) },
        ],
        domainTemplate: '<domain/>',
        torrent: { infoHash: 'c'.repeat(40) },
      },
      replica: { name: 'hosts/h1/images/debian', path: '/x/images/debian', webSeedUrl: 'http://h1:7447/' },
    },
  },
});

describe('checkImport', () => {
  test('names the field of every malformed request, and changes nothing', async () => {
    const { deps, images } = setup(() => undefined);
    const cases: Array<[Partial<ImportImageRequest>, string]> = [
      [{ imageId: '../x' }, 'image_id'],
      [{ host: 'h1' }, 'host'],
      [{ source: undefined }, 'source'],
      [{ source: { $case: 'importPath', value: '../etc/passwd' } }, 'import_path'],
      [{ source: { $case: 'importPath', value: '/etc/passwd' } }, 'import_path'],
      [{ source: { $case: 'importPath', value: 'a//b' } }, 'import_path'],
      [{ source: { $case: 'url', value: { uri: 'file:///etc/passwd', sha256: 'a'.repeat(64), maxBytes: '0' } } }, 'url.uri'],
      [{ source: { $case: 'url', value: { uri: 'https://u:p@x/y', sha256: 'a'.repeat(64), maxBytes: '0' } } }, 'url.uri'],
      [{ source: { $case: 'url', value: { uri: 'https://x/y', sha256: 'nope', maxBytes: '0' } } }, 'url.sha256'],
      [{ template: undefined }, 'template'],
      [{ template: { $case: 'domainXml', value: ' ' } }, 'domain_xml'],
      [{ template: { $case: 'domain', value: ImportImageDomain.fromPartial({ vcpus: 999 }) } }, 'domain.vcpus'],
      [{ template: { $case: 'domain', value: ImportImageDomain.fromPartial({ memoryMib: '1' }) } }, 'domain.memory_mib'],
      [{ template: { $case: 'domain', value: ImportImageDomain.fromPartial({ kernelPath: '../vmlinuz' }) } }, 'domain.kernel_path'],
      [{ template: { $case: 'domain', value: ImportImageDomain.fromPartial({ initrdPath: 'initrd' }) } }, 'domain.initrd_path'],
    ];
    for (const [fields, field] of cases) {
      const error = await checkImport(request(fields), deps).then(
        () => assert.fail(`accepted ${JSON.stringify(fields)}`),
        (caught: unknown) => caught as CowherdError,
      );
      assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, field);
      assert.equal(error.field, field, JSON.stringify(fields));
    }
    assert.equal(images.values.size, 0);
    await assert.rejects(checkImport(request({ host: 'hosts/other' }), deps), (error: CowherdError) => error.code === GrpcStatus.NOT_FOUND);
    images.values.set('debian', Image.fromPartial({ name: 'images/debian', state: Image_State.STATE_AVAILABLE }));
    // A taken id is no error any more: the handler claims the next version after these checks.
    await checkImport(request(), deps);
  });

  test('metadata shows a URL without its query', () => {
    assert.equal(
      importSourceText(request({ source: { $case: 'url', value: { uri: 'https://x.example/a/b.qcow2?X-Amz-Signature=s', sha256: '', maxBytes: '0' } } })),
      'https://x.example/a/b.qcow2',
    );
  });
});

describe('the import operation', () => {
  test('registers what a publish registers', async () => {
    const { deps, images, replicas, events } = setup((stream) => {
      stream.emit(
        'data',
        ImportImageResponse.fromPartial({
          response: {
            $case: 'progress',
            value: { stage: ImageImportStage.IMAGE_IMPORT_STAGE_CONVERTING, progress: { bytesDone: '5', bytesTotal: '10' }, sourceFormat: 'raw' },
          },
        }),
      );
      stream.emit('data', result);
      stream.emit('end');
    });
    const image = await importOperationKind(deps).run(context(request({ description: 'd' })));
    assert.equal(image.state, Image_State.STATE_AVAILABLE);
    assert.equal(image.description, 'd');
    assert.equal(images.values.get('debian')?.torrent?.infoHash, 'c'.repeat(40));
    const replica = replicas.values.get('h1.debian')!;
    assert.deepEqual([replica.origin, replica.generation, replica.webSeedUrl], [true, '1', 'http://h1:7447/']);
    assert.deepEqual(
      events.map((event) => [event.type, event.id]),
      [
        ['cowherd.events.v1.ImagePublished', 'image.published/debian/operations/op-1'],
        ['cowherd.events.v1.ImageAvailable', 'image.available/debian/h1/operations/op-1'],
      ],
    );
    assert.equal(events[1]!.payload['generation'], '1');
    assert.equal(events[1]!.payload['totalBytes'], '110');
  });

  test('a failed import leaves no record and no event, with the agent error as it was', async () => {
    const { deps, images, replicas, events } = setup((stream) => {
      const metadata = new Metadata();
      stream.emit(
        'error',
        Object.assign(new Error('wrong checksum'), {
          code: GrpcStatus.DATA_LOSS,
          details: 'the SHA-256 is wrong',
          metadata,
        }),
      );
    });
    const error = await importOperationKind(deps)
      .run(context(request()))
      .then(
        () => assert.fail('succeeded'),
        (caught: unknown) => caught as CowherdError,
      );
    assert.equal(error.code, GrpcStatus.DATA_LOSS);
    assert.equal(images.values.size, 0, 'the claim is gone');
    assert.equal(replicas.values.size, 0);
    assert.deepEqual(events, []);
  });

  test('a download failure is not reported as an unreachable host', async () => {
    const { deps } = setup((stream) => {
      const failure = new CowherdError(GrpcStatus.UNAVAILABLE, 'http://x/y: HTTP 404 Not Found', { reason: ErrorReason.ERROR_REASON_TRANSFER_FAILED });
      const status = toStatus(failure);
      stream.emit('error', Object.assign(new Error(status.message), { code: status.code, details: status.message, metadata: statusMetadata(status) }));
    });
    const error = await importOperationKind(deps)
      .run(context(request()))
      .then(
        () => assert.fail('succeeded'),
        (caught: unknown) => caught as CowherdError,
      );
    assert.equal(error.reason, ErrorReason.ERROR_REASON_TRANSFER_FAILED, error.message);
    assert.match(error.message, /HTTP 404/);
  });

  test('registering that fails removes the replica the agent made', async () => {
    const { deps, replicas, images, deletedReplicas, events } = setup((stream) => {
      stream.emit('data', result);
      stream.emit('end');
    });
    const failingDeps = { ...deps, events: { publish: async () => Promise.reject(new Error('NATS is gone')) } } as unknown as PublishDeps;
    await assert.rejects(importOperationKind(failingDeps).run(context(request())));
    assert.deepEqual(deletedReplicas, ['hosts/h1/images/debian']);
    assert.equal(replicas.values.size, 0);
    assert.equal(images.values.size, 0);
    assert.deepEqual(events, []);
  });

  test('cancelling ends the agent stream and leaves nothing', async () => {
    const controller = new AbortController();
    const { deps, images, streams } = setup(() => setTimeout(() => controller.abort(), 50));
    await assert.rejects(importOperationKind(deps).run(context(request(), controller.signal)), (error: CowherdError) => error.code === GrpcStatus.CANCELLED);
    assert.equal(streams[0]?.cancelled, true);
    assert.equal(images.values.size, 0);
  });
});

/** The trailers a cowherd server sends for a status: the encoded google.rpc.Status in grpc-status-details-bin. */
function statusMetadata(status: ReturnType<typeof toStatus>): Metadata {
  const metadata = new Metadata();
  metadata.set('grpc-status-details-bin', Buffer.from(StatusCodec.encode(status).finish()));
  return metadata;
}
