/**
 * The RPC contract at the gRPC boundary, on real grpc-js servers on port 0 with real certificates, called
 * from grpc-js and from a Python client generated from proto/ (Debian's grpcio):
 *
 * - a server-streaming call that the server refuses (PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT,
 *   NOT_FOUND) ends with that status and its ErrorInfo at once, not at the client's deadline: once at the
 *   boundary (authorization, revocation) and once from the handler, for InventoryService.WatchVirtualMachines
 *   and AgentService.ExportImage, and a stream that fails after sending messages ends with its status too;
 * - filter values are checked against the field's type and enum values on every filter of the shared parser,
 *   and ListOperations (real NATS) checks `kind` against every operation kind the services define.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus, type ClientReadableStream, type ServiceError } from '@grpc/grpc-js';
import { AGENT_POLICY } from '../../services/agent/access-policy.js';
import { INVENTORY_POLICY } from '../../services/inventory/access-policy.js';
import { AgentServiceClient, AgentServiceService } from '../../services/gen/cowherd/agent/v1/agent_service.js';
import { InventoryServiceClient, InventoryServiceService } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host_State, VirtualMachine, VirtualMachine_State, VirtualMachineChange_Type } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { createClient } from '../../services/common/platform/client.js';
import { writeCredentials } from '../../services/common/platform/credential-files.js';
import { CowherdError, readServiceError } from '../../services/common/platform/errors.js';
import { booleanField, enumField, enumValueNames, imageNameField, parseFilter } from '../../services/common/domain/filter.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { OPERATION_KIND_NAMES } from '../../services/common/domain/operation-kinds.js';
import { OperationManager } from '../../services/common/domain/operations.js';
import { PageTokens } from '../../services/common/platform/pagination.js';
import { inspectCertificate } from '../../services/common/platform/pki.js';
import { readDescriptorSet } from '../../services/common/platform/reflection.js';
import { adaptService, type RevocationCheck } from '../../services/common/platform/rpc.js';
import { startServer, type RunningServer } from '../../services/common/platform/server.js';
import { mutualTlsChannelCredentialsFromPem, mutualTlsServerCredentials, type TlsFiles } from '../../services/common/platform/tls.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { REPOSITORY } from '../harness/processes.js';
import { EVERY_HOST, HOST_NAME, IMAGE_NAME } from '../../services/common/domain/resource-names.js';

const log = createLogger({ service: 'test', level: 'silent' });
/** The client's own deadline: a refusal that waits for it would take this long. */
const CLIENT_DEADLINE_MS = 20_000;
/** "At once": well below the deadline, with room for a busy 2-core machine. */
const AT_ONCE_MS = 1_500;

/** How a streaming call ended, as the client saw it. */
interface StreamOutcome {
  readonly code: GrpcStatus;
  readonly reason: string;
  readonly message: string;
  readonly messages: number;
  readonly ms: number;
}

/** Reads a server stream to its end (status) and times it. */
function outcome(stream: ClientReadableStream<unknown>): Promise<StreamOutcome> {
  const started = performance.now();
  let messages = 0;
  return new Promise((resolve) => {
    stream.on('data', () => {
      messages++;
    });
    stream.on('error', (error: ServiceError) => {
      const received = readServiceError(error);
      resolve({ code: received.code, reason: received.reason, message: received.message, messages, ms: performance.now() - started });
    });
    stream.on('end', () => resolve({ code: GrpcStatus.OK, reason: '', message: '', messages, ms: performance.now() - started }));
  });
}

interface PythonOutcome {
  readonly method: string;
  readonly code: string;
  readonly details: string;
  readonly reason: string;
  readonly domain: string;
  readonly messages: number;
  readonly seconds: number;
}

/** test/python/streaming_refusals.py with the given credentials against `address`: one outcome per call. */
function pythonCalls(
  files: TlsFiles,
  address: string,
  calls: ReadonlyArray<{ service: 'inventory' | 'agent'; method: string; request: Record<string, unknown> }>,
): Promise<PythonOutcome[]> {
  const withDeadline = calls.map((spec) => ({ ...spec, timeout: CLIENT_DEADLINE_MS / 1000 }));
  return new Promise((resolve, reject) => {
    execFile(
      '/usr/bin/python3',
      [join(REPOSITORY, 'test/python/streaming_refusals.py'), files.certificateFile, files.privateKeyFile, files.caFile, address, JSON.stringify(withDeadline)],
      { cwd: join(REPOSITORY, 'test/python'), timeout: 120_000 },
      (error, stdout, stderr) => {
        if (error) return reject(new Error(`streaming_refusals.py failed: ${error.message}\n${stderr}`));
        resolve(
          stdout
            .trim()
            .split('\n')
            .map((line) => JSON.parse(line) as PythonOutcome),
        );
      },
    );
  });
}

describe('RPC contract: streaming refusals end with their status at once', () => {
  const resources = new Resources();
  let pki: TestPki;
  let server: RunningServer;
  const revoked = new Set<string>();
  let handlerCalls = 0;
  const address = (): string => `localhost:${server.port}`;

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const revocations: RevocationCheck = { isRevoked: (serial) => revoked.has(serial) };
    const inventory = adaptService(
      InventoryServiceService,
      {
        // The handler's own refusals, as the inventory's: a malformed parent, a host that does not exist; and a
        // stream that breaks after its first message.
        watchVirtualMachines: async (request, context, send) => {
          handlerCalls++;
          if (!HOST_NAME.matches(request.parent) && request.parent !== EVERY_HOST)
            throw CowherdError.invalidArgument('parent', 'must be hosts/{host} or hosts/-');
          if (request.parent === 'hosts/nope') throw CowherdError.notFound(request.parent);
          await send({ type: VirtualMachineChange_Type.TYPE_SYNCED, virtualMachine: undefined, revision: '0' });
          if (request.parent === 'hosts/breaks') throw CowherdError.notFound('hosts/breaks');
          await new Promise<void>((resolve) => context.signal.addEventListener('abort', () => resolve(), { once: true }));
        },
      },
      INVENTORY_POLICY,
      { log, revocations },
    );
    const agent = adaptService(
      AgentServiceService,
      {
        exportImage: async (request) => {
          handlerCalls++;
          if (!IMAGE_NAME.matches(request.image)) throw CowherdError.invalidArgument('image', 'must be images/{image}');
          throw CowherdError.notFound(request.virtualMachine);
        },
      },
      AGENT_POLICY,
      { log, revocations },
    );
    const serverFiles = await pki.files('host', 'kvm-01');
    server = await startServer({
      log,
      address: 'localhost:0',
      credentials: mutualTlsServerCredentials(serverFiles, 200),
      services: [inventory, agent],
      descriptorSet: readDescriptorSet(),
      revocations,
    });
    resources.defer(() => server.stop(1_000));
  });
  after(() => resources.release());

  /** Clients of both services for kind/name, and the credential files for the Python client. */
  async function caller(
    kind: 'admin' | 'host' | 'service',
    name: string,
  ): Promise<{ inventory: InventoryServiceClient; agent: AgentServiceClient; files: TlsFiles; serial: string }> {
    const credentials = await pki.credentials(kind, name);
    // The same certificate for both clients: revoking its serial refuses both.
    const files = await writeCredentials(join(await resources.tempDir(), `${kind}-${name}`), credentials);
    const channel = mutualTlsChannelCredentialsFromPem({ ...credentials, caPem: pki.ca.certificatePem });
    const inventory = createClient(InventoryServiceClient, address(), channel);
    const agent = createClient(AgentServiceClient, address(), channel);
    resources.defer(() => {
      inventory.close();
      agent.close();
    });
    return { inventory, agent, files, serial: inspectCertificate(credentials.certificatePem).serialNumber };
  }
  const deadline = (): { deadline: Date } => ({ deadline: new Date(Date.now() + CLIENT_DEADLINE_MS) });
  const exportRequest = (image: string) => ({ virtualMachine: 'hosts/kvm-01/virtualMachines/missing', image, trackerAnnounceUrl: '', operation: '' });

  it('grpc-js: every refusal of WatchVirtualMachines and ExportImage arrives with its code and ErrorInfo within a second', async () => {
    const admin = await caller('admin', 'alice');
    const host = await caller('host', 'kvm-02');
    const distribution = await caller('service', 'distribution');
    const revokedAdmin = await caller('admin', 'mallory');
    revoked.add(revokedAdmin.serial);
    const before = handlerCalls;

    const cases: Array<{ what: string; stream: () => ClientReadableStream<unknown>; code: GrpcStatus; reason: string; messages?: number }> = [
      {
        what: 'watch by a host identity',
        stream: () => host.inventory.watchVirtualMachines({ parent: 'hosts/-', sendInitialState: false }, deadline()),
        code: GrpcStatus.PERMISSION_DENIED,
        reason: 'ERROR_REASON_PERMISSION_DENIED',
      },
      {
        what: 'watch with a revoked certificate',
        stream: () => revokedAdmin.inventory.watchVirtualMachines({ parent: 'hosts/-', sendInitialState: false }, deadline()),
        code: GrpcStatus.UNAUTHENTICATED,
        reason: 'ERROR_REASON_CERTIFICATE_REVOKED',
      },
      {
        what: 'export by an admin',
        stream: () => admin.agent.exportImage(exportRequest('images/x'), deadline()),
        code: GrpcStatus.PERMISSION_DENIED,
        reason: 'ERROR_REASON_PERMISSION_DENIED',
      },
      {
        what: 'export with a revoked certificate',
        stream: () => revokedAdmin.agent.exportImage(exportRequest('images/x'), deadline()),
        code: GrpcStatus.UNAUTHENTICATED,
        reason: 'ERROR_REASON_CERTIFICATE_REVOKED',
      },
    ];
    const boundaryOnly = cases.length;
    cases.push(
      {
        what: 'watch of a malformed parent',
        stream: () => admin.inventory.watchVirtualMachines({ parent: 'hosts/a/b', sendInitialState: false }, deadline()),
        code: GrpcStatus.INVALID_ARGUMENT,
        reason: 'ERROR_REASON_INVALID_FIELD',
      },
      {
        what: 'watch of an unknown host',
        stream: () => admin.inventory.watchVirtualMachines({ parent: 'hosts/nope', sendInitialState: false }, deadline()),
        code: GrpcStatus.NOT_FOUND,
        reason: 'ERROR_REASON_RESOURCE_NOT_FOUND',
      },
      {
        what: 'watch that fails after one message',
        stream: () => admin.inventory.watchVirtualMachines({ parent: 'hosts/breaks', sendInitialState: false }, deadline()),
        code: GrpcStatus.NOT_FOUND,
        reason: 'ERROR_REASON_RESOURCE_NOT_FOUND',
        messages: 1,
      },
      {
        what: 'export of a malformed image',
        stream: () => distribution.agent.exportImage(exportRequest('nope'), deadline()),
        code: GrpcStatus.INVALID_ARGUMENT,
        reason: 'ERROR_REASON_INVALID_FIELD',
      },
      {
        what: 'export of a missing VM',
        stream: () => distribution.agent.exportImage(exportRequest('images/x'), deadline()),
        code: GrpcStatus.NOT_FOUND,
        reason: 'ERROR_REASON_RESOURCE_NOT_FOUND',
      },
    );
    for (const [index, item] of cases.entries()) {
      const result = await outcome(item.stream());
      assert.equal(GrpcStatus[result.code], GrpcStatus[item.code], `${item.what}: ${result.message}`);
      assert.equal(result.reason, item.reason, item.what);
      assert.equal(result.messages, item.messages ?? 0, item.what);
      assert.ok(result.ms < AT_ONCE_MS, `${item.what}: the status took ${Math.round(result.ms)} ms (deadline ${CLIENT_DEADLINE_MS} ms)`);
      if (index === boundaryOnly - 1) assert.equal(handlerCalls, before, 'refused at the boundary: no handler ran');
    }
  });

  it('Python grpcio: the same refusals arrive with their code and ErrorInfo within a second', async () => {
    const admin = await caller('admin', 'bob');
    const host = await caller('host', 'kvm-03');
    const distribution = await caller('service', 'distribution');
    const revokedAdmin = await caller('admin', 'eve');
    revoked.add(revokedAdmin.serial);
    const watch = (parent: string) => ({ service: 'inventory' as const, method: 'WatchVirtualMachines', request: { parent } });
    const exportCall = (image: string) => ({
      service: 'agent' as const,
      method: 'ExportImage',
      request: { virtualMachine: 'hosts/kvm-01/virtualMachines/missing', image },
    });
    const expectations: Array<{
      files: TlsFiles;
      call: ReturnType<typeof watch> | ReturnType<typeof exportCall>;
      code: string;
      reason: string;
      messages?: number;
    }> = [
      { files: host.files, call: watch('hosts/-'), code: 'PERMISSION_DENIED', reason: 'ERROR_REASON_PERMISSION_DENIED' },
      { files: revokedAdmin.files, call: watch('hosts/-'), code: 'UNAUTHENTICATED', reason: 'ERROR_REASON_CERTIFICATE_REVOKED' },
      { files: admin.files, call: watch('hosts/a/b'), code: 'INVALID_ARGUMENT', reason: 'ERROR_REASON_INVALID_FIELD' },
      { files: admin.files, call: watch('hosts/nope'), code: 'NOT_FOUND', reason: 'ERROR_REASON_RESOURCE_NOT_FOUND' },
      { files: admin.files, call: watch('hosts/breaks'), code: 'NOT_FOUND', reason: 'ERROR_REASON_RESOURCE_NOT_FOUND', messages: 1 },
      { files: admin.files, call: exportCall('images/x'), code: 'PERMISSION_DENIED', reason: 'ERROR_REASON_PERMISSION_DENIED' },
      { files: revokedAdmin.files, call: exportCall('images/x'), code: 'UNAUTHENTICATED', reason: 'ERROR_REASON_CERTIFICATE_REVOKED' },
      { files: distribution.files, call: exportCall('nope'), code: 'INVALID_ARGUMENT', reason: 'ERROR_REASON_INVALID_FIELD' },
      { files: distribution.files, call: exportCall('images/x'), code: 'NOT_FOUND', reason: 'ERROR_REASON_RESOURCE_NOT_FOUND' },
    ];
    // One Python process per identity, each making its calls in order.
    const byFiles = new Map<TlsFiles, typeof expectations>();
    for (const item of expectations) byFiles.set(item.files, [...(byFiles.get(item.files) ?? []), item]);
    for (const [files, items] of byFiles) {
      const results = await pythonCalls(
        files,
        address(),
        items.map((item) => item.call),
      );
      assert.equal(results.length, items.length);
      for (const [index, item] of items.entries()) {
        const result = results[index]!;
        const what = `${item.call.method} ${JSON.stringify(item.call.request)}`;
        assert.equal(result.code, item.code, `${what}: ${result.details}`);
        assert.equal(result.reason, item.reason, what);
        assert.equal(result.domain, 'cowherd.dev', what);
        assert.equal(result.messages, item.messages ?? 0, what);
        assert.ok(result.seconds * 1000 < AT_ONCE_MS, `${what}: the status took ${result.seconds} s (deadline ${CLIENT_DEADLINE_MS / 1000} s)`);
      }
    }
  });

  it('buf curl (through server reflection): a refused stream ends with its code at once', async () => {
    const admin = await caller('admin', 'carol');
    const bufCurl = (method: string, data: Record<string, unknown>): Promise<{ exitCode: number; output: string; ms: number }> => {
      const started = performance.now();
      const args = [
        'curl',
        '--protocol',
        'grpc',
        '--cacert',
        admin.files.caFile,
        '--cert',
        admin.files.certificateFile,
        '--key',
        admin.files.privateKeyFile,
        '--timeout',
        `${CLIENT_DEADLINE_MS / 1000}s`,
        '--data',
        JSON.stringify(data),
        `https://${address()}/${method}`,
      ];
      return new Promise((resolve) => {
        execFile(join(REPOSITORY, 'node_modules/.bin/buf'), args, { timeout: 60_000 }, (error, stdout, stderr) =>
          resolve({ exitCode: error ? ((error as { code?: number }).code ?? -1) : 0, output: stdout + stderr, ms: performance.now() - started }),
        );
      });
    };
    for (const [method, data, code] of [
      ['cowherd.inventory.v1.InventoryService/WatchVirtualMachines', { parent: 'hosts/nope' }, 'not_found'],
      ['cowherd.agent.v1.AgentService/ExportImage', { virtualMachine: 'hosts/kvm-01/virtualMachines/missing', image: 'images/x' }, 'permission_denied'],
    ] as const) {
      const result = await bufCurl(method, data);
      assert.notEqual(result.exitCode, 0, `${method}: ${result.output}`);
      assert.match(result.output, new RegExp(`"code": "${code}"`), method);
      // buf curl itself takes a moment to start and to fetch the schema by reflection: the bound is the deadline.
      assert.ok(result.ms < CLIENT_DEADLINE_MS / 4, `${method}: buf curl ended after ${Math.round(result.ms)} ms (deadline ${CLIENT_DEADLINE_MS} ms)`);
    }
  });
});

describe('RPC contract: filter values are checked against the field', () => {
  const vm = (state: VirtualMachine_State, managed: boolean, sourceImage = ''): VirtualMachine =>
    VirtualMachine.fromPartial({ name: 'hosts/h/virtualMachines/v', state, managed, sourceImage });
  const fields = {
    state: enumField<VirtualMachine>(VirtualMachine_State, 'STATE_', (item) => item.state),
    managed: booleanField<VirtualMachine>((item) => item.managed),
    source_image: imageNameField<VirtualMachine>((item) => item.sourceImage, { allowEmpty: true }),
  };

  it('lists the allowed values from the generated enum, without UNSPECIFIED and UNRECOGNIZED', () => {
    assert.deepEqual(enumValueNames(Host_State, 'STATE_'), ['READY', 'UNREACHABLE', 'DRAINING']);
    assert.deepEqual(enumValueNames(Hypervisor, 'HYPERVISOR_'), ['KVM', 'XEN']);
  });

  it('refuses a value the field cannot hold, naming the value and the allowed ones', () => {
    for (const [filter, allowed] of [
      ['state = RUNING', /"RUNING" is not a value of state; allowed: RUNNING, .*SHUT_OFF/],
      ['state = 7', /"7" is not a value of state; allowed: /],
      ['state = UNSPECIFIED', /"UNSPECIFIED" is not a value of state/],
      ['managed = maybe', /"maybe" is not a value of managed; allowed: true, false/],
      ['state = RUNNING AND managed != yes', /"yes" is not a value of managed/],
      ['source_image = debian-12', /source_image value "debian-12" is not of the form images\/\{image\}/],
    ] as const) {
      assert.throws(
        () => parseFilter(filter, fields),
        (error: unknown) =>
          error instanceof CowherdError && error.code === GrpcStatus.INVALID_ARGUMENT && error.field === 'filter' && allowed.test(error.message),
        filter,
      );
    }
  });

  it('matches values the field can hold', () => {
    const running = vm(VirtualMachine_State.STATE_RUNNING, true, 'images/debian-12');
    const off = vm(VirtualMachine_State.STATE_SHUT_OFF, false);
    const select = (filter: string) => [running, off].filter(parseFilter(filter, fields));
    assert.deepEqual(select('state = RUNNING'), [running]);
    assert.deepEqual(select('state != RUNNING'), [off]);
    assert.deepEqual(select('managed = false'), [off]);
    assert.deepEqual(select('source_image = "images/debian-12"'), [running]);
    assert.deepEqual(select('source_image = ""'), [off]);
  });
});

describe('RPC contract: ListOperations checks its filter values', () => {
  const resources = new Resources();
  after(() => resources.release());

  it('knows every operation kind the services define, and only those', async () => {
    // Each service names its kinds in its own folder (`kind: '<service>.<verb>-<noun>'` or a constant).
    const defined = new Set<string>();
    for (const service of ['distribution', 'cloning']) {
      const folder = join(REPOSITORY, 'services', service);
      for (const file of (await readdir(folder)).filter((name) => name.endsWith('.ts'))) {
        const text = await readFile(join(folder, file), 'utf8');
        for (const match of text.matchAll(/(?:kind: |_KIND = )'([a-z]+\.[a-z-]+)'/g)) defined.add(match[1]!);
      }
    }
    assert.deepEqual([...defined].sort(), [...OPERATION_KIND_NAMES].sort());
  });

  it('refuses a kind or done value that does not exist, naming the allowed ones', async () => {
    const pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    const connection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'distribution'), name: 'rpc-contract', log });
    resources.defer(() => connection.close());
    const manager = await OperationManager.open({ js: connection.jetstream, log, pageTokens: await PageTokens.open(connection.jetstream) });
    resources.defer(() => manager.stop());
    for (const [filter, message] of [
      ['kind = cloning.clone-vms', /"cloning.clone-vms" is not a value of kind; allowed: distribution.publish-image, .*cloning.clone-virtual-machines/],
      ['done = maybe', /done must be true or false/],
    ] as const) {
      await assert.rejects(
        manager.list({ filter, pageSize: 0, pageToken: '' }),
        (error: unknown) =>
          error instanceof CowherdError && error.code === GrpcStatus.INVALID_ARGUMENT && error.field === 'filter' && message.test(error.message),
        filter,
      );
    }
    assert.deepEqual((await manager.list({ filter: 'kind = cloning.clone-virtual-machines AND done = false', pageSize: 0, pageToken: '' })).operations, []);
  });
});
