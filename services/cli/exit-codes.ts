/**
 * Exit codes that scripts can rely on, the mapping from gRPC status codes to them, and the messages that
 * turn a status into what to do next. The table is documented in the README's CLI section; change both
 * together.
 */
import { Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { readServiceError, type ReceivedError } from '../common/platform/errors.js';
import { Status } from '../gen/google/rpc/status.js';
import {
  HOST_IMAGE_NAME,
  HOST_NAME,
  IMAGE_NAME,
  JOIN_TOKEN_NAME,
  OPERATION_NAME,
  parseImageKey,
  parseImageReference,
  VIRTUAL_MACHINE_NAME,
} from '../common/domain/resource-names.js';

/** The CLI's exit codes. */
export const EXIT = {
  /** Done. */
  OK: 0,
  /** Any other failure: INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED, DATA_LOSS, a local error. */
  FAILURE: 1,
  /** The invocation is wrong: unknown command or option, missing argument, bad value (also INVALID_ARGUMENT, OUT_OF_RANGE). */
  USAGE: 2,
  /** A named resource does not exist (NOT_FOUND). */
  NOT_FOUND: 3,
  /** The fleet's state does not allow it now (FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED, RESOURCE_EXHAUSTED). */
  CONFLICT: 4,
  /** The credentials are missing, unreadable or refused (UNAUTHENTICATED, PERMISSION_DENIED). */
  ACCESS: 5,
  /** A service did not answer in time or could not be reached (UNAVAILABLE, DEADLINE_EXCEEDED): retrying may help. */
  UNAVAILABLE: 6,
  /** An operation finished, but some of its items (clones, hosts) failed; the output lists them. */
  PARTIAL: 7,
  /** Ctrl-C while waiting for an operation (the operation keeps running), or before `fleet up` had the fleet up. */
  INTERRUPTED: 130,
} as const;

/** The exit code for a gRPC status code. */
export function exitCodeFor(code: GrpcStatus): number {
  switch (code) {
    case GrpcStatus.OK:
      return EXIT.OK;
    case GrpcStatus.INVALID_ARGUMENT:
    case GrpcStatus.OUT_OF_RANGE:
      return EXIT.USAGE;
    case GrpcStatus.NOT_FOUND:
      return EXIT.NOT_FOUND;
    case GrpcStatus.FAILED_PRECONDITION:
    case GrpcStatus.ALREADY_EXISTS:
    case GrpcStatus.ABORTED:
    case GrpcStatus.RESOURCE_EXHAUSTED:
      return EXIT.CONFLICT;
    case GrpcStatus.UNAUTHENTICATED:
    case GrpcStatus.PERMISSION_DENIED:
      return EXIT.ACCESS;
    case GrpcStatus.UNAVAILABLE:
    case GrpcStatus.DEADLINE_EXCEEDED:
      return EXIT.UNAVAILABLE;
    default:
      return EXIT.FAILURE;
  }
}

/** An expected failure: printed as `cowherd: <message>` without a stack trace, then exit `exitCode`. */
export class CliError extends Error {
  override readonly name = 'CliError';
  constructor(
    message: string,
    readonly exitCode: number = EXIT.FAILURE,
  ) {
    super(message);
  }
}

/** Where a failed call went, for messages. */
export interface CallTarget {
  /** inventory, distribution, cloning, certificate-authority. */
  readonly service: string;
  readonly address: string;
  /** The flag that sets the address, e.g. --inventory. */
  readonly flag: string;
  /** The environment variable that sets it. */
  readonly variable: string;
  readonly credentialsDirectory: string;
  readonly timeoutMs: number;
}

/** Decodes a google.rpc.Status (an operation's error, a per-item failure) like a call's error. */
export function readStatus(status: Status): ReceivedError {
  const metadata = new Metadata();
  metadata.set('grpc-status-details-bin', Buffer.from(Status.encode(status).finish()));
  return readServiceError({ code: status.code, details: status.message, metadata });
}

/** A CliError with advice for a failed call. */
export function callError(error: ServiceError, target: CallTarget): CliError {
  const received = readServiceError(error);
  return new CliError(explain(received, target), exitCodeFor(received.code));
}

/** The message for a failed status: what went wrong and what to do about it. */
export function explain(received: ReceivedError, target: CallTarget): string {
  const reason = received.reason.replace(/^ERROR_REASON_/, '');
  const message = received.message;
  switch (received.code) {
    case GrpcStatus.NOT_FOUND:
      return describeMissing(received.metadata['resource'] ?? /^(\S+) not found/.exec(message)?.[1], message);
    case GrpcStatus.INVALID_ARGUMENT:
      return `${message}${received.fields.length > 0 && !received.fields.some((field) => message.startsWith(field)) ? ` (field ${received.fields.join(', ')})` : ''}\nhint: --help shows the accepted values`;
    case GrpcStatus.ALREADY_EXISTS:
      if (reason === 'OPERATION_CONFLICT') return `${message}\nhint: another operation is already working on it: wait for it to finish, then retry`;
      return `${message}\nhint: choose another name`;
    case GrpcStatus.FAILED_PRECONDITION:
    case GrpcStatus.RESOURCE_EXHAUSTED:
      // The server says what is wrong; the hint says which cowherd command fixes it.
      return `${message}${PRECONDITION_ADVICE[reason] ? `\nhint: ${PRECONDITION_ADVICE[reason]}` : ''}`;
    case GrpcStatus.UNAUTHENTICATED:
    case GrpcStatus.PERMISSION_DENIED:
      return `the ${target.service} service refused the credentials in ${target.credentialsDirectory}: ${message}. The CLI needs an admin certificate (spiffe://cowherd/admin/<you>) from this fleet's CA: pass --credentials <dir> or set COWHERD_CREDENTIALS (npm start writes one to .state/fleet/credentials/admin)`;
    case GrpcStatus.UNAVAILABLE:
      if (reason === 'HOST_UNREACHABLE' || reason === 'TRANSFER_FAILED') return `${message}; check the host with \`cowherd hosts list\` and retry`;
      // tls.ts expectServerIdentity: a server of this CA, but not the service the CLI meant to reach.
      const identity = /is (spiffe:\/\/\S+?|no cowherd identity), not spiffe:/.exec(message);
      if (identity) {
        return `the server at ${target.address} is not the ${target.service} service (it presents ${identity[1]}); point ${target.flag} or ${target.variable} at the ${target.service} service`;
      }
      if (/certificate|ssl|tls|handshake|self.signed|verify/i.test(message)) {
        return `the TLS handshake with the ${target.service} service at ${target.address} failed (${message}); the credentials in ${target.credentialsDirectory} must be an admin certificate from this fleet's CA (--credentials or COWHERD_CREDENTIALS)`;
      }
      return `cannot reach the ${target.service} service at ${target.address} (${message}); is the fleet running? (npm start runs one on this machine) Point ${target.flag} or ${target.variable} at the service`;
    case GrpcStatus.DEADLINE_EXCEEDED:
      if (reason !== '') return `${message}; retry, or stop it with --force`;
      return `the ${target.service} service at ${target.address} did not answer within ${target.timeoutMs / 1000} s; retry, or raise --timeout`;
    case GrpcStatus.UNIMPLEMENTED:
      return `the ${target.service} service at ${target.address} does not implement this yet (${message}); it needs a newer cowherd version`;
    case GrpcStatus.CANCELLED:
      return `${message}: the operation was cancelled`;
    default:
      return `the ${target.service} service failed: ${message}${reason === 'INTERNAL' || received.code === GrpcStatus.INTERNAL ? ' (its log has the cause)' : ''}`;
  }
}

const PRECONDITION_ADVICE: Readonly<Record<string, string>> = {
  IMAGE_IN_USE: 'delete the VMs cloned from it first: `cowherd vms list --filter \'source_image = "images/<image>"\'` lists them',
  VIRTUAL_MACHINE_RUNNING: '`cowherd vms stop <host>/<vm>` first, or add --force',
  VIRTUAL_MACHINE_HAS_DEPENDENTS: 'delete the clones built on its disks first: `cowherd vms show <host>/<vm>` lists them',
  VIRTUAL_MACHINE_NOT_MANAGED: 'add --force to remove only its libvirt definition (no file is removed)',
  HOST_NOT_EMPTY: '`cowherd hosts drain <host>`, delete its clones (`cowherd vms list --host <host>`), or add --force',
  LAST_AVAILABLE_REPLICA: '`cowherd images distribute <image> --hosts <other host>` first, or add --force',
  HYPERVISOR_MISMATCH: "pick hosts of the image's hypervisor: `cowherd hosts list` shows each host's",
  RESOURCE_STATE_CONFLICT: 'check its state with the matching `show` command and retry once it has settled',
  INSUFFICIENT_SPACE: "free space in the host's image directory: `cowherd hosts show <host>` shows how much is left",
  UNTRUSTED_DOMAIN_XML: 'publish a VM whose disks are plain files and whose XML has no host-specific devices',
};

/** "no host named x; ..." for a NOT_FOUND resource name. */
export function describeMissing(resource: string | undefined, fallback: string): string {
  if (resource === undefined) return `${fallback}; the matching \`list\` command shows what exists`;
  const host = HOST_NAME.parse(resource);
  if (host) return `no host named "${host.host}"; \`cowherd hosts list\` shows the hosts`;
  // A version by number or alias before the plain image: IMAGE_NAME reads `.../versions/3` as a storage key.
  const version = /^images\/[^/]+\/versions\/[^/]+$/.test(resource) ? parseImageReference(resource) : undefined;
  if (version)
    return `image "${version.id}" has no version ${version.version ?? `aliased "${version.alias}"`}; \`cowherd images versions ${version.id}\` lists its versions and aliases`;
  const image = IMAGE_NAME.parse(resource);
  if (image) return `no image named "${image.image}"; \`cowherd images list\` shows the images`;
  const vm = VIRTUAL_MACHINE_NAME.parse(resource);
  if (vm) return `no VM named "${vm.virtualMachine}" on host "${vm.host}"; \`cowherd vms list --host ${vm.host}\` shows its VMs`;
  const replica = HOST_IMAGE_NAME.parse(resource);
  if (replica) {
    const key = parseImageKey(replica.image);
    const what = key && key.version > 1 ? `${key.id}/versions/${key.version}` : replica.image;
    return `host "${replica.host}" holds no copy of image "${what}"; \`cowherd images show ${what}\` shows where it is`;
  }
  if (OPERATION_NAME.matches(resource)) return `no operation ${resource} (finished operations are kept for 7 days)`;
  if (JOIN_TOKEN_NAME.matches(resource)) return `no join token ${resource}`;
  return `${resource} not found`;
}
