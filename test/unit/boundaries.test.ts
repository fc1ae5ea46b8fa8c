/**
 * The import-boundary check (.dependency-cruiser.cjs, run by scripts/check-imports.sh in `npm test`): the tree
 * keeps its rules, and the same rule set fails, naming the rule, on each deliberate bad import of a fixture tree
 * shaped like the repository (test/fixtures/import-boundaries), while the imports the rules allow pass.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CHECKER = path.join(ROOT, 'node_modules/.bin/depcruise');
const CONFIG = path.join(ROOT, '.dependency-cruiser.cjs');
const FIXTURE = path.join(ROOT, 'test/fixtures/import-boundaries');

interface Check {
  /** The checker's exit status with its plain-text report, as scripts/check-imports.sh runs it. */
  exitCode: number;
  /** One line per violation from its JSON report: `rule: from -> to` (a cycle names its first edge). */
  violations: string[];
}

function runChecker(cwd: string, outputType: string, extraArguments: string[]): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      CHECKER,
      ['--config', CONFIG, '--output-type', outputType, ...extraArguments, 'services', 'deploy'],
      { cwd, maxBuffer: 64 * 1024 * 1024, timeout: 120_000 },
      (error, stdout, stderr) => resolve({ exitCode: error === null ? 0 : typeof error.code === 'number' ? error.code : -1, stdout, stderr }),
    );
  });
}

/**
 * Runs the real rule set over services/ and deploy/ of `cwd` (paths in the rules are relative to it), twice: the
 * plain-text report sets the exit status (the JSON one always exits 0), the JSON report lists the violations.
 */
async function checkImports(cwd: string, extraArguments: string[] = []): Promise<Check> {
  const [text, json] = await Promise.all([runChecker(cwd, 'err', extraArguments), runChecker(cwd, 'json', extraArguments)]);
  let result: { summary: { violations: { rule: { name: string }; from: string; to: string }[] } };
  try {
    result = JSON.parse(json.stdout);
  } catch {
    assert.fail(`the import check printed no report (exit ${json.exitCode}): ${json.stderr.slice(0, 2000)}`);
  }
  const violations = result.summary.violations.map((violation) => `${violation.rule.name}: ${violation.from} -> ${violation.to}`).sort();
  return { exitCode: text.exitCode, violations };
}

describe('import boundaries', () => {
  it('hold on the tree: services/ and deploy/ break no rule', async () => {
    const { exitCode, violations } = await checkImports(ROOT);
    assert.deepEqual(violations, [], `the import check found violations (npm run check:imports):\n${violations.join('\n')}`);
    assert.equal(exitCode, 0);
  });

  it('fail on each deliberate bad import of the fixture tree, naming its rule', async () => {
    const { exitCode, violations } = await checkImports(FIXTURE);
    assert.deepEqual(
      violations,
      [
        'agent-hypervisor-swarm-host-apart: services/agent/swarm/bad-swarm.ts -> services/agent/hypervisor/index.ts',
        'agent-room-only-through-index: services/agent/bad-job.ts -> services/agent/hypervisor/libvirt.ts',
        'agent-rooms-import-no-jobs: services/agent/image-directory/bad-room.ts -> services/agent/config.ts',
        'cli-imports-only-gen-common-launcher: services/cli/bad-cli.ts -> services/agent/hypervisor/libvirt.ts',
        'common-imports-no-service: services/common/domain/bad-common.ts -> services/inventory/main.ts',
        'deploy-imports-only-common-gen: deploy/sidecar/bad-sidecar.ts -> services/certificate-authority/records.ts',
        'gen-imports-no-hand-written-code: services/gen/bad-generated.ts -> services/common/platform/logger.ts',
        'no-cycles-in-services: services/distribution/cycle-a.ts -> services/distribution/cycle-b.ts',
        'no-cycles-in-services: services/distribution/type-cycle-a.ts -> services/distribution/type-cycle-b.ts',
        'no-service-imports-another-service: services/cloning/bad-cross-service.ts -> services/inventory/main.ts',
        'no-service-imports-another-service: services/launcher/bad-launcher.ts -> services/cli/output.ts',
        'platform-imports-no-domain: services/common/platform/bad-platform.ts -> services/common/domain/names.ts',
      ],
      'each bad import breaks exactly its rule, and no allowed import of the fixture is reported',
    );
    assert.notEqual(exitCode, 0, 'the check exits non-zero on a violation, so npm test stops');
  });

  it('pass on the fixture tree without its bad imports and cycles', async () => {
    const { exitCode, violations } = await checkImports(FIXTURE, ['--exclude', '(^|/)bad-[^/]*\\.ts$|cycle-[ab]\\.ts$']);
    assert.deepEqual(violations, []);
    assert.equal(exitCode, 0);
  });
});
