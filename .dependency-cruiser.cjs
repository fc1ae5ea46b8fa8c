// The import boundaries of the house (design/HOUSE-STYLE.md habits 1, 15, 16 and 18), checked by
// `npm run check:imports` and by scripts/test.sh before the tests. Each rule says why it exists; a violation
// names the rule, the importing file and the imported one.
//
// What is checked: every file under services/ and deploy/ (scripts/check-imports.sh names them). Tests and
// benchmarks are not checked: they may import any internal module to test it.
//
// Type-only imports (`import type`) count like any other import, for the boundaries and for cycles: a type
// reached from another service's folder or a room's inner file ties the two together just as a value does (it
// changes when they change), and a cycle through types is still two modules that cannot be read or moved apart.
// The tree holds this today. (The TypeScript parser that could tell them apart does not support TypeScript 7,
// so the check parses through swc, which sees `import type` as a plain import.)

/** The services' own folders: everything under services/ except the shared code and the generated code. */
const SERVICE = '(?!common/|gen/)([^/]+)';
/** The agent's rooms (sub-folders by concern); each is entered only through its index.ts. */
const ROOMS = '(hypervisor|swarm|host|image-directory|streaming)';
/** Files of this repository (as opposed to npm packages and node's own modules). */
const PROJECT_FILE = '^(services|deploy|test|bench|scripts|proto|vendor)/';

/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    {
      name: 'no-service-imports-another-service',
      comment:
        'A service never imports another service folder (agent, certificate-authority, inventory, distribution, cloning, launcher, ...): ' +
        'shared code lives in services/common, the API in services/gen. This also keeps services/launcher off every file of services/cli. ' +
        'The CLI has its own, narrower rule (cli-imports-only-gen-common-launcher).',
      severity: 'error',
      from: { path: `^services/${SERVICE}/`, pathNot: '^services/cli/' },
      to: { path: `^services/${SERVICE}/`, pathNot: '^services/$1/' },
    },
    {
      name: 'cli-imports-only-gen-common-launcher',
      comment:
        'The CLI is a client: it speaks the generated API (services/gen), uses the shared code (services/common) and starts the local fleet ' +
        'through the launcher room (services/launcher); it never reaches into a service, the deploy code or the tests.',
      severity: 'error',
      from: { path: '^services/cli/' },
      to: { path: PROJECT_FILE, pathNot: '^services/(cli|common|gen|launcher)/' },
    },
    {
      name: 'common-imports-no-service',
      comment: 'services/common is shared by every service, so it imports only itself and the generated code (services/gen), never a service folder.',
      severity: 'error',
      from: { path: '^services/common/' },
      to: { path: PROJECT_FILE, pathNot: '^services/(common|gen)/' },
    },
    {
      name: 'platform-imports-no-domain',
      comment:
        'services/common/platform is the plumbing (config, logging, TLS, servers, rpc, errors, NATS, KV, events) under the shared domain code; ' +
        'services/common/domain builds on it, never the other way round.',
      severity: 'error',
      from: { path: '^services/common/platform/' },
      to: { path: '^services/common/domain/' },
    },
    {
      name: 'agent-room-only-through-index',
      comment:
        "The agent's rooms (hypervisor/, swarm/, host/, image-directory/, streaming/) show a small public surface in their index.ts: a file outside a room " +
        "(the agent's jobs and wiring, or another room) imports the room's index.ts, never one of its inner files.",
      severity: 'error',
      // $1 is the first folder or file name under services/agent/ of the importing file: a room's own files may import each other.
      from: { path: '^services/agent/([^/]+)' },
      to: { path: `^services/agent/${ROOMS}/`, pathNot: ['^services/agent/[^/]+/index\\.ts$', '^services/agent/$1/'] },
    },
    {
      name: 'agent-hypervisor-swarm-host-apart',
      comment:
        'The hypervisor (libvirt, domain XML, disks), the swarm (moving image bytes between hosts) and streaming (serving a replica that ' +
        "is still arriving to qemu) know nothing of each other nor of the host's membership (reporter, facts, enrollment): the jobs at " +
        "the agent's top level put them together.",
      severity: 'error',
      from: { path: '^services/agent/(hypervisor|swarm|streaming)/' },
      to: { path: '^services/agent/(hypervisor|swarm|host|streaming)/', pathNot: '^services/agent/$1/' },
    },
    {
      name: 'agent-rooms-import-no-jobs',
      comment:
        "The rooms sit under the agent's jobs (handlers, clone engine, VM lifecycle, export) and wiring (main.ts, config.ts) at " +
        "services/agent/*.ts: a room imports other rooms' indexes, services/common and services/gen, never a file of the agent's top level.",
      severity: 'error',
      from: { path: `^services/agent/${ROOMS}/` },
      to: { path: '^services/agent/[^/]+$' },
    },
    {
      name: 'deploy-imports-only-common-gen',
      comment:
        'Sidecars and bootstrap programs under deploy/ are launchers of their own: they use the shared modules (services/common) and the ' +
        "generated API (services/gen), never a service's internal files.",
      severity: 'error',
      from: { path: '^deploy/' },
      to: { path: PROJECT_FILE, pathNot: '^(deploy|services/common|services/gen)/' },
    },
    {
      name: 'gen-imports-no-hand-written-code',
      comment: 'services/gen is generated from proto/ (npm run generate) and regenerated at will: it imports only itself and npm packages.',
      severity: 'error',
      from: { path: '^services/gen/' },
      to: { path: PROJECT_FILE, pathNot: '^services/gen/' },
    },
    {
      name: 'no-cycles-in-services',
      comment:
        'No import cycle anywhere in services/ (type-only imports included, see the top of this file): a cycle makes two modules one ' +
        'that cannot be read, tested or moved apart, and a runtime cycle can see a half-initialised module.',
      severity: 'error',
      from: { path: '^services/' },
      to: { circular: true },
    },
  ],
  options: {
    // TypeScript 7 has no compiler API for the checker to call; swc parses TypeScript (type-only imports included).
    parser: 'swc',
    tsConfig: { fileName: 'tsconfig.json' },
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '(^|/)node_modules/' },
    enhancedResolveOptions: {
      exportsFields: ['exports'],
      conditionNames: ['import', 'require', 'node', 'types', 'default'],
      extensions: ['.ts', '.d.ts', '.js', '.mjs', '.cjs', '.json'],
    },
    cache: false,
  },
};
