/** Unit tests of services/common pieces that need no server. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import {
  addressVariable,
  ConfigError,
  describeConfig,
  integerVariable,
  pathVariable,
  readConfig,
  stringVariable,
  urlListVariable,
} from '../../services/common/platform/config.js';
import { CowherdError, readServiceError, toServiceError } from '../../services/common/platform/errors.js';
import { identityUri, parseIdentity } from '../../services/common/platform/identity.js';
import { redactSecrets } from '../../services/common/platform/logger.js';
import { PageTokens, paginate, pageSizeOf } from '../../services/common/platform/pagination.js';
import { readAllPages } from '../../services/common/platform/list-pages.js';
import {
  createCertificateAuthority,
  createCsr,
  generateKeyPair,
  inspectCertificate,
  parseCsr,
  signLeafCertificate,
} from '../../services/common/platform/pki.js';
import { readDescriptorSet, splitDescriptorSet } from '../../services/common/platform/reflection.js';
import { rerunning, RevocationSet } from '../../services/common/platform/revocation.js';
import { FileDescriptorProto } from '../../services/gen/google/protobuf/descriptor.js';

describe('config', () => {
  const spec = {
    address: addressVariable('T_ADDRESS', 'listen address', '0.0.0.0:1'),
    count: integerVariable('T_COUNT', 'a count', 3, 1, 10),
    name: stringVariable('T_NAME', 'a required name'),
    urls: urlListVariable('T_URLS', 'servers', ['nats://localhost:4222']),
    file: pathVariable('T_FILE', 'a file', 'relative/file'),
  };

  it('applies defaults and parses values into a frozen object', () => {
    const config = readConfig(spec, { T_NAME: 'x', T_COUNT: '7', T_URLS: 'tls://a:1, tls://b:2' });
    assert.equal(config.count, 7);
    assert.equal(config.address, '0.0.0.0:1');
    assert.deepEqual(config.urls, ['tls://a:1', 'tls://b:2']);
    assert.ok(config.file.startsWith('/'));
    assert.ok(Object.isFrozen(config));
  });

  it('lists every bad variable at once', () => {
    try {
      readConfig(spec, { T_ADDRESS: 'nope', T_COUNT: '99', T_URLS: ',' });
      assert.fail('should throw');
    } catch (error) {
      assert.ok(error instanceof ConfigError);
      assert.equal(error.problems.length, 4);
      for (const name of ['T_ADDRESS', 'T_COUNT', 'T_NAME', 'T_URLS']) assert.match(error.message, new RegExp(name));
    }
  });

  it('documents itself as a table', () => {
    assert.match(describeConfig(spec), /\| `T_NAME` \| \(required\) \| a required name \|/);
  });
});

describe('identity', () => {
  it('round-trips the three kinds and refuses foreign or malformed URIs', () => {
    assert.deepEqual(parseIdentity(identityUri('host', 'kvm-01.example')), {
      kind: 'host',
      name: 'kvm-01.example',
      uri: 'spiffe://cowherd/host/kvm-01.example',
    });
    for (const bad of [
      'spiffe://other/host/a',
      'spiffe://cowherd/root/a',
      'spiffe://cowherd/host/../x',
      'spiffe://cowherd/host/A',
      'spiffe://cowherd/host/a/b',
      'https://cowherd/host/a',
    ]) {
      assert.equal(parseIdentity(bad), undefined, bad);
    }
    assert.throws(() => identityUri('admin', 'x/y'));
  });
});

describe('errors', () => {
  it('carries code, reason and field to the client and hides unknown causes', () => {
    const sent = toServiceError(CowherdError.invalidArgument('host.name', 'must be a hostname'));
    const received = readServiceError(sent);
    assert.equal(received.code, GrpcStatus.INVALID_ARGUMENT);
    assert.equal(received.reason, 'ERROR_REASON_INVALID_FIELD');
    assert.deepEqual(received.fields, ['host.name']);
    assert.equal(received.message, 'host.name must be a hostname');

    let logged: unknown;
    const hidden = readServiceError(toServiceError(new Error('secret path /etc/x'), (error) => (logged = error)));
    assert.equal(hidden.code, GrpcStatus.INTERNAL);
    assert.equal(hidden.message, 'internal error');
    assert.ok(logged instanceof Error);
  });

  it('redacts PEM blocks and join tokens from free text', () => {
    const text = 'failed: -----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY----- token cjt1.abc.def';
    assert.equal(redactSecrets(text), 'failed: [redacted pem] token [redacted token]');
  });
});

describe('pagination', () => {
  const tokens = new PageTokens(Buffer.alloc(32, 7));
  const items = Array.from({ length: 25 }, (_, i) => `item-${String(i).padStart(2, '0')}`);

  it('pages completely, in order, with no item twice', async () => {
    const seen = await readAllPages(async (pageToken) => {
      const { page, nextPageToken } = paginate(items, (item) => item, { pageSize: 10, pageToken, query: 'q', tokens });
      return { items: page, nextPageToken };
    });
    assert.deepEqual(seen, items);
  });

  it('refuses tampered tokens, tokens of another query and of another secret', () => {
    const { nextPageToken } = paginate(items, (item) => item, { pageSize: 10, pageToken: '', query: 'q', tokens });
    const [body, mac] = nextPageToken.split('.');
    const forgedBody = Buffer.from(JSON.stringify({ k: 'item-20', q: JSON.parse(Buffer.from(body!, 'base64url').toString()).q })).toString('base64url');
    assert.throws(() => tokens.open(`${forgedBody}.${mac}`, 'q'), /page_token/);
    assert.throws(() => tokens.open(nextPageToken, 'other query'), /different query/);
    assert.throws(() => new PageTokens(Buffer.alloc(32, 8)).open(nextPageToken, 'q'), /page_token/);
    assert.equal(tokens.open(nextPageToken, 'q'), 'item-09');
  });

  it('defaults and caps page sizes', () => {
    assert.equal(pageSizeOf(0), 100);
    assert.equal(pageSizeOf(5000), 1000);
    assert.throws(() => pageSizeOf(-1), /page_size/);
  });
});

describe('pki', () => {
  it('signs a CSR-made leaf with the SPIFFE SAN, server and client usage, and reads it back', async () => {
    const ca = await createCertificateAuthority({ bits: 2048 });
    const keys = await generateKeyPair();
    const csr = parseCsr(createCsr(keys.privateKeyPem, keys.publicKeyPem, { identity: 'spiffe://cowherd/host/kvm-01', dnsNames: ['kvm-01'] }));
    assert.deepEqual(csr.uris, ['spiffe://cowherd/host/kvm-01']);
    assert.deepEqual(csr.dnsNames, ['kvm-01']);
    const pem = signLeafCertificate({ ca, publicKeyPem: csr.publicKeyPem, identity: csr.uris[0]!, dnsNames: csr.dnsNames, ttlSeconds: 3600 });
    const facts = inspectCertificate(pem);
    assert.deepEqual(facts.identity, { kind: 'host', name: 'kvm-01', uri: 'spiffe://cowherd/host/kvm-01' });
    assert.ok(facts.notAfter.getTime() - Date.now() <= 3600_000 + 120_000);
    assert.match(facts.serialNumber, /^[0-9a-f]+$/);
  });

  it('refuses a malformed CSR and one whose signature does not verify', async () => {
    assert.throws(
      () => parseCsr('not a csr'),
      (error: unknown) => error instanceof CowherdError && error.field === 'csr_pem',
    );
    const keys = await generateKeyPair();
    const other = await generateKeyPair();
    // Signed with one key, carrying another's public key: the self-signature cannot verify.
    assert.throws(() => parseCsr(createCsr(keys.privateKeyPem, other.publicKeyPem, { identity: 'spiffe://cowherd/host/a' })), /signature/);
  });
});

describe('reflection descriptor set', () => {
  it('splits the buf descriptor set into files that keep their dependency lists', () => {
    const files = splitDescriptorSet(readDescriptorSet()).map((bytes) => FileDescriptorProto.decode(bytes));
    const operations = files.find((file) => file.name === 'google/longrunning/operations.proto');
    assert.ok(operations, 'operations.proto is in the set');
    assert.ok(operations.dependency.includes('google/rpc/status.proto'));
    assert.ok(files.some((file) => file.name === 'grpc/health/v1/health.proto'));
  });
});

describe('revocation following', () => {
  it('runs a refresh asked for during a fetch once more afterwards, so a change stored meanwhile is seen', async () => {
    const seen: string[][] = [];
    let stored: string[] = [];
    const releases: Array<() => void> = [];
    const refresh = rerunning(async () => {
      const snapshot = [...stored];
      await new Promise<void>((resolve) => releases.push(resolve));
      seen.push(snapshot);
    });
    const first = refresh();
    stored = ['abc'];
    const second = refresh();
    const third = refresh();
    assert.equal(releases.length, 1, 'one run at a time');
    releases.shift()!();
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(releases.length, 1, 'the calls during the run asked for exactly one more');
    releases.shift()!();
    await Promise.all([first, second, third]);
    assert.deepEqual(seen, [[], ['abc']]);
  });

  it('keeps serials added locally through a replace with an older list', () => {
    const set = new RevocationSet();
    set.add('1f');
    set.replace(['2a']);
    assert.ok(set.isRevoked('1f') && set.isRevoked('2a'));
    set.replace([]);
    assert.ok(set.isRevoked('1f'));
    assert.equal(set.isRevoked('2a'), false);
  });
});
