/** Starts cowherd processes (services/<name>/main.ts) as real child processes on free ports. */
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startDaemon, type Daemon } from '../../services/common/child-process.js';
import type { ProcessName } from '../../services/common/service-process.js';
import type { TlsFiles } from '../../services/common/tls.js';
import type { Resources } from './index.js';

/** The repository root. */
export const REPOSITORY = fileURLToPath(new URL('../..', import.meta.url));

/** A started service process. */
export interface ServiceProcess {
  readonly name: ProcessName;
  readonly daemon: Daemon;
  /** localhost:<mTLS port> */
  readonly address: string;
  /** localhost:<plaintext health port> */
  readonly healthAddress: string;
  /** Every JSON log line so far. */
  readonly logs: Array<Record<string, unknown>>;
}

/** Starts `services/<name>/main.ts` on free ports and waits for its "serving" log line. */
export async function startServiceProcess(resources: Resources, name: ProcessName, tls: TlsFiles, natsUrl: string, extraEnv: Record<string, string> = {}): Promise<ServiceProcess> {
  const logs: Array<Record<string, unknown>> = [];
  const daemon = await startDaemon(process.execPath, ['--import', 'tsx', join(REPOSITORY, 'services', name, 'main.ts')], {
    readyPattern: /"msg":"serving"/,
    readyTimeoutMs: 60_000,
    cwd: REPOSITORY,
    env: {
      ...process.env as Record<string, string>,
      COWHERD_LISTEN_ADDRESS: 'localhost:0',
      COWHERD_HEALTH_ADDRESS: 'localhost:0',
      COWHERD_TLS_CERT: tls.certificateFile,
      COWHERD_TLS_KEY: tls.privateKeyFile,
      COWHERD_TLS_CA: tls.caFile,
      COWHERD_NATS_URL: natsUrl,
      COWHERD_SHUTDOWN_GRACE_SECONDS: '5',
      ...extraEnv,
    },
    onLine: (line) => {
      try {
        logs.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        logs.push({ raw: line });
      }
    },
  });
  resources.defer(() => daemon.stop(10_000));
  const serving = logs.find((line) => line['msg'] === 'serving');
  if (!serving) throw new Error(`${name} printed no serving line`);
  return { name, daemon, address: `localhost:${String(serving['port'])}`, healthAddress: `localhost:${String(serving['healthPort'])}`, logs };
}
