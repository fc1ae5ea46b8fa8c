/**
 * `cowherd operations`: the long-running operations of distribution and cloning (google.longrunning), for
 * what was started with --no-wait or left by Ctrl-C: list them, show one, follow one to its end, cancel one.
 */
import type { ListOperationsResponse, Operation } from '../gen/google/longrunning/operations.js';
import { OPERATION_ID, OPERATION_NAME } from '../common/domain/resource-names.js';
import type { CommandSpec } from './command-line.js';
import type { CliContext } from './cli-context.js';
import { CliError, EXIT, explain, readStatus } from './exit-codes.js';
import { operationKindOf } from './operation-kinds.js';
import { followOperation, operationJson, unpackAny } from './operation-wait.js';
import { formatTime, keyValues, table } from './output.js';
import { ArgumentReader } from './resource-arguments.js';

const SERVICES = ['distribution', 'cloning'] as const;
const OPERATION_ARGUMENT = { name: 'operation', description: 'operations/<id> (or just the id)' };

export const OPERATIONS_COMMAND: CommandSpec<CliContext> = {
  name: 'operations',
  summary: 'list, show, follow and cancel long-running operations (publish, distribute, clone, ...)',
  subcommands: [
    {
      name: 'list',
      summary: 'list the operations of distribution and cloning (finished ones are kept 7 days)',
      options: [{ name: 'running', description: 'only those not done yet' }],
      run: async (invocation, context) => {
        const filter = invocation.flag('running') ? 'done = false' : '';
        const byName = new Map<string, Operation>();
        for (const service of SERVICES) {
          const client = context.operations(service);
          const operations = await context.listAll<Operation, ListOperationsResponse>(
            service,
            (pageToken, cb) => client.listOperations({ name: 'operations', filter, pageSize: 1000, pageToken, returnPartialSuccess: false }, cb),
            (response) => response.operations,
          );
          for (const operation of operations) byName.set(operation.name, operation);
        }
        const operations = [...byName.values()].sort((a, b) => startOf(b) - startOf(a));
        if (context.out.format === 'json') {
          context.out.json({ operations: operations.map((operation) => toJson(operation)) });
          return EXIT.OK;
        }
        if (operations.length === 0) {
          context.out.note(invocation.flag('running') ? 'no operation is running' : 'no operations in the last 7 days');
          return EXIT.OK;
        }
        context.out.line(
          table(
            ['operation', 'kind', 'state', 'about', 'started'],
            operations.map((operation) => [
              operation.name,
              operationKindOf(operation.metadata?.typeUrl)?.title ?? '-',
              stateOf(context, operation),
              subjectOf(operation),
              new Date(startOf(operation) || 0).toISOString().slice(0, 19).replace('T', ' '),
            ]),
          ),
        );
        return EXIT.OK;
      },
    },
    {
      name: 'show',
      summary: 'show one operation: its kind, state, progress and result',
      positionals: [OPERATION_ARGUMENT],
      run: async (invocation, context) => {
        const operation = await find(context, operationName(invocation.positionals[0]!, new ArgumentReader(invocation.command)));
        if (context.out.format === 'json') {
          context.out.json(toJson(operation));
          return EXIT.OK;
        }
        const kind = operationKindOf(operation.metadata?.typeUrl);
        const metadata = kind ? unpackAny(operation.metadata, kind.typeNames.metadata, kind.metadata) : undefined;
        context.out.line(
          keyValues([
            ['operation', operation.name],
            ['kind', kind?.title ?? operation.metadata?.typeUrl ?? '-'],
            ['state', stateOf(context, operation)],
            ['about', subjectOf(operation)],
            ['started', startOf(operation) ? formatTime(new Date(startOf(operation))) : '-'],
          ]),
        );
        if (kind) for (const line of kind.render(metadata)) context.out.line(`  ${[line.label, line.text].filter(Boolean).join('  ')}`);
        return EXIT.OK;
      },
    },
    {
      name: 'wait',
      summary: 'follow an operation with its progress until it is done; the exit status is its outcome',
      positionals: [OPERATION_ARGUMENT],
      run: async (invocation, context) => {
        const operation = await find(context, operationName(invocation.positionals[0]!, new ArgumentReader(invocation.command)));
        const kind = operationKindOf(operation.metadata?.typeUrl);
        if (!kind)
          throw new CliError(
            `${operation.name} is of a kind this CLI does not know (${operation.metadata?.typeUrl ?? 'no metadata'}); \`cowherd operations show\` shows its state`,
            EXIT.FAILURE,
          );
        const response = await followOperation(context, operation, kind);
        if (context.out.format === 'json') context.out.json(kind.response.toJSON(response));
        else context.out.line(`${operation.name} (${kind.title}) succeeded`);
        return EXIT.OK;
      },
    },
    {
      name: 'cancel',
      summary: 'ask a running operation to stop (what it finished stays done)',
      positionals: [OPERATION_ARGUMENT],
      run: async (invocation, context) => {
        const operation = await find(context, operationName(invocation.positionals[0]!, new ArgumentReader(invocation.command)));
        const service = operationKindOf(operation.metadata?.typeUrl)?.service ?? 'distribution';
        await context.call(service, (cb) => context.operations(service).cancelOperation({ name: operation.name }, cb));
        if (context.out.format === 'json') context.out.json({ name: operation.name, cancelRequested: true });
        else context.out.line(`asked ${operation.name} to stop; \`cowherd operations wait ${operation.name}\` shows when it has`);
        return EXIT.OK;
      },
    },
  ],
};

function operationName(raw: string, args: ArgumentReader): string {
  const operation = OPERATION_NAME.parse(raw)?.operation ?? raw;
  if (!OPERATION_ID.test(operation)) args.fail(`${JSON.stringify(raw)} is not an operation name (operations/<uuid>)`);
  return OPERATION_NAME.format({ operation });
}

/** GetOperation on distribution, then on cloning. */
async function find(context: CliContext, name: string): Promise<Operation> {
  for (const service of SERVICES) {
    try {
      return await context.call<Operation>(service, (cb) => context.operations(service).getOperation({ name }, cb));
    } catch (error) {
      if (!(error instanceof CliError) || error.exitCode !== EXIT.NOT_FOUND) throw error;
    }
  }
  throw new CliError(
    `no operation ${name} on the distribution or cloning service (finished operations are kept for 7 days); \`cowherd operations list\` shows them`,
    EXIT.NOT_FOUND,
  );
}

function toJson(operation: Operation): Record<string, unknown> {
  const kind = operationKindOf(operation.metadata?.typeUrl);
  if (kind) return operationJson(operation, kind);
  const result: Record<string, unknown> = { name: operation.name, done: operation.done };
  if (operation.result?.$case === 'error') result['error'] = { code: operation.result.value.code, message: operation.result.value.message };
  return result;
}

function stateOf(context: CliContext, operation: Operation): string {
  if (!operation.done) return 'RUNNING';
  if (operation.result?.$case === 'error') {
    const kind = operationKindOf(operation.metadata?.typeUrl);
    return `FAILED: ${explain(readStatus(operation.result.value), context.target(kind?.service ?? 'distribution')).split('\n')[0]}`;
  }
  return 'SUCCEEDED';
}

/** What the operation is about, from its metadata: the image, the source of clones, the VM. */
function subjectOf(operation: Operation): string {
  const kind = operationKindOf(operation.metadata?.typeUrl);
  const metadata = kind ? (unpackAny(operation.metadata, kind.typeNames.metadata, kind.metadata) as Record<string, unknown> | undefined) : undefined;
  const about = metadata?.['image'] ?? metadata?.['source'] ?? metadata?.['virtualMachine'];
  return typeof about === 'string' && about !== '' ? about : '-';
}

function startOf(operation: Operation): number {
  const kind = operationKindOf(operation.metadata?.typeUrl);
  const metadata = kind ? (unpackAny(operation.metadata, kind.typeNames.metadata, kind.metadata) as { startTime?: Date } | undefined) : undefined;
  return metadata?.startTime?.getTime() ?? 0;
}
