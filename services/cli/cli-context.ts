/**
 * What every command works with: the admin credential bundle (read once, checked before the first call),
 * one client per service on demand with the --timeout deadline, calls whose failures become CliErrors with
 * advice, and the output.
 */
import { readFileSync } from 'node:fs';
import type { ChannelCredentials, ServiceError } from '@grpc/grpc-js';
import { CertificateAuthorityServiceClient } from '../gen/cowherd/certauthority/v1/certificate_authority_service.js';
import { CloningServiceClient } from '../gen/cowherd/cloning/v1/cloning_service.js';
import { DistributionServiceClient } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { InventoryServiceClient } from '../gen/cowherd/inventory/v1/inventory_service.js';
import { OperationsClient } from '../gen/google/longrunning/operations.js';
import { createClient, type ClientConstructor } from '../common/platform/client.js';
import { credentialFiles } from '../common/platform/credential-files.js';
import { identityUri } from '../common/platform/identity.js';
import { readAllPages } from '../common/platform/list-pages.js';
import { inspectCertificate } from '../common/platform/pki.js';
import { mutualTlsChannelCredentialsFromPem, type TlsFiles } from '../common/platform/tls.js';
import { SERVICE_ADDRESSES, type CliConfig, type ServiceKey } from './cli-config.js';
import { callError, CliError, EXIT, type CallTarget } from './exit-codes.js';
import type { Output } from './output.js';

/** The settings every command runs with: config overridden by the global flags. */
export interface GlobalSettings {
  readonly credentialsDirectory: string;
  readonly addresses: Readonly<Record<ServiceKey, string>>;
  readonly natsUrls: readonly string[];
  /** Deadline of each call. */
  readonly timeoutMs: number;
  readonly quiet: boolean;
}

/** The admin credential bundle as PEM, read from its directory. */
export interface AdminBundle {
  readonly files: TlsFiles;
  readonly pem: { certificatePem: string; privateKeyPem: string; caPem: string };
  /** The identity the certificate names, e.g. spiffe://cowherd/admin/alice. */
  readonly identity: string;
}

/** A command's view of the fleet. */
export class CliContext {
  private bundle: AdminBundle | undefined;
  /** Per service: each checks that the server is that service (its SPIFFE identity), not only the CA. */
  private readonly channelCredentials = new Map<ServiceKey, ChannelCredentials>();
  private readonly clients = new Map<string, { close(): void }>();

  constructor(
    readonly config: CliConfig,
    readonly settings: GlobalSettings,
    readonly out: Output,
  ) {}

  /** The admin bundle; throws CliError (exit 5) naming the directory and what to do when it is unusable. */
  credentials(): AdminBundle {
    if (this.bundle) return this.bundle;
    const directory = this.settings.credentialsDirectory;
    const files = credentialFiles(directory);
    const read = (path: string): string => {
      try {
        return readFileSync(path, 'utf8');
      } catch (error) {
        throw new CliError(
          `cannot read the admin credentials: ${path} (${(error as NodeJS.ErrnoException).code ?? (error as Error).message}). ` +
            'Pass --credentials <dir> or set COWHERD_CREDENTIALS to a directory with cert.pem, key.pem and ca.pem; npm start writes one to .state/fleet/credentials/admin',
          EXIT.ACCESS,
        );
      }
    };
    const pem = { certificatePem: read(files.certificateFile), privateKeyPem: read(files.privateKeyFile), caPem: read(files.caFile) };
    let facts: ReturnType<typeof inspectCertificate>;
    try {
      facts = inspectCertificate(pem.certificatePem);
    } catch {
      throw new CliError(`${files.certificateFile} is not a PEM certificate; point --credentials at an admin credential bundle`, EXIT.ACCESS);
    }
    if (facts.identity?.kind !== 'admin') {
      throw new CliError(
        `the certificate in ${directory} is for ${facts.identity?.uri ?? 'no cowherd identity'}, not an admin (spiffe://cowherd/admin/<you>); point --credentials at an admin bundle`,
        EXIT.ACCESS,
      );
    }
    if (facts.notAfter.getTime() <= Date.now()) {
      throw new CliError(
        `the admin certificate in ${directory} expired on ${facts.notAfter.toISOString()}; get a new one (npm start renews the local fleet's)`,
        EXIT.ACCESS,
      );
    }
    this.bundle = { files, pem, identity: facts.identity.uri };
    return this.bundle;
  }

  get inventory(): InventoryServiceClient {
    return this.client('inventory', InventoryServiceClient);
  }

  get distribution(): DistributionServiceClient {
    return this.client('distribution', DistributionServiceClient);
  }

  get cloning(): CloningServiceClient {
    return this.client('cloning', CloningServiceClient);
  }

  get certificateAuthority(): CertificateAuthorityServiceClient {
    return this.client('ca', CertificateAuthorityServiceClient);
  }

  /** google.longrunning.Operations of the service that runs an operation. */
  operations(service: 'distribution' | 'cloning'): OperationsClient {
    return this.client(service, OperationsClient, 'operations');
  }

  /** Where calls to `service` go, for messages. */
  target(service: ServiceKey): CallTarget {
    const names = SERVICE_ADDRESSES[service];
    return {
      ...names,
      address: this.settings.addresses[service],
      credentialsDirectory: this.settings.credentialsDirectory,
      timeoutMs: this.settings.timeoutMs,
    };
  }

  /** One unary call; a failure becomes a CliError with advice and its exit code. */
  async call<Res>(service: ServiceKey, invoke: (callback: (error: ServiceError | null, response: Res) => void) => void): Promise<Res> {
    try {
      return await new Promise<Res>((resolve, reject) => invoke((error, response) => (error ? reject(error) : resolve(response))));
    } catch (error) {
      if (error instanceof CliError) throw error;
      if (typeof (error as ServiceError).code === 'number') throw callError(error as ServiceError, this.target(service));
      throw error;
    }
  }

  /** Every page of a List call, concatenated. */
  listAll<Item, Res extends { nextPageToken: string }>(
    service: ServiceKey,
    page: (pageToken: string, callback: (error: ServiceError | null, response: Res) => void) => void,
    items: (response: Res) => readonly Item[],
  ): Promise<Item[]> {
    return readAllPages(async (pageToken) => {
      const response = await this.call<Res>(service, (callback) => page(pageToken, callback));
      return { items: items(response), nextPageToken: response.nextPageToken };
    });
  }

  /** Closes every client. */
  close(): void {
    for (const client of this.clients.values()) client.close();
    this.clients.clear();
  }

  private client<C extends { close(): void }>(service: ServiceKey, Client: ClientConstructor<C>, variant = ''): C {
    const key = `${service}/${variant}`;
    const existing = this.clients.get(key);
    if (existing) return existing as C;
    let credentials = this.channelCredentials.get(service);
    if (!credentials) {
      credentials = mutualTlsChannelCredentialsFromPem(this.credentials().pem, identityUri('service', SERVICE_ADDRESSES[service].service));
      this.channelCredentials.set(service, credentials);
    }
    const client = createClient(Client, this.settings.addresses[service], credentials, { defaultDeadlineMs: this.settings.timeoutMs });
    this.clients.set(key, client);
    return client;
  }
}
