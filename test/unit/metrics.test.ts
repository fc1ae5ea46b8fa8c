/** Unit tests of services/common/platform/metrics.ts and the places that feed it, without NATS or gRPC servers. */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import type { JetStreamClient } from '@nats-io/jetstream';
import { CloneEngine } from '../../services/agent/clone-engine.js';
import type { Libvirt } from '../../services/agent/hypervisor/libvirt.js';
import { readConfig } from '../../services/common/platform/config.js';
import { CLONE_DONE } from '../../services/common/domain/event-types.js';
import { JetStreamEventPublisher } from '../../services/common/platform/events.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { counter, distributionMetrics, metricsRegistry, recordRpc, serveMetrics } from '../../services/common/platform/metrics.js';
import { serverVariables } from '../../services/common/platform/service-process.js';
import type { CloneDone } from '../../services/gen/cowherd/events/v1/events.js';
import { DiskBackend } from '../../services/gen/cowherd/common/v1/types.js';
import { writeTinyReplica } from '../harness/index.js';

const log = createLogger({ service: 'test', level: 'silent' });

/** The value of one labelled series of a metric in the process registry (0 when absent). */
async function valueOf(name: string, labels: Record<string, string>): Promise<number> {
  const metric = metricsRegistry.getSingleMetric(name);
  assert.ok(metric, `${name} is registered`);
  const { values } = await metric.get();
  return values.find((value) => Object.entries(labels).every(([key, expected]) => value.labels[key] === expected))?.value ?? 0;
}

const cloneDone: CloneDone = {
  imageVersion: '',
  virtualMachine: 'hosts/kvm-01/virtualMachines/a',
  host: 'hosts/kvm-01',
  domainName: 'a',
  uuid: '',
  image: '',
  sourceVirtualMachine: '',
  overlays: [],
  started: false,
  operation: '',
  occurTime: undefined,
  diskBackend: DiskBackend.DISK_BACKEND_QCOW2_OVERLAY,
};

describe('metrics', () => {
  it('count event publishes and publish failures by event type', async () => {
    let fail = false;
    const js = {
      publish: async () => (fail ? Promise.reject(new Error('no responders')) : { seq: 7, duplicate: false, stream: 'COWHERD_EVENTS' }),
    } as unknown as JetStreamClient;
    const publisher = new JetStreamEventPublisher(js, log);
    const published = await valueOf('cowherd_events_published_total', { type: 'clone.done' });
    const failed = await valueOf('cowherd_event_publish_failures_total', { type: 'clone.done' });

    assert.equal(await publisher.publish(CLONE_DONE, cloneDone, { host: 'kvm-01', id: 'clone.done/x' }), 7);
    fail = true;
    await assert.rejects(publisher.publish(CLONE_DONE, cloneDone, { host: 'kvm-01', id: 'clone.done/y' }), /no responders/);
    await assert.rejects(publisher.publish(CLONE_DONE, cloneDone, { host: 'kvm-01', id: 'clone.done/z' }), /no responders/);

    assert.equal(await valueOf('cowherd_events_published_total', { type: 'clone.done' }), published + 1);
    assert.equal(await valueOf('cowherd_event_publish_failures_total', { type: 'clone.done' }), failed + 2);
  });

  it('split the gRPC path into service and method labels', async () => {
    recordRpc('/cowherd.test.v1.TestService/DoThing', 'NOT_FOUND', 0.02);
    assert.equal(await valueOf('cowherd_rpc_requests_total', { service: 'cowherd.test.v1.TestService', method: 'DoThing', code: 'NOT_FOUND' }), 1);
    const text = await metricsRegistry.getSingleMetricAsString('cowherd_rpc_duration_seconds');
    assert.match(text, /cowherd_rpc_duration_seconds_bucket\{le="0\.025",service="cowherd\.test\.v1\.TestService",method="DoThing"\} 1/);
  });

  it('record distribution bytes and rates by image id, whatever form of the name the swarm has', async () => {
    distributionMetrics.addBytes('images/debian-12', 'download', 1000);
    distributionMetrics.addBytes('debian-12', 'download', 24);
    distributionMetrics.addBytes('debian-12', 'upload', 0);
    distributionMetrics.setRate('images/debian-12', 'download', 4096);
    distributionMetrics.setRate('debian-12', 'upload', -1);
    assert.equal(await valueOf('cowherd_distribution_bytes_total', { image: 'debian-12', direction: 'download' }), 1024);
    assert.equal(await valueOf('cowherd_distribution_rate_bytes_per_second', { image: 'debian-12', direction: 'download' }), 4096);
    assert.equal(await valueOf('cowherd_distribution_rate_bytes_per_second', { image: 'debian-12', direction: 'upload' }), 0);
    distributionMetrics.forget('images/debian-12');
    const rates = await metricsRegistry.getSingleMetric('cowherd_distribution_rate_bytes_per_second')!.get();
    assert.equal(rates.values.filter((value) => value.labels['image'] === 'debian-12').length, 0);
    assert.equal(await valueOf('cowherd_distribution_bytes_total', { image: 'debian-12', direction: 'download' }), 1024, 'counters stay');
  });

  it('time each clone an agent makes, by result (real qemu-img, fake libvirt)', async () => {
    const directory = await mkdtemp(join(tmpdir(), 'cowherd-clone-metrics-'));
    try {
      await writeTinyReplica(directory);
      // libvirt refuses the clone named refused-*; the other one is defined.
      const define = async (xml: string): Promise<void> => {
        if (xml.includes('refused-')) throw new Error('refused');
      };
      const libvirt = { uri: 'test:///default', listDomains: async () => [], define } as unknown as Libvirt;
      const engine = new CloneEngine({
        host: 'kvm-01',
        imageDirectory: directory,
        hypervisor: 'kvm',
        libvirt,
        events: { publish: async () => undefined },
        log,
      });
      const count = async (result: string): Promise<number> => {
        const { values } = await metricsRegistry.getSingleMetric('cowherd_clone_duration_seconds')!.get();
        return (
          (values as Array<{ metricName?: string; labels: Record<string, unknown>; value: number }>).find(
            (value) => value.metricName === 'cowherd_clone_duration_seconds_count' && value.labels['result'] === result,
          )?.value ?? 0
        );
      };
      const doneBefore = await count('done');
      const failedBefore = await count('failed');
      const results = await engine.createClones({
        dataDiskBytes: '0',
        guestConfiguration: undefined,
        guestConfigurationDigest: '',
        source: { $case: 'image', value: 'images/tiny' },
        clones: [
          { index: 0, domainName: 'made-1', start: false },
          { index: 0, domainName: 'refused-1', start: false },
        ],
        operation: '',
        requestId: '',
        stream: false,
        diskBackend: 0,
        validateOnly: false,
      });
      assert.deepEqual(
        results.map((result) => result.virtualMachine !== undefined),
        [true, false],
      );
      assert.equal(await count('done'), doneBefore + 1);
      assert.equal(await count('failed'), failedBefore + 1);
    } finally {
      await rm(directory, { recursive: true, force: true });
    }
  });

  it('refuse metric names outside the cowherd_ namespace and counters without _total', () => {
    assert.throws(() => counter({ name: 'requests_total', help: 'x' }), /must start with cowherd_/);
    assert.throws(() => counter({ name: 'cowherd_requests', help: 'x' }), /must end with _total/);
  });

  it('read COWHERD_METRICS_ADDRESS: a per-process default, port 0, or off', () => {
    const spec = { metricsAddress: serverVariables('cloning').metricsAddress };
    assert.equal(readConfig(spec, {}).metricsAddress, '0.0.0.0:7474');
    assert.equal(readConfig({ metricsAddress: serverVariables('agent').metricsAddress }, {}).metricsAddress, '0.0.0.0:7475');
    assert.equal(readConfig(spec, { COWHERD_METRICS_ADDRESS: '0.0.0.0:9464' }).metricsAddress, '0.0.0.0:9464');
    assert.equal(readConfig(spec, { COWHERD_METRICS_ADDRESS: 'localhost:0' }).metricsAddress, 'localhost:0');
    assert.equal(readConfig(spec, { COWHERD_METRICS_ADDRESS: 'off' }).metricsAddress, undefined);
    assert.throws(() => readConfig(spec, { COWHERD_METRICS_ADDRESS: '9464' }), /COWHERD_METRICS_ADDRESS: must be host:port/);
  });

  it('serve the registry on GET and HEAD /metrics only, and report a busy port', async () => {
    const server = await serveMetrics({ address: '127.0.0.1:0', log });
    try {
      const response = await fetch(`http://127.0.0.1:${server.port}/metrics`);
      assert.equal(response.status, 200);
      assert.match(await response.text(), /# TYPE cowherd_rpc_requests_total counter/);
      assert.equal((await fetch(`http://127.0.0.1:${server.port}/metrics`, { method: 'HEAD' })).status, 200);
      assert.equal((await fetch(`http://127.0.0.1:${server.port}/healthz`)).status, 404);
      assert.equal((await fetch(`http://127.0.0.1:${server.port}/metrics`, { method: 'DELETE' })).status, 405);
      await assert.rejects(serveMetrics({ address: `127.0.0.1:${server.port}`, log }), /cannot serve metrics on 127\.0\.0\.1:\d+: .*EADDRINUSE/);
    } finally {
      await server.stop();
    }
  });
});
