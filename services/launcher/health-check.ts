/** Asks a process's health service on its mTLS port and on its plaintext probe port. */
import { credentials as grpcCredentials, type ChannelCredentials } from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';
import { HealthCheckResponse_ServingStatus, healthCheckResponse_ServingStatusToJSON, HealthClient } from '../gen/grpc/health/v1/health.js';
import { clientOptions } from '../common/platform/client.js';
import { mutualTlsChannelCredentialsFromPem } from '../common/platform/tls.js';
import type { TlsFiles } from '../common/platform/tls.js';

/** Health of one process on both ports. */
export interface HealthReport {
  readonly name: string;
  /** SERVING, NOT_SERVING, ... or the error text. */
  readonly mtls: string;
  readonly probe: string;
}

/** Checks the "" (whole process) status on both ports. */
export async function checkHealth(name: string, address: string, healthAddress: string, credentials: TlsFiles): Promise<HealthReport> {
  const mtls = mutualTlsChannelCredentialsFromPem({
    certificatePem: readFileSync(credentials.certificateFile, 'utf8'),
    privateKeyPem: readFileSync(credentials.privateKeyFile, 'utf8'),
    caPem: readFileSync(credentials.caFile, 'utf8'),
  });
  const [secure, probe] = await Promise.all([check(address, mtls), check(healthAddress, grpcCredentials.createInsecure())]);
  return { name, mtls: secure, probe };
}

/** One Health/Check call; the status name or the error text. */
export function check(address: string, credentials: ChannelCredentials, service = ''): Promise<string> {
  const client = new HealthClient(address, credentials, clientOptions({ defaultDeadlineMs: 10_000 }));
  return new Promise((resolve) => {
    client.check({ service }, (error, response) => {
      client.close();
      if (error) resolve(`error: ${error.message}`);
      else resolve(healthCheckResponse_ServingStatusToJSON(response?.status ?? HealthCheckResponse_ServingStatus.UNKNOWN));
    });
  });
}
