/**
 * A clone's guest identity (cowherd.inventory.v1.GuestConfiguration): the checks both cloning (before an
 * operation exists) and the agent (before it makes anything) run, the per-clone rendering of its variables,
 * and the digest that is all cowherd keeps of it. The documents hold secrets: no message here quotes them.
 *
 * Variables: `{name}`, `{index}`, `{host}` and `{uuid}`, exactly these spellings; every other brace is kept as
 * written, so shell `${HOME}` and cloud-init's own Jinja (`{{ v1.local_hostname }}`) pass through untouched.
 * The hostname template is the exception: a hostname holds no braces, so any other brace there is refused.
 */
import { createHash } from 'node:crypto';
import { GuestConfiguration } from '../../gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../platform/errors.js';

/** The field name requests use for the configuration (errors name `guest_configuration.<field>`). */
export const GUEST_CONFIGURATION_FIELD = 'guest_configuration';
/** user-data and network-config after substitution, each at most this many bytes (cloud-init seeds are small; a config drive is 64 MiB at most, a NoCloud seed is read whole). */
export const MAX_DOCUMENT_BYTES = 64 * 1024;
/** SSH keys per configuration at most. */
export const MAX_SSH_KEYS = 100;
/** Bytes per SSH key line at most (an RSA 16384-bit key is ~2.8 KiB; certificates are larger). */
export const MAX_SSH_KEY_BYTES = 16 * 1024;
/** The hostname template at most (before substitution). */
const MAX_HOSTNAME_TEMPLATE = 1024;
/** The default hostname template: the clone's domain name. */
export const DEFAULT_HOSTNAME_TEMPLATE = '{name}';
/** A UUID-shaped stand-in for `{uuid}` when checking before the agent has drawn the clone's UUID (same length and alphabet). */
export const PLACEHOLDER_UUID = '00000000-0000-4000-8000-000000000000';

const VARIABLES = /\{(name|index|host|uuid)\}/g;
const HOSTNAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
const SSH_KEY =
  /^(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp(?:256|384|521)|sk-(?:ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com|(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp(?:256|384|521))-cert-v01@openssh\.com) [A-Za-z0-9+/]+={0,3}(?: [^\r\n]*)?$/;

/** The values of one clone's variables. */
export interface GuestVariables {
  /** The domain name (the virtual machine id). */
  readonly name: string;
  /** 1-based index in the CloneVirtualMachines request. */
  readonly index: number;
  /** The host id (not `hosts/{host}`). */
  readonly host: string;
  /** The clone's libvirt UUID, lowercase. */
  readonly uuid: string;
}

/** What a clone's seed disk holds, rendered. */
export interface GuestIdentity {
  readonly hostname: string;
  /** `meta-data`: instance-id, local-hostname, public-keys (YAML). */
  readonly metaData: string;
  /** `user-data`. */
  readonly userData: string;
  /** `network-config`, when the configuration has one. */
  readonly networkConfig?: string;
}

/**
 * The configuration clones get: the request's, each empty field filled from the image's default; the image's
 * default alone when the request has none; undefined when neither has one (no seed disk).
 */
export function effectiveGuestConfiguration(
  imageDefault: GuestConfiguration | undefined,
  requested: GuestConfiguration | undefined,
): GuestConfiguration | undefined {
  if (requested === undefined) return imageDefault;
  if (imageDefault === undefined) return requested;
  return {
    hostnameTemplate: requested.hostnameTemplate || imageDefault.hostnameTemplate,
    sshAuthorizedKeys: requested.sshAuthorizedKeys.length > 0 ? requested.sshAuthorizedKeys : imageDefault.sshAuthorizedKeys,
    userData: requested.userData || imageDefault.userData,
    networkConfig: requested.networkConfig || imageDefault.networkConfig,
  };
}

/** SHA-256 (lowercase hex) of the configuration's protobuf encoding: what the inventory, events and operations keep instead of it. */
export function guestConfigurationDigest(configuration: GuestConfiguration): string {
  return createHash('sha256')
    .update(GuestConfiguration.encode(GuestConfiguration.fromPartial(configuration)).finish())
    .digest('hex');
}

/**
 * Checks what can be checked without a clone's values: sizes, key lines, the kind of each document, the
 * variables of the hostname template. INVALID_ARGUMENT names the field. `prefix` is the request's field name.
 */
export function checkGuestConfiguration(configuration: GuestConfiguration, prefix = GUEST_CONFIGURATION_FIELD): void {
  const field = (name: string): string => `${prefix}.${name}`;
  const hostname = configuration.hostnameTemplate;
  if (hostname.length > MAX_HOSTNAME_TEMPLATE)
    throw CowherdError.invalidArgument(field('hostname_template'), `must be at most ${MAX_HOSTNAME_TEMPLATE} characters`);
  const stray = hostname.replace(VARIABLES, 'x');
  if (/[{}]/.test(stray)) throw CowherdError.invalidArgument(field('hostname_template'), 'may use only the variables {name}, {index}, {host} and {uuid}');
  if (configuration.sshAuthorizedKeys.length > MAX_SSH_KEYS)
    throw CowherdError.invalidArgument(field('ssh_authorized_keys'), `must hold at most ${MAX_SSH_KEYS} keys`);
  configuration.sshAuthorizedKeys.forEach((key, index) => checkSshKey(key, field(`ssh_authorized_keys[${index}]`)));
  checkUserData(configuration.userData, field('user_data'));
  checkNetworkConfig(configuration.networkConfig, field('network_config'));
}

/**
 * Renders a clone's identity and checks the result (a valid hostname, documents within their size).
 * INVALID_ARGUMENT names the field; nothing of a document is quoted.
 */
export function renderGuestIdentity(configuration: GuestConfiguration, variables: GuestVariables, prefix = GUEST_CONFIGURATION_FIELD): GuestIdentity {
  const field = (name: string): string => `${prefix}.${name}`;
  const substitute = (text: string): string =>
    text.replace(VARIABLES, (_whole, variable: keyof GuestVariables) => (variable === 'index' ? String(variables.index) : variables[variable]));
  const hostname = substitute(configuration.hostnameTemplate === '' ? DEFAULT_HOSTNAME_TEMPLATE : configuration.hostnameTemplate);
  if (!HOSTNAME.test(hostname))
    throw CowherdError.invalidArgument(
      field('hostname_template'),
      `gives ${JSON.stringify(hostname.slice(0, 300))} for clone ${variables.index}, which is not a valid hostname (dot-separated labels of letters, digits and inner hyphens, 1 to 63 characters each, 253 in all)`,
    );
  const keys = configuration.sshAuthorizedKeys.map((key, index) => {
    const rendered = substitute(key);
    checkSshKey(rendered, field(`ssh_authorized_keys[${index}]`));
    return rendered;
  });
  const userData = substitute(configuration.userData === '' ? '#cloud-config\n' : configuration.userData);
  checkUserData(userData, field('user_data'));
  let networkConfig: string | undefined;
  if (configuration.networkConfig !== '') {
    networkConfig = substitute(configuration.networkConfig);
    checkNetworkConfig(networkConfig, field('network_config'));
  }
  const lines = [`instance-id: ${JSON.stringify(variables.uuid)}`, `local-hostname: ${JSON.stringify(hostname)}`];
  if (keys.length > 0) lines.push('public-keys:', ...keys.map((key) => `  - ${JSON.stringify(key)}`));
  return { hostname, metaData: `${lines.join('\n')}\n`, userData, ...(networkConfig === undefined ? {} : { networkConfig }) };
}

function checkSshKey(key: string, field: string): void {
  if (Buffer.byteLength(key) > MAX_SSH_KEY_BYTES) throw CowherdError.invalidArgument(field, `must be at most ${MAX_SSH_KEY_BYTES} bytes`);
  if (!SSH_KEY.test(key.trim()))
    throw CowherdError.invalidArgument(
      field,
      'must be one OpenSSH public key line: a key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-*, sk-*), base64, an optional comment',
    );
}

function checkUserData(text: string, field: string): void {
  if (text === '') return;
  if (Buffer.byteLength(text) > MAX_DOCUMENT_BYTES) throw CowherdError.invalidArgument(field, `must be at most ${MAX_DOCUMENT_BYTES} bytes`);
  if (text.includes('\0')) throw CowherdError.invalidArgument(field, 'must be text (it holds a NUL byte)');
  // cloud-init's Jinja header may come first; the document kind is the line after it.
  const body = /^## template: *jinja[ \t]*\r?\n/i.test(text) ? text.slice(text.indexOf('\n') + 1) : text;
  if (!/^(#cloud-config[ \t]*\r?(\n|$)|#!|content-type: *multipart\/)/i.test(body))
    throw CowherdError.invalidArgument(field, 'must start with "#cloud-config", "#!" (a script) or "Content-Type: multipart/" (a MIME multipart)');
}

function checkNetworkConfig(text: string, field: string): void {
  if (text === '') return;
  if (Buffer.byteLength(text) > MAX_DOCUMENT_BYTES) throw CowherdError.invalidArgument(field, `must be at most ${MAX_DOCUMENT_BYTES} bytes`);
  if (text.includes('\0')) throw CowherdError.invalidArgument(field, 'must be text (it holds a NUL byte)');
  const lines = text.split(/\r?\n/).filter((line) => line.trim() !== '' && !/^\s*#/.test(line));
  if (lines.some((line) => /^ *\t/.test(line))) throw CowherdError.invalidArgument(field, 'must be YAML: indentation with tabs is not allowed');
  // Version 2 either at the top (`version: 2`) or under a top-level `network:` key, as cloud-init accepts both.
  const topVersion = lines.find((line) => /^version\s*:/.test(line));
  const networkAt = lines.findIndex((line) => /^network\s*:\s*$/.test(line));
  let version = topVersion;
  if (networkAt >= 0) {
    const indent = /^(\s+)/.exec(lines[networkAt + 1] ?? '')?.[1] ?? '';
    version = indent === '' ? undefined : lines.slice(networkAt + 1).find((line) => line.startsWith(`${indent}version`) && /^\s+version\s*:/.test(line));
  }
  if (version === undefined || !/:\s*["']?2["']?\s*$/.test(version))
    throw CowherdError.invalidArgument(field, 'must be a network-config version 2 document ("version: 2" at the top level or under "network:")');
}
