/**
 * Keeps NATS's allow-list equal to the CA's records: one NATS user per ACTIVE certificate (its subject DN,
 * which carries the serial), permissions by identity kind, plus static identity-level users for bootstrap
 * infrastructure. After every issue and revoke (and every 30 s, for expiries and other replicas) the CA
 * rewrites the authorization file and reloads nats-server, so a revoked certificate is refused by NATS
 * within a second of RevokeCertificate returning, and an issued one is admitted before it returns.
 */
import { readFile } from 'node:fs/promises';
import type { Identity } from '../common/platform/identity.js';
import type { Logger } from '../common/platform/logger.js';
import { certificatePrincipal, identityPrincipal, reloadNats, writeNatsAuthorization, type NatsPrincipal } from '../common/platform/nats-authorization.js';
import { certificateState, type CertificateListener } from './certificate-authority.js';
import type { CertificateRecord } from './records.js';

/** How the CA reaches the NATS server it manages. */
export interface NatsUsersOptions {
  /** The authorization file the server includes. */
  readonly authorizationFile: string;
  /** nats-server's pid file, for the reload signal. */
  readonly pidFile: string;
  /** Identities admitted by URI SAN whatever their serial (the bootstrap services). */
  readonly staticIdentities: readonly Identity[];
  readonly listCertificates: () => Promise<readonly CertificateRecord[]>;
  readonly log: Logger;
}

/** Reload settles in a few milliseconds (measured 3-9 ms); wait this long before answering the caller. */
const RELOAD_SETTLE_MS = 150;

/** A listener that re-syncs NATS users on every change, and a sync function for timers and start-up. */
export function natsUsers(options: NatsUsersOptions): CertificateListener & { sync(): Promise<void> } {
  let queue: Promise<void> = Promise.resolve();
  const sync = (): Promise<void> => {
    const next = queue.then(async () => {
      const active = (await options.listCertificates()).filter((record) => certificateState(record) === 'ACTIVE');
      const principals: NatsPrincipal[] = [];
      for (const record of active) {
        try {
          principals.push(certificatePrincipal(record.certificatePem));
        } catch (error) {
          options.log.warn({ err: error, certificate: `certificates/${record.serialNumber}` }, 'certificate left out of NATS users');
        }
      }
      await writeNatsAuthorization(options.authorizationFile, options.staticIdentities.map((identity) => identityPrincipal(identity)), principals);
      reloadNats(Number((await readFile(options.pidFile, 'utf8')).trim()));
      await new Promise((resolve) => setTimeout(resolve, RELOAD_SETTLE_MS));
      options.log.debug({ users: principals.length + options.staticIdentities.length }, 'NATS users synced');
    });
    queue = next.catch((error: unknown) => options.log.error({ err: error }, 'NATS users sync failed'));
    return next;
  };
  return { sync, issued: () => sync(), revoked: () => sync() };
}

/** Calls every listener in turn. */
export function allListeners(...listeners: readonly CertificateListener[]): CertificateListener {
  return {
    issued: async (record, context) => {
      for (const listener of listeners) await listener.issued(record, context);
    },
    revoked: async (record) => {
      for (const listener of listeners) await listener.revoked(record);
    },
  };
}
