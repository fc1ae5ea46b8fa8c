/**
 * Test harness: temp directories that are removed after the test, a throw-away CA with credentials
 * for any identity, and a real nats-server with JetStream and mutual TLS on a free port.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeCredentials, issueCredentials, type Credentials } from '../../services/common/credential-files.js';
import { startEmbeddedNats, type EmbeddedNats } from '../../services/common/embedded-nats.js';
import { identityUri, type IdentityKind } from '../../services/common/identity.js';
import { createCertificateAuthority, type CertificateAndKey } from '../../services/common/pki.js';
import type { TlsFiles } from '../../services/common/tls.js';

/** Something to undo at the end of a test file. */
type Cleanup = () => Promise<void> | void;

/** Collects clean-ups and runs them in reverse order. */
export class Resources {
  private readonly cleanups: Cleanup[] = [];

  /** Registers a clean-up. */
  defer(cleanup: Cleanup): void {
    this.cleanups.push(cleanup);
  }

  /** A fresh temp directory, removed by `release`. */
  async tempDir(prefix = 'cowherd-test-'): Promise<string> {
    const directory = await mkdtemp(join(tmpdir(), prefix));
    this.defer(() => rm(directory, { recursive: true, force: true }));
    return directory;
  }

  /** Runs every clean-up, newest first; reports all failures. */
  async release(): Promise<void> {
    const errors: unknown[] = [];
    while (this.cleanups.length > 0) {
      try {
        await this.cleanups.pop()!();
      } catch (error) {
        errors.push(error);
      }
    }
    if (errors.length > 0) throw new AggregateError(errors, 'clean-up failed');
  }
}

/** A throw-away CA that writes credential directories. */
export class TestPki {
  private constructor(readonly ca: CertificateAndKey, private readonly directory: string) {}

  /** Makes a CA (2048-bit: tests need speed, not strength) under `directory`. */
  static async create(directory: string, commonName = 'cowherd test CA'): Promise<TestPki> {
    return new TestPki(await createCertificateAuthority({ commonName, bits: 2048, validityDays: 2 }), directory);
  }

  /** Credentials for kind/name, with DNS SAN localhost so it can serve too. */
  async credentials(kind: IdentityKind, name: string, options: { ttlSeconds?: number; notBefore?: Date } = {}): Promise<Credentials> {
    return issueCredentials(this.ca, identityUri(kind, name), { dnsNames: ['localhost'], ...options });
  }

  /** Writes credentials for kind/name into their own directory and returns the file paths. */
  async files(kind: IdentityKind, name: string, options: { ttlSeconds?: number; notBefore?: Date; subdirectory?: string } = {}): Promise<TlsFiles> {
    return writeCredentials(join(this.directory, options.subdirectory ?? `${kind}-${name}`), await this.credentials(kind, name, options));
  }
}

/** Starts a real nats-server with JetStream and mTLS; stopped and its data removed on release. */
export async function startTestNats(resources: Resources, pki: TestPki): Promise<EmbeddedNats> {
  const directory = await resources.tempDir('cowherd-nats-');
  const tls = await pki.files('service', 'nats', { subdirectory: 'nats-server' });
  const nats = await startEmbeddedNats({ directory, tls });
  resources.defer(() => nats.stop());
  return nats;
}
