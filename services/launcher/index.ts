/**
 * The launcher room's public surface: the local fleet supervisor (NATS, the four services and two agents as
 * child processes on one machine), the story told on it, and the embedded nats-server they start with. The
 * CLI's `fleet up` calls it; it uses the services' public APIs and services/common, never the CLI's or a
 * service's files (README.md).
 */
export { startEmbeddedNats, freePort, type EmbeddedNats, type EmbeddedNatsOptions } from './embedded-nats.js';
export { check, checkHealth, type HealthReport } from './health-check.js';
export { FLEET_PROCESSES, secondHostId, startLocalFleet, type FleetEndpoint, type LocalFleet, type LocalFleetOptions, type LocalHost } from './local-fleet.js';
export {
  checkStoryName,
  DEFAULT_STORY_NAME,
  guestDomainXml,
  masterDomainXml,
  runStory,
  STORY_CLONES,
  StoryInterrupted,
  type StoryFleet,
  type StoryOptions,
  type StoryRecord,
} from './story.js';
