/**
 * Test harness: temp directories that are removed after the test, a throw-away CA with credentials
 * for any identity, and a real nats-server with JetStream, mutual TLS and per-certificate users on a free port.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { startDaemon, type Daemon } from '../../services/common/platform/child-process.js';
import { writeCredentials, issueCredentials, type Credentials } from '../../services/common/platform/credential-files.js';
import { startEmbeddedNats, type EmbeddedNats } from '../../services/launcher/embedded-nats.js';
import { identityUri, type Identity, type IdentityKind } from '../../services/common/platform/identity.js';
import { FULL_ACCESS, identityPrincipal, type NatsPrincipal } from '../../services/common/platform/nats-authorization.js';
import { createCertificateAuthority, natsUserOf, type CertificateAndKey } from '../../services/common/platform/pki.js';
import type { TlsFiles } from '../../services/common/platform/tls.js';

/** Something to undo at the end of a test file. */
type Cleanup = () => Promise<void> | void;

/** Collects clean-ups and runs them in reverse order. */
export class Resources {
  private readonly cleanups: Cleanup[] = [];

  /** Registers a clean-up. */
  defer(cleanup: Cleanup): void {
    this.cleanups.push(cleanup);
  }

  /** A fresh temp directory, removed by `release`. */
  async tempDir(prefix = 'cowherd-test-'): Promise<string> {
    const directory = await mkdtemp(join(tmpdir(), prefix));
    this.defer(() => rm(directory, { recursive: true, force: true }));
    return directory;
  }

  /** Runs every clean-up, newest first; reports all failures. */
  async release(): Promise<void> {
    const errors: unknown[] = [];
    while (this.cleanups.length > 0) {
      try {
        await this.cleanups.pop()!();
      } catch (error) {
        errors.push(error);
      }
    }
    if (errors.length > 0) throw new AggregateError(errors, 'clean-up failed');
  }
}

/** A certificate TestPki issued. */
export interface IssuedCertificate {
  readonly certificatePem: string;
  readonly identity: Identity;
}

/** A throw-away CA that writes credential directories. */
export class TestPki {
  /** Every certificate issued through {@link credentials} or {@link files}, oldest first. */
  readonly issued: IssuedCertificate[] = [];
  private readonly issueListeners = new Set<(certificate: IssuedCertificate) => Promise<void> | void>();

  private constructor(
    readonly ca: CertificateAndKey,
    private readonly directory: string,
  ) {}

  /** Makes a CA (2048-bit: tests need speed, not strength) under `directory`. */
  static async create(directory: string, commonName = 'cowherd test CA'): Promise<TestPki> {
    return new TestPki(await createCertificateAuthority({ commonName, bits: 2048, validityDays: 2 }), directory);
  }

  /** Calls `listener` (and waits for it) after every certificate issued from now on; returns the unsubscribe. */
  onIssue(listener: (certificate: IssuedCertificate) => Promise<void> | void): () => void {
    this.issueListeners.add(listener);
    return () => void this.issueListeners.delete(listener);
  }

  /** DNS names every certificate issued from now on gets besides localhost (a bench's control-plane host name). */
  extraDnsNames: string[] = [];

  /** Credentials for kind/name, with DNS SAN localhost so it can serve too. */
  async credentials(kind: IdentityKind, name: string, options: { ttlSeconds?: number; notBefore?: Date } = {}): Promise<Credentials> {
    const uri = identityUri(kind, name);
    const credentials = await issueCredentials(this.ca, uri, { dnsNames: ['localhost', ...this.extraDnsNames], ...options });
    const issued: IssuedCertificate = { certificatePem: credentials.certificatePem, identity: { kind, name, uri } };
    this.issued.push(issued);
    for (const listener of [...this.issueListeners]) await listener(issued);
    return credentials;
  }

  /** Writes credentials for kind/name into their own directory and returns the file paths. */
  async files(kind: IdentityKind, name: string, options: { ttlSeconds?: number; notBefore?: Date; subdirectory?: string } = {}): Promise<TlsFiles> {
    return writeCredentials(join(this.directory, options.subdirectory ?? `${kind}-${name}`), await this.credentials(kind, name, options));
  }
}

/** Service names the test NATS admits by URI SAN in the default mode. */
export const TEST_SERVICES = ['certificate-authority', 'inventory', 'distribution', 'cloning', 'nats', 'test'] as const;

/** Options of {@link startTestNats}. */
export interface TestNatsOptions {
  /** The listen address; default 127.0.0.1. */
  readonly host?: string;
  /** Users from the start (least privilege by kind unless a principal says otherwise). */
  readonly users?: readonly NatsPrincipal[];
  /**
   * What happens to certificates `pki` issues (before and after the start):
   * - 'full-access' (default): each becomes a user with every permission, whatever its kind, and the
   *   services in {@link TEST_SERVICES} are admitted by URI SAN too: tests that are not about NATS
   *   authorization connect with any certificate, as before per-certificate users existed;
   * - 'by-kind': each becomes a user with its kind's least-privilege permissions;
   * - 'none': only `users` and later `nats.updateUsers(...)` calls decide (the test manages the list).
   * - 'ca-managed': the certificate authority process keeps the users (as in a fleet); until it first
   *   writes them, the test services are admitted by identity. Certificates the test PKI issues are not
   *   added: the CA's own list would overwrite them anyway.
   */
  readonly issued?: 'full-access' | 'by-kind' | 'none' | 'ca-managed';
}

/**
 * Starts a real nats-server with JetStream, mTLS and per-certificate users; stopped and its data removed
 * on release. In the automatic modes every certificate `pki` issues is added to the users, and the
 * server has applied it before `pki.credentials`/`pki.files` return.
 */
export async function startTestNats(resources: Resources, pki: TestPki, options: TestNatsOptions = {}): Promise<EmbeddedNats> {
  const directory = await resources.tempDir('cowherd-nats-');
  const tls = await pki.files('service', 'nats', { subdirectory: 'nats-server' });
  const mode = options.issued ?? 'full-access';
  const principalOf = (certificate: IssuedCertificate): NatsPrincipal => ({
    user: natsUserOf(certificate.certificatePem),
    identity: certificate.identity,
    ...(mode === 'full-access' ? { permissions: FULL_ACCESS } : {}),
  });
  const bootstrapUsers =
    mode === 'full-access' || mode === 'ca-managed'
      ? TEST_SERVICES.map((name) => identityPrincipal({ kind: 'service', name, uri: identityUri('service', name) }, FULL_ACCESS))
      : [];
  const users: NatsPrincipal[] = [...(options.users ?? []), ...(mode === 'none' || mode === 'ca-managed' ? [] : pki.issued.map(principalOf))];
  const nats = await startEmbeddedNats({ directory, tls, bootstrapUsers, users, ...(options.host ? { host: options.host } : {}) });
  resources.defer(() => nats.stop());
  if (mode !== 'none' && mode !== 'ca-managed') {
    const unsubscribe = pki.onIssue(async (certificate) => {
      users.push(principalOf(certificate));
      await nats.updateUsers([...users]);
    });
    // Deferred after stop, so it runs first: no reload is attempted on a stopped server.
    resources.defer(unsubscribe);
  }
  return nats;
}

/**
 * Restarts of a test nats-server: each call stops it (SIGINT: a clean shutdown, as a restart by an operator or
 * Kubernetes does), keeps it down for `downMs` while `during` runs, and starts it again on the same
 * configuration, port and store. Make this before the clients that use the server: the restarted servers are
 * stopped on release after them, so that every client closes while its server is still up.
 */
export function natsRestarts(resources: Resources, nats: EmbeddedNats): (downMs: number, during?: () => Promise<void>) => Promise<void> {
  const restarted: Daemon[] = [];
  resources.defer(async () => void (await Promise.all(restarted.map((daemon) => daemon.stop(10_000)))));
  return async (downMs, during = async () => undefined) => {
    const configFile = join(dirname(nats.pidFile), 'nats-server.conf');
    await nats.daemon.stop(10_000);
    const downSince = Date.now();
    await during();
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, downMs - (Date.now() - downSince))));
    restarted.push(await startDaemon('nats-server', ['-c', configFile], { readyPattern: /Server is ready/, readyTimeoutMs: 30_000, stopSignal: 'SIGINT' }));
  };
}

/**
 * A minimal image replica for clone tests: `<imagesRoot>/images/<id>/disk0.qcow2` (1 MiB, real qemu-img) and a
 * domain template naming it as vda. Returns the replica directory.
 */
export async function writeTinyReplica(imagesRoot: string, id = 'tiny'): Promise<string> {
  const replica = join(imagesRoot, 'images', id);
  await mkdir(replica, { recursive: true });
  await promisify(execFile)('qemu-img', ['create', '-f', 'qcow2', join(replica, 'disk0.qcow2'), '1M']);
  await writeFile(
    join(replica, 'domain-template.xml'),
    "<domain type='qemu'><name>x</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='disk0.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
  );
  return replica;
}
