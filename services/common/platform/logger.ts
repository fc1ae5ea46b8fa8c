/**
 * pino JSON logging: one root logger per process, `child({component})` below it. Keys, tokens, PEM
 * blocks and CSRs are redacted by path wherever they appear in logged objects, and `redactSecrets`
 * scrubs them from free text (error messages from child processes, for example).
 */
import { pino, type Logger, type LevelWithSilent } from 'pino';

export type { Logger } from 'pino';

/** Log levels an operator may pick. */
export const LOG_LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

const SECRET_KEYS = ['privateKey', 'privateKeyPem', 'private_key', 'key', 'keyPem', 'token', 'joinToken', 'password', 'secret', 'csrPem', 'csr_pem'];

/** Makes the root logger of a process. `destination` defaults to stdout. */
export function createLogger(options: { service: string; level: LevelWithSilent; destination?: NodeJS.WritableStream }): Logger {
  return pino(
    {
      level: options.level,
      base: { service: options.service, pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: { paths: [...SECRET_KEYS, ...SECRET_KEYS.map((key) => `*.${key}`)], censor: '[redacted]' },
      formatters: { level: (label) => ({ level: label }) },
      serializers: { err: serializeError, error: serializeError },
    },
    options.destination ?? process.stdout,
  );
}

const PEM_BLOCK = /-----BEGIN [A-Z ]+-----[\s\S]*?-----END [A-Z ]+-----/g;

/** Replaces PEM blocks (keys, certificates, CSRs) and cowherd join tokens in free text. */
export function redactSecrets(text: string): string {
  return text.replace(PEM_BLOCK, '[redacted pem]').replace(/\bcjt1\.[A-Za-z0-9_.-]+/g, '[redacted token]');
}

function serializeError(error: unknown): unknown {
  const serialized = pino.stdSerializers.err(error as Error) as unknown as Record<string, unknown>;
  if (typeof serialized['message'] === 'string') serialized['message'] = redactSecrets(serialized['message']);
  if (typeof serialized['stack'] === 'string') serialized['stack'] = redactSecrets(serialized['stack']);
  return serialized;
}
