/**
 * Following a google.longrunning.Operation to its end: GetOperation on the service that runs it, about
 * once a second, drawing its metadata as progress. Ctrl-C stops following, not the operation (it lives in
 * the fleet's KV and goes on), and says how to find it again.
 */
import type { Operation } from '../gen/google/longrunning/operations.js';
import type { Any } from '../gen/google/protobuf/any.js';
import type { OptionSpec } from './command-line.js';
import type { CliContext } from './cli-context.js';
import { CliError, EXIT, exitCodeFor, explain, readStatus } from './exit-codes.js';
import { createProgressDisplay, type ProgressLine } from './progress.js';

/** A protobuf message type as ts-proto generates it. */
export interface MessageFunctions<T> {
  decode(input: Uint8Array): T;
  toJSON(message: T): unknown;
}

/** How to read one kind of operation. */
export interface OperationShape<Meta, Res> {
  /** What it does, e.g. "distribute image". */
  readonly title: string;
  /** The service that runs it (and answers google.longrunning.Operations for it). */
  readonly service: 'distribution' | 'cloning';
  readonly typeNames: { readonly metadata: string; readonly response: string };
  readonly metadata: MessageFunctions<Meta>;
  readonly response: MessageFunctions<Res>;
  /** Progress lines from the current metadata (undefined before the first metadata). */
  readonly render: (metadata: Meta | undefined) => readonly ProgressLine[];
}

/** Unpacks an Any of the expected type; undefined when absent or of another type. */
export function unpackAny<T>(any: Any | undefined, typeName: string, type: MessageFunctions<T>): T | undefined {
  if (!any || any.typeUrl !== `type.googleapis.com/${typeName}`) return undefined;
  return type.decode(any.value);
}

/** The operation as proto JSON with its metadata and response decoded (not base64 Any values). */
export function operationJson<Meta, Res>(operation: Operation, shape: OperationShape<Meta, Res>): Record<string, unknown> {
  const metadata = unpackAny(operation.metadata, shape.typeNames.metadata, shape.metadata);
  const result: Record<string, unknown> = { name: operation.name, done: operation.done };
  if (metadata !== undefined)
    result['metadata'] = { '@type': `type.googleapis.com/${shape.typeNames.metadata}`, ...(shape.metadata.toJSON(metadata) as object) };
  if (operation.result?.$case === 'error') result['error'] = { code: operation.result.value.code, message: operation.result.value.message };
  if (operation.result?.$case === 'response') {
    const response = unpackAny(operation.result.value, shape.typeNames.response, shape.response);
    if (response !== undefined)
      result['response'] = { '@type': `type.googleapis.com/${shape.typeNames.response}`, ...(shape.response.toJSON(response) as object) };
  }
  return result;
}

/**
 * Polls until the operation is done and returns its response; an operation error becomes a CliError with
 * the code's exit status. Ctrl-C exits 130 and leaves the operation running.
 */
export async function followOperation<Meta, Res>(context: CliContext, started: Operation, shape: OperationShape<Meta, Res>, intervalMs = 1000): Promise<Res> {
  const display = createProgressDisplay(process.stderr, { quiet: context.settings.quiet });
  const service = shape.service;
  const client = context.operations(service);
  let interrupted = false;
  let wake: (() => void) | undefined;
  const onInterrupt = (): void => {
    interrupted = true;
    wake?.();
  };
  process.on('SIGINT', onInterrupt);
  try {
    let operation = started;
    let delay = 250;
    for (;;) {
      display.update(shape.render(unpackAny(operation.metadata, shape.typeNames.metadata, shape.metadata)));
      if (operation.done) break;
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, delay);
      });
      if (interrupted) {
        throw new CliError(
          `stopped following ${operation.name}; it keeps running in the fleet (\`cowherd operations wait ${operation.name}\` follows it again)`,
          EXIT.INTERRUPTED,
        );
      }
      delay = Math.min(intervalMs, delay * 2);
      operation = await context.call(service, (callback) => client.getOperation({ name: operation.name }, callback));
    }
    display.finish();
    if (operation.result?.$case === 'error') {
      const received = readStatus(operation.result.value);
      throw new CliError(`${operation.name} failed: ${explain(received, context.target(service))}`, exitCodeFor(received.code));
    }
    const response = operation.result?.$case === 'response' ? unpackAny(operation.result.value, shape.typeNames.response, shape.response) : undefined;
    if (response === undefined) throw new CliError(`${operation.name} finished without a ${shape.typeNames.response} response`, EXIT.FAILURE);
    return response;
  } finally {
    process.off('SIGINT', onInterrupt);
  }
}

/** Options of every command that starts an operation. */
export const OPERATION_OPTIONS: readonly OptionSpec[] = [
  { name: 'request-id', value: '<uuid>', description: 'makes a retry safe: the same id within 24 h returns the first operation (default: a new UUID)' },
  { name: 'no-wait', description: 'print the operation and return at once instead of following it' },
];

/** For --no-wait: the operation as JSON, or its name and how to follow it. */
export function printStarted<Meta, Res>(context: CliContext, operation: Operation, shape: OperationShape<Meta, Res>): number {
  if (context.out.format === 'json') context.out.json(operationJson(operation, shape));
  else {
    context.out.line(operation.name);
    context.out.note(
      `started (${shape.title}); \`cowherd operations wait ${operation.name}\` follows it, \`cowherd operations show ${operation.name}\` shows it`,
    );
  }
  return EXIT.OK;
}
