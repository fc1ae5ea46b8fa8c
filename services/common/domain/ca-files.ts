/**
 * The CA's key and certificate on disk. Made on the first start (RSA 3072, key 0600), loaded on later
 * starts. In Kubernetes the pair is a mounted Secret; on one machine it lives in the state directory.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import forge from 'node-forge';
import { createCertificateAuthority, type CertificateAndKey } from '../platform/pki.js';

/** Thrown when the CA files are unusable: half present, mismatched, or the key readable by others. */
export class CaFilesError extends Error {
  override readonly name = 'CaFilesError';
}

/** Loads the CA, or creates it when neither file exists. Never logs or returns the key anywhere else. */
export async function loadOrCreateCertificateAuthority(keyFile: string, certificateFile: string, onCreate?: () => void): Promise<CertificateAndKey> {
  const haveKey = existsSync(keyFile);
  const haveCertificate = existsSync(certificateFile);
  if (!haveKey && !haveCertificate) {
    onCreate?.();
    const ca = await createCertificateAuthority({ commonName: 'cowherd CA', bits: 3072 });
    await mkdir(dirname(keyFile), { recursive: true, mode: 0o700 });
    await mkdir(dirname(certificateFile), { recursive: true, mode: 0o700 });
    // 'wx': never overwrite a key that appeared meanwhile (two replicas starting at once).
    await writeFile(keyFile, ca.privateKeyPem, { mode: 0o600, flag: 'wx' });
    await writeFile(certificateFile, ca.certificatePem, { mode: 0o644, flag: 'wx' });
    return ca;
  }
  if (!haveKey || !haveCertificate)
    throw new CaFilesError(`only one of ${keyFile} and ${certificateFile} exists; restore the other or remove both to make a new CA`);
  const mode = (await stat(keyFile)).mode & 0o777;
  if ((mode & 0o077) !== 0) throw new CaFilesError(`${keyFile} is readable by others (mode ${mode.toString(8)}); chmod 600 it`);
  const ca = { privateKeyPem: await readFile(keyFile, 'utf8'), certificatePem: await readFile(certificateFile, 'utf8') };
  const certificate = forge.pki.certificateFromPem(ca.certificatePem);
  const key = forge.pki.privateKeyFromPem(ca.privateKeyPem) as forge.pki.rsa.PrivateKey;
  const publicKey = certificate.publicKey as forge.pki.rsa.PublicKey;
  if (publicKey.n.compareTo(key.n) !== 0) throw new CaFilesError(`${keyFile} is not the key of ${certificateFile}`);
  return ca;
}
