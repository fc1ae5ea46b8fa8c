/**
 * The Kubernetes init step for cowherd's PKI, run by an operator from a checkout of the repository:
 *
 *   node --import tsx deploy/bootstrap/issue-credentials.ts --out .state/k8s [--namespace cowherd] \
 *     [--dns inventory=inventory.example.net] [--dns nats=nats.example.net] [--admin alice]
 *   kubectl apply -k .state/k8s
 *
 * It makes the fleet's CA on the first run (RSA 3072, key 0600; later runs load it), and signs directly
 * with the CA key what must exist before the certificate-authority service can issue anything: NATS's
 * server certificate (also used by the NATS pods' sidecar as its client certificate), one certificate per
 * service, and an admin bundle that stays on the operator's machine. It writes a kustomization with one
 * Secret per identity (`cowherd-tls-<name>`: cert.pem, key.pem, ca.pem) and the CA key Secret
 * (`cowherd-ca-key`: ca-key.pem, ca.pem, bootstrap-certificates.pem), which only the certificate-authority
 * pods mount. The gRPC servers admit only serials the CA has recorded, and these seeds are signed before the
 * CA service runs, so every seed certificate (not its key) goes into bootstrap-certificates.pem, which the CA
 * records as issued at start and whenever the mounted file changes (COWHERD_CA_BOOTSTRAP_CERTIFICATES).
 *
 * These certificates are seeds: every pod copies its Secret into a memory emptyDir at start and renews
 * the copy itself at two thirds of its lifetime (services/common/platform/certificate-renewal.ts), so a running
 * pod never needs the Secret again. A pod that restarts starts from the seed, which must therefore still
 * be valid: run this again (it re-issues only what is past two thirds of its life, or missing, or from
 * another CA, or lacks a DNS name asked for) and re-apply, at least every 60 days (seeds live 90 days).
 * Host certificates are never made here: hosts enroll with join tokens.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { loadOrCreateCertificateAuthority } from '../../services/common/domain/ca-files.js';
import { renewalTime } from '../../services/common/platform/certificate-renewal.js';
import { credentialFiles, issueCredentials, writeCredentials } from '../../services/common/platform/credential-files.js';
import { identityUri, isPrincipalName } from '../../services/common/platform/identity.js';
import { inspectCertificate, type CertificateAndKey } from '../../services/common/platform/pki.js';

/** The in-cluster identities that get a seed certificate, in the order they start. */
export const CLUSTER_IDENTITIES = ['nats', 'certificate-authority', 'inventory', 'distribution', 'cloning'] as const;
/** One of {@link CLUSTER_IDENTITIES}. */
export type ClusterIdentity = (typeof CLUSTER_IDENTITIES)[number];

/** NATS StatefulSet size: each pod's route address must be in NATS's certificate. */
export const NATS_CLUSTER_SIZE = 3;
const SEED_DAYS = 90;
const ADMIN_DAYS = 30;

/** Options of {@link issueClusterCredentials}. */
export interface ClusterCredentialsOptions {
  /** Output directory: CA, credentials, admin bundle and the kustomization of the Secrets. */
  readonly directory: string;
  /** Namespace of the control plane (deploy/base). Default `cowherd`. */
  readonly namespace?: string;
  /** Cluster DNS domain. Default `cluster.local`. */
  readonly clusterDomain?: string;
  /** Extra DNS names per identity: the names hosts outside the cluster use (load balancers). */
  readonly extraDnsNames?: Readonly<Partial<Record<ClusterIdentity, readonly string[]>>>;
  /** Admin user whose bundle is written to `<directory>/admin/<user>`. Default `operator`. */
  readonly adminUser?: string;
  /** Seed lifetime in days. Default 90 (the longest IssueCertificate allows; renewal keeps it). */
  readonly seedDays?: number;
  readonly say?: (line: string) => void;
}

/** What {@link issueClusterCredentials} wrote. */
export interface ClusterCredentials {
  readonly caCertificateFile: string;
  /** The identities whose seed was (re)issued by this run; the others were still good. */
  readonly issued: readonly string[];
  readonly kustomizationFile: string;
  readonly adminDirectory: string;
}

/** The DNS names an in-cluster identity's certificate carries: its Service, short and qualified. */
export function clusterDnsNames(identity: ClusterIdentity, namespace: string, clusterDomain: string, extra: readonly string[] = []): string[] {
  const service = (name: string): string[] => [name, `${name}.${namespace}`, `${name}.${namespace}.svc`, `${name}.${namespace}.svc.${clusterDomain}`];
  const names = service(identity);
  if (identity === 'nats') {
    // Routes between the servers dial each pod by its stable name through the headless Service; the
    // sidecar in each pod talks to its own server over localhost.
    for (let index = 0; index < NATS_CLUSTER_SIZE; index++) {
      names.push(
        `nats-${index}.nats-headless`,
        `nats-${index}.nats-headless.${namespace}.svc`,
        `nats-${index}.nats-headless.${namespace}.svc.${clusterDomain}`,
      );
    }
    names.push('localhost');
  }
  return [...new Set([...names, ...extra])];
}

/** Makes or loads the CA, (re)issues the seeds that need it, writes the Secrets' kustomization. */
export async function issueClusterCredentials(options: ClusterCredentialsOptions): Promise<ClusterCredentials> {
  const directory = resolve(options.directory);
  const namespace = options.namespace ?? 'cowherd';
  const clusterDomain = options.clusterDomain ?? 'cluster.local';
  const adminUser = options.adminUser ?? 'operator';
  const seedSeconds = (options.seedDays ?? SEED_DAYS) * 86_400;
  const say = options.say ?? (() => undefined);
  if (!isPrincipalName(adminUser)) throw new Error(`--admin ${JSON.stringify(adminUser)} is not a valid user name`);
  if (!isPrincipalName(namespace)) throw new Error(`--namespace ${JSON.stringify(namespace)} is not a valid namespace`);

  const caKeyFile = join(directory, 'ca', 'ca-key.pem');
  const caCertificateFile = join(directory, 'ca', 'ca.pem');
  const ca = await loadOrCreateCertificateAuthority(caKeyFile, caCertificateFile, () => say(`creating the fleet's CA in ${join(directory, 'ca')}`));
  const issued: string[] = [];
  for (const name of CLUSTER_IDENTITIES) {
    const dnsNames = clusterDnsNames(name, namespace, clusterDomain, options.extraDnsNames?.[name]);
    if (await ensureSeed(ca, join(directory, 'credentials', name), identityUri('service', name), dnsNames, seedSeconds))
      issued.push(identityUri('service', name));
  }
  const adminDirectory = join(directory, 'admin', adminUser);
  if (await ensureSeed(ca, adminDirectory, identityUri('admin', adminUser), [], ADMIN_DAYS * 86_400)) issued.push(identityUri('admin', adminUser));
  for (const identity of issued) say(`issued ${identity}`);
  const seedFiles = [...CLUSTER_IDENTITIES.map((name) => join(directory, 'credentials', name)), adminDirectory].map(
    (seed) => credentialFiles(seed).certificateFile,
  );
  const bootstrapCertificates = (await Promise.all(seedFiles.map((file) => readFile(file, 'utf8')))).join('');
  await writeFile(join(directory, 'ca', 'bootstrap-certificates.pem'), bootstrapCertificates, { mode: 0o644 });

  const kustomizationFile = join(directory, 'kustomization.yaml');
  await writeFile(kustomizationFile, renderSecretsKustomization(namespace), { mode: 0o600 });
  return { caCertificateFile, issued, kustomizationFile, adminDirectory };
}

/** The kustomization that turns the files into Secrets (fixed names: the manifests refer to them). */
export function renderSecretsKustomization(namespace: string): string {
  const lines = [
    '# Written by deploy/bootstrap/issue-credentials.ts. Apply with `kubectl apply -k <this directory>`.',
    '# Holds the CA key: keep this directory as safe as the key itself (see deploy/README.md, backups).',
    'apiVersion: kustomize.config.k8s.io/v1beta1',
    'kind: Kustomization',
    `namespace: ${namespace}`,
    'generatorOptions:',
    '  disableNameSuffixHash: true',
    '  labels:',
    '    app.kubernetes.io/part-of: cowherd',
    'secretGenerator:',
    '  - name: cowherd-ca-key',
    '    type: Opaque',
    '    files:',
    '      - ca-key.pem=ca/ca-key.pem',
    '      - ca.pem=ca/ca.pem',
    '      - bootstrap-certificates.pem=ca/bootstrap-certificates.pem',
  ];
  for (const name of CLUSTER_IDENTITIES) {
    lines.push(
      `  - name: cowherd-tls-${name}`,
      '    type: Opaque',
      '    files:',
      `      - cert.pem=credentials/${name}/cert.pem`,
      `      - key.pem=credentials/${name}/key.pem`,
      `      - ca.pem=credentials/${name}/ca.pem`,
    );
  }
  return `${lines.join('\n')}\n`;
}

/** Issues credentials unless `directory` holds good ones; true when it issued. */
async function ensureSeed(ca: CertificateAndKey, directory: string, identity: string, dnsNames: readonly string[], ttlSeconds: number): Promise<boolean> {
  const files = credentialFiles(directory);
  if (existsSync(files.certificateFile) && existsSync(files.privateKeyFile) && existsSync(files.caFile)) {
    const facts = inspectCertificate(await readFile(files.certificateFile, 'utf8'));
    const sameCa = (await readFile(files.caFile, 'utf8')) === ca.certificatePem;
    const fresh = Date.now() < renewalTime(facts.notBefore, facts.notAfter).getTime();
    const hasNames = dnsNames.every((name) => facts.dnsNames.includes(name));
    if (sameCa && fresh && hasNames && facts.identity?.uri === identity) return false;
  }
  await mkdir(directory, { recursive: true, mode: 0o700 });
  await writeCredentials(directory, await issueCredentials(ca, identity, { dnsNames, ttlSeconds }));
  return true;
}

/** Parses `--dns name=a,b` values into extra DNS names per identity. */
export function parseExtraDnsNames(values: readonly string[]): Partial<Record<ClusterIdentity, string[]>> {
  const result: Partial<Record<ClusterIdentity, string[]>> = {};
  for (const value of values) {
    const match = /^([a-z-]+)=(.+)$/.exec(value);
    const name = match?.[1] as ClusterIdentity | undefined;
    if (!match || name === undefined || !CLUSTER_IDENTITIES.includes(name))
      throw new Error(`--dns ${JSON.stringify(value)}: expected <${CLUSTER_IDENTITIES.join('|')}>=<dns name>[,<dns name>...]`);
    const names = match[2]!
      .split(',')
      .map((part) => part.trim().toLowerCase())
      .filter((part) => part !== '');
    for (const dnsName of names)
      if (!/^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/.test(dnsName))
        throw new Error(`--dns ${JSON.stringify(value)}: ${JSON.stringify(dnsName)} is not a DNS name`);
    result[name] = [...(result[name] ?? []), ...names];
  }
  return result;
}

async function main(argv: readonly string[]): Promise<number> {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      out: { type: 'string', default: fileURLToPath(new URL('../../.state/k8s', import.meta.url)) },
      namespace: { type: 'string', default: 'cowherd' },
      'cluster-domain': { type: 'string', default: 'cluster.local' },
      dns: { type: 'string', multiple: true, default: [] },
      admin: { type: 'string', default: 'operator' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      'usage: node --import tsx deploy/bootstrap/issue-credentials.ts [--out DIR] [--namespace NS] [--cluster-domain D]\n' +
        '         [--dns <identity>=<name>[,<name>]]... [--admin USER]\n' +
        `identities: ${CLUSTER_IDENTITIES.join(', ')}\nthen: kubectl apply -k DIR\n`,
    );
    return 0;
  }
  const result = await issueClusterCredentials({
    directory: values.out,
    namespace: values.namespace,
    clusterDomain: values['cluster-domain'],
    extraDnsNames: parseExtraDnsNames(values.dns),
    adminUser: values.admin,
    say: (line) => void process.stdout.write(`${line}\n`),
  });
  process.stdout.write(`Secrets kustomization: ${result.kustomizationFile}\nnext: kubectl apply -k ${resolve(values.out)}\n`);
  process.stdout.write(`admin bundle (cert.pem, key.pem, ca.pem): ${result.adminDirectory}\n`);
  return 0;
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      process.stderr.write(`issue-credentials: ${(error as Error).message}\n`);
      process.exit(1);
    },
  );
}
