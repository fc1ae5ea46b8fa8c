/**
 * mTLS credentials from PEM files, reloaded when the files change: a renewed certificate written over
 * the old one is used by the next connection, with no restart.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { checkServerIdentity as checkServerHostname, type PeerCertificate } from 'node:tls';
import { ChannelCredentials, experimental, ServerCredentials } from '@grpc/grpc-js';
import { parseSubjectAltName } from './pki.js';

/** The three PEM files every cowherd process holds. */
export interface TlsFiles {
  /** The process's own certificate. */
  readonly certificateFile: string;
  /** Its private key (0600). */
  readonly privateKeyFile: string;
  /** The cowherd CA certificate: the only root trusted. */
  readonly caFile: string;
}

/** How often changed files are picked up. Renewal happens at 2/3 of the lifetime, so seconds are plenty. */
export const DEFAULT_TLS_REFRESH_MS = 5_000;

/**
 * The PEM files as a grpc-js certificate provider. Read synchronously when made, so that a server bound at
 * once presents its certificate to its first caller, then re-read every `refreshIntervalMs` while anyone
 * listens; listeners hear only of contents that changed. (grpc-js's FileWatcherCertificateProvider reads in
 * the background and forgets what it read once its listeners have come and gone for two intervals: a
 * server bound on a busy machine then drops every connection, "disconnected before secure TLS connection
 * was established", until a read completes, although it already says it serves.)
 */
class PemFiles implements experimental.CertificateProvider {
  private identity: experimental.IdentityCertificateUpdate | null = null;
  private ca: experimental.CaCertificateUpdate | null = null;
  private readonly identityListeners = new Set<experimental.IdentityCertificateUpdateListener>();
  private readonly caListeners = new Set<experimental.CaCertificateUpdateListener>();
  private timer: NodeJS.Timeout | undefined;
  private reading = false;

  constructor(
    private readonly files: Partial<TlsFiles>,
    private readonly refreshIntervalMs: number,
  ) {
    this.take(
      files.certificateFile === undefined ? undefined : readFileSync(files.certificateFile),
      files.privateKeyFile === undefined ? undefined : readFileSync(files.privateKeyFile),
      files.caFile === undefined ? undefined : readFileSync(files.caFile),
    );
  }

  addCaCertificateListener(listener: experimental.CaCertificateUpdateListener): void {
    this.caListeners.add(listener);
    this.watch();
    if (this.files.caFile !== undefined) process.nextTick(listener, this.ca);
  }

  removeCaCertificateListener(listener: experimental.CaCertificateUpdateListener): void {
    this.caListeners.delete(listener);
    this.unwatchIfUnused();
  }

  addIdentityCertificateListener(listener: experimental.IdentityCertificateUpdateListener): void {
    this.identityListeners.add(listener);
    this.watch();
    if (this.files.certificateFile !== undefined) process.nextTick(listener, this.identity);
  }

  removeIdentityCertificateListener(listener: experimental.IdentityCertificateUpdateListener): void {
    this.identityListeners.delete(listener);
    this.unwatchIfUnused();
  }

  /** Keeps what it is given and says what changed. A file that cannot be read keeps its last contents. */
  private take(certificate: Buffer | undefined, privateKey: Buffer | undefined, ca: Buffer | undefined): { identity: boolean; ca: boolean } {
    const changed = { identity: false, ca: false };
    const unchanged = this.identity?.certificate.equals(certificate ?? Buffer.alloc(0)) && this.identity.privateKey.equals(privateKey ?? Buffer.alloc(0));
    // A renewal caught between writing the certificate and the key keeps the old pair until both are new.
    if (certificate !== undefined && privateKey !== undefined && !unchanged && keyMatches(certificate, privateKey)) {
      this.identity = { certificate, privateKey };
      changed.identity = true;
    }
    if (ca !== undefined && !this.ca?.caCertificate.equals(ca)) {
      this.ca = { caCertificate: ca };
      changed.ca = true;
    }
    return changed;
  }

  private watch(): void {
    if (this.timer !== undefined) return;
    this.timer = setInterval(() => void this.refresh(), this.refreshIntervalMs);
    // The server's socket, not a file watch, keeps a process running.
    this.timer.unref();
  }

  private unwatchIfUnused(): void {
    if (this.caListeners.size > 0 || this.identityListeners.size > 0 || this.timer === undefined) return;
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private async refresh(): Promise<void> {
    if (this.reading) return;
    this.reading = true;
    try {
      const read = (path: string | undefined): Promise<Buffer | undefined> =>
        path === undefined ? Promise.resolve(undefined) : readFile(path).catch(() => undefined);
      const [certificate, privateKey, ca] = await Promise.all([read(this.files.certificateFile), read(this.files.privateKeyFile), read(this.files.caFile)]);
      const changed = this.take(certificate, privateKey, ca);
      if (changed.identity) for (const listener of this.identityListeners) listener(this.identity);
      if (changed.ca) for (const listener of this.caListeners) listener(this.ca);
    } finally {
      this.reading = false;
    }
  }
}

function keyMatches(certificate: Buffer, privateKey: Buffer): boolean {
  try {
    return new X509Certificate(certificate).checkPrivateKey(createPrivateKey(privateKey));
  } catch {
    return false;
  }
}

function provider(files: Partial<TlsFiles>, refreshIntervalMs: number): experimental.CertificateProvider {
  return new PemFiles(files, refreshIntervalMs);
}

/** Server credentials that demand a client certificate signed by the cowherd CA. */
export function mutualTlsServerCredentials(files: TlsFiles, refreshIntervalMs = DEFAULT_TLS_REFRESH_MS): ServerCredentials {
  const watcher = provider(files, refreshIntervalMs);
  return experimental.createCertificateProviderServerCredentials(watcher, watcher, true);
}

/** Server-auth-only TLS (the CA's enrollment port): clients need no certificate yet. */
export function serverOnlyTlsCredentials(files: Omit<TlsFiles, 'caFile'> & { caFile?: string }, refreshIntervalMs = DEFAULT_TLS_REFRESH_MS): ServerCredentials {
  readFileSync(files.certificateFile);
  readFileSync(files.privateKeyFile);
  const watcher = provider(files, refreshIntervalMs);
  return experimental.createCertificateProviderServerCredentials(watcher, watcher, false);
}

/**
 * Channel credentials for the server a client dials, by the SPIFFE identity that server must prove
 * (`spiffe://cowherd/service/inventory`, `spiffe://cowherd/host/kvm-01`).
 */
export type CredentialsFor = (serverIdentity: string) => ChannelCredentials;

/**
 * Client credentials presenting our certificate and trusting only the cowherd CA, one set per server
 * identity: a connection succeeds only when the server's certificate carries exactly the identity the
 * caller meant to reach. A CA-signed certificate of another identity (a host's, another service's)
 * served at that address fails the handshake, so the call fails UNAVAILABLE and no request is sent.
 * One file watcher serves every identity; credentials are made once per identity and kept, so that
 * grpc-js shares connections between clients of the same server.
 */
export function mutualTlsClientCredentials(files: TlsFiles, refreshIntervalMs = DEFAULT_TLS_REFRESH_MS): CredentialsFor {
  const watcher = provider(files, refreshIntervalMs);
  const byIdentity = new Map<string, ChannelCredentials>();
  return (serverIdentity) => {
    let credentials = byIdentity.get(serverIdentity);
    if (!credentials) {
      credentials = experimental.createCertificateProviderChannelCredentials(watcher, watcher, { checkServerIdentity: expectServerIdentity(serverIdentity) });
      byIdentity.set(serverIdentity, credentials);
    }
    return credentials;
  };
}

/**
 * Client credentials from PEM contents held in memory (the CLI's bundle, tests). With `serverIdentity`
 * the server must prove that SPIFFE identity too (see mutualTlsClientCredentials).
 */
export function mutualTlsChannelCredentialsFromPem(
  pem: { certificatePem: string; privateKeyPem: string; caPem: string },
  serverIdentity?: string,
): ChannelCredentials {
  return ChannelCredentials.createSsl(
    Buffer.from(pem.caPem),
    Buffer.from(pem.privateKeyPem),
    Buffer.from(pem.certificatePem),
    serverIdentity === undefined ? {} : { checkServerIdentity: expectServerIdentity(serverIdentity) },
  );
}

/**
 * A TLS `checkServerIdentity` that keeps Node's host name check (the DNS SAN must match the name
 * dialled, or grpc.ssl_target_name_override) and then demands that the certificate's only URI SAN be
 * `serverIdentity`. DNS names alone are not enough: every host certificate carries `localhost`, and
 * a host's own name may be any label an admin chose.
 */
export function expectServerIdentity(serverIdentity: string): (hostname: string, certificate: PeerCertificate) => Error | undefined {
  return (hostname, certificate) => {
    const hostnameError = checkServerHostname(hostname, certificate);
    if (hostnameError) return hostnameError;
    const uris = parseSubjectAltName(certificate.subjectaltname ?? '').uris;
    if (uris.length !== 1 || uris[0] !== serverIdentity) {
      return Object.assign(new Error(`the server at ${hostname} is ${uris.length === 0 ? 'no cowherd identity' : uris.join(', ')}, not ${serverIdentity}`), {
        code: 'ERR_COWHERD_SERVER_IDENTITY',
      });
    }
    return undefined;
  };
}
