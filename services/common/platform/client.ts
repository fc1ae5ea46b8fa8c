/**
 * Outgoing gRPC calls: every call gets a deadline, and unary calls are retried on UNAVAILABLE,
 * RESOURCE_EXHAUSTED and ABORTED with jittered exponential backoff, within that same deadline.
 * These three codes mean "nothing happened, try again" in cowherd's servers (a replica restarting, a
 * lease moving); every other code is an answer and is returned at once. Streams are not retried:
 * their callers resume from their own state.
 */
import {
  InterceptingCall,
  ListenerBuilder,
  RequesterBuilder,
  status as GrpcStatus,
  type ChannelCredentials,
  type ChannelOptions,
  type Interceptor,
  type Metadata,
  type ServiceError,
  type StatusObject,
} from '@grpc/grpc-js';

/** Options of {@link deadlineAndRetryInterceptor}. */
export interface RetryOptions {
  /** Deadline for calls that set none. Default 30 s. */
  readonly defaultDeadlineMs?: number;
  /** Attempts in total, the first included. Default 5. */
  readonly maxAttempts?: number;
  /** First backoff; doubles each attempt, full jitter. Default 100 ms. */
  readonly initialBackoffMs?: number;
  /** Backoff ceiling. Default 3 s. */
  readonly maxBackoffMs?: number;
}

/** Status codes that are retried. */
export const RETRYABLE_CODES: ReadonlySet<GrpcStatus> = new Set([GrpcStatus.UNAVAILABLE, GrpcStatus.RESOURCE_EXHAUSTED, GrpcStatus.ABORTED]);

/** The client interceptor every cowherd client installs. */
export function deadlineAndRetryInterceptor(options: RetryOptions = {}): Interceptor {
  const maxAttempts = options.maxAttempts ?? 5;
  const initial = options.initialBackoffMs ?? 100;
  const ceiling = options.maxBackoffMs ?? 3_000;
  return (callOptions, nextCall) => {
    const withDeadline = callOptions.deadline === undefined ? { ...callOptions, deadline: Date.now() + (options.defaultDeadlineMs ?? 30_000) } : callOptions;
    const definition = callOptions.method_definition;
    if (definition.requestStream || definition.responseStream) return new InterceptingCall(nextCall(withDeadline));

    const deadline = withDeadline.deadline instanceof Date ? withDeadline.deadline.getTime() : Number(withDeadline.deadline);
    let sentMessage: unknown;
    let sentMetadata: Metadata;
    const requester = new RequesterBuilder()
      .withStart((metadata, listener, next) => {
        sentMetadata = metadata;
        let received: unknown;
        let receivedMetadata: Metadata | undefined;
        const finish = (status: StatusObject): void => {
          if (receivedMetadata) listener.onReceiveMetadata(receivedMetadata);
          if (received !== undefined) listener.onReceiveMessage(received);
          listener.onReceiveStatus(status);
        };
        const attempt = (number: number, status: StatusObject): void => {
          const backoff = Math.random() * Math.min(ceiling, initial * 2 ** (number - 1));
          if (!RETRYABLE_CODES.has(status.code) || number >= maxAttempts || Date.now() + backoff >= deadline) return finish(status);
          setTimeout(() => {
            const retry = nextCall(withDeadline);
            received = undefined;
            receivedMetadata = undefined;
            retry.start(sentMetadata.clone(), {
              onReceiveMetadata: (value) => (receivedMetadata = value),
              onReceiveMessage: (value) => (received = value),
              onReceiveStatus: (next) => (next.code === GrpcStatus.OK ? finish(next) : attempt(number + 1, next)),
            });
            retry.sendMessage(sentMessage);
            retry.halfClose();
          }, backoff);
        };
        next(
          metadata,
          new ListenerBuilder()
            .withOnReceiveMetadata((value) => (receivedMetadata = value))
            .withOnReceiveMessage((value) => (received = value))
            .withOnReceiveStatus((status) => (status.code === GrpcStatus.OK ? finish(status) : attempt(1, status)))
            .build(),
        );
      })
      .withSendMessage((message, next) => {
        sentMessage = message;
        next(message);
      })
      .build();
    return new InterceptingCall(nextCall(withDeadline), requester);
  };
}

/** Channel options for clients: the interceptor, keepalive and the name the server certificate carries. */
export function clientOptions(options: RetryOptions & { serverName?: string } = {}): ChannelOptions & { interceptors: Interceptor[] } {
  return {
    interceptors: [deadlineAndRetryInterceptor(options)],
    'grpc.keepalive_time_ms': 30_000,
    'grpc.keepalive_timeout_ms': 10_000,
    ...(options.serverName === undefined ? {} : { 'grpc.ssl_target_name_override': options.serverName, 'grpc.default_authority': options.serverName }),
  };
}

/** A ts-proto generated client constructor. */
export type ClientConstructor<C> = new (address: string, credentials: ChannelCredentials, options?: ChannelOptions) => C;

/** Makes a generated client with cowherd's interceptor and options. */
export function createClient<C>(
  Client: ClientConstructor<C>,
  address: string,
  credentials: ChannelCredentials,
  options: RetryOptions & { serverName?: string } = {},
): C {
  return new Client(address, credentials, clientOptions(options));
}

/** Promise form of a callback-style unary call: `await call((cb) => client.getHost(request, cb))`. */
export function call<Res>(invoke: (callback: (error: ServiceError | null, response: Res) => void) => void): Promise<Res> {
  return new Promise((resolve, reject) => invoke((error, response) => (error ? reject(error) : resolve(response))));
}
