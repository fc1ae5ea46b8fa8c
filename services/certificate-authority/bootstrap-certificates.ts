/**
 * Bootstrap certificates: what is signed with the CA key before the CA service can issue anything (NATS's
 * certificate, the services' Kubernetes seeds, the CA service's own certificate, the local fleet's
 * bootstrap admin). Servers admit only serials the CA has recorded, so the CA records these from a PEM
 * bundle file (COWHERD_CA_BOOTSTRAP_CERTIFICATES, written by deploy/bootstrap/issue-credentials.ts and the
 * local fleet). The file is read at start and again whenever it changed, before every list of issued
 * serials the CA hands out: a re-run of the bootstrap (new seeds in the mounted Secret) is recorded without
 * a restart, and a server that meets a new seed's serial asks the CA, which reads the file first.
 */
import { stat, readFile } from 'node:fs/promises';
import type { Logger } from '../common/platform/logger.js';

/** Splits a PEM bundle into its CERTIFICATE blocks. */
export function certificateBlocks(bundle: string): string[] {
  return bundle.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)?.map((block) => `${block}\n`) ?? [];
}

/** Records the bundle's certificates whenever the file changed; `importChanges` is cheap when it did not. */
export function bootstrapCertificates(options: { file: string | undefined; record: (certificatePem: string) => Promise<boolean>; log: Logger }): {
  importChanges(): Promise<void>;
} {
  let seen = '';
  let running: Promise<void> | undefined;
  const importOnce = async (): Promise<void> => {
    if (options.file === undefined) return;
    let version: string;
    try {
      const facts = await stat(options.file);
      version = `${facts.size}/${facts.mtimeMs}/${facts.ino}`;
    } catch (error) {
      if (seen !== 'missing') options.log.warn({ err: error, file: options.file }, 'bootstrap certificates file unreadable; nothing recorded from it');
      seen = 'missing';
      return;
    }
    if (version === seen) return;
    const blocks = certificateBlocks(await readFile(options.file, 'utf8'));
    let recorded = 0;
    let complete = true;
    for (const block of blocks) {
      try {
        if (await options.record(block)) recorded++;
      } catch (error) {
        // Read again next time: the failure may be NATS's, not the certificate's.
        complete = false;
        options.log.warn({ err: error, file: options.file }, 'bootstrap certificate left out');
      }
    }
    if (complete) seen = version;
    if (recorded > 0) options.log.info({ file: options.file, recorded, certificates: blocks.length }, 'bootstrap certificates recorded');
  };
  return {
    // One import at a time; a caller that arrives during one waits for it and then checks again.
    importChanges: async () => {
      while (running) await running;
      running = importOnce().finally(() => {
        running = undefined;
      });
      await running;
    },
  };
}
