/**
 * Keeps a process's certificate fresh: at two thirds of its lifetime it makes a new key pair, asks the CA
 * for a certificate for the same identity and DNS names, and writes key and certificate over the old
 * files. Servers and clients built on tls.ts pick the new files up without a restart. The private key is
 * made here and never leaves the machine.
 */
import { readFile } from 'node:fs/promises';
import { writeAtomically } from './credential-files.js';
import type { Logger } from './logger.js';
import { createCsr, generateKeyPair, inspectCertificate } from './pki.js';
import type { TlsFiles } from './tls.js';

/** Asks the CA for a certificate for a CSR (RenewCertificate, or the CA signing for itself). */
export type RenewFunction = (csrPem: string) => Promise<{ certificatePem: string; caPem: string }>;

/** When a certificate should be renewed: two thirds into its life. */
export function renewalTime(notBefore: Date, notAfter: Date): Date {
  return new Date(notBefore.getTime() + ((notAfter.getTime() - notBefore.getTime()) * 2) / 3);
}

/** Renews `files` in place before they expire, until the returned function is called. */
export async function keepCertificateFresh(options: {
  files: TlsFiles;
  renew: RenewFunction;
  log: Logger;
  onRenewed?: (serialNumber: string) => void;
}): Promise<() => void> {
  const log = options.log.child({ component: 'certificate-renewal' });
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const plan = async (minimumMs = 0): Promise<void> => {
    if (stopped) return;
    const facts = inspectCertificate(await readFile(options.files.certificateFile, 'utf8'));
    const due = Math.max(minimumMs, renewalTime(facts.notBefore, facts.notAfter).getTime() - Date.now());
    // setTimeout caps at 2^31-1 ms (~24.8 days): re-plan then.
    timer = setTimeout(() => void renewNow(), Math.min(Math.max(due, 0), 2 ** 31 - 1));
  };
  const renewNow = async (): Promise<void> => {
    try {
      const current = inspectCertificate(await readFile(options.files.certificateFile, 'utf8'));
      if (renewalTime(current.notBefore, current.notAfter).getTime() > Date.now()) return void (await plan(1_000));
      if (!current.identity) throw new Error('the current certificate names no cowherd identity');
      const keys = await generateKeyPair(2048);
      const csrPem = createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity: current.identity.uri, dnsNames: current.dnsNames });
      const renewed = await options.renew(csrPem);
      // Key first, then CA, then certificate: a watcher that sees the new certificate finds its key there.
      await writeAtomically(options.files.privateKeyFile, keys.privateKeyPem, 0o600);
      await writeAtomically(options.files.caFile, renewed.caPem, 0o644);
      await writeAtomically(options.files.certificateFile, renewed.certificatePem, 0o644);
      const facts = inspectCertificate(renewed.certificatePem);
      log.info({ serialNumber: facts.serialNumber, expireTime: facts.notAfter.toISOString(), previous: current.serialNumber }, 'certificate renewed');
      options.onRenewed?.(facts.serialNumber);
      // Never renew again within a second, whatever the new certificate's dates say.
      await plan(1_000);
    } catch (error) {
      // Retry well before expiry: every tenth of the remaining time, at least 5 s, at most 10 min.
      const facts = inspectCertificate(await readFile(options.files.certificateFile, 'utf8'));
      const retryMs = Math.min(600_000, Math.max(5_000, (facts.notAfter.getTime() - Date.now()) / 10));
      log.warn({ err: error, retryMs }, 'certificate renewal failed; will retry');
      if (!stopped) timer = setTimeout(() => void renewNow(), retryMs);
    }
  };
  await plan();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
