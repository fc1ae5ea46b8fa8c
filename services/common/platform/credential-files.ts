/**
 * Credentials on disk: cert.pem, key.pem (0600) and ca.pem in one directory per identity. Writes are
 * atomic (temp file + rename) so that a process watching the files never reads half a certificate.
 */
import { mkdir, open, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { generateKeyPair, signLeafCertificate, type CertificateAndKey } from './pki.js';
import type { TlsFiles } from './tls.js';

/** A certificate, its key and the CA certificate, as PEM. */
export interface Credentials {
  readonly certificatePem: string;
  readonly privateKeyPem: string;
  readonly caPem: string;
}

/** Paths of the three files in a credentials directory. */
export function credentialFiles(directory: string): TlsFiles {
  return { certificateFile: join(directory, 'cert.pem'), privateKeyFile: join(directory, 'key.pem'), caFile: join(directory, 'ca.pem') };
}

/** Writes credentials into `directory` (created 0700) and returns the file paths. */
export async function writeCredentials(directory: string, credentials: Credentials): Promise<TlsFiles> {
  await mkdir(directory, { recursive: true, mode: 0o700 });
  const files = credentialFiles(directory);
  // Key first, then certificate: a watcher that sees the new certificate finds its key already there.
  await writeAtomically(files.privateKeyFile, credentials.privateKeyPem, 0o600);
  await writeAtomically(files.caFile, credentials.caPem, 0o644);
  await writeAtomically(files.certificateFile, credentials.certificatePem, 0o644);
  return files;
}

/** Makes a key pair and a certificate for `identity` signed directly by `ca` (bootstrap and tests). */
export async function issueCredentials(
  ca: CertificateAndKey,
  identity: string,
  options: { dnsNames?: readonly string[]; ttlSeconds?: number; notBefore?: Date } = {},
): Promise<Credentials> {
  const keys = await generateKeyPair(2048);
  const certificatePem = signLeafCertificate({
    ca,
    publicKeyPem: keys.publicKeyPem,
    identity,
    dnsNames: options.dnsNames ?? [],
    ttlSeconds: options.ttlSeconds ?? 86_400,
    ...(options.notBefore === undefined ? {} : { notBefore: options.notBefore }),
  });
  return { certificatePem, privateKeyPem: keys.privateKeyPem, caPem: ca.certificatePem };
}

/**
 * Writes `contents` to a temp file beside `path`, then renames it over `path`. With `sync`, the temp file is
 * fsynced before the rename, so that after a crash `path` holds the old or the new contents, never an empty
 * file (the caller fsyncs the directory to make the rename itself durable).
 */
export async function writeAtomically(path: string, contents: string, mode: number, options: { sync?: boolean } = {}): Promise<void> {
  const temporary = `${path}.${process.pid}.${Date.now()}.tmp`;
  if (options.sync) {
    const handle = await open(temporary, 'w', mode);
    try {
      await handle.writeFile(contents);
      await handle.sync();
    } finally {
      await handle.close();
    }
  } else {
    await writeFile(temporary, contents, { mode });
  }
  await rename(temporary, path);
}
