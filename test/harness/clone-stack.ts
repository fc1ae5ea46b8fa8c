/**
 * The whole clone path on real parts, for tests and benchmarks: NATS, CA, inventory, cloning, and an agent
 * on the private libvirtd, with an image replica laid out on the agent's host as distribution leaves it and
 * its records in inventory's buckets. Publishing is the distribution issue's; until then this is how an
 * image gets onto a host.
 */
import { execFile } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { ChannelCredentials } from '@grpc/grpc-js';
import { CertificateAuthorityServiceClient } from '../../services/gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { CloningServiceClient } from '../../services/gen/cowherd/cloning/v1/cloning_service.js';
import { DistributionServiceClient } from '../../services/gen/cowherd/distribution/v1/distribution_service.js';
import { InventoryServiceClient } from '../../services/gen/cowherd/inventory/v1/inventory_service.js';
import { OperationsClient, type Operation } from '../../services/gen/google/longrunning/operations.js';
import {
  Host_State,
  Image,
  Image_State,
  ImageReplica,
  ImageReplica_State,
  VirtualMachine_State,
  Host,
  type VirtualMachine,
} from '../../services/gen/cowherd/inventory/v1/resources.js';
import { DiskFormat, Hypervisor } from '../../services/gen/cowherd/common/v1/types.js';
import { createClient } from '../../services/common/platform/client.js';
import { freePort } from '../../services/launcher/embedded-nats.js';
import { KvStore, protoCodec } from '../../services/common/platform/kv.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { mutualTlsChannelCredentialsFromPem } from '../../services/common/platform/tls.js';
import { sanitizeDomainTemplate } from '../../services/agent/hypervisor/index.js';
import { Resources, TestPki, startTestNats } from './index.js';
import { call, waitFor } from './grpc.js';
import { REPOSITORY, startCertificateAuthorityProcess, startServiceProcess, type ServiceProcess } from './processes.js';
import { HOST_IMAGE_NAME, HOST_NAME, hostOf, IMAGE_NAME, VIRTUAL_MACHINE_NAME } from '../../services/common/domain/resource-names.js';

const run = promisify(execFile);

/** An agent of the stack. */
export interface StackAgent {
  readonly host: string;
  readonly imageDirectory: string;
  readonly process: ServiceProcess;
  /** Starts the agent again after its process was stopped or killed (same identity and image directory). */
  restart(): Promise<ServiceProcess>;
}

/** A running clone stack. */
export interface CloneStack {
  readonly host: string;
  readonly imageDirectory: string;
  readonly agent: ServiceProcess;
  /** The first agent with its restart (same identity and image directory). */
  readonly firstAgent: StackAgent;
  /** Starts one more agent (another host on this machine); extraEnv overrides its variables. */
  addAgent(host: string, extraEnv?: Record<string, string>): Promise<StackAgent>;
  /** The test CA (credentials for any identity). */
  readonly pki: TestPki;
  /** A NATS connection with the distribution service's identity (KV buckets, durable consumers). */
  readonly connection: Awaited<ReturnType<typeof connectNats>>;
  /** The distribution process (tests kill and restart it). */
  readonly distributionProcess: ServiceProcess;
  /** The cloning process (its logs). */
  readonly cloningProcess: ServiceProcess;
  /**
   * Starts one more replica of distribution or cloning: same NATS, CA and inventory, its own ports (and, for
   * distribution, its own tracker). A cloning replica reaches distribution at the first replica's address.
   */
  startReplica(name: 'distribution' | 'cloning'): Promise<ServiceProcess>;
  /** An admin's mTLS credentials (clients of replicas started with startReplica). */
  readonly adminCredentials: ChannelCredentials;
  readonly cloning: CloningServiceClient;
  readonly distribution: DistributionServiceClient;
  /** google.longrunning.Operations on the distribution service. */
  readonly distributionOperations: OperationsClient;
  readonly operations: OperationsClient;
  readonly inventory: InventoryServiceClient;
  readonly virsh: (...args: string[]) => Promise<{ stdout: string }>;
  /** Lays out `images/<image>/` on the agent's host from a qcow2 base and registers image and replica. */
  addImage(image: string, basePath: string): Promise<string>;
  /** WaitOperation until done (bounded), on the cloning service or on `client`. */
  wait(name: string, timeoutMs?: number, client?: OperationsClient): Promise<Operation>;
  /** Undefines these domains at release. */
  track(...domains: string[]): void;
  /** Writes a replica record as distribution would (tests of rules that need several hosts' replicas). */
  putReplica(replica: ImageReplica): Promise<void>;
  /**
   * Defines a powered-off domain `name` on the first agent's host with one qcow2 disk of `mib` MiB of random data
   * (the source of a PublishImage), tracked for removal, and waits until inventory shows it SHUT_OFF.
   */
  defineSourceVm(name: string, mib: number): Promise<void>;
  /** Waits until inventory shows each of these hosts READY. */
  waitHostsReady(hosts: Iterable<string>): Promise<void>;
}

/** Options of {@link startCloneStack}. */
export interface CloneStackOptions {
  /** Extra variables per service (small deadlines, fast heartbeats), also for replicas started later. */
  readonly serviceEnv?: Partial<Record<'inventory' | 'distribution' | 'cloning', Record<string, string>>>;
  /** Extra variables of the first agent (e.g. COWHERD_DOMAIN_SCOPE=image-directory when more agents share the libvirtd). */
  readonly firstAgentEnv?: Record<string, string>;
}

/** Starts the stack; everything is released with `resources`. */
export async function startCloneStack(resources: Resources, host: string, options: CloneStackOptions = {}): Promise<CloneStack> {
  const extra = (service: 'inventory' | 'distribution' | 'cloning'): Record<string, string> => options.serviceEnv?.[service] ?? {};
  const uri = 'qemu:///system';
  const virsh = (...args: string[]) =>
    run('virsh', ['-c', uri, ...args], { timeout: 120_000, env: { ...process.env, LC_ALL: 'C' }, maxBuffer: 64 * 1024 * 1024 });
  await run('bash', [join(REPOSITORY, 'scripts/libvirtd.sh'), 'start'], { timeout: 120_000 });
  const pki = await TestPki.create(await resources.tempDir());
  const nats = await startTestNats(resources, pki, { issued: 'ca-managed' });
  const ca = await startCertificateAuthorityProcess(resources, pki, nats);
  const inventoryProcess = await startServiceProcess(resources, 'inventory', await pki.files('service', 'inventory'), nats.url, {
    COWHERD_CA_ADDRESS: ca.address,
    ...extra('inventory'),
  });
  const distributionProcess = await startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
    COWHERD_CA_ADDRESS: ca.address,
    COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
    ...extra('distribution'),
  });
  const cloningProcess = await startServiceProcess(resources, 'cloning', await pki.files('service', 'cloning'), nats.url, {
    COWHERD_CA_ADDRESS: ca.address,
    COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
    COWHERD_DISTRIBUTION_ADDRESS: distributionProcess.address,
    ...extra('cloning'),
  });
  const startReplica = async (name: 'distribution' | 'cloning'): Promise<ServiceProcess> =>
    name === 'distribution'
      ? startServiceProcess(resources, 'distribution', await pki.files('service', 'distribution'), nats.url, {
          COWHERD_CA_ADDRESS: ca.address,
          COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
          ...extra('distribution'),
        })
      : startServiceProcess(resources, 'cloning', await pki.files('service', 'cloning'), nats.url, {
          COWHERD_CA_ADDRESS: ca.address,
          COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
          COWHERD_DISTRIBUTION_ADDRESS: distributionProcess.address,
          ...extra('cloning'),
        });
  const directory = await resources.tempDir('cowherd-e2e-');
  const admin = mutualTlsChannelCredentialsFromPem({ ...(await pki.credentials('admin', 'alice')), caPem: pki.ca.certificatePem });
  const caAdmin = createClient(CertificateAuthorityServiceClient, ca.address, admin);
  resources.defer(() => caAdmin.close());
  /** One more agent on this machine, joined with a join token like any host; its own image directory. */
  const startAgent = async (hostId: string, extraEnv: Record<string, string> = {}): Promise<StackAgent> => {
    const token = await call<{ token: string }>((cb) => caAdmin.createJoinToken({ host: hostId, ttl: undefined, requestId: '' }, cb));
    const agentPort = await freePort();
    const hostDirectory = join(directory, hostId);
    const env = {
      COWHERD_LISTEN_ADDRESS: `localhost:${agentPort}`,
      COWHERD_HOST_ID: hostId,
      COWHERD_JOIN_TOKEN: token.token,
      COWHERD_ENROLL_ADDRESS: ca.enrollAddress,
      COWHERD_CREDENTIALS_DIR: join(hostDirectory, 'credentials'),
      COWHERD_CA_ADDRESS: ca.address,
      COWHERD_INVENTORY_ADDRESS: inventoryProcess.address,
      COWHERD_ADVERTISE_ADDRESS: `localhost:${agentPort}`,
      COWHERD_LIBVIRT_URI: uri,
      COWHERD_IMAGE_DIR: join(hostDirectory, 'images-root'),
      COWHERD_TORRENT_PORT: '0',
      COWHERD_WEB_SEED_ADDRESS: '127.0.0.1:0',
      ...extraEnv,
    };
    const process = await startServiceProcess(resources, 'agent', undefined, nats.url, env);
    // A restart keeps the identity (credentials) and the image directory; the token is spent.
    const restartEnv = { ...env, COWHERD_JOIN_TOKEN: '' };
    delete (restartEnv as Record<string, string>)['COWHERD_JOIN_TOKEN'];
    return {
      host: hostId,
      imageDirectory: env.COWHERD_IMAGE_DIR,
      process,
      restart: () => startServiceProcess(resources, 'agent', undefined, nats.url, restartEnv),
    };
  };
  const first = await startAgent(host, options.firstAgentEnv);
  const imageDirectory = first.imageDirectory;
  const agent = first.process;
  const cloning = createClient(CloningServiceClient, cloningProcess.address, admin, { defaultDeadlineMs: 30_000 });
  const distribution = createClient(DistributionServiceClient, distributionProcess.address, admin, { defaultDeadlineMs: 30_000 });
  const distributionOperations = createClient(OperationsClient, distributionProcess.address, admin, { defaultDeadlineMs: 130_000 });
  const operations = createClient(OperationsClient, cloningProcess.address, admin, { defaultDeadlineMs: 130_000 });
  const inventory = createClient(InventoryServiceClient, inventoryProcess.address, admin, { defaultDeadlineMs: 30_000 });
  const domains: string[] = [];
  resources.defer(async () => {
    cloning.close();
    distribution.close();
    distributionOperations.close();
    operations.close();
    inventory.close();
    for (const domain of domains) {
      await virsh('destroy', domain).catch(() => undefined);
      await virsh('undefine', '--nvram', domain).catch(() => virsh('undefine', domain).catch(() => undefined));
    }
  });
  const log = createLogger({ service: 'test', level: 'silent' });
  const connection = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'distribution'), name: 'test-setup', log });
  resources.defer(() => connection.close());
  const images = await KvStore.open(connection.jetstream, 'images', protoCodec(Image));
  const replicas = await KvStore.open(connection.jetstream, 'replicas', protoCodec(ImageReplica));

  return {
    host,
    imageDirectory,
    agent,
    addAgent: startAgent,
    firstAgent: first,
    pki,
    connection,
    cloningProcess,
    distributionProcess,
    startReplica,
    adminCredentials: admin,
    cloning,
    distribution,
    distributionOperations,
    operations,
    inventory,
    virsh,
    track: (...names) => void domains.push(...names),
    putReplica: async (replica) => {
      await replicas.put(`${hostOf(replica.host)}.${IMAGE_NAME.parse(replica.image)?.image}`, replica);
    },
    addImage: async (image, basePath) => {
      const source = `cowherd-template-${image}`;
      const xml = `<domain type='qemu'><name>${source}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${basePath}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><model type='virtio'/></interface></devices></domain>`;
      const template = sanitizeDomainTemplate(xml);
      const replica = join(imageDirectory, 'images', image);
      await mkdir(replica, { recursive: true });
      await run('cp', ['--sparse=always', basePath, join(replica, template.disks[0]!.fileName)]);
      await writeFile(join(replica, 'domain-template.xml'), template.xml);
      const now = new Date();
      await images.put(
        image,
        Image.fromPartial({
          name: IMAGE_NAME.format({ image }),
          hypervisor: Hypervisor.HYPERVISOR_KVM,
          state: Image_State.STATE_AVAILABLE,
          originHost: HOST_NAME.format({ host }),
          domainTemplate: template.xml,
          files: [{ path: template.disks[0]!.fileName, format: DiskFormat.DISK_FORMAT_QCOW2, targetDevice: 'vda' }],
          createTime: now,
          updateTime: now,
        }),
      );
      await replicas.put(
        `${host}.${image}`,
        ImageReplica.fromPartial({
          name: HOST_IMAGE_NAME.format({ host, image }),
          image: IMAGE_NAME.format({ image }),
          host: HOST_NAME.format({ host }),
          state: ImageReplica_State.STATE_AVAILABLE,
          path: replica,
          origin: true,
          createTime: now,
          updateTime: now,
        }),
      );
      return join(replica, template.disks[0]!.fileName);
    },
    defineSourceVm: async (name, mib) => {
      const vmDirectory = join(imageDirectory, 'vms');
      await mkdir(vmDirectory, { recursive: true });
      const raw = join(vmDirectory, `${name}.raw`);
      await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${mib}`, 'status=none']);
      await run('qemu-img', ['convert', '-q', '-O', 'qcow2', raw, join(vmDirectory, `${name}.qcow2`)]);
      await rm(raw, { force: true });
      const xml = `<domain type='qemu'><name>${name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${join(vmDirectory, `${name}.qcow2`)}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`;
      await writeFile(join(vmDirectory, `${name}.xml`), xml);
      await virsh('define', join(vmDirectory, `${name}.xml`));
      domains.push(name);
      await waitFor(`${name} in inventory`, async () =>
        (await call<VirtualMachine>((cb) => inventory.getVirtualMachine({ name: VIRTUAL_MACHINE_NAME.format({ host, virtualMachine: name }) }, cb))).state ===
        VirtualMachine_State.STATE_SHUT_OFF
          ? true
          : undefined,
      );
    },
    waitHostsReady: async (hosts) => {
      for (const name of hosts) {
        await waitFor(`${name} READY`, async () =>
          (await call<Host>((cb) => inventory.getHost({ name: HOST_NAME.format({ host: name }) }, cb))).state === Host_State.STATE_READY ? true : undefined,
        );
      }
    },
    wait: async (name, timeoutMs = 120_000, client = operations) => {
      const deadline = Date.now() + timeoutMs;
      let operation = await call<Operation>((cb) => client.getOperation({ name }, cb));
      while (!operation.done && Date.now() < deadline) {
        operation = await call<Operation>((cb) => client.waitOperation({ name, timeout: { seconds: '10', nanos: 0 } }, cb));
      }
      return operation;
    },
  };
}

/**
 * Caps `host`'s download rate through inventory's UpdateHost (transfer_limits; 0 upload: unlimited) and waits
 * until its agent logs the limits applied once more than before the call.
 */
export async function capDownload(
  stack: Pick<CloneStack, 'inventory'>,
  host: string,
  bytesPerSecond: number,
  agent: { readonly process: Pick<ServiceProcess, 'logs'> },
): Promise<void> {
  const applied = (): number => agent.process.logs.filter((line) => line['msg'] === 'transfer limits applied').length;
  const before = applied();
  await setDownloadLimit(stack.inventory, host, bytesPerSecond);
  await waitFor(`the download cap on ${host}`, async () => (applied() > before ? true : undefined), 30_000);
}

/**
 * Sets `host`'s download rate through inventory's UpdateHost (transfer_limits; 0 upload: unlimited). Its agent
 * applies it with its next heartbeat's answer: {@link capDownload} waits for that.
 */
export async function setDownloadLimit(inventory: Pick<InventoryServiceClient, 'updateHost'>, host: string, bytesPerSecond: number): Promise<void> {
  await call((cb) =>
    inventory.updateHost(
      {
        host: Host.fromPartial({
          name: HOST_NAME.format({ host }),
          transferLimits: { uploadBytesPerSecond: '0', downloadBytesPerSecond: String(bytesPerSecond) },
        }),
        updateMask: ['transfer_limits'],
      },
      cb,
    ),
  );
}
