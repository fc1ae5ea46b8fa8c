/**
 * The one error of the domain XML layers. Failures are {@link DomainXmlError}s (CowherdErrors):
 * UNTRUSTED_DOMAIN_XML (FAILED_PRECONDITION, metadata "element") for XML that cowherd will not carry,
 * PATH_OUTSIDE_IMAGE_DIRECTORY (INVALID_ARGUMENT, metadata "path") for a caller's path outside its directory,
 * INVALID_FIELD for other bad options.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { CowherdError } from '../../../common/platform/errors.js';
import { ErrorReason, errorReasonToJSON } from '../../../gen/cowherd/common/v1/error_reason.js';

/**
 * Thrown when domain XML or an option cannot be used. A CowherdError, so the gRPC boundary maps it as it
 * is; `reasonName` is the ErrorReason's proto name, e.g. "ERROR_REASON_UNTRUSTED_DOMAIN_XML".
 */
export class DomainXmlError extends CowherdError {
  get reasonName(): string {
    return errorReasonToJSON(this.reason);
  }

  /** The XML holds something cowherd will not carry into a template or clone (FAILED_PRECONDITION). */
  static untrusted(element: string, problem: string): DomainXmlError {
    return new DomainXmlError(GrpcStatus.FAILED_PRECONDITION, `domain XML: <${element}>: ${problem}`, {
      reason: ErrorReason.ERROR_REASON_UNTRUSTED_DOMAIN_XML,
      metadata: { element },
    });
  }

  /** A caller's path resolves outside the directory it must stay in (INVALID_ARGUMENT). */
  static pathOutside(field: string, value: string, problem: string): DomainXmlError {
    return new DomainXmlError(GrpcStatus.INVALID_ARGUMENT, `${field} ${problem}`, {
      reason: ErrorReason.ERROR_REASON_PATH_OUTSIDE_IMAGE_DIRECTORY,
      field,
      metadata: { field, path: value },
    });
  }

  /** A caller's option is malformed (INVALID_ARGUMENT). */
  static invalidField(field: string, problem: string): DomainXmlError {
    return new DomainXmlError(GrpcStatus.INVALID_ARGUMENT, `${field} ${problem}`, {
      reason: ErrorReason.ERROR_REASON_INVALID_FIELD,
      field,
      metadata: { field },
    });
  }
}
