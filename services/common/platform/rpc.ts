/**
 * The gRPC boundary of every service: promise-based handlers, caller identity from the client
 * certificate, per-RPC authorization (deny by default), revocation checks, request logging and error
 * mapping. Services write `(request, context) => Promise<response>`; `adaptService` turns that into
 * what grpc-js calls.
 */
import {
  status as GrpcStatus,
  type Metadata,
  type ServerDuplexStream,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceDefinition,
  type UntypedHandleCall,
  type sendUnaryData,
} from '@grpc/grpc-js';
import type { PeerCertificate } from 'node:tls';
import { ErrorReason } from '../../gen/cowherd/common/v1/error_reason.js';
import { CowherdError, toServiceError } from './errors.js';
import { describeIdentity, parseIdentity, type Identity, type IdentityKind } from './identity.js';
import type { Logger } from './logger.js';
import { recordRpc } from './metrics.js';
import { certificateUsage, normalizeSerial, parseSubjectAltName, type CertificateUsage } from './pki.js';

/** What a handler knows about the call it serves. */
export interface CallContext {
  /** The authenticated caller; undefined only on methods that allow unauthenticated callers. */
  readonly caller: Identity | undefined;
  /** The certificate the caller authenticated with; undefined without one. */
  readonly callerCertificate: PeerCertificateFacts | undefined;
  /** Full method path, e.g. /cowherd.inventory.v1.InventoryService/GetHost. */
  readonly method: string;
  /** Logger with caller and method bound. */
  readonly log: Logger;
  /** Aborted when the client cancels or the deadline passes. */
  readonly signal: AbortSignal;
  readonly metadata: Metadata;
}

interface MethodShape {
  readonly path: string;
  readonly requestStream: boolean;
  readonly responseStream: boolean;
  readonly originalName?: string;
  requestDeserialize(bytes: Buffer): unknown;
  responseSerialize(value: never): Buffer;
}

type RequestOf<M> = M extends { requestDeserialize(bytes: Buffer): infer R } ? R : never;
type ResponseOf<M> = M extends { responseSerialize(value: infer R): Buffer } ? R : never;

/** A unary handler. */
export type UnaryHandler<Req, Res> = (request: Req, context: CallContext) => Promise<Res>;
/** A server-streaming handler: `send` writes one message and resolves when the stream can take more. */
export type ServerStreamHandler<Req, Res> = (request: Req, context: CallContext, send: (message: Res) => Promise<void>) => Promise<void>;

/** What the server knows of the client certificate of a call. */
export interface PeerCertificateFacts {
  /** Lowercase hex without leading zeros. */
  readonly serialNumber: string;
  readonly dnsNames: readonly string[];
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** basicConstraints CA:TRUE: a CA certificate, which no client may present. */
  readonly certificateAuthority: boolean;
  /** Extended key usages by name (serverAuth, clientAuth, ...); empty without the extension. */
  readonly extendedKeyUsages: readonly string[];
}

/** The promise-based handlers of a ts-proto service definition (client streaming is not used by cowherd). */
export type Handlers<D> = {
  [K in keyof D]: D[K] extends { requestStream: false; responseStream: false }
    ? UnaryHandler<RequestOf<D[K]>, ResponseOf<D[K]>>
    : D[K] extends { requestStream: false; responseStream: true }
      ? ServerStreamHandler<RequestOf<D[K]>, ResponseOf<D[K]>>
      : never;
};

/** Who may call one RPC. */
export interface AccessRule<Req> {
  /** Identity kinds allowed; 'anyone' admits callers without a client certificate (enrollment port only). */
  readonly allow: readonly IdentityKind[] | 'anyone';
  /**
   * For host callers: the host the request acts for. A host identity may act only for itself: when this
   * returns anything but the caller's own hostname the call is PERMISSION_DENIED (HOST_MISMATCH).
   * 'caller' means the request names no host and the handler acts for the caller's identity itself
   * (renewing its own certificate). Required whenever `allow` includes 'host'.
   */
  readonly actsForHost?: ((request: Req) => string | undefined) | 'caller';
  /** For service callers: the services allowed (least privilege between services); any service when unset. */
  readonly services?: readonly string[];
}

/** The authorization table of a service: every RPC must appear (deny by default is enforced by the type). */
export type AccessPolicy<D> = { [K in keyof D]: AccessRule<RequestOf<D[K]>> };

/** Answers whether a certificate serial (lowercase hex) has been revoked. */
export interface RevocationCheck {
  isRevoked(serialNumber: string): boolean;
}

/** No revocations: for tests and processes that have no view of the CA yet. */
export const NO_REVOCATIONS: RevocationCheck = { isRevoked: () => false };

/**
 * Answers whether the CA issued a certificate serial (lowercase hex): true, false, or undefined when the
 * CA could not be asked (services/common/platform/revocation.ts IssuedSerials).
 */
export interface IssuedCheck {
  isIssued(serialNumber: string): Promise<boolean | undefined>;
}

/** A service ready to be added to a server. */
export interface ServiceRegistration {
  /** Fully qualified service name, e.g. cowherd.inventory.v1.InventoryService. */
  readonly serviceName: string;
  readonly definition: ServiceDefinition;
  readonly implementation: Record<string, UntypedHandleCall>;
}

/** Everything the boundary needs besides the handlers. */
export interface BoundaryOptions {
  readonly log: Logger;
  readonly revocations: RevocationCheck;
  /** Serials the CA issued; without it every CA-signed serial is taken as issued (tests of the boundary alone). */
  readonly issued?: IssuedCheck;
  /** Methods whose successful calls are logged at debug instead of info (health checks, heartbeats). */
  readonly quietMethods?: ReadonlySet<string>;
}

/**
 * Wraps promise-based handlers with authentication, authorization, logging, metrics and error mapping.
 * Methods of the definition without a handler answer UNIMPLEMENTED (after authorization). Every call,
 * refused or not, ends in one `rpc` log line (caller, method, code, ms, and the operation it started
 * or named) and in cowherd_rpc_requests_total / cowherd_rpc_duration_seconds.
 */
export function adaptService<D extends Record<string, MethodShape>>(
  definition: D,
  handlers: Partial<Handlers<D>>,
  policy: AccessPolicy<D>,
  options: BoundaryOptions,
): ServiceRegistration {
  const implementation: Record<string, UntypedHandleCall> = {};
  let serviceName = '';
  for (const [key, method] of Object.entries(definition)) {
    serviceName = method.path.split('/')[1] ?? '';
    const rule = (policy as Record<string, AccessRule<unknown>>)[key];
    const handler = (handlers as Record<string, ((...args: never[]) => Promise<unknown>) | undefined>)[key];
    const quiet = options.quietMethods?.has(method.path) ?? false;
    if (method.requestStream) throw new Error(`${method.path}: client streaming is not supported`);
    if (!method.responseStream) {
      implementation[key] = ((call: ServerUnaryCall<unknown, unknown>, callback: sendUnaryData<unknown>) => {
        const started = process.hrtime.bigint();
        let context: CallContext | undefined;
        void (async () => {
          context = callContext(call, method.path, options);
          await authenticate(context, rule, options);
          authorize(call.request, context, rule, options);
          if (!handler) throw unimplemented(method.path);
          return (handler as UnaryHandler<unknown, unknown>)(call.request, context);
        })().then(
          (response) => {
            logCall(options, context, method.path, started, GrpcStatus.OK, quiet, { operation: operationNameOf(call.request) ?? operationNameOf(response) });
            callback(null, response);
          },
          (error: unknown) => {
            const serviceError = toServiceError(error, (cause) => (context?.log ?? options.log).error({ err: cause, method: method.path }, 'unexpected error'));
            logCall(options, context, method.path, started, serviceError.code, quiet, {
              message: serviceError.details,
              operation: operationNameOf(call.request),
            });
            callback(serviceError, null);
          },
        );
      }) as UntypedHandleCall;
    } else {
      implementation[key] = ((call: ServerWritableStream<unknown, unknown>) => {
        const started = process.hrtime.bigint();
        let context: CallContext | undefined;
        const send = (message: unknown): Promise<void> =>
          new Promise((resolve, reject) => {
            if (call.cancelled || call.destroyed)
              return reject(new CowherdError(GrpcStatus.CANCELLED, 'call cancelled', { reason: ErrorReason.ERROR_REASON_INTERNAL }));
            if (call.write(message)) resolve();
            else call.once('drain', () => resolve());
          });
        void (async () => {
          context = callContext(call, method.path, options);
          await authenticate(context, rule, options);
          authorize(call.request, context, rule, options);
          if (!handler) throw unimplemented(method.path);
          await (handler as ServerStreamHandler<unknown, unknown>)(call.request, context, send);
        })().then(
          () => {
            logCall(options, context, method.path, started, GrpcStatus.OK, quiet, { operation: operationNameOf(call.request) });
            call.end();
          },
          (error: unknown) => {
            const serviceError = toServiceError(error, (cause) => (context?.log ?? options.log).error({ err: cause, method: method.path }, 'unexpected error'));
            logCall(options, context, method.path, started, serviceError.code, quiet, {
              message: serviceError.details,
              operation: operationNameOf(call.request),
            });
            // Not destroy(): a destroyed ServerWritableStream never runs its _final, which is where grpc-js
            // sends the status, so the client saw no status at all and waited for its own deadline. An
            // 'error' event records the status and ends the stream (after anything already written).
            if (!call.cancelled) call.emit('error', serviceError);
          },
        );
      }) as UntypedHandleCall;
    }
  }
  return { serviceName, definition: definition as unknown as ServiceDefinition, implementation };
}

/**
 * Who may use server reflection: any cowherd identity (admin, service or host) whose certificate is not
 * revoked. The schemas it describes are public (proto/ is in the repository), but reflection is a door into
 * every server, so it takes the same certificate, identity and revocation checks as every other RPC.
 */
export const REFLECTION_RULE: AccessRule<unknown> = { allow: ['admin', 'service', 'host'], actsForHost: 'caller' };

/**
 * The boundary for a bidirectional-streaming method (server reflection is cowherd's only one): the same
 * caller identity, authorization by `rule`, revocation check, `rpc` log line and RPC metrics as
 * adaptService. The checks run once, when the stream opens; a refused stream ends with the error before
 * `handler` sees it.
 */
export function adaptBidiStreamHandler(
  path: string,
  rule: AccessRule<unknown>,
  options: BoundaryOptions,
  handler: (call: ServerDuplexStream<unknown, unknown>, context: CallContext) => void,
): UntypedHandleCall {
  return ((call: ServerDuplexStream<unknown, unknown>) => {
    const started = process.hrtime.bigint();
    let context: CallContext | undefined;
    void (async () => {
      context = callContext(call, path, options);
      await authenticate(context, rule, options);
      authorize(undefined, context, rule, options);
      return context;
    })().then(
      (admitted) => {
        let logged = false;
        const finish = (code: GrpcStatus): void => {
          if (logged) return;
          logged = true;
          logCall(options, admitted, path, started, code, false);
        };
        call.once('finish', () => finish(GrpcStatus.OK));
        call.once('cancelled', () => finish(GrpcStatus.CANCELLED));
        handler(call, admitted);
      },
      (error: unknown) => {
        const serviceError = toServiceError(error, (cause) => (context?.log ?? options.log).error({ err: cause, method: path }, 'unexpected error'));
        logCall(options, context, path, started, serviceError.code, false, { message: serviceError.details });
        // Not destroy(): on a duplex call grpc-js then cancels the call instead of sending this status.
        call.emit('error', serviceError);
      },
    );
  }) as UntypedHandleCall;
}

/** Reads the caller's identity from a call's TLS peer certificate; undefined without one. */
export function peerIdentity(call: {
  getAuthContext(): { sslPeerCertificate?: PeerCertificate };
}): { identity: Identity | undefined; certificate: PeerCertificateFacts } | undefined {
  const certificate = call.getAuthContext().sslPeerCertificate;
  if (!certificate || !certificate.serialNumber) return undefined;
  const sans = parseSubjectAltName(certificate.subjectaltname ?? '');
  const identity = sans.uris.length === 1 ? parseIdentity(sans.uris[0]!) : undefined;
  let usage: CertificateUsage;
  try {
    usage = certificateUsage(certificate.raw);
  } catch {
    usage = { certificateAuthority: false, extendedKeyUsages: [] }; // unreadable extensions: no clientAuth, refused
  }
  return {
    identity,
    certificate: {
      serialNumber: normalizeSerial(certificate.serialNumber),
      dnsNames: sans.dnsNames,
      notBefore: new Date(certificate.valid_from),
      notAfter: new Date(certificate.valid_to),
      certificateAuthority: usage.certificateAuthority,
      extendedKeyUsages: usage.extendedKeyUsages,
    },
  };
}

/**
 * What a call is and who makes it, before any check: the log of a refused call names its caller too.
 * `caller` in logs is kind/name (host/kvm-01), "anonymous" without a certificate, or "unidentified"
 * for a certificate that names no cowherd identity.
 */
function callContext(
  call: ServerUnaryCall<unknown, unknown> | ServerWritableStream<unknown, unknown> | ServerDuplexStream<unknown, unknown>,
  path: string,
  options: BoundaryOptions,
): CallContext {
  const controller = new AbortController();
  (call as ServerUnaryCall<unknown, unknown>).once('cancelled', () =>
    controller.abort(new CowherdError(GrpcStatus.CANCELLED, 'call cancelled', { reason: ErrorReason.ERROR_REASON_INTERNAL })),
  );
  const peer = peerIdentity(call);
  const caller = peer?.identity;
  const log = options.log.child({ method: path, caller: caller ? describeIdentity(caller) : peer ? 'unidentified' : 'anonymous' });
  return { caller, callerCertificate: peer?.certificate, method: path, log, signal: controller.signal, metadata: call.metadata };
}

/**
 * Throws unless the client certificate may authenticate anyone, before any authorization: a leaf with
 * clientAuth usage (never a CA certificate) whose serial the CA issued. A certificate signed with the CA
 * key outside the CA (a leaked key, a stray bootstrap) is refused here as NATS refuses it. Calls that need
 * no certificate skip this; a call without one is left to authorize.
 */
async function authenticate(context: CallContext, rule: AccessRule<unknown> | undefined, options: BoundaryOptions): Promise<void> {
  const certificate = context.callerCertificate;
  if (!rule || rule.allow === 'anyone' || rule.allow.length === 0 || !certificate) return;
  const serial = certificate.serialNumber;
  const notForClients = (problem: string): CowherdError =>
    new CowherdError(GrpcStatus.UNAUTHENTICATED, `certificate ${serial} ${problem}`, {
      reason: ErrorReason.ERROR_REASON_CERTIFICATE_NOT_FOR_CLIENTS,
      metadata: { serial_number: serial },
    });
  if (certificate.certificateAuthority) throw notForClients('is a CA certificate (basicConstraints CA:TRUE); clients authenticate with leaf certificates only');
  if (!certificate.extendedKeyUsages.includes('clientAuth')) throw notForClients('lacks the clientAuth extended key usage');
  const issued = await options.issued?.isIssued(serial);
  if (issued === false) {
    throw new CowherdError(GrpcStatus.UNAUTHENTICATED, `certificate ${serial} was never issued by the cowherd CA`, {
      reason: ErrorReason.ERROR_REASON_CERTIFICATE_NOT_ISSUED,
      metadata: { serial_number: serial },
    });
  }
  if (options.issued && issued === undefined) {
    throw new CowherdError(GrpcStatus.UNAVAILABLE, `cannot check with the CA whether certificate ${serial} was issued; retry`, {
      reason: ErrorReason.ERROR_REASON_CERTIFICATE_CHECK_UNAVAILABLE,
      metadata: { serial_number: serial },
    });
  }
}

/** Throws unless the call's caller may make it (deny by default). */
function authorize(request: unknown, context: CallContext, rule: AccessRule<unknown> | undefined, options: BoundaryOptions): void {
  const path = context.method;
  const caller = context.caller;
  const certificate = context.callerCertificate;
  if (!rule) throw CowherdError.permissionDenied(`${path} is not open to any caller`);
  if (rule.allow === 'anyone') return;
  if (rule.allow.length === 0) throw CowherdError.permissionDenied(`${path} is not served on this port`);
  if (!certificate) throw CowherdError.unauthenticated('a client certificate from the cowherd CA is required');
  if (options.revocations.isRevoked(certificate.serialNumber)) {
    throw CowherdError.unauthenticated(`certificate ${certificate.serialNumber} has been revoked`, ErrorReason.ERROR_REASON_CERTIFICATE_REVOKED);
  }
  if (!caller) throw CowherdError.unauthenticated('the client certificate names no cowherd identity (one spiffe://cowherd/... URI SAN)');
  if (!rule.allow.includes(caller.kind)) {
    throw CowherdError.permissionDenied(`${describeIdentity(caller)} may not call ${path}`);
  }
  if (caller.kind === 'service' && rule.services && !rule.services.includes(caller.name)) {
    throw CowherdError.permissionDenied(
      `${describeIdentity(caller)} may not call ${path}; only ${rule.services.map((name) => `service/${name}`).join(', ')} may`,
    );
  }
  if (caller.kind === 'host') {
    if (!rule.actsForHost) throw CowherdError.permissionDenied(`${describeIdentity(caller)} may not call ${path}`);
    const target = rule.actsForHost === 'caller' ? caller.name : rule.actsForHost(request);
    if (target !== caller.name) {
      throw CowherdError.permissionDenied(
        `host ${caller.name} may act only for its own host, not for ${JSON.stringify(target ?? '')}`,
        ErrorReason.ERROR_REASON_HOST_MISMATCH,
      );
    }
  }
}

function unimplemented(path: string): CowherdError {
  return new CowherdError(GrpcStatus.UNIMPLEMENTED, `${path} is not implemented yet`, { reason: ErrorReason.ERROR_REASON_INTERNAL });
}

/**
 * The long-running operation a call is about, for the request log: the `name` of a request to the
 * Operations service, or of the Operation a Create/Publish/Distribute call returned.
 */
function operationNameOf(message: unknown): string | undefined {
  const name = typeof message === 'object' && message !== null ? (message as { name?: unknown }).name : undefined;
  return typeof name === 'string' && name.startsWith('operations/') ? name : undefined;
}

/** Ends a call: one `rpc` log line and the RPC metrics. */
function logCall(
  options: BoundaryOptions,
  context: CallContext | undefined,
  method: string,
  started: bigint,
  code: GrpcStatus,
  quiet: boolean,
  extra: { message?: string; operation?: string | undefined } = {},
): void {
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const codeName = GrpcStatus[code] ?? String(code);
  recordRpc(method, codeName, seconds);
  const log = context?.log ?? options.log.child({ method });
  const fields = {
    code: codeName,
    ms: seconds * 1000,
    ...(extra.operation === undefined ? {} : { operation: extra.operation }),
    ...(extra.message === undefined ? {} : { error: extra.message }),
  };
  if (code === GrpcStatus.OK) {
    if (quiet) log.debug(fields, 'rpc');
    else log.info(fields, 'rpc');
  } else if (code === GrpcStatus.INTERNAL || code === GrpcStatus.UNKNOWN) log.error(fields, 'rpc');
  else log.warn(fields, 'rpc');
}
