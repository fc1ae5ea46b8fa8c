/**
 * The Kubernetes deployment (deploy/), checked offline: no cluster and no container engine here.
 *
 * - Every kustomization renders with kustomize (kubectl's built-in, v5; scripts/install.sh provides it).
 * - Every rendered object is validated against the Kubernetes API schemas of kubernetes-models 4.5.1
 *   (types, formats, enums, required fields) and, beyond what that validator does, for unknown fields: the
 *   generated validators read every field their schema knows, so a field the validation never read is not
 *   in the schema (a typo such as `readOnlyRootFilesytem` would otherwise be dropped silently by the API).
 * - The policies of the issue: probes, security context, replicas, PDBs, pinned images, no secrets in
 *   ConfigMaps, a port named grpc on every cowherd Service, default-deny NetworkPolicies, and the
 *   decisions deploy/README.md documents (CA key only in the CA, hostPath only where needed, ...).
 * - The pieces around the manifests: the credentials bootstrap renders Secrets whose names the manifests
 *   use, nats-server accepts the NATS configuration, systemd accepts the agent unit, deploy/'s TypeScript
 *   type-checks, and the Containerfile builds what the manifests run (statically: no engine to build it).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { parseAllDocuments } from 'yaml';
import { clusterDnsNames, CLUSTER_IDENTITIES, issueClusterCredentials } from '../../deploy/bootstrap/issue-credentials.js';
import { COWHERD_BUCKETS, SIDECAR_VARIABLES, parseStaticIdentities } from '../../deploy/nats/nats-sidecar.js';
import { openCaRecords } from '../../services/common/domain/ca-records.js';
import { startDaemon } from '../../services/common/platform/child-process.js';
import { writeCredentials } from '../../services/common/platform/credential-files.js';
import { startEmbeddedNats } from '../../services/launcher/embedded-nats.js';
import { createLogger } from '../../services/common/platform/logger.js';
import { identityPrincipal, renderNatsAuthorization } from '../../services/common/platform/nats-authorization.js';
import { connectNats } from '../../services/common/platform/nats.js';
import { inspectCertificate } from '../../services/common/platform/pki.js';
import { Resources, TestPki } from '../harness/index.js';

const run = promisify(execFile);
const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));
const DEPLOY = join(REPOSITORY, 'deploy');
const KUSTOMIZATIONS = ['base', 'agent', 'overlays/dev', 'overlays/production'] as const;
const OVERLAYS = ['overlays/dev', 'overlays/production'] as const;
const COWHERD_SERVICES = ['certificate-authority', 'inventory', 'distribution', 'cloning'] as const;

/** A rendered Kubernetes object (loosely typed: the schema check is what types it). */
type K8sObject = {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [key: string]: any;
};

/** kubectl with kustomize v5: on PATH, or where scripts/install.sh puts its own copy. */
async function findKubectl(): Promise<string> {
  const stateDirectory = process.env['COWHERD_STATE_DIR'] ?? join(REPOSITORY, '.state');
  const candidates = ['kubectl', join(stateDirectory, 'tools', 'bin', 'kubectl')];
  const problems: string[] = [];
  for (const candidate of candidates) {
    try {
      const { stdout } = await run(candidate, ['version', '--client'], { timeout: 30_000 });
      const kustomize = /Kustomize Version: v(\d+)\./.exec(stdout)?.[1];
      if (kustomize !== undefined && Number(kustomize) >= 5) return candidate;
      problems.push(`${candidate}: kustomize ${kustomize ?? 'missing'} (need v5)`);
    } catch (error) {
      problems.push(`${candidate}: ${(error as Error).message.split('\n')[0]}`);
    }
  }
  throw new Error(`no kubectl with kustomize v5 (run scripts/install.sh): ${problems.join('; ')}`);
}

async function render(kubectl: string, directory: string): Promise<K8sObject[]> {
  const { stdout, stderr } = await run(kubectl, ['kustomize', directory], { timeout: 60_000, maxBuffer: 32 * 1024 * 1024 });
  assert.equal(stderr.trim(), '', `kustomize warned for ${directory}`);
  return parseAllDocuments(stdout).map((document) => {
    assert.deepEqual(document.errors, [], `YAML from kustomize ${directory}`);
    const object = document.toJS() as K8sObject;
    // kustomize folds a Secret's base64 into lines; the API server's decoder skips the newlines, the
    // schema's "byte" format does not.
    if (object.kind === 'Secret') for (const key of Object.keys(object.data ?? {})) object.data[key] = String(object.data[key]).replace(/\s+/g, '');
    return object;
  });
}

/** `kind/name` (with the namespace), for messages. */
function id(object: K8sObject): string {
  return `${object.kind}/${object.metadata.namespace ?? '-'}/${object.metadata.name}`;
}

/**
 * Validates with the model class of apiVersion/kind; returns the schema errors and the unknown fields.
 * The validator is called on a proxy that records every field it reads (and every map it iterates).
 */
async function validateObject(object: K8sObject): Promise<string[]> {
  const [group, version] = object.apiVersion.includes('/') ? object.apiVersion.split('/') : ['', object.apiVersion];
  const module = `kubernetes-models/${group === '' ? version : `${group}/${version}`}/${object.kind}`;
  let model: { prototype: { validate(this: unknown): void } };
  try {
    model = (await import(module))[object.kind];
  } catch {
    return [`no schema for ${object.apiVersion} ${object.kind}`];
  }
  const seen = new Set<string>();
  const all = new Set<string>();
  const problems: string[] = [];
  try {
    model.prototype.validate.call(track(object, '', seen, all));
  } catch (error) {
    problems.push(String((error as Error).message));
  }
  for (const path of all) if (!seen.has(path)) problems.push(`unknown field ${path}`);
  return problems;
}

function track(value: unknown, path: string, seen: Set<string>, all: Set<string>): unknown {
  if (value === null || typeof value !== 'object') return value;
  if (!Array.isArray(value)) for (const key of Object.keys(value)) all.add(`${path}/${key}`);
  return new Proxy(value as object, {
    get(target, key, receiver) {
      const result = Reflect.get(target, key, receiver);
      if (typeof key !== 'string' || !Object.prototype.hasOwnProperty.call(target, key)) return result;
      if (!Array.isArray(target)) seen.add(`${path}/${key}`);
      return track(result, `${path}/${key}`, seen, all);
    },
    ownKeys(target) {
      // A map (labels, data, resources.limits) is iterated, not read field by field: all its keys are known.
      if (!Array.isArray(target)) for (const key of Object.keys(target)) seen.add(`${path}/${key}`);
      return Reflect.ownKeys(target);
    },
  });
}

const WORKLOAD_KINDS = new Set(['Deployment', 'StatefulSet', 'DaemonSet']);
const workloads = (objects: readonly K8sObject[]): K8sObject[] => objects.filter((object) => WORKLOAD_KINDS.has(object.kind));
const allContainers = (workload: K8sObject): any[] => [...(workload.spec.template.spec.initContainers ?? []), ...workload.spec.template.spec.containers];
const selects = (selector: Record<string, string>, labels: Record<string, string> = {}): boolean =>
  Object.entries(selector).every(([key, value]) => labels[key] === value);

describe('deploy/: Kubernetes manifests, rendered and validated offline', () => {
  const resources = new Resources();
  let kubectl: string;
  const rendered = new Map<string, K8sObject[]>();

  before(async () => {
    kubectl = await findKubectl();
    for (const directory of KUSTOMIZATIONS) rendered.set(directory, await render(kubectl, join(DEPLOY, directory)));
  });
  after(() => resources.release());

  test('every kustomization renders the objects the design names', () => {
    const overlayKinds = (directory: string): string[] => rendered.get(directory)!.map((object) => `${object.kind}/${object.metadata.name}`);
    for (const overlay of OVERLAYS) {
      const kinds = overlayKinds(overlay);
      for (const name of COWHERD_SERVICES) {
        for (const kind of ['Deployment', 'Service', 'ServiceAccount', 'PodDisruptionBudget'])
          assert.ok(kinds.includes(`${kind}/${name}`), `${overlay}: ${kind}/${name}`);
      }
      for (const expected of [
        'StatefulSet/nats',
        'Service/nats',
        'Service/nats-headless',
        'ConfigMap/nats-config',
        'DaemonSet/agent',
        'ConfigMap/cowherd-config',
        'Namespace/cowherd',
        'Namespace/cowherd-agents',
      ]) {
        assert.ok(kinds.includes(expected), `${overlay}: ${expected}`);
      }
    }
  });

  test('every rendered object matches the Kubernetes API schema, with no unknown field', async () => {
    const problems: string[] = [];
    for (const [directory, objects] of rendered) {
      for (const object of objects) for (const problem of await validateObject(object)) problems.push(`${directory} ${id(object)}: ${problem}`);
    }
    assert.deepEqual(problems, []);
    // The check itself catches what it claims to (a misspelt field, a wrong type).
    const deployment = structuredClone(rendered.get('overlays/dev')!.find((object) => object.kind === 'Deployment')!);
    deployment.spec.template.spec.containers[0].securityContext.readOnlyRootFilesytem = true;
    deployment.spec.replicas = 'two';
    const caught = await validateObject(deployment);
    assert.ok(
      caught.some((problem) => problem.includes('readOnlyRootFilesytem')),
      caught.join('\n'),
    );
    assert.ok(
      caught.some((problem) => problem.includes('replicas')),
      caught.join('\n'),
    );
  });

  for (const overlay of OVERLAYS) {
    describe(`policies: ${overlay}`, () => {
      const objects = (): K8sObject[] => rendered.get(overlay)!;

      test('every container has probes, the services gRPC probes on their plaintext health port', () => {
        for (const workload of workloads(objects())) {
          for (const container of workload.spec.template.spec.containers) {
            assert.ok(container.readinessProbe && container.livenessProbe, `${id(workload)} ${container.name}: readiness and liveness probes`);
            const health = container.ports?.find((port: any) => port.name === 'health');
            if (health) {
              for (const probe of [container.readinessProbe, container.livenessProbe])
                assert.equal(probe.grpc?.port, health.containerPort, `${id(workload)} ${container.name}: gRPC probe on the health port`);
            }
          }
          if (workload.kind === 'Deployment' || workload.kind === 'DaemonSet')
            assert.ok(
              workload.spec.template.spec.containers[0].ports.some((port: any) => port.name === 'health'),
              `${id(workload)}: a health port`,
            );
        }
      });

      test('every container runs non-root, read-only, without privileges, capabilities or a missing seccomp profile', () => {
        for (const workload of workloads(objects())) {
          const pod = workload.spec.template.spec;
          assert.equal(pod.securityContext?.runAsNonRoot, true, `${id(workload)}: pod runAsNonRoot`);
          assert.ok(pod.securityContext?.runAsUser > 0, `${id(workload)}: pod runAsUser`);
          assert.equal(pod.securityContext?.seccompProfile?.type, 'RuntimeDefault', `${id(workload)}: pod seccomp`);
          assert.notEqual(pod.hostPID, true, `${id(workload)}: hostPID`);
          assert.notEqual(pod.hostIPC, true, `${id(workload)}: hostIPC`);
          for (const container of allContainers(workload)) {
            const context = container.securityContext ?? {};
            const where = `${id(workload)} ${container.name}`;
            assert.equal(context.runAsNonRoot, true, `${where}: runAsNonRoot`);
            assert.equal(context.readOnlyRootFilesystem, true, `${where}: readOnlyRootFilesystem`);
            assert.equal(context.allowPrivilegeEscalation, false, `${where}: allowPrivilegeEscalation`);
            assert.notEqual(context.privileged, true, `${where}: privileged`);
            assert.deepEqual(context.capabilities?.drop, ['ALL'], `${where}: capabilities drop ALL`);
            assert.equal(context.capabilities?.add, undefined, `${where}: no capability added`);
            assert.equal(context.seccompProfile?.type, 'RuntimeDefault', `${where}: seccomp RuntimeDefault`);
            assert.notEqual(context.runAsUser, 0, `${where}: not uid 0`);
          }
        }
      });

      test('every container has CPU and memory requests and limits', () => {
        for (const workload of workloads(objects())) {
          for (const container of allContainers(workload)) {
            for (const side of ['requests', 'limits'])
              for (const resource of ['cpu', 'memory'])
                assert.ok(container.resources?.[side]?.[resource], `${id(workload)} ${container.name}: ${side}.${resource}`);
          }
        }
      });

      test('services run 2+ replicas spread over nodes, NATS 3, each with a PodDisruptionBudget', () => {
        const budgets = objects().filter((object) => object.kind === 'PodDisruptionBudget');
        for (const workload of workloads(objects())) {
          const pod = workload.spec.template.spec;
          if (workload.kind === 'Deployment') assert.ok(workload.spec.replicas >= 2, `${id(workload)}: replicas ${workload.spec.replicas}`);
          if (workload.kind === 'StatefulSet') assert.equal(workload.spec.replicas, 3, `${id(workload)}: 3 NATS servers`);
          if (workload.kind === 'DaemonSet') continue;
          const spread = (pod.topologySpreadConstraints ?? []).some((constraint: any) => constraint.topologyKey === 'kubernetes.io/hostname');
          const antiAffinity = (pod.affinity?.podAntiAffinity?.requiredDuringSchedulingIgnoredDuringExecution ?? []).some(
            (term: any) => term.topologyKey === 'kubernetes.io/hostname',
          );
          assert.ok(spread || antiAffinity, `${id(workload)}: spread over nodes`);
          if (overlay === 'overlays/production') assert.ok(antiAffinity, `${id(workload)}: required anti-affinity in production`);
          const budget = budgets.find(
            (candidate) =>
              candidate.metadata.namespace === workload.metadata.namespace &&
              selects(candidate.spec.selector.matchLabels, workload.spec.template.metadata.labels),
          );
          assert.ok(budget, `${id(workload)}: a PodDisruptionBudget`);
          assert.ok(budget.spec.maxUnavailable === 1 || budget.spec.minAvailable >= 1, `${id(budget)}: keeps a replica`);
          if (workload.kind === 'Deployment')
            assert.ok(
              workload.spec.replicas - (budget.spec.maxUnavailable ?? workload.spec.replicas - budget.spec.minAvailable) >= 1,
              `${id(budget)}: allows an eviction yet keeps one`,
            );
        }
      });

      test('every image is pinned to a version tag (no latest, no untagged image)', () => {
        for (const workload of workloads(objects())) {
          for (const container of allContainers(workload)) {
            const image: string = container.image;
            const tag = /^[^@]+:([\w][\w.-]{0,127})$/.exec(image.replace(/^[^/]+:\d+\//, ''))?.[1];
            assert.ok(
              /@sha256:[0-9a-f]{64}$/.test(image) || (tag !== undefined && tag !== 'latest' && /\d/.test(tag)),
              `${id(workload)} ${container.name}: ${image}`,
            );
          }
        }
      });

      test('ConfigMaps hold no secrets; credentials come from Secrets, the CA key only into the CA', () => {
        const secretLooking = [/-----BEGIN/, /PRIVATE KEY/, /\bcjt1\.[\w-]+\./, /\b[A-Za-z0-9+_=-]{40,}\b/];
        for (const map of objects().filter((object) => object.kind === 'ConfigMap')) {
          for (const [key, value] of Object.entries<string>(map.data ?? {})) {
            for (const pattern of secretLooking) assert.doesNotMatch(value, pattern, `${id(map)} ${key}`);
            if (/(TOKEN|PASSWORD|SECRET|KEY)/.test(key)) assert.match(value, /^\/[\w./-]+$/, `${id(map)} ${key}: only a file path`);
          }
          assert.equal(map.binaryData, undefined, `${id(map)}: no binaryData`);
        }
        for (const workload of workloads(objects())) {
          const secrets = (workload.spec.template.spec.volumes ?? []).filter((volume: any) => volume.secret).map((volume: any) => volume.secret.secretName);
          const name = workload.metadata.name;
          assert.equal(
            secrets.includes('cowherd-ca-key'),
            name === 'certificate-authority',
            `${id(workload)}: the CA key Secret is mounted only in the CA (${secrets.join(', ')})`,
          );
          if (workload.kind !== 'DaemonSet') assert.ok(secrets.includes(`cowherd-tls-${name}`), `${id(workload)}: its own certificate Secret`);
          for (const container of allContainers(workload)) {
            for (const variable of container.env ?? [])
              assert.ok(
                variable.valueFrom || !/(-----BEGIN|cjt1\.)/.test(variable.value ?? ''),
                `${id(workload)} ${container.name}: ${variable.name} inline secret`,
              );
          }
        }
      });

      test('every cowherd Service has a port named grpc that reaches a container port of its pods', () => {
        const services = objects().filter((object) => object.kind === 'Service');
        for (const service of services) {
          const pods = workloads(objects()).filter(
            (workload) => workload.metadata.namespace === service.metadata.namespace && selects(service.spec.selector, workload.spec.template.metadata.labels),
          );
          assert.ok(pods.length > 0, `${id(service)}: selects pods`);
          const containerPorts = pods.flatMap((workload) => workload.spec.template.spec.containers.flatMap((container: any) => container.ports ?? []));
          for (const port of service.spec.ports)
            assert.ok(
              containerPorts.some((candidate: any) => candidate.name === port.targetPort || candidate.containerPort === port.targetPort),
              `${id(service)}: port ${port.name} -> ${port.targetPort}`,
            );
          if (service.spec.selector['app.kubernetes.io/name'] !== 'nats')
            assert.ok(
              service.spec.ports.some((port: any) => port.name === 'grpc'),
              `${id(service)}: a port named grpc`,
            );
        }
        for (const name of COWHERD_SERVICES)
          assert.ok(
            services.some((service) => service.metadata.name === name),
            `Service/${name}`,
          );
        assert.deepEqual(
          services
            .find((service) => service.metadata.name === 'certificate-authority')!
            .spec.ports.map((port: any) => port.name)
            .sort(),
          ['enroll', 'grpc'],
        );
        assert.ok(
          services.find((service) => service.metadata.name === 'distribution')!.spec.ports.some((port: any) => port.name === 'tracker' && port.port === 7463),
        );
      });

      test('NetworkPolicies deny by default in every namespace and open only named ports', () => {
        const policies = objects().filter((object) => object.kind === 'NetworkPolicy');
        const namespaces = new Set(workloads(objects()).map((workload) => workload.metadata.namespace));
        for (const namespace of namespaces) {
          assert.ok(
            policies.some(
              (policy) =>
                policy.metadata.namespace === namespace &&
                Object.keys(policy.spec.podSelector).length === 0 &&
                policy.spec.policyTypes.includes('Ingress') &&
                policy.spec.policyTypes.includes('Egress') &&
                policy.spec.ingress === undefined &&
                policy.spec.egress === undefined,
            ),
            `default-deny in ${namespace}`,
          );
        }
        for (const policy of policies) {
          for (const rule of [...(policy.spec.ingress ?? []), ...(policy.spec.egress ?? [])])
            assert.ok(rule.ports?.length > 0 && rule.ports.every((port: any) => port.port !== undefined), `${id(policy)}: every rule names its ports`);
        }
        const ingressPorts = (name: string): number[] =>
          policies
            .filter((policy) => policy.spec.podSelector.matchLabels?.['app.kubernetes.io/name'] === name)
            .flatMap((policy) => (policy.spec.ingress ?? []).flatMap((rule: any) => rule.ports.map((port: any) => port.port)));
        assert.deepEqual(ingressPorts('certificate-authority').sort(), [7440, 7441]);
        assert.deepEqual(ingressPorts('inventory'), [7442]);
        assert.deepEqual(ingressPorts('distribution').sort(), [7443, 7463]);
        assert.deepEqual(ingressPorts('cloning'), [7444]);
        assert.deepEqual(ingressPorts('nats').sort(), [4222, 6222]);
      });

      test('the control plane meets Pod Security "restricted"; only the agents get host access, and only what they need', () => {
        const namespace = objects().find((object) => object.kind === 'Namespace' && object.metadata.name === 'cowherd')!;
        assert.equal(namespace.metadata.labels?.['pod-security.kubernetes.io/enforce'], 'restricted');
        const allowedVolumes = new Set(['configMap', 'secret', 'emptyDir', 'persistentVolumeClaim', 'projected', 'downwardAPI']);
        for (const workload of workloads(objects())) {
          const pod = workload.spec.template.spec;
          assert.equal(pod.automountServiceAccountToken, false, `${id(workload)}: no service account token`);
          const account = objects().find(
            (object) =>
              object.kind === 'ServiceAccount' && object.metadata.name === pod.serviceAccountName && object.metadata.namespace === workload.metadata.namespace,
          );
          assert.equal(account?.automountServiceAccountToken, false, `${id(workload)}: its own ServiceAccount, without a token`);
          if (workload.metadata.namespace === 'cowherd') {
            assert.notEqual(pod.hostNetwork, true, `${id(workload)}: hostNetwork`);
            for (const volume of pod.volumes ?? [])
              assert.ok(
                Object.keys(volume).some((key) => allowedVolumes.has(key)),
                `${id(workload)}: volume ${volume.name}`,
              );
            for (const container of allContainers(workload))
              assert.ok(!(container.ports ?? []).some((port: any) => port.hostPort), `${id(workload)}: hostPort`);
          }
        }
        const agent = workloads(objects()).find((workload) => workload.kind === 'DaemonSet')!;
        const pod = agent.spec.template.spec;
        assert.equal(agent.metadata.namespace, 'cowherd-agents');
        assert.equal(pod.hostNetwork, true);
        assert.equal(pod.dnsPolicy, 'ClusterFirstWithHostNet');
        assert.deepEqual(pod.nodeSelector, { 'cowherd.io/hypervisor': 'kvm' });
        const hostPaths = pod.volumes
          .filter((volume: any) => volume.hostPath)
          .map((volume: any) => volume.hostPath.path)
          .sort();
        assert.deepEqual(hostPaths, ['/run/libvirt', '/var/lib/cowherd/credentials', '/var/lib/cowherd/images']);
        const mounts = pod.containers[0].volumeMounts;
        assert.equal(mounts.find((mount: any) => mount.mountPath === '/run/libvirt')?.readOnly, true, 'libvirt mounted read-only');
        // libvirtd on the host opens the disks the agent names: the image directory keeps its host path.
        assert.ok(
          mounts.some(
            (mount: any) =>
              mount.name === pod.volumes.find((volume: any) => volume.hostPath?.path === '/var/lib/cowherd/images').name &&
              mount.mountPath === '/var/lib/cowherd/images',
          ),
        );
      });

      test('every pod offers a metrics port 9464 named metrics with Prometheus annotations', () => {
        for (const workload of workloads(objects()).filter((workload) => workload.metadata.name !== 'nats')) {
          const ports = workload.spec.template.spec.containers[0].ports;
          assert.ok(
            ports.some((port: any) => port.name === 'metrics' && port.containerPort === 9464),
            `${id(workload)}: metrics port`,
          );
          const annotations = workload.spec.template.metadata.annotations ?? {};
          assert.equal(annotations['prometheus.io/scrape'], 'true', `${id(workload)}`);
          assert.equal(annotations['prometheus.io/port'], '9464', `${id(workload)}`);
        }
      });

      test('configuration names only variables the processes read, and SIGTERM drains within the grace period', async () => {
        const known = await knownVariables();
        const used: Array<[string, string]> = [];
        for (const map of objects().filter((object) => object.kind === 'ConfigMap' && object.metadata.name !== 'nats-config'))
          for (const key of Object.keys(map.data ?? {})) used.push([id(map), key]);
        for (const workload of workloads(objects()))
          for (const container of allContainers(workload))
            for (const variable of container.env ?? []) used.push([`${id(workload)} ${container.name}`, variable.name]);
        for (const [where, name] of used) if (name.startsWith('COWHERD_')) assert.ok(known.has(name), `${where}: ${name} is read by no cowherd process`);
        const config = objects().find((object) => object.kind === 'ConfigMap' && object.metadata.name === 'cowherd-config')!;
        for (const workload of workloads(objects()).filter((workload) => workload.kind === 'Deployment')) {
          assert.ok(
            workload.spec.template.spec.terminationGracePeriodSeconds > Number(config.data.COWHERD_SHUTDOWN_GRACE_SECONDS),
            `${id(workload)}: grace period`,
          );
          assert.deepEqual(workload.spec.template.spec.containers[0].args, [`services/${workload.metadata.name}/main.ts`]);
        }
      });
    });
  }

  test('NATS: the start-up allow-list is what the sidecar renders for its static identities, and nats-server accepts the configuration', async () => {
    const objects = rendered.get('overlays/production')!;
    const config = objects.find((object) => object.kind === 'ConfigMap' && object.metadata.name === 'nats-config')!;
    const nats = objects.find((object) => object.kind === 'StatefulSet' && object.metadata.name === 'nats')!;
    const sidecar = nats.spec.template.spec.containers.find((container: any) => container.name === 'sidecar');
    const env = Object.fromEntries(sidecar.env.map((variable: any) => [variable.name, variable.value]));
    const identities = parseStaticIdentities(env['COWHERD_NATS_STATIC_IDENTITIES']);
    assert.deepEqual(identities.map((identity) => identity.name).sort(), [...CLUSTER_IDENTITIES].sort());
    assert.equal(
      config.data['authorization.conf'],
      renderNatsAuthorization(
        identities.map((identity) => identityPrincipal(identity)),
        [],
      ),
    );
    for (const name of Object.keys(env))
      assert.ok(
        Object.values(SIDECAR_VARIABLES).some((variable) => variable.name === name),
        `sidecar variable ${name}`,
      );
    assert.equal(nats.spec.template.spec.shareProcessNamespace, true, 'the sidecar signals nats-server');

    // nats-server -t parses the whole configuration (TLS files included) with the paths moved into a temp dir.
    const directory = await resources.tempDir('cowherd-test-deploy-nats-');
    const credentials = await issueClusterCredentials({ directory: join(directory, 'bootstrap') });
    const tls = join(directory, 'bootstrap', 'credentials', 'nats');
    const relocate = (text: string): string =>
      text
        .replaceAll('/var/run/cowherd/tls/', `${tls}/`)
        .replaceAll('"/data"', JSON.stringify(join(directory, 'data')))
        .replaceAll('/var/run/nats/', `${directory}/`);
    await mkdir(join(directory, 'data'));
    await writeFile(join(directory, 'nats.conf'), relocate(config.data['nats.conf']));
    await writeFile(join(directory, 'authorization.conf'), config.data['authorization.conf']);
    const { stdout, stderr } = await run('nats-server', ['-c', join(directory, 'nats.conf'), '-t'], {
      env: { ...process.env, SERVER_NAME: 'nats-0' },
      timeout: 30_000,
    });
    assert.match(`${stdout}${stderr}`, /configuration file .* is valid/);
    // Routes dial nats-<i>.nats-headless: the server certificate names each of them.
    const dnsNames = inspectCertificate(await readFile(join(tls, 'cert.pem'), 'utf8')).dnsNames;
    for (const route of config.data['nats.conf'].match(/nats-\d\.nats-headless/g)) assert.ok(dnsNames.includes(route), route);
    assert.ok(credentials.issued.length > 0);
  });

  test('the credentials bootstrap writes the Secrets the manifests mount, and a second run keeps them', async () => {
    const directory = await resources.tempDir('cowherd-test-deploy-credentials-');
    const first = await issueClusterCredentials({ directory, extraDnsNames: { inventory: ['inventory.cowherd.example.net'] }, adminUser: 'alice' });
    assert.deepEqual(
      [...first.issued].sort(),
      [...CLUSTER_IDENTITIES.map((name) => `spiffe://cowherd/service/${name}`), 'spiffe://cowherd/admin/alice'].sort(),
    );
    const second = await issueClusterCredentials({ directory, extraDnsNames: { inventory: ['inventory.cowherd.example.net'] }, adminUser: 'alice' });
    assert.deepEqual(second.issued, [], 'seeds still good are kept');
    for (const name of CLUSTER_IDENTITIES) {
      const facts = inspectCertificate(await readFile(join(directory, 'credentials', name, 'cert.pem'), 'utf8'));
      assert.equal(facts.identity?.uri, `spiffe://cowherd/service/${name}`);
      for (const dnsName of clusterDnsNames(name, 'cowherd', 'cluster.local')) assert.ok(facts.dnsNames.includes(dnsName), `${name}: ${dnsName}`);
      const days = (facts.notAfter.getTime() - facts.notBefore.getTime()) / 86_400_000;
      assert.ok(days > 89 && days < 91, `${name}: a 90-day seed`);
    }
    assert.ok(
      inspectCertificate(await readFile(join(directory, 'credentials', 'inventory', 'cert.pem'), 'utf8')).dnsNames.includes('inventory.cowherd.example.net'),
    );
    // The config's addresses are names in the certificates.
    const config = rendered.get('overlays/production')!;
    const agentConfig = config.find((object) => object.kind === 'ConfigMap' && object.metadata.name === 'agent-config')!.data;
    const serviceConfig = config.find((object) => object.kind === 'ConfigMap' && object.metadata.name === 'cowherd-config')!.data;
    for (const address of [
      agentConfig.COWHERD_NATS_URL,
      agentConfig.COWHERD_CA_ADDRESS,
      agentConfig.COWHERD_ENROLL_ADDRESS,
      agentConfig.COWHERD_INVENTORY_ADDRESS,
      serviceConfig.COWHERD_NATS_URL,
      serviceConfig.COWHERD_CA_ADDRESS,
      serviceConfig.COWHERD_INVENTORY_ADDRESS,
    ]) {
      const host = new URL(address.includes('://') ? address : `tls://${address}`).hostname;
      const identity = CLUSTER_IDENTITIES.find((name) => host === name || host.startsWith(`${name}.`))!;
      assert.ok(identity, address);
      assert.ok(clusterDnsNames(identity, 'cowherd', 'cluster.local').includes(host), `${address} is in ${identity}'s certificate`);
    }

    const secrets = await render(kubectl, directory);
    assert.ok(secrets.every((secret) => secret.kind === 'Secret' && secret.metadata.namespace === 'cowherd'));
    for (const secret of secrets) assert.deepEqual(await validateObject(secret), [], id(secret));
    const made = new Map(secrets.map((secret) => [secret.metadata.name, Object.keys(secret.data).sort()]));
    assert.deepEqual(made.get('cowherd-ca-key'), ['bootstrap-certificates.pem', 'ca-key.pem', 'ca.pem']);
    // Every seed's certificate is in the CA's bootstrap file, which it records as issued.
    const bootstrapBundle = await readFile(join(directory, 'ca', 'bootstrap-certificates.pem'), 'utf8');
    const bootstrapSerials = (bootstrapBundle.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [])
      .map((pem) => inspectCertificate(pem).serialNumber)
      .sort();
    const seedSerials = await Promise.all(
      [...CLUSTER_IDENTITIES.map((name) => join(directory, 'credentials', name)), first.adminDirectory].map(
        async (seed) => inspectCertificate(await readFile(join(seed, 'cert.pem'), 'utf8')).serialNumber,
      ),
    );
    assert.deepEqual(bootstrapSerials, seedSerials.sort());
    for (const overlay of OVERLAYS) {
      for (const workload of workloads(rendered.get(overlay)!)) {
        for (const volume of workload.spec.template.spec.volumes ?? []) {
          if (!volume.secret || volume.secret.optional) continue;
          assert.ok(made.has(volume.secret.secretName), `${overlay} ${id(workload)} mounts ${volume.secret.secretName}, which the bootstrap makes`);
          const mount = [...allContainers(workload)]
            .flatMap((container: any) => container.volumeMounts ?? [])
            .find((candidate: any) => candidate.name === volume.name);
          const copied = allContainers(workload)
            .flatMap((container: any) => container.args ?? [])
            .join(' ');
          // Every key the volume mounts (all of the Secret's unless it names items).
          const keys: string[] = volume.secret.items ? volume.secret.items.map((item: { key: string }) => item.key) : made.get(volume.secret.secretName)!;
          for (const key of keys)
            assert.ok(copied.includes(`${mount.mountPath}/${key}`), `${id(workload)}: ${volume.secret.secretName}/${key} is copied into the live directory`);
        }
      }
    }
  });

  test('the agent systemd unit passes systemd-analyze verify, hardened', async () => {
    const unit = join(DEPLOY, 'systemd', 'cowherd-agent.service');
    const { stdout, stderr } = await run('systemd-analyze', ['verify', unit], { timeout: 60_000 }).catch((error: { stdout: string; stderr: string }) => error);
    const complaints = `${stdout}${stderr}`.split('\n').filter((line) => line.includes('cowherd-agent.service') || /Unknown|Failed|Invalid/i.test(line));
    assert.deepEqual(complaints, []);
    const text = await readFile(unit, 'utf8');
    for (const directive of [
      'NoNewPrivileges=yes',
      'ProtectSystem=strict',
      'ReadWritePaths=/var/lib/cowherd/images /var/lib/cowherd/credentials',
      'CapabilityBoundingSet=',
      'User=cowherd',
      'EnvironmentFile=/etc/cowherd/agent.env',
    ]) {
      assert.ok(text.split('\n').includes(directive), directive);
    }
    const example = await readFile(join(DEPLOY, 'systemd', 'cowherd-agent.env.example'), 'utf8');
    const known = await knownVariables();
    for (const name of example.matchAll(/^#?(COWHERD_[A-Z_]+)=/gm)) assert.ok(known.has(name[1]!), name[1]);
  });

  test("deploy/'s TypeScript type-checks, and the Containerfile builds what the manifests run", async () => {
    await run(process.execPath, [join(REPOSITORY, 'node_modules', 'typescript', 'bin', 'tsc'), '--noEmit', '-p', join(DEPLOY, 'tsconfig.json')], {
      cwd: REPOSITORY,
      timeout: 120_000,
    });
    const containerfile = await readFile(join(DEPLOY, 'Containerfile'), 'utf8');
    const targets = [...containerfile.matchAll(/^FROM\s+(\S+)(?:\s+AS\s+(\S+))?/gim)].map((match) => ({ image: match[1]!, target: match[2] }));
    for (const target of ['services', 'agent', 'nats'])
      assert.ok(
        targets.some((candidate) => candidate.target === target),
        `target ${target}`,
      );
    const pinned = Object.fromEntries([...containerfile.matchAll(/^ARG\s+(\w+)=(\S+)/gm)].map((match) => [match[1], match[2]]));
    for (const { image } of targets) {
      const resolved = image.replace(/^\$\{(\w+)\}$/, (_, name: string) => pinned[name] ?? name);
      if (targets.some((candidate) => candidate.target === resolved)) continue;
      assert.match(resolved, /^[\w./-]+:\d[\w.-]*(-[\w.-]+)?$/, `base image ${image} is pinned to a version`);
    }
    assert.match(containerfile, /npm ci --omit=dev/);
    assert.match(containerfile, /^USER 10001:10001$/m);
    assert.doesNotMatch(containerfile.split(/^FROM .* AS services$/m)[1] ?? '', /^USER root/m);
    // Every program the manifests start exists and is copied into the image.
    for (const overlay of OVERLAYS) {
      for (const workload of workloads(rendered.get(overlay)!)) {
        for (const container of workload.spec.template.spec.containers) {
          const program = [...(container.args ?? [])].join(' ').match(/(services|deploy)\/[\w/-]+\.ts/)?.[0];
          if (container.image.startsWith('cowherd/nats')) continue;
          assert.ok(program && existsSync(join(REPOSITORY, program)), `${id(workload)} ${container.name}: ${program}`);
          assert.ok(
            containerfile.includes(`COPY ${program.split('/')[0]}/`) || containerfile.includes(`COPY ${program.split('/').slice(0, 2).join('/')}/`),
            `${program} is copied into the image`,
          );
        }
      }
    }
    const ignore = await readFile(join(REPOSITORY, '.dockerignore'), 'utf8');
    for (const needed of ['!services/', '!deploy/nats/', '!proto/cowherd.binpb', '!vendor/', '!package-lock.json'])
      assert.ok(ignore.split('\n').includes(needed), needed);
  });
});

describe('deploy/nats/nats-sidecar.ts against a real nats-server', () => {
  test('admits a certificate the CA recorded, refuses it once revoked, and creates the buckets', async () => {
    const resources = new Resources();
    try {
      const directory = await resources.tempDir('cowherd-test-deploy-sidecar-');
      const log = createLogger({ service: 'test', level: 'silent' });
      const pki = await TestPki.create(join(directory, 'pki'));
      const natsTls = await pki.files('service', 'nats');
      const staticIdentities = 'spiffe://cowherd/service/nats,spiffe://cowherd/service/certificate-authority';
      // As in the StatefulSet: nats-server starts with the static users, the sidecar keeps the rest.
      const nats = await startEmbeddedNats({
        directory: join(directory, 'nats'),
        tls: natsTls,
        bootstrapUsers: parseStaticIdentities(staticIdentities).map((identity) => identityPrincipal(identity)),
      });
      resources.defer(() => nats.stop());
      const sidecar = await startDaemon(process.execPath, ['--import', 'tsx', join(DEPLOY, 'nats', 'nats-sidecar.ts')], {
        readyPattern: /NATS users in sync/,
        readyTimeoutMs: 60_000,
        cwd: REPOSITORY,
        env: {
          ...process.env,
          COWHERD_TLS_CERT: natsTls.certificateFile,
          COWHERD_TLS_KEY: natsTls.privateKeyFile,
          COWHERD_TLS_CA: natsTls.caFile,
          COWHERD_NATS_URL: nats.url,
          // Renewal is not due for hours: the CA is never called.
          COWHERD_CA_ADDRESS: 'localhost:1',
          COWHERD_NATS_AUTHORIZATION_FILE: nats.authorizationFile,
          COWHERD_NATS_PID_FILE: nats.pidFile,
          COWHERD_NATS_STATIC_IDENTITIES: staticIdentities,
          COWHERD_NATS_REPLICAS: '1',
        },
      });
      resources.defer(() => sidecar.stop(10_000));

      // The CA's side: a host certificate recorded in the `ca` bucket, as EnrollHost does.
      const ca = await connectNats({ servers: [nats.url], tls: await pki.files('service', 'certificate-authority'), name: 'test-ca', log });
      resources.defer(() => ca.close());
      const records = await openCaRecords(ca.jetstream);
      const host = await pki.credentials('host', 'kvm-01');
      const hostFiles = await writeCredentials(join(directory, 'host'), host);
      const facts = inspectCertificate(host.certificatePem);
      const record = {
        serialNumber: facts.serialNumber,
        identity: facts.identity!.uri,
        dnsNames: facts.dnsNames,
        issueTime: facts.notBefore.toISOString(),
        expireTime: facts.notAfter.toISOString(),
        certificatePem: host.certificatePem,
        issuer: 'spiffe://cowherd/service/certificate-authority',
      };
      const connectHost = async (): Promise<void> => {
        const connection = await connectNats({ servers: [nats.url], tls: hostFiles, name: 'test-host', log, connectTimeoutMs: 1_500 });
        try {
          // A host may publish its own events (and nothing of other hosts): the user has the host's permissions.
          await connection.connection.flush();
        } finally {
          // Also when the flush fails: the revocation's reload can drop the connection just after it was made (the
          // flush then fails at the first reconnect), and a connection nobody closes goes on reconnecting once
          // nats-server is stopped, which kept this process from exiting after its tests had passed.
          await connection.close();
        }
      };
      await assert.rejects(connectHost(), 'not admitted before the CA recorded it');
      await records.certificates.create(`certificate.${facts.serialNumber}`, record);
      await eventually(connectHost, 15_000);
      const authorization = await readFile(nats.authorizationFile, 'utf8');
      assert.match(authorization, new RegExp(`OU=${facts.serialNumber}`), 'one user per certificate, named by its subject');
      assert.match(authorization, /cowherd\.events\.\*\.\*\.kvm-01/, "the host's own event subjects only");

      await records.certificates.put(`certificate.${facts.serialNumber}`, { ...record, revoked: { time: new Date().toISOString(), reason: 1 } });
      await eventually(() => assert.rejects(connectHost()), 15_000);

      await eventually(async () => {
        for (const bucket of COWHERD_BUCKETS) assert.equal((await ca.manager.streams.info(`KV_${bucket}`)).config.num_replicas, 1, bucket);
      }, 30_000);
    } finally {
      await resources.release();
    }
  });
});

/** Retries `check` until it passes or `timeoutMs` is over (then throws its last error). */
async function eventually(check: () => Promise<unknown>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await check();
      return;
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
}

/** Every COWHERD_* variable a cowherd process declares (services/ and deploy/ sources). */
async function knownVariables(): Promise<Set<string>> {
  const { stdout } = await run('grep', ['-rhoE', "'COWHERD_[A-Z_]+'", join(REPOSITORY, 'services'), join(REPOSITORY, 'deploy'), '--include=*.ts']);
  return new Set(
    stdout
      .split('\n')
      .filter((line) => line !== '')
      .map((line) => line.slice(1, -1)),
  );
}
