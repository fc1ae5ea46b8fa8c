/**
 * Every service and the agent as real processes on real NATS with real certificates: health SERVING on
 * the mTLS port and the plaintext probe port, reflection that a Python client generated from proto/
 * can use, refusal of callers without a certificate or with one from another CA, clean SIGTERM of each.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { ChannelCredentials, credentials as grpcCredentials } from '@grpc/grpc-js';
import { check } from '../../services/launcher/health-check.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import type { ProcessName } from '../../services/common/platform/service-process.js';
import { Resources, TestPki, startTestNats } from '../harness/index.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from '../harness/processes.js';

const run = promisify(execFile);
const PROCESSES: readonly ProcessName[] = ['certificate-authority', 'inventory', 'distribution', 'cloning', 'agent'];
/** The cowherd service each process serves. */
const SERVICE_OF: Record<ProcessName, string> = {
  'certificate-authority': 'cowherd.certauthority.v1.CertificateAuthorityService',
  inventory: 'cowherd.inventory.v1.InventoryService',
  distribution: 'cowherd.distribution.v1.DistributionService',
  cloning: 'cowherd.cloning.v1.CloningService',
  agent: 'cowherd.agent.v1.AgentService',
};

describe('service processes', () => {
  const resources = new Resources();
  let pki: TestPki;
  const processes = new Map<ProcessName, ServiceProcess>();
  let admin: ChannelCredentials;
  let adminFiles: { certificateFile: string; privateKeyFile: string; caFile: string };

  before(async () => {
    pki = await TestPki.create(await resources.tempDir());
    const nats = await startTestNats(resources, pki);
    adminFiles = await pki.files('admin', 'alice');
    admin = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem });
    // The CA first: every other process follows its revocation list and renews through it.
    const ca = await startCertificateAuthorityProcess(resources, pki, { url: nats.url });
    processes.set('certificate-authority', ca);
    await Promise.all(
      PROCESSES.filter((name) => name !== 'certificate-authority').map(async (name) => {
        const tls = await pki.files(name === 'agent' ? 'host' : 'service', name === 'agent' ? 'test-host' : name);
        processes.set(name, await startServiceProcess(resources, name, tls, nats.url, { COWHERD_CA_ADDRESS: ca.address }));
      }),
    );
  });
  after(() => resources.release());

  it('answer health SERVING on the mTLS port and on the plaintext probe port', async () => {
    for (const [name, process] of processes) {
      assert.equal(await check(process.address, admin), 'SERVING', `${name} mTLS`);
      assert.equal(await check(process.healthAddress, grpcCredentials.createInsecure()), 'SERVING', `${name} probe`);
      assert.equal(await check(process.address, admin, SERVICE_OF[name]), 'SERVING', `${name} ${SERVICE_OF[name]}`);
    }
  });

  it('serve reflection that a Python client generated from proto/ lists and uses over mTLS', async () => {
    const addresses = [...processes.values()].map((process) => process.address);
    const { stdout } = await run(
      '/usr/bin/python3',
      [`${REPOSITORY}/test/python/reflection_client.py`, adminFiles.certificateFile, adminFiles.privateKeyFile, adminFiles.caFile, ...addresses],
      { timeout: 120_000 },
    );
    const results = stdout
      .trim()
      .split('\n')
      .map(
        (line) => JSON.parse(line) as { address: string; services: string[]; health: Record<string, string>; descriptors_ok: boolean; error: string | null },
      );
    assert.equal(results.length, processes.size);
    for (const [name, process] of processes) {
      const result = results.find((item) => item.address === process.address);
      assert.ok(result, name);
      assert.equal(result.error, null, `${name}: ${result.error}`);
      assert.ok(result.services.includes(SERVICE_OF[name]), `${name} lists ${SERVICE_OF[name]}: ${result.services.join(', ')}`);
      assert.ok(result.services.includes('grpc.health.v1.Health'));
      assert.ok(result.services.includes('grpc.reflection.v1.ServerReflection'));
      assert.ok(result.descriptors_ok, `${name}: descriptors resolve with their dependencies`);
      for (const service of result.services.filter((service) => !service.startsWith('grpc.reflection'))) {
        assert.equal(result.health[service], 'SERVING', `${name} ${service}`);
      }
      assert.equal(result.health[''], 'SERVING');
    }
  });

  it('refuse a client without a certificate and one with a certificate from another CA', async () => {
    const otherPki = await TestPki.create(await resources.tempDir(), 'some other CA');
    const stranger = await otherPki.credentials('admin', 'alice');
    const noCertificate = ChannelCredentials.createSsl(Buffer.from(pki.ca.certificatePem));
    const otherCa = mutualTlsChannelCredentialsFromPem({
      certificatePem: stranger.certificatePem,
      privateKeyPem: stranger.privateKeyPem,
      caPem: pki.ca.certificatePem,
    });
    for (const [name, process] of processes) {
      assert.match(await check(process.address, noCertificate), /^error: 14 UNAVAILABLE/, `${name} without certificate`);
      assert.match(await check(process.address, otherCa), /^error: 14 UNAVAILABLE/, `${name} with another CA's certificate`);
    }
  });

  it('answer UNIMPLEMENTED or PERMISSION_DENIED, never crash, on RPCs not built yet', async () => {
    const process = processes.get('inventory')!;
    // Reflection proves the method exists; a raw call with an empty message exercises the boundary.
    const { makeGenericClientConstructor } = await import('@grpc/grpc-js');
    const Client = makeGenericClientConstructor({}, 'x');
    const client = new Client(process.address, admin);
    const code = await new Promise<number>((resolve) => {
      client.makeUnaryRequest(
        '/cowherd.inventory.v1.InventoryService/ListHosts',
        (value: Buffer) => value,
        (value: Buffer) => value,
        Buffer.alloc(0),
        (error) => resolve(error?.code ?? 0),
      );
    });
    client.close();
    assert.ok([0, 12].includes(code), `ListHosts answered ${code}`);
  });

  it('stop cleanly on SIGTERM, every service and the agent', async () => {
    // The way a fleet goes down: the agent first, the services it reports to next, the CA they follow last.
    for (const name of [...PROCESSES].reverse()) {
      const process = processes.get(name)!;
      await process.daemon.stop(10_000);
      assert.equal(await process.daemon.exited, 0, `${name} exits 0 (not killed after its grace time, no failure)`);
      const messages = process.logs.map((line) => line['msg']);
      assert.ok(
        process.logs.some((line) => line['msg'] === 'signal received: draining' && line['signal'] === 'SIGTERM'),
        `${name} drained on SIGTERM`,
      );
      assert.ok(messages.includes('stopped'), `${name} logged "stopped": ${messages.slice(-5).join(' | ')}`);
      assert.ok(!messages.includes('unclean stop'), `${name} stopped cleanly`);
    }
  });

  it('refuse to start with bad configuration, naming every bad variable', async () => {
    const result = await run(process.execPath, ['--import', 'tsx', `${REPOSITORY}/services/inventory/main.ts`], {
      cwd: REPOSITORY,
      env: { PATH: process.env['PATH'] ?? '', COWHERD_LISTEN_ADDRESS: 'nowhere', COWHERD_LOG_LEVEL: 'loud' },
      timeout: 30_000,
    }).then(
      () => undefined,
      (error: { code: number; stderr: string }) => error,
    );
    assert.ok(result, 'start-up failed');
    assert.equal(result.code, 2);
    for (const name of ['COWHERD_LISTEN_ADDRESS', 'COWHERD_LOG_LEVEL', 'COWHERD_TLS_CERT', 'COWHERD_TLS_KEY', 'COWHERD_TLS_CA'])
      assert.match(result.stderr, new RegExp(name));
  });
});
