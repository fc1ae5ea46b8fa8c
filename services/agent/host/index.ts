/**
 * The host room: this host's membership in the fleet (enrollment with a join token, registration,
 * heartbeats and VM reports to inventory) and the facts it reports. It uses the hypervisor and
 * image-directory rooms; nothing below it uses it.
 */
export { ensureEnrolled } from './enrollment.js';
export { createHostFactsSource, detectHypervisor, readSystemFacts } from './host-facts.js';
export { createReporter, inventoryPort, type InventoryPort, type Reporter } from './reporter.js';
