#!/usr/bin/env node
/**
 * `ocicache serve [--config FILE]`: run the proxy. Without --config it reads $OCICACHE_CONFIG or
 * the embedded config/default.yaml.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { buildApp } from './app.js';
import { ConfigError, loadConfig } from './config.js';

const USAGE = `usage: ocicache serve [--config FILE]

  serve    run the caching proxy (default config: config/default.yaml, or $OCICACHE_CONFIG)
  version  print the version
`;

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

async function serve(configFile: string | undefined): Promise<void> {
  const config = loadConfig(configFile);
  const app = await buildApp(config);
  await app.listen({ host: config.server.host, port: config.server.port });
  app.log.info(
    { version: version(), storage: config.storage.root, defaultUpstream: config.defaultUpstream ?? null, upstreams: config.upstreams.map((u) => `${u.name}=${u.url.origin}`) },
    'ocicache ready',
  );
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    app.log.info({ signal }, 'shutting down: finishing requests and fills');
    // A second chance for stuck connections, then give up: the cache is crash-safe anyway.
    setTimeout(() => {
      app.log.warn('shutdown took too long, exiting');
      process.exit(1);
    }, config.server.shutdownTimeout + 5000).unref();
    app
      .drain(config.server.shutdownTimeout)
      .then(() => app.close())
      .then(
      () => process.exit(0),
      (err: unknown) => {
        app.log.error({ err }, 'error during shutdown');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
}

async function main(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: { config: { type: 'string', short: 'c' }, help: { type: 'boolean', short: 'h' } },
    allowPositionals: true,
  });
  const command = positionals[0] ?? 'serve';
  if (values.help) {
    process.stdout.write(USAGE);
    return;
  }
  switch (command) {
    case 'serve':
      return serve(values.config);
    case 'version':
      process.stdout.write(`${version()}\n`);
      return;
    default:
      process.stderr.write(`unknown command ${command}\n${USAGE}`);
      process.exitCode = 2;
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  if (err instanceof ConfigError) {
    process.stderr.write(`${err.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
