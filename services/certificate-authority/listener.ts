/** What happens around issuance and revocation besides the records: events (and NATS users, when configured). */
import { CERTIFICATE_REVOKED, HOST_ENROLLED } from '../common/domain/event-types.js';
import type { EventPublisher } from '../common/platform/events.js';
import { parseIdentity } from '../common/platform/identity.js';
import type { CertificateListener } from './certificate-authority.js';
import { CERTIFICATE_NAME, HOST_NAME } from '../common/domain/resource-names.js';

/** Publishes host.enrolled (for certificates from a join token) and certificate.revoked. */
export function eventingListener(events: EventPublisher): CertificateListener {
  return {
    issued: async (record, context) => {
      const identity = parseIdentity(record.identity);
      if (identity?.kind !== 'host' || context.joinToken === undefined) return;
      await events.publish(
        HOST_ENROLLED,
        {
          host: HOST_NAME.format({ host: identity.name }),
          identity: record.identity,
          certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }),
          joinToken: context.joinToken,
          occurTime: new Date(record.issueTime),
        },
        { host: identity.name, id: `host.enrolled/${record.serialNumber}` },
      );
    },
    revoked: async (record) => {
      const identity = parseIdentity(record.identity);
      await events.publish(
        CERTIFICATE_REVOKED,
        {
          certificate: CERTIFICATE_NAME.format({ certificate: record.serialNumber }),
          serialNumber: record.serialNumber,
          identity: record.identity,
          reason: record.revoked?.reason ?? 0,
          occurTime: new Date(record.revoked?.time ?? Date.now()),
        },
        { host: identity?.kind === 'host' ? identity.name : '_', id: `certificate.revoked/${record.serialNumber}` },
      );
    },
  };
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
