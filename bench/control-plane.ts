/**
 * bench:control-plane — simulated agents against one real inventory process on a real nats-server.
 * The real certificate authority runs beside it: inventory admits only serials the CA recorded, so the
 * bench's directly signed certificates go into the CA's bootstrap file.
 *
 * 1,000 agents (each its own host identity and mTLS channel) register, report 10 VMs each (10,000 VMs)
 * and heartbeat every 10 s with random phase. A share of them (10%) also sends a partial
 * ReportVirtualMachines with each heartbeat, as agents do when their domains change: one VM changes state,
 * or one VM goes and another comes (the total stays at 10,000). Meanwhile an admin pages through
 * ListVirtualMachines on `hosts/-` (page size 100) at a steady rate.
 *
 * Prints exactly one JSON line on stdout, {"agents","vms","list_p50_ms","list_p99_ms","heartbeats_per_s"},
 * and one JSON line with the details (reports, errors, heartbeat latency, goal) on stderr. Goal: p99 <
 * 100 ms at 1,000 agents with one heartbeat per 10 s, on a 2-core machine. Environment: BENCH_AGENTS,
 * BENCH_VMS_PER_AGENT, BENCH_SECONDS, BENCH_LIST_RATE, BENCH_REPORTING_SHARE.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { InventoryServiceClient } from '../services/gen/cowherd/inventory/v1/inventory_service.js';
import { Host, VirtualMachine, VirtualMachine_State } from '../services/gen/cowherd/inventory/v1/resources.js';
import { Hypervisor } from '../services/gen/cowherd/common/v1/types.js';
import { startDaemon } from '../services/common/platform/child-process.js';
import { createClient } from '../services/common/platform/client.js';
import { issueCredentials, writeCredentials } from '../services/common/platform/credential-files.js';
import { freePort, startEmbeddedNats } from '../services/launcher/embedded-nats.js';
import { identityUri } from '../services/common/platform/identity.js';
import { createCertificateAuthority, generateKeyPair, signLeafCertificate } from '../services/common/platform/pki.js';
import { mutualTlsChannelCredentialsFromPem } from '../services/common/platform/tls.js';
import { call } from '../services/common/platform/client.js';

const AGENTS = Number(process.env['BENCH_AGENTS'] ?? 1000);
const VMS_PER_AGENT = Number(process.env['BENCH_VMS_PER_AGENT'] ?? 10);
const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 30);
const LIST_RATE = Number(process.env['BENCH_LIST_RATE'] ?? 20);
const REPORTING_SHARE = Number(process.env['BENCH_REPORTING_SHARE'] ?? 0.1);
const HEARTBEAT_SECONDS = 10;
const REPOSITORY = fileURLToPath(new URL('..', import.meta.url));

async function limited<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      while (next < items.length) await work(items[next++]!);
    }),
  );
}

function percentile(sorted: readonly number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

async function main(): Promise<void> {
  const directory = await mkdtemp(join(tmpdir(), 'cowherd-bench-'));
  const stops: Array<() => Promise<void>> = [];
  try {
    const ca = await createCertificateAuthority({ bits: 2048 });
    const nats = await startEmbeddedNats({
      directory: join(directory, 'nats'),
      tls: await writeCredentials(join(directory, 'nats-tls'), await issueCredentials(ca, identityUri('service', 'nats'), { dnsNames: ['localhost'] })),
    });
    stops.push(() => nats.stop());
    const inventoryTls = await writeCredentials(
      join(directory, 'inventory'),
      await issueCredentials(ca, identityUri('service', 'inventory'), { dnsNames: ['localhost'] }),
    );

    // One key pair, a certificate per agent: signing is what identities cost, not key generation.
    const keys = await generateKeyPair(2048);
    const agents = Array.from({ length: AGENTS }, (_, i) => `agent-${String(i).padStart(4, '0')}`);
    const agentCertificates = new Map(
      agents.map((host) => [host, signLeafCertificate({ ca, publicKeyPem: keys.publicKeyPem, identity: identityUri('host', host), ttlSeconds: 3600 })]),
    );
    const adminCredentials = await issueCredentials(ca, identityUri('admin', 'bench'));

    // The real CA, which records every certificate signed here (servers admit only serials the CA issued).
    const caTls = await writeCredentials(
      join(directory, 'certificate-authority'),
      await issueCredentials(ca, identityUri('service', 'certificate-authority'), { dnsNames: ['localhost'] }),
    );
    await writeFile(join(directory, 'ca-key.pem'), ca.privateKeyPem, { mode: 0o600 });
    await writeFile(join(directory, 'ca.pem'), ca.certificatePem);
    await writeFile(
      join(directory, 'bootstrap-certificates.pem'),
      [...agentCertificates.values(), adminCredentials.certificatePem, await readFile(inventoryTls.certificateFile, 'utf8')].join(''),
    );
    const caPort = await freePort();
    const caProcess = await startDaemon(process.execPath, ['--import', 'tsx', join(REPOSITORY, 'services/certificate-authority/main.ts')], {
      readyPattern: /"msg":"serving"/,
      readyTimeoutMs: 120_000,
      cwd: REPOSITORY,
      env: {
        PATH: process.env['PATH'] ?? '',
        COWHERD_LISTEN_ADDRESS: `localhost:${caPort}`,
        COWHERD_HEALTH_ADDRESS: 'localhost:0',
        COWHERD_METRICS_ADDRESS: 'localhost:0',
        COWHERD_ENROLL_ADDRESS: 'localhost:0',
        COWHERD_TLS_CERT: caTls.certificateFile,
        COWHERD_TLS_KEY: caTls.privateKeyFile,
        COWHERD_TLS_CA: caTls.caFile,
        COWHERD_NATS_URL: nats.url,
        COWHERD_CA_KEY_FILE: join(directory, 'ca-key.pem'),
        COWHERD_CA_CERT_FILE: join(directory, 'ca.pem'),
        COWHERD_CA_BOOTSTRAP_CERTIFICATES: join(directory, 'bootstrap-certificates.pem'),
      },
    });
    stops.push(() => caProcess.stop(10_000));
    const inventoryPort = await freePort();
    const inventory = await startDaemon(process.execPath, ['--import', 'tsx', join(REPOSITORY, 'services/inventory/main.ts')], {
      readyPattern: /"msg":"serving"/,
      readyTimeoutMs: 60_000,
      cwd: REPOSITORY,
      env: {
        PATH: process.env['PATH'] ?? '',
        COWHERD_LISTEN_ADDRESS: `localhost:${inventoryPort}`,
        COWHERD_HEALTH_ADDRESS: 'localhost:0',
        COWHERD_METRICS_ADDRESS: 'localhost:0',
        COWHERD_TLS_CERT: inventoryTls.certificateFile,
        COWHERD_TLS_KEY: inventoryTls.privateKeyFile,
        COWHERD_TLS_CA: inventoryTls.caFile,
        COWHERD_NATS_URL: nats.url,
        COWHERD_CA_ADDRESS: `localhost:${caPort}`,
        COWHERD_HEARTBEAT_SECONDS: String(HEARTBEAT_SECONDS),
        COWHERD_LOG_LEVEL: 'info',
      },
    });
    stops.push(() => inventory.stop(10_000));
    const address = `localhost:${inventoryPort}`;

    const clients = new Map<string, InventoryServiceClient>();
    for (const host of agents) {
      const certificatePem = agentCertificates.get(host)!;
      clients.set(
        host,
        createClient(
          InventoryServiceClient,
          address,
          mutualTlsChannelCredentialsFromPem({ certificatePem, privateKeyPem: keys.privateKeyPem, caPem: ca.certificatePem }),
          { defaultDeadlineMs: 30_000 },
        ),
      );
    }
    const setupStart = Date.now();
    await limited(agents, 50, async (host) => {
      const client = clients.get(host)!;
      await call((cb) =>
        client.registerHost(
          {
            host: Host.fromPartial({
              name: `hosts/${host}`,
              hostname: host,
              hypervisor: Hypervisor.HYPERVISOR_KVM,
              cpuCount: 32,
              memoryBytes: String(256 * 2 ** 30),
              agentEndpoint: `${host}:7445`,
            }),
          },
          cb,
        ),
      );
      const vms = Array.from({ length: VMS_PER_AGENT }, (_, i) =>
        VirtualMachine.fromPartial({
          name: `hosts/${host}/virtualMachines/vm-${i}`,
          domainName: `vm-${i}`,
          uuid: `${host}-${i}`,
          state: VirtualMachine_State.STATE_RUNNING,
          vcpuCount: 2,
          memoryBytes: String(2 ** 31),
        }),
      );
      await call((cb) => client.reportVirtualMachines({ parent: `hosts/${host}`, virtualMachines: vms, fullSnapshot: true, removedVirtualMachines: [] }, cb));
    });
    const setupSeconds = (Date.now() - setupStart) / 1000;

    const admin = createClient(InventoryServiceClient, address, mutualTlsChannelCredentialsFromPem(adminCredentials), { defaultDeadlineMs: 30_000 });
    const countAll = async (): Promise<number> => {
      let count = 0;
      let pageToken = '';
      do {
        const page = await call<{ virtualMachines: unknown[]; nextPageToken: string }>((cb) =>
          admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 1000, pageToken, filter: '' }, cb),
        );
        count += page.virtualMachines.length;
        pageToken = page.nextPageToken;
      } while (pageToken !== '');
      return count;
    };
    const vms = await countAll();

    // Measure: heartbeats at one per agent per 10 s with random phase, partial reports from a share of the
    // agents with their heartbeats, and paging at LIST_RATE per second.
    const vmOf = (host: string, id: string, running: boolean): VirtualMachine =>
      VirtualMachine.fromPartial({
        name: `hosts/${host}/virtualMachines/${id}`,
        domainName: id,
        uuid: `${host}-${id}`,
        state: running ? VirtualMachine_State.STATE_RUNNING : VirtualMachine_State.STATE_SHUT_OFF,
        vcpuCount: 2,
        memoryBytes: String(2 ** 31),
      });
    let heartbeats = 0;
    let heartbeatErrors = 0;
    const heartbeatLatencies: number[] = [];
    let reports = 0;
    let reportErrors = 0;
    const reportLatencies: number[] = [];
    const deadline = Date.now() + SECONDS * 1000;
    const timers: NodeJS.Timeout[] = [];
    const reporting = new Set(agents.filter((_, index) => index < Math.round(AGENTS * REPORTING_SHARE)));
    for (const host of agents) {
      const client = clients.get(host)!;
      // What this simulated host has: its VM ids and which run. Its reports go one at a time, as an agent's do.
      const ids = Array.from({ length: VMS_PER_AGENT }, (_, i) => `vm-${i}`);
      const running = new Set(ids);
      let round = 0;
      let reportInFlight = false;
      const report = (): void => {
        if (reportInFlight || ids.length === 0) return;
        round++;
        const slot = round % ids.length;
        let request: { virtualMachines: VirtualMachine[]; removedVirtualMachines: string[] };
        if (round % 2 === 1) {
          // A domain started or stopped.
          const id = ids[slot]!;
          if (running.has(id)) running.delete(id);
          else running.add(id);
          request = { virtualMachines: [vmOf(host, id, running.has(id))], removedVirtualMachines: [] };
        } else {
          // A domain undefined and another defined.
          const gone = ids[slot]!;
          const added = `vm-${slot}-r${round}`;
          ids[slot] = added;
          running.delete(gone);
          running.add(added);
          request = { virtualMachines: [vmOf(host, added, true)], removedVirtualMachines: [`hosts/${host}/virtualMachines/${gone}`] };
        }
        reportInFlight = true;
        const started = performance.now();
        client.reportVirtualMachines({ parent: `hosts/${host}`, fullSnapshot: false, ...request }, (error) => {
          reportInFlight = false;
          if (error) reportErrors++;
          else {
            reports++;
            reportLatencies.push(performance.now() - started);
          }
        });
      };
      const beat = (): void => {
        if (Date.now() >= deadline) return;
        const started = performance.now();
        client.heartbeat({ host: `hosts/${host}`, memoryFreeBytes: '1', imageDirectoryFreeBytes: '1', imageDirectoryTotalBytes: '1' }, (error) => {
          if (error) heartbeatErrors++;
          else {
            heartbeats++;
            heartbeatLatencies.push(performance.now() - started);
          }
        });
        if (reporting.has(host)) report();
        timers.push(setTimeout(beat, HEARTBEAT_SECONDS * 1000));
      };
      timers.push(setTimeout(beat, Math.random() * HEARTBEAT_SECONDS * 1000));
    }
    const listLatencies: number[] = [];
    let listErrors = 0;
    let pageToken = '';
    const measureStart = Date.now();
    while (Date.now() < deadline) {
      const tickStart = Date.now();
      const started = performance.now();
      try {
        const page = await call<{ nextPageToken: string }>((cb) => admin.listVirtualMachines({ parent: 'hosts/-', pageSize: 100, pageToken, filter: '' }, cb));
        listLatencies.push(performance.now() - started);
        pageToken = page.nextPageToken;
      } catch {
        listErrors++;
        pageToken = '';
      }
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, 1000 / LIST_RATE - (Date.now() - tickStart))));
    }
    const measuredSeconds = (Date.now() - measureStart) / 1000;
    for (const timer of timers) clearTimeout(timer);
    await new Promise((resolve) => setTimeout(resolve, 500));
    const vmsAfter = await countAll();

    listLatencies.sort((a, b) => a - b);
    heartbeatLatencies.sort((a, b) => a - b);
    reportLatencies.sort((a, b) => a - b);
    const p99 = percentile(listLatencies, 99);
    const round = (value: number): number => Math.round(value * 100) / 100;
    const heartbeatsPerSecond = heartbeats / measuredSeconds;
    // stdout: the result, exactly these keys; stderr: what explains it.
    process.stdout.write(
      `${JSON.stringify({ agents: AGENTS, vms, list_p50_ms: round(percentile(listLatencies, 50)), list_p99_ms: round(p99), heartbeats_per_s: round(heartbeatsPerSecond) })}\n`,
    );
    process.stderr.write(
      `${JSON.stringify({
        list_calls: listLatencies.length,
        list_errors: listErrors,
        list_page_size: 100,
        heartbeat_target_per_s: AGENTS / HEARTBEAT_SECONDS,
        heartbeat_errors: heartbeatErrors,
        heartbeat_p99_ms: round(percentile(heartbeatLatencies, 99)),
        reporting_agents: reporting.size,
        reports_per_s: round(reports / measuredSeconds),
        report_errors: reportErrors,
        report_p50_ms: round(percentile(reportLatencies, 50)),
        report_p99_ms: round(percentile(reportLatencies, 99)),
        vms_after: vmsAfter,
        setup_s: round(setupSeconds),
        measured_s: round(measuredSeconds),
        goal_met: p99 < 100 && heartbeatErrors === 0 && reportErrors === 0 && listErrors === 0 && heartbeatsPerSecond >= 0.9 * (AGENTS / HEARTBEAT_SECONDS),
      })}\n`,
    );
    for (const client of clients.values()) client.close();
    admin.close();
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => undefined);
    await rm(directory, { recursive: true, force: true });
  }
}

await main();
