/**
 * mTLS credentials from PEM files, reloaded when the files change: a renewed certificate written over
 * the old one is used by the next connection, with no restart (grpc-js FileWatcherCertificateProvider).
 */
import { readFileSync } from 'node:fs';
import { ChannelCredentials, experimental, ServerCredentials } from '@grpc/grpc-js';

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

/** Server-auth-only TLS (the CA's enrollment port): clients need no certificate yet. */
export function serverOnlyTlsCredentials(files: Omit<TlsFiles, 'caFile'> & { caFile?: string }, refreshIntervalMs = DEFAULT_TLS_REFRESH_MS): ServerCredentials {
  readFileSync(files.certificateFile);
  readFileSync(files.privateKeyFile);
  const watcher = provider(files, refreshIntervalMs);
  return experimental.createCertificateProviderServerCredentials(watcher, watcher, false);
}

/** Client credentials presenting our certificate and trusting only the cowherd CA. */
export function mutualTlsChannelCredentials(files: TlsFiles, refreshIntervalMs = DEFAULT_TLS_REFRESH_MS): ChannelCredentials {
  assertReadable(files);
  const watcher = provider(files, refreshIntervalMs);
  return experimental.createCertificateProviderChannelCredentials(watcher, watcher);
}

/** Client credentials from PEM contents held in memory (the CLI's bundle, tests). */
export function mutualTlsChannelCredentialsFromPem(pem: { certificatePem: string; privateKeyPem: string; caPem: string }): ChannelCredentials {
  return ChannelCredentials.createSsl(Buffer.from(pem.caPem), Buffer.from(pem.privateKeyPem), Buffer.from(pem.certificatePem));
}

function assertReadable(files: TlsFiles): void {
  // Fail at start-up with the file's name rather than at the first handshake with an opaque TLS error.
  for (const path of [files.certificateFile, files.privateKeyFile, files.caFile]) readFileSync(path);
}
