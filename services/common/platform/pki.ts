/**
 * X.509 building blocks for cowherd's private CA: keys, CSRs, certificates with SPIFFE URI SANs.
 * Key pairs come from node:crypto (native, ~20x faster than node-forge's JS RSA); certificate and
 * CSR encoding uses node-forge.
 */
import { createHash, generateKeyPair as generateKeyPairCallback, randomBytes, X509Certificate } from 'node:crypto';
import { promisify } from 'node:util';
import forge from 'node-forge';
import { CowherdError } from './errors.js';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { parseIdentity, type Identity } from './identity.js';

const generateKeyPairAsync = promisify(generateKeyPairCallback);

/** A PEM private key and the matching PEM public key. */
export interface KeyPairPem {
  readonly privateKeyPem: string;
  readonly publicKeyPem: string;
}

/** A certificate with its private key, both PEM. */
export interface CertificateAndKey {
  readonly certificatePem: string;
  readonly privateKeyPem: string;
}

/** Makes an RSA key pair; 3072 bits for the CA, 2048 for short-lived leaves. */
export async function generateKeyPair(bits = 2048): Promise<KeyPairPem> {
  const { privateKey, publicKey } = await generateKeyPairAsync('rsa', {
    modulusLength: bits,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
  return { privateKeyPem: privateKey, publicKeyPem: publicKey };
}

/** Options for {@link createCertificateAuthority}. */
export interface CertificateAuthorityOptions {
  /** Subject common name. Default "cowherd CA". */
  readonly commonName?: string;
  /** RSA modulus length. Default 3072. */
  readonly bits?: number;
  /** Validity in days. Default 3650. */
  readonly validityDays?: number;
  /** Start of validity; default one minute ago (clock skew). */
  readonly notBefore?: Date;
}

/** Creates a self-signed CA certificate and key. */
export async function createCertificateAuthority(options: CertificateAuthorityOptions = {}): Promise<CertificateAndKey> {
  const keys = await generateKeyPair(options.bits ?? 3072);
  const privateKey = forge.pki.privateKeyFromPem(keys.privateKeyPem);
  const publicKey = forge.pki.publicKeyFromPem(keys.publicKeyPem);
  const certificate = forge.pki.createCertificate();
  certificate.publicKey = publicKey;
  certificate.serialNumber = newSerialNumber();
  const notBefore = options.notBefore ?? new Date(Date.now() - 60_000);
  certificate.validity.notBefore = notBefore;
  certificate.validity.notAfter = new Date(notBefore.getTime() + (options.validityDays ?? 3650) * 86_400_000);
  const subject = [
    { name: 'commonName', value: options.commonName ?? 'cowherd CA' },
    { name: 'organizationName', value: 'cowherd' },
  ];
  certificate.setSubject(subject);
  certificate.setIssuer(subject);
  certificate.setExtensions([
    { name: 'basicConstraints', cA: true, critical: true, pathLenConstraint: 0 },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true },
    { name: 'subjectKeyIdentifier' },
  ]);
  certificate.sign(privateKey, forge.md.sha256.create());
  return { certificatePem: forge.pki.certificateToPem(certificate), privateKeyPem: keys.privateKeyPem };
}

/** What a certificate request asks for. */
export interface CsrSubject {
  /** The SPIFFE identity, e.g. spiffe://cowherd/host/kvm-01. */
  readonly identity: string;
  /** DNS names the holder is reached by (servers). */
  readonly dnsNames?: readonly string[];
}

/** Makes a PEM CSR signed by the given private key (the key never leaves the caller). */
export function createCsr(privateKeyPem: string, publicKeyPem: string, subject: CsrSubject): string {
  const csr = forge.pki.createCertificationRequest();
  csr.publicKey = forge.pki.publicKeyFromPem(publicKeyPem);
  csr.setSubject([{ name: 'commonName', value: commonNameFor(subject.identity) }]);
  csr.setAttributes([{ name: 'extensionRequest', extensions: [{ name: 'subjectAltName', altNames: altNames(subject.identity, subject.dnsNames ?? []) }] }]);
  csr.sign(forge.pki.privateKeyFromPem(privateKeyPem), forge.md.sha256.create());
  return forge.pki.certificationRequestToPem(csr);
}

/** What a CSR says, after its signature was checked. */
export interface ParsedCsr {
  readonly publicKeyPem: string;
  /** Every URI SAN in the request. */
  readonly uris: readonly string[];
  /** Every DNS SAN in the request. */
  readonly dnsNames: readonly string[];
  /** SANs of any other kind (IP, email...), which cowherd never signs. */
  readonly otherNames: readonly string[];
  readonly publicKeyBits: number;
}

/**
 * Parses a PEM CSR and verifies its self-signature.
 * Throws INVALID_ARGUMENT (CSR_INVALID) naming `field` when it is not a well-formed, self-signed RSA CSR.
 */
export function parseCsr(csrPem: string, field = 'csr_pem'): ParsedCsr {
  let csr: forge.pki.CertificateSigningRequest;
  try {
    csr = forge.pki.certificationRequestFromPem(csrPem);
  } catch (cause) {
    throw CowherdError.invalidArgument(field, 'is not a PEM certificate signing request', ErrorReason.ERROR_REASON_CSR_INVALID, cause);
  }
  let verified = false;
  try {
    verified = csr.verify();
  } catch {
    // node-forge throws rather than returning false when the signature block does not decode.
  }
  if (!verified) throw CowherdError.invalidArgument(field, 'signature does not verify', ErrorReason.ERROR_REASON_CSR_INVALID);
  const publicKey = csr.publicKey as forge.pki.rsa.PublicKey | null;
  if (!publicKey || typeof publicKey.n?.bitLength !== 'function') {
    throw CowherdError.invalidArgument(field, 'must carry an RSA public key', ErrorReason.ERROR_REASON_CSR_INVALID);
  }
  const uris: string[] = [];
  const dnsNames: string[] = [];
  const otherNames: string[] = [];
  const request = csr.getAttribute({ name: 'extensionRequest' }) as {
    extensions?: Array<{ name?: string; altNames?: Array<{ type: number; value?: string; ip?: string }> }>;
  } | null;
  for (const extension of request?.extensions ?? []) {
    if (extension.name !== 'subjectAltName') continue;
    for (const alt of extension.altNames ?? []) {
      if (alt.type === 6 && alt.value) uris.push(alt.value);
      else if (alt.type === 2 && alt.value) dnsNames.push(alt.value);
      else otherNames.push(alt.ip ?? alt.value ?? `type ${alt.type}`);
    }
  }
  return { publicKeyPem: forge.pki.publicKeyToPem(publicKey), uris, dnsNames, otherNames, publicKeyBits: publicKey.n.bitLength() };
}

/** What to put into a leaf certificate. */
export interface LeafCertificateOptions {
  readonly ca: CertificateAndKey;
  readonly publicKeyPem: string;
  readonly identity: string;
  readonly dnsNames?: readonly string[];
  /** Lifetime in seconds. */
  readonly ttlSeconds: number;
  /** Start of validity; default one minute ago (clock skew). */
  readonly notBefore?: Date;
  /** Serial as lowercase hex; default 16 random bytes. */
  readonly serialNumber?: string;
}

/** Signs a leaf certificate usable both as TLS server and TLS client (cowherd's peers are both). */
export function signLeafCertificate(options: LeafCertificateOptions): string {
  const caCertificate = forge.pki.certificateFromPem(options.ca.certificatePem);
  const caKey = forge.pki.privateKeyFromPem(options.ca.privateKeyPem);
  const certificate = forge.pki.createCertificate();
  certificate.publicKey = forge.pki.publicKeyFromPem(options.publicKeyPem);
  certificate.serialNumber = options.serialNumber ?? newSerialNumber();
  const backdate = backdateSeconds(options.ttlSeconds);
  const notBefore = options.notBefore ?? new Date(Date.now() - backdate * 1000);
  certificate.validity.notBefore = notBefore;
  certificate.validity.notAfter = new Date(notBefore.getTime() + (backdate + options.ttlSeconds) * 1000);
  // The serial is in the subject too (OU): NATS (2.9) maps client certificates to users by subject DN,
  // which is how a single revoked certificate can be refused there while its identity's other ones work.
  certificate.setSubject(leafSubject(options.identity, certificate.serialNumber));
  certificate.setIssuer(caCertificate.subject.attributes);
  certificate.setExtensions([
    { name: 'basicConstraints', cA: false, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    { name: 'extKeyUsage', serverAuth: true, clientAuth: true },
    { name: 'subjectAltName', critical: true, altNames: altNames(options.identity, options.dnsNames ?? []) },
    { name: 'subjectKeyIdentifier' },
    { name: 'authorityKeyIdentifier', keyIdentifier: caCertificate.generateSubjectKeyIdentifier().getBytes() },
  ]);
  certificate.sign(caKey, forge.md.sha256.create());
  return forge.pki.certificateToPem(certificate);
}

/**
 * Leaves start a little in the past so that a verifier whose clock lags still accepts them: a minute, or a
 * quarter of the lifetime for very short-lived certificates (tests), so renewal at two thirds stays ahead.
 */
export function backdateSeconds(ttlSeconds: number): number {
  return Math.min(60, ttlSeconds / 4);
}

/** The ttl a certificate was signed with, from its whole validity (the inverse of the backdating above). */
export function ttlOfValidity(validitySeconds: number): number {
  return validitySeconds >= 300 ? validitySeconds - 60 : validitySeconds / 1.25;
}

/** Facts read from a PEM certificate with node:crypto. */
export interface CertificateFacts {
  readonly serialNumber: string;
  readonly identity: Identity | undefined;
  readonly dnsNames: readonly string[];
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly sha256: string;
}

/** Reads serial (lowercase hex), SPIFFE identity, DNS names, validity and fingerprint of a PEM certificate. */
export function inspectCertificate(certificatePem: string): CertificateFacts {
  const certificate = new X509Certificate(certificatePem);
  const sans = parseSubjectAltName(certificate.subjectAltName ?? '');
  const uri = sans.uris[0];
  return {
    serialNumber: normalizeSerial(certificate.serialNumber),
    identity: uri === undefined ? undefined : parseIdentity(uri),
    dnsNames: sans.dnsNames,
    notBefore: new Date(certificate.validFrom),
    notAfter: new Date(certificate.validTo),
    sha256: createHash('sha256').update(certificate.raw).digest('hex'),
  };
}

/** What a certificate says about its use: the basicConstraints CA flag and the extended key usages. */
export interface CertificateUsage {
  /** basicConstraints CA:TRUE, whatever keyUsage says (OpenSSL's own CA check also wants keyCertSign). */
  readonly certificateAuthority: boolean;
  /** serverAuth, clientAuth, ... as node-forge names them; empty without the extension. */
  readonly extendedKeyUsages: readonly string[];
}

const usageByFingerprint = new Map<string, CertificateUsage>();

/**
 * Reads basicConstraints and extKeyUsage from a certificate's DER bytes, from the extension list itself
 * (never a byte search, which a crafted name could fool). Node's `ca` flag is OpenSSL's X509_check_ca, which
 * calls a CA:TRUE certificate without keyCertSign "not a CA", so it cannot answer this. Results are kept
 * by fingerprint (bounded): servers ask on every call. Throws when the bytes are not a certificate.
 */
export function certificateUsage(der: Buffer): CertificateUsage {
  const fingerprint = createHash('sha256').update(der).digest('hex');
  const known = usageByFingerprint.get(fingerprint);
  if (known) return known;
  const certificate = forge.asn1.fromDer(forge.util.createBuffer(der.toString('binary')));
  const tbs = (certificate.value as forge.asn1.Asn1[])[0];
  const wrapper = (tbs?.value as forge.asn1.Asn1[] | undefined)?.find((part) => part.tagClass === forge.asn1.Class.CONTEXT_SPECIFIC && part.type === 3);
  // The [3] wrapper holds the SEQUENCE of extensions; forge's parser takes the wrapper.
  const extensions = wrapper
    ? (forge.pki as unknown as { certificateExtensionsFromAsn1(wrapper: forge.asn1.Asn1): Array<Record<string, unknown>> }).certificateExtensionsFromAsn1(
        wrapper,
      )
    : [];
  const basic = extensions.find((extension) => extension['name'] === 'basicConstraints');
  const extended = extensions.find((extension) => extension['name'] === 'extKeyUsage');
  const usage: CertificateUsage = {
    certificateAuthority: basic?.['cA'] === true,
    extendedKeyUsages: extended ? ['serverAuth', 'clientAuth', 'codeSigning', 'emailProtection', 'timeStamping'].filter((name) => extended[name] === true) : [],
  };
  if (usageByFingerprint.size >= 10_000) usageByFingerprint.clear();
  usageByFingerprint.set(fingerprint, usage);
  return usage;
}

/** SHA-256 of a PEM certificate's DER bytes, lowercase hex: the pin a join token carries. */
export function certificateSha256(certificatePem: string): string {
  return createHash('sha256').update(new X509Certificate(certificatePem).raw).digest('hex');
}

/** Splits Node's `subjectaltname` string ("URI:spiffe://..., DNS:localhost") into URIs and DNS names. */
export function parseSubjectAltName(subjectAltName: string): { uris: string[]; dnsNames: string[] } {
  const uris: string[] = [];
  const dnsNames: string[] = [];
  for (const part of subjectAltName.split(/,\s*/)) {
    if (part.startsWith('URI:')) uris.push(part.slice(4));
    else if (part.startsWith('DNS:')) dnsNames.push(part.slice(4));
  }
  return { uris, dnsNames };
}

/** Serial numbers compare as lowercase hex without leading zeros. */
export function normalizeSerial(serial: string): string {
  return serial.toLowerCase().replace(/^0+(?=.)/, '');
}

function newSerialNumber(): string {
  // Positive 128-bit serial: clear the top bit so DER keeps it positive without a pad byte.
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x7f) | 0x10;
  return bytes.toString('hex');
}

/** Subject of a leaf: O=cowherd, OU=<serial>, CN=<kind>/<name>, in that DER order. */
function leafSubject(identity: string, serialNumber: string): forge.pki.CertificateField[] {
  return [
    { name: 'organizationName', value: 'cowherd' },
    { name: 'organizationalUnitName', value: normalizeSerial(serialNumber) },
    { name: 'commonName', value: commonNameFor(identity) },
  ];
}

/**
 * The subject DN of a leaf as NATS prints it (RFC 2253: last RDN first), the `user` of a
 * verify_and_map authorization entry.
 */
export function natsUserOf(certificatePem: string): string {
  const facts = new X509Certificate(certificatePem);
  const parts = facts.subject
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line.length > 0);
  return parts.reverse().join(',');
}

function commonNameFor(identity: string): string {
  const short = identity.replace(/^spiffe:\/\/cowherd\//, '');
  return short.length <= 64 ? short : short.slice(0, 64);
}

function altNames(identity: string, dnsNames: readonly string[]): Array<{ type: number; value: string }> {
  return [{ type: 6, value: identity }, ...dnsNames.map((value) => ({ type: 2, value }))];
}
