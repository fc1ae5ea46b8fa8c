/**
 * One error type for the whole codebase and the one place where it becomes a gRPC status.
 * Domain code throws CowherdError (or lets unknown errors fly); the server boundary calls
 * toServiceError, which attaches google.rpc.Status with an ErrorInfo (and a BadRequest for field
 * errors) in `grpc-status-details-bin`. A `cause` is logged, never sent.
 */
import { Metadata, status as GrpcStatus, type ServiceError } from '@grpc/grpc-js';
import { ErrorReason, errorReasonFromJSON, errorReasonToJSON } from '../../gen/cowherd/common/v1/error_reason.js';
import { BadRequest, ErrorInfo } from '../../gen/google/rpc/error_details.js';
import { Status } from '../../gen/google/rpc/status.js';
import type { Any } from '../../gen/google/protobuf/any.js';
import { isStoreUnavailable } from './store-errors.js';
import { typeUrlOf } from './type-urls.js';

/** The ErrorInfo domain of every cowherd error. */
export const ERROR_DOMAIN = 'cowherd.dev';
const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
const ERROR_INFO_TYPE = typeUrlOf(ErrorInfo);
const BAD_REQUEST_TYPE = typeUrlOf(BadRequest);

/** Options of a CowherdError beyond code and message. */
export interface CowherdErrorOptions {
  readonly reason: ErrorReason;
  /** For INVALID_ARGUMENT: the request field at fault, in proto field path form ("host.name"). */
  readonly field?: string;
  /** Extra ErrorInfo metadata, e.g. the dependents that block a delete. Never secrets. */
  readonly metadata?: Readonly<Record<string, string>>;
  /** What went wrong underneath: logged, never sent to the caller. */
  readonly cause?: unknown;
}

/** Thrown by domain code for every failure the caller should see as a specific gRPC status. */
export class CowherdError extends Error {
  override readonly name = 'CowherdError';
  readonly code: GrpcStatus;
  readonly reason: ErrorReason;
  readonly field: string | undefined;
  readonly metadata: Readonly<Record<string, string>>;

  constructor(code: GrpcStatus, message: string, options: CowherdErrorOptions) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.reason = options.reason;
    this.field = options.field;
    this.metadata = options.metadata ?? {};
  }

  /** INVALID_ARGUMENT naming the field: "<field> <problem>". */
  static invalidArgument(field: string, problem: string, reason: ErrorReason = ErrorReason.ERROR_REASON_INVALID_FIELD, cause?: unknown): CowherdError {
    return new CowherdError(GrpcStatus.INVALID_ARGUMENT, `${field} ${problem}`, { reason, field, cause });
  }

  /** NOT_FOUND for a resource name. */
  static notFound(resourceName: string): CowherdError {
    return new CowherdError(GrpcStatus.NOT_FOUND, `${resourceName} not found`, {
      reason: ErrorReason.ERROR_REASON_RESOURCE_NOT_FOUND,
      metadata: { resource: resourceName },
    });
  }

  /** ALREADY_EXISTS for a resource name. */
  static alreadyExists(resourceName: string): CowherdError {
    return new CowherdError(GrpcStatus.ALREADY_EXISTS, `${resourceName} already exists`, {
      reason: ErrorReason.ERROR_REASON_ALREADY_EXISTS,
      metadata: { resource: resourceName },
    });
  }

  /** FAILED_PRECONDITION with a reason and optional metadata. */
  static failedPrecondition(message: string, reason: ErrorReason, metadata?: Record<string, string>): CowherdError {
    return new CowherdError(GrpcStatus.FAILED_PRECONDITION, message, metadata === undefined ? { reason } : { reason, metadata });
  }

  /** PERMISSION_DENIED: the caller is known but may not do this. */
  static permissionDenied(message: string, reason: ErrorReason = ErrorReason.ERROR_REASON_PERMISSION_DENIED): CowherdError {
    return new CowherdError(GrpcStatus.PERMISSION_DENIED, message, { reason });
  }

  /** UNAUTHENTICATED: the caller could not be identified. */
  static unauthenticated(message: string, reason: ErrorReason = ErrorReason.ERROR_REASON_UNAUTHENTICATED): CowherdError {
    return new CowherdError(GrpcStatus.UNAUTHENTICATED, message, { reason });
  }
}

/** Converts any thrown value into a google.rpc.Status (for Operation.error and per-item results). */
export function toStatus(error: unknown): Status {
  const known = asCowherdError(error);
  const details: Any[] = [
    {
      typeUrl: ERROR_INFO_TYPE,
      value: Buffer.from(ErrorInfo.encode({ reason: errorReasonToJSON(known.reason), domain: ERROR_DOMAIN, metadata: { ...known.metadata } }).finish()),
    },
  ];
  if (known.field !== undefined) {
    details.push({
      typeUrl: BAD_REQUEST_TYPE,
      value: Buffer.from(
        BadRequest.encode({
          fieldViolations: [{ field: known.field, description: known.message, reason: errorReasonToJSON(known.reason), localizedMessage: undefined }],
        }).finish(),
      ),
    });
  }
  return { code: known.code, message: known.message, details };
}

/**
 * Turns a thrown value into what a grpc-js handler passes to its callback: canonical code, message,
 * and the encoded google.rpc.Status in trailing metadata. Unknown errors become INTERNAL with a
 * generic message; `onUnknown` receives them for logging.
 */
export function toServiceError(
  error: unknown,
  onUnknown?: (error: unknown) => void,
): Partial<ServiceError> & { code: GrpcStatus; details: string; metadata: Metadata } {
  if (!(error instanceof CowherdError) && onUnknown) onUnknown(error);
  const status = toStatus(error);
  const metadata = new Metadata();
  metadata.set(STATUS_DETAILS_KEY, Buffer.from(Status.encode(status).finish()));
  return { name: 'CowherdError', message: status.message, code: status.code, details: status.message, metadata };
}

/**
 * Maps unknown errors to INTERNAL with a message that leaks nothing; a store that did not answer (NATS restarting)
 * is UNAVAILABLE, which clients retry, not INTERNAL.
 */
export function asCowherdError(error: unknown): CowherdError {
  if (error instanceof CowherdError) return error;
  if (isStoreUnavailable(error)) {
    return new CowherdError(GrpcStatus.UNAVAILABLE, 'the control-plane store (NATS JetStream) did not answer; retry', {
      reason: ErrorReason.ERROR_REASON_STORE_UNAVAILABLE,
      cause: error,
    });
  }
  return new CowherdError(GrpcStatus.INTERNAL, 'internal error', { reason: ErrorReason.ERROR_REASON_INTERNAL, cause: error });
}

/** What a client learns from a failed call: code, message and the ErrorInfo reason and metadata. */
export interface ReceivedError {
  readonly code: GrpcStatus;
  readonly message: string;
  /** ErrorInfo.reason, e.g. "ERROR_REASON_IMAGE_IN_USE"; empty when the server sent none. */
  readonly reason: string;
  readonly metadata: Readonly<Record<string, string>>;
  /** Fields named by a BadRequest detail. */
  readonly fields: readonly string[];
}

/** Decodes a grpc-js ServiceError from a cowherd server (client side). */
export function readServiceError(error: Partial<ServiceError>): ReceivedError {
  const raw = error.metadata?.get(STATUS_DETAILS_KEY)[0];
  let reason = '';
  let metadata: Record<string, string> = {};
  const fields: string[] = [];
  if (raw instanceof Buffer) {
    const status = Status.decode(raw);
    for (const detail of status.details) {
      if (detail.typeUrl === ERROR_INFO_TYPE) {
        const info = ErrorInfo.decode(detail.value);
        reason = info.reason;
        metadata = info.metadata;
      } else if (detail.typeUrl === BAD_REQUEST_TYPE) {
        for (const violation of BadRequest.decode(detail.value).fieldViolations) fields.push(violation.field);
      }
    }
  }
  return { code: error.code ?? GrpcStatus.UNKNOWN, message: error.details ?? error.message ?? '', reason, metadata, fields };
}

/**
 * Re-raises an error another cowherd server sent (code, message, reason, metadata), for a service that
 * relays a call: the caller sees the agent's FAILED_PRECONDITION, not an INTERNAL. Transport failures
 * (UNAVAILABLE, DEADLINE_EXCEEDED) become UNAVAILABLE with HOST_UNREACHABLE naming `target`.
 */
export function relayServiceError(error: unknown, target: string): CowherdError {
  if (error instanceof CowherdError) return error;
  const received = readServiceError(error as Partial<ServiceError>);
  if (received.code === GrpcStatus.UNAVAILABLE || received.code === GrpcStatus.DEADLINE_EXCEEDED) {
    return new CowherdError(GrpcStatus.UNAVAILABLE, `${target} did not answer: ${received.message}`, {
      reason: ErrorReason.ERROR_REASON_HOST_UNREACHABLE,
      metadata: { host: target },
      cause: error,
    });
  }
  if (received.code === GrpcStatus.INTERNAL || received.code === GrpcStatus.UNKNOWN || received.reason === '') {
    return new CowherdError(received.code === GrpcStatus.UNKNOWN ? GrpcStatus.INTERNAL : received.code, `${target}: ${received.message}`, {
      reason: ErrorReason.ERROR_REASON_INTERNAL,
      cause: error,
    });
  }
  const reason = errorReasonFromJSON(received.reason);
  return new CowherdError(received.code, received.message, {
    reason: reason === ErrorReason.UNRECOGNIZED ? ErrorReason.ERROR_REASON_INTERNAL : reason,
    metadata: received.metadata,
    ...(received.fields[0] === undefined ? {} : { field: received.fields[0] }),
    cause: error,
  });
}

/** A CowherdError carrying a google.rpc.Status (its code, ErrorInfo reason and metadata). */
export function errorFromStatus(status: Status, prefix: string): CowherdError {
  const info = status.details.find((detail) => detail.typeUrl === ERROR_INFO_TYPE);
  const decoded = info ? ErrorInfo.decode(info.value) : undefined;
  return new CowherdError(status.code, `${prefix}${status.message}`, {
    reason: decoded ? errorReasonFromJSON(decoded.reason) : ErrorReason.ERROR_REASON_INTERNAL,
    metadata: decoded?.metadata ?? {},
  });
}
