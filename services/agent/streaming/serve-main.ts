/**
 * The streaming server's process (stream-server.ts): `node serve-main.ts <image dir>/.streaming`. The agent starts
 * it detached, with its output appended to `server.log` beside its sockets, and it exits by itself once idle.
 * Environment: COWHERD_STREAM_IDLE_EXIT_MS (default 10000), COWHERD_STREAM_MAX_STALL_MS (default 900000),
 * COWHERD_STREAM_PROFILE_WINDOW_MS (default 60000).
 */
import { runStreamServer } from './stream-server.js';

const directory = process.argv[2];
if (!directory) {
  process.stderr.write('usage: serve-main <streaming directory>\n');
  process.exit(2);
}
const number = (name: string): number | undefined => {
  const value = process.env[name];
  return value === undefined || value === '' ? undefined : Number(value);
};
const log = (message: string): void => {
  process.stderr.write(`${new Date().toISOString()} cowherd-stream-server: ${message}\n`);
};
try {
  const idleExitMs = number('COWHERD_STREAM_IDLE_EXIT_MS');
  const maxStallMs = number('COWHERD_STREAM_MAX_STALL_MS');
  const profileWindowMs = number('COWHERD_STREAM_PROFILE_WINDOW_MS');
  const server = await runStreamServer({
    directory,
    log,
    ...(idleExitMs === undefined ? {} : { idleExitMs }),
    ...(maxStallMs === undefined ? {} : { maxStallMs }),
    ...(profileWindowMs === undefined ? {} : { profileWindowMs }),
  });
  // The agent's restarts must not take the server along: it ignores the signals a dying parent's group may send.
  process.on('SIGHUP', () => undefined);
  process.on('SIGTERM', () => void server.close());
  await server.stopped;
  process.exit(0);
} catch (error) {
  log(`cannot start: ${(error as Error).message}`);
  process.exit(1);
}
