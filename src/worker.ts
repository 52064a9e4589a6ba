/**
 * The entry of a worker process of a group (server.workers > 1; http/cluster.ts starts it with
 * cluster.fork). It loads only what answering hits and forwarding needs (http/worker.ts), not the
 * whole cache, so a worker costs less memory than its coordinator.
 */
import { ConfigError } from './core/config.js';
import { runWorker, workerSetup } from './http/worker.js';

// Signals are the coordinator's to act on (a terminal's Ctrl-C and systemd's stop reach every
// process of the group): it tells its workers when to drain.
process.on('SIGTERM', () => undefined);
process.on('SIGINT', () => undefined);

try {
  const { config, socketPath } = workerSetup(process.env);
  await runWorker(config, socketPath);
} catch (err) {
  process.stderr.write(err instanceof ConfigError ? `${err.message}\n` : `${(err as Error).stack ?? String(err)}\n`);
  process.exit(err instanceof ConfigError ? 2 : 1);
}
