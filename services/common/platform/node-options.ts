/**
 * Node options a service's process runs with beyond `--import tsx`, in one place for every way cowherd starts
 * one here (the local fleet, the tests, the benches). The deployment files spell the same options (deploy/systemd,
 * deploy/agent/agent.yaml, deploy/Containerfile); the agent README says why.
 *
 * The agent: `--initial-old-space-size=128`. A receiving agent moves its image through buffers that die young, but
 * with V8's default start (an old generation sized for the ~30 MiB the agent holds) about half of the receivers of
 * bench:distribution (100 Mbit/s, 6 receivers) fell into a full mark-compact every ~0.4 s for the whole transfer
 * (43-52 per 256 MiB against 5 for the others) and used 1.5x the CPU. With 128 MiB to start, every receiver ran
 * 3 full GCs in its life and 3.9-4.0 CPU-s per 256 MiB instead of 3.8-6.7. It costs at most ~100 MiB of heap that
 * V8 would otherwise collect sooner.
 */
export const AGENT_NODE_OPTIONS: readonly string[] = ['--initial-old-space-size=128'];

/** The node options of service `name` (a folder of services/). */
export function serviceNodeOptions(name: string): readonly string[] {
  return name === 'agent' ? AGENT_NODE_OPTIONS : [];
}
