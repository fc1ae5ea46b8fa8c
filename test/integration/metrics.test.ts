/**
 * Prometheus metrics on real processes: an inventory process on real NATS with real certificates counts
 * and times the mTLS calls it serves by service, method and status code, serves them at GET /metrics on
 * its plaintext metrics port (and nothing else there), and its request log names the caller, refused
 * calls included. Operations on a real nats-server show up by kind and state.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { call, createClient } from '../../services/common/platform/client.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { metricsRegistry } from '../../services/common/platform/metrics.js';
import { connectNats, type Nats } from '../../services/common/platform/nats.js';
import { OperationManager, type OperationKind } from '../../services/common/domain/operations.js';
import { PageTokens } from '../../services/common/platform/pagination.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Duration } from '../../services/gen/google/protobuf/duration.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const INVENTORY = 'cowherd.inventory.v1.InventoryService';
const log = createLogger({ service: 'test', level: 'silent' });

/** One sample of the text exposition format. */
interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

function parseExposition(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)/.exec(line);
    assert.ok(match, `malformed exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const label of (match[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[label[1]!] = label[2]!;
    samples.push({ name: match[1]!, labels, value: Number(match[3]) });
  }
  return samples;
}

/** The value of the one sample named `name` whose labels include `labels`; undefined if none. */
function valueOf(samples: readonly Sample[], name: string, labels: Record<string, string>): number | undefined {
  const found = samples.filter((sample) => sample.name === name && Object.entries(labels).every(([key, value]) => sample.labels[key] === value));
  assert.ok(found.length <= 1, `${name} ${JSON.stringify(labels)} matches ${found.length} samples`);
  return found[0]?.value;
}

async function scrape(address: string): Promise<{ contentType: string; samples: Sample[] }> {
  const response = await fetch(`http://${address}/metrics`);
  assert.equal(response.status, 200);
  return { contentType: response.headers.get('content-type') ?? '', samples: parseExposition(await response.text()) };
}

async function waitFor<T>(read: () => Promise<T | undefined> | T | undefined, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await read();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

describe('metrics', () => {
  const resources = new Resources();
  let pki: TestPki;
  let natsUrl: string;
  let inventory: ServiceProcess;
  let metricsAddress: string;

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    natsUrl = nats.url;
    const ca = await startCertificateAuthorityProcess(resources, pki, { url: nats.url });
    inventory = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, { COWHERD_CA_ADDRESS: ca.address });
    assert.ok(inventory.metricsAddress, 'the serving line names the metrics port');
    metricsAddress = inventory.metricsAddress;
  });
  after(() => resources.release());

  it('counts and times real mTLS calls by service, method and code, and logs each with its caller', async () => {
    const admin = createClient(
      InventoryServiceClient,
      inventory.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 10_000 },
    );
    const host = createClient(
      InventoryServiceClient,
      inventory.address,
      mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('host', 'kvm-01')), caPem: pki.ca.certificatePem }),
      { defaultDeadlineMs: 10_000 },
    );
    try {
      await call((cb) => admin.listHosts({ pageSize: 10, pageToken: '', filter: '' }, cb));
      await call((cb) => admin.listHosts({ pageSize: 10, pageToken: '', filter: '' }, cb));
      // A host may read only its own record: refused at the boundary, which still counts and logs it.
      const refused = await call((cb) => host.getHost({ name: 'hosts/kvm-02' }, cb)).then(
        () => undefined,
        (error: ServiceError) => error,
      );
      assert.equal(refused?.code, GrpcStatus.PERMISSION_DENIED);
    } finally {
      admin.close();
      host.close();
    }

    const { contentType, samples } = await scrape(metricsAddress);
    assert.match(contentType, /^text\/plain; version=0\.0\.4/);
    assert.equal(valueOf(samples, 'cowherd_rpc_requests_total', { service: INVENTORY, method: 'ListHosts', code: 'OK' }), 2);
    assert.equal(valueOf(samples, 'cowherd_rpc_requests_total', { service: INVENTORY, method: 'GetHost', code: 'PERMISSION_DENIED' }), 1);
    assert.equal(valueOf(samples, 'cowherd_rpc_requests_total', { service: INVENTORY, method: 'GetHost', code: 'OK' }), undefined);
    assert.equal(valueOf(samples, 'cowherd_rpc_duration_seconds_count', { service: INVENTORY, method: 'ListHosts' }), 2);
    const sum = valueOf(samples, 'cowherd_rpc_duration_seconds_sum', { service: INVENTORY, method: 'ListHosts' });
    assert.ok(sum !== undefined && sum > 0 && sum < 20, `duration sum ${sum}`);
    assert.equal(valueOf(samples, 'cowherd_rpc_duration_seconds_bucket', { service: INVENTORY, method: 'ListHosts', le: '+Inf' }), 2);
    // The standard Node.js process metrics come along under their usual names.
    assert.ok((valueOf(samples, 'process_resident_memory_bytes', {}) ?? 0) > 0);
    // No label carries an identity, a key or a path.
    for (const sample of samples)
      for (const value of Object.values(sample.labels)) assert.doesNotMatch(value, /spiffe:|BEGIN|admin\/alice|host\/kvm-01|\//, `${sample.name} ${value}`);

    const rpcLines = inventory.logs.filter((line) => line['msg'] === 'rpc');
    const listed = rpcLines.find((line) => line['method'] === `/${INVENTORY}/ListHosts`);
    assert.equal(listed?.['caller'], 'admin/alice');
    assert.equal(listed?.['code'], 'OK');
    const denied = rpcLines.find((line) => line['method'] === `/${INVENTORY}/GetHost`);
    assert.equal(denied?.['caller'], 'host/kvm-01');
    assert.equal(denied?.['code'], 'PERMISSION_DENIED');
  });

  it('serves nothing but /metrics on the metrics port', async () => {
    const base = `http://${metricsAddress}`;
    assert.equal((await fetch(`${base}/`)).status, 404);
    assert.equal((await fetch(`${base}/metrics/extra`)).status, 404);
    assert.equal((await fetch(`${base}/debug/pprof`)).status, 404);
    assert.equal((await fetch(`${base}/metrics`, { method: 'POST', body: 'x' })).status, 405);
    assert.equal((await fetch(`${base}/metrics?name[]=x`)).status, 200);
  });

  it('counts operations by kind and state from KV, and the ones that finished on this replica', async () => {
    const connection: Nats = await connectNats({ servers: [natsUrl], tls: await pki.files('service', 'distribution'), name: 'metrics-test', log });
    const kind: OperationKind<Duration, Duration, Duration, undefined> = {
      kind: 'test.metrics',
      requestType: Duration,
      metadataType: Duration,
      responseType: Duration,
      async run(context) {
        if (context.request.seconds === '0') throw new Error('asked to fail');
        return context.request;
      },
    };
    const manager = await OperationManager.open({
      js: connection.jetstream,
      log,
      pageTokens: await PageTokens.open(connection.jetstream),
      scanIntervalMs: 100,
    });
    try {
      manager.register(kind);
      manager.resumeOrphans();
      const succeeded = await manager.start(kind, { seconds: '1', nanos: 0 }, { seconds: '0', nanos: 0 }, '');
      const failed = await manager.start(kind, { seconds: '0', nanos: 0 }, { seconds: '0', nanos: 0 }, '');
      await manager.wait(succeeded.name, 10_000);
      await manager.wait(failed.name, 10_000);
      const inProcess = async (): Promise<Sample[]> => parseExposition(await metricsRegistry.metrics());
      // The scan reads KV every 100 ms here: both end up counted by state, every state is reported, nothing is left running.
      const expected = { running: 0, orphaned: 0, succeeded: 1, failed: 1, cancelled: 0 };
      const byState = async (): Promise<Record<string, number | undefined>> => {
        const samples = await inProcess();
        return Object.fromEntries(Object.keys(expected).map((state) => [state, valueOf(samples, 'cowherd_operations', { kind: 'test.metrics', state })]));
      };
      await waitFor(async () => (JSON.stringify(await byState()) === JSON.stringify(expected) ? true : undefined)).catch(async (error: unknown) => {
        throw new Error(`cowherd_operations by state: ${JSON.stringify(await byState())}`, { cause: error });
      });
      const samples = await inProcess();
      assert.equal(valueOf(samples, 'cowherd_operations_finished_total', { kind: 'test.metrics', result: 'succeeded' }), 1);
      assert.equal(valueOf(samples, 'cowherd_operations_finished_total', { kind: 'test.metrics', result: 'failed' }), 1);
    } finally {
      await manager.stop();
      await connection.close();
    }
  });
});
