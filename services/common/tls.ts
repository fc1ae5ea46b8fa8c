/**
 * mTLS credentials from PEM files, reloaded when the files change: a renewed certificate written over
 * the old one is used by the next connection, with no restart (grpc-js FileWatcherCertificateProvider).
 */
import { readFileSync } from 'node:fs';
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

function provider(files: Partial<TlsFiles>, refreshIntervalMs: number): experimental.FileWatcherCertificateProvider {
  return new experimental.FileWatcherCertificateProvider({
    ...(files.certificateFile === undefined ? {} : { certificateFile: files.certificateFile }),
    ...(files.privateKeyFile === undefined ? {} : { privateKeyFile: files.privateKeyFile }),
    ...(files.caFile === undefined ? {} : { caCertificateFile: files.caFile }),
    refreshIntervalMs,
  });
}

/** Server credentials that demand a client certificate signed by the cowherd CA. */
export function mutualTlsServerCredentials(files: TlsFiles, refreshIntervalMs = DEFAULT_TLS_REFRESH_MS): ServerCredentials {
  assertReadable(files);
  const watcher = provider(files, refreshIntervalMs);
  return experimental.createCertificateProviderServerCredentials(watcher, watcher, true);
}

/**
 * mutualTlsServerCredentials, resolved once the files are read. Call it just before binding: grpc-js reads
 * the files in the background, and a server bound before that read is done drops every connection (the
 * client sees "disconnected before secure TLS connection was established") although it already says it
 * serves; on a busy machine at start-up the read can take long enough for a first caller to meet it.
 */
export async function loadedMutualTlsServerCredentials(files: TlsFiles, refreshIntervalMs = DEFAULT_TLS_REFRESH_MS): Promise<ServerCredentials> {
  assertReadable(files);
  const watcher = provider(files, refreshIntervalMs);
  // The provider keeps what it read: the server's own listener, added when it binds, gets it at once.
  await new Promise<void>((resolve) => {
    const listener = (): void => {
      watcher.removeIdentityCertificateListener(listener);
      resolve();
    };
    watcher.addIdentityCertificateListener(listener);
  });
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
  assertReadable(files);
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
export function mutualTlsChannelCredentialsFromPem(pem: { certificatePem: string; privateKeyPem: string; caPem: string }, serverIdentity?: string): ChannelCredentials {
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
      return Object.assign(new Error(`the server at ${hostname} is ${uris.length === 0 ? 'no cowherd identity' : uris.join(', ')}, not ${serverIdentity}`), { code: 'ERR_COWHERD_SERVER_IDENTITY' });
    }
    return undefined;
  };
}

function assertReadable(files: TlsFiles): void {
  // Fail at start-up with the file's name rather than at the first handshake with an opaque TLS error.
  for (const path of [files.certificateFile, files.privateKeyFile, files.caFile]) readFileSync(path);
}
