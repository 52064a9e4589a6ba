#!/usr/bin/env node
/**
 * The `ocicache` command: serve, and the operator's one-shot commands gc, verify, prefetch and
 * haproxy.
 * Without --config every command reads $OCICACHE_CONFIG or the embedded config/default.yaml.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { request, type Dispatcher } from 'undici';
import { buildApp } from './http/app.js';
import { startGroup } from './http/cluster.js';
import { ConfigError, configFromText, loadConfig, readConfigFile, type Config } from './core/config.js';
import { formatBytes } from './core/units.js';
import type { KeptEntry } from './cache/keep.js';
import { prefetch, type PrefetchEvent, type PrefetchOptions } from './cache/prefetch.js';
import { openCache, type Services } from './cache/services.js';
import { CacheInUse } from './storage/lock.js';
import { problems, verify } from './cache/verify.js';
import { haproxyConfig } from './fleet/haproxy.js';
import { version } from './version.js';

const USAGE = `usage: ocicache <command> [--config FILE] [options]

  serve                 run the caching proxy (the default command)
  gc                    expire and evict blobs now (maxAge, storage.maxSize down to the low
                        watermark) and print what was freed
  verify                re-hash every blob and manifest, repair the index, remove what is
                        corrupt; exits 1 when anything was found
  prefetch REF...       fetch images into the cache (REF: [registry/]name[:tag|@digest])
      --platform LIST     only these platforms of a multi-platform image, e.g. linux/amd64,linux/arm64
      --with-referrers    also each manifest's signatures, SBOMs and attestations (the referrers
                          API, or the sha256-<hex> tags where the upstream has none)
      --file FILE         read references from FILE too, one per line (# comments allowed)
      --server URL        ask a running ocicache (POST URL/admin/prefetch) instead of opening the
                          cache directory; the admin token comes from $OCICACHE_ADMIN_TOKEN
  kept                  list the keep list's images and what the cache holds for them
      --server URL        ask a running ocicache (GET URL/admin/keep; $OCICACHE_ADMIN_TOKEN)
  haproxy               print an HAProxy configuration for replicas of this config behind one
                        consistent-hash balancer (README, "Running a fleet")
      --replica NAME=HOST:PORT   a replica, once per replica (NAME: stable, e.g. the pod name)
      --bind ADDR           where HAProxy listens (default :5000)
      --check-interval D    how often HAProxy checks each replica's /readyz (default 2s)
      --dns                 replica hosts are DNS names to keep resolving (a StatefulSet's pods)
      --out FILE            write the configuration to FILE instead of standard output
  version               print the version

  --config FILE         config file (default: $OCICACHE_CONFIG, else config/default.yaml)

gc, verify and prefetch without --server open the cache directory themselves, and refuse while a
server (or another command) has it open: use the server's admin API (POST /admin/gc,
/admin/prefetch, prefetch --server) instead.
`;


async function withCache<T>(config: Config, fn: (s: Services) => Promise<T>): Promise<T> {
  const log = pino({ level: config.log.level === 'info' ? 'warn' : config.log.level }, pino.destination(2));
  const s = await openCache(config, log, { sweep: false });
  try {
    return await fn(s);
  } finally {
    await s.close(0);
  }
}

async function gc(config: Config): Promise<void> {
  await withCache(config, async (s) => {
    const r = await s.lifecycle.pass('gc');
    const usage = s.db.usage();
    process.stdout.write(
      `gc: freed ${r.blobs} blobs (${formatBytes(r.bytes)}); dropped ${r.manifests} manifests, ${r.tags} tags and ${r.danglingRows} dangling index rows\n` +
        `cache: ${formatBytes(usage.bytes)} in ${usage.count} blobs (limit ${config.storage.maxSize === undefined ? 'none' : formatBytes(config.storage.maxSize)})\n`,
    );
  });
}

async function verifyCommand(config: Config): Promise<void> {
  const report = await withCache(config, (s) => verify(s));
  const lines = [
    ...report.corruptBlobs.map((d) => `corrupt blob ${d}: deleted`),
    ...report.missingBlobs.map((d) => `missing blob file ${d}: index row dropped`),
    ...report.adoptedBlobs.map((d) => `blob file without index row ${d}: verified and adopted`),
    ...report.strayFiles.map((p) => `stray file ${p}: deleted`),
    ...report.corruptManifests.map((d) => `corrupt manifest ${d}: dropped`),
  ];
  if (report.droppedManifests + report.droppedTags > 0) lines.push(`dropped ${report.droppedManifests} manifests and ${report.droppedTags} tags that pointed to removed content`);
  if (report.danglingRows > 0) lines.push(`removed ${report.danglingRows} dangling index rows`);
  const n = problems(report);
  lines.push(`verify: checked ${report.blobsChecked} blobs and ${report.manifestsChecked} manifests: ${n === 0 ? 'all good' : `${n} problems found and repaired`}`);
  process.stdout.write(`${lines.join('\n')}\n`);
  if (n > 0) process.exitCode = 1;
}

function printEvent(e: PrefetchEvent): void {
  if (e.event === 'done') {
    const s = e.summary!;
    process.stdout.write(`prefetch: ${s.refs} images, ${s.blobs} blobs (${s.fetched} fetched), ${formatBytes(s.bytes)} in the cache; ${s.failedRefs} failed\n`);
    if (s.failedRefs > 0) process.exitCode = 1;
    return;
  }
  if (e.event === 'error') {
    process.stdout.write(`${e.ref}  error: ${e.error}\n`);
    return;
  }
  const size = e.size === undefined ? '' : ` ${formatBytes(e.size)}`;
  const platform = e.platform ? ` (${e.platform})` : '';
  const subject = e.subject ? ` (referrer of ${e.subject})` : '';
  process.stdout.write(`${e.ref}  ${e.event} ${e.digest}${size} ${e.result}${platform}${subject}${e.error ? `: ${e.error}` : ''}\n`);
}

async function prefetchCommand(config: Config | undefined, refs: string[], options: PrefetchOptions, server: string | undefined): Promise<void> {
  if (refs.length === 0) throw new UsageError('prefetch needs at least one image reference (or --file)');
  if (server === undefined) {
    await withCache(config!, (s) => prefetch(s, refs, options, printEvent));
    return;
  }
  const body = JSON.stringify({ references: refs, platforms: options.platforms, withReferrers: options.withReferrers });
  const res = await adminRequest(server, '/admin/prefetch', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
  let buffered = '';
  for await (const chunk of res.body) {
    buffered += (chunk as Buffer).toString('utf8');
    let nl: number;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      printEvent(JSON.parse(buffered.slice(0, nl)) as PrefetchEvent);
      buffered = buffered.slice(nl + 1);
    }
  }
}

class UsageError extends Error {}

/** A call to a running server's admin API with $OCICACHE_ADMIN_TOKEN; anything but a 200 is the user's error to read. */
async function adminRequest(server: string, path: string, init: { method?: 'GET' | 'POST'; headers?: Record<string, string>; body?: string } = {}): Promise<Dispatcher.ResponseData> {
  const token = process.env.OCICACHE_ADMIN_TOKEN;
  let res: Dispatcher.ResponseData;
  try {
    res = await request(new URL(path, server), { ...init, headers: { ...init.headers, ...(token ? { authorization: `Bearer ${token}` } : {}) } });
  } catch (err) {
    throw new UsageError(`cannot reach ${server}: ${(err as Error).message}`);
  }
  if (res.statusCode !== 200) throw new UsageError(`${server} answered ${res.statusCode}: ${await res.body.text()}`);
  return res;
}

/** Prints the keep list: each entry and what it holds, from the cache directory or a running server. */
async function keptCommand(config: Config | undefined, server: string | undefined): Promise<void> {
  let entries: KeptEntry[];
  if (server === undefined) {
    entries = await withCache(config!, async (s) => s.keeper.entries());
  } else {
    entries = ((await (await adminRequest(server, '/admin/keep')).body.json()) as { entries: KeptEntry[] }).entries;
  }
  if (entries.length === 0) process.stdout.write('keep: no images listed (config keep.images)\n');
  for (const e of entries) {
    const state = e.error ? `  last refresh failed: ${e.error}` : '';
    if (e.refs.length === 0) process.stdout.write(`${e.pattern}  not fetched yet${state}\n`);
    for (const r of e.refs) process.stdout.write(`${e.pattern}  ${r.ref}  ${r.digests} manifests and blobs kept${state}\n`);
  }
}


async function serve(configFile: string | undefined): Promise<void> {
  const source = readConfigFile(configFile);
  const config = configFromText(source.file, source.text);
  // A signal during start-up (a worker may already answer while another starts) stops the server once it is up.
  let early: string | undefined;
  const onEarly = (signal: string): void => void (early ??= signal);
  process.on('SIGTERM', onEarly).on('SIGINT', onEarly);
  let app: Awaited<ReturnType<typeof buildApp>>;
  let close: () => Promise<void>;
  if (config.server.workers > 1) {
    ({ app, stop: close } = await startGroup(config, source.text));
  } else {
    app = await buildApp(config);
    await app.listen({ host: config.server.host, port: config.server.port });
    close = async () => {
      await app.drain(config.server.shutdownTimeout);
      await app.close();
    };
  }
  app.log.info(
    { version: version(), storage: config.storage.root, listen: `${config.server.host}:${config.server.port}`, workers: config.server.workers, defaultUpstream: config.defaultUpstream ?? null, upstreams: config.upstreams.map((u) => `${u.name}=${u.url.origin}`) },
    'ocicache ready',
  );
  let stopping = false;
  // Logs go to stdout asynchronously (telemetry/log-stream.ts): write out what is buffered before exiting.
  const exit = (code: number): void => {
    (app.log as unknown as { flush(cb: () => void): void }).flush(() => process.exit(code));
  };
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    app.log.info({ signal }, 'shutting down: finishing requests and fills');
    // A second chance for stuck connections, then give up: the cache is crash-safe anyway.
    setTimeout(() => {
      app.log.warn('shutdown took too long, exiting');
      exit(1);
    }, config.server.shutdownTimeout * (config.server.workers > 1 ? 2 : 1) + 5000).unref();
    close().then(
      () => exit(0),
      (err: unknown) => {
        app.log.error({ err }, 'error during shutdown');
        exit(1);
      },
    );
  };
  process.off('SIGTERM', onEarly).off('SIGINT', onEarly);
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
  if (early) stop(early);
}

async function main(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      config: { type: 'string', short: 'c' },
      help: { type: 'boolean', short: 'h' },
      platform: { type: 'string', multiple: true },
      'with-referrers': { type: 'boolean' },
      file: { type: 'string', multiple: true },
      server: { type: 'string' },
      replica: { type: 'string', multiple: true },
      bind: { type: 'string' },
      'check-interval': { type: 'string' },
      dns: { type: 'boolean' },
      out: { type: 'string' },
    },
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
    case 'gc':
      return gc(loadConfig(values.config, process.env, { upstreamAuth: false, adminToken: false }));
    case 'verify':
      return verifyCommand(loadConfig(values.config, process.env, { upstreamAuth: false, adminToken: false }));
    case 'prefetch': {
      const refs = positionals.slice(1);
      for (const f of values.file ?? []) {
        let text: string;
        try {
          text = readFileSync(f === '-' ? 0 : f, 'utf8');
        } catch (err) {
          throw new UsageError(`--file ${f}: ${(err as Error).message}`);
        }
        refs.push(...text.split('\n').map((l) => l.replace(/#.*/, '').trim()).filter(Boolean));
      }
      const platforms = values.platform?.flatMap((p) => p.split(',')).map((p) => p.trim()).filter(Boolean);
      const config = values.server === undefined ? loadConfig(values.config, process.env, { upstreamAuth: true, adminToken: false }) : undefined;
      return prefetchCommand(config, refs, { platforms, withReferrers: values['with-referrers'] }, values.server);
    }
    case 'kept': {
      const config = values.server === undefined ? loadConfig(values.config, process.env, { upstreamAuth: false, adminToken: false }) : undefined;
      return keptCommand(config, values.server);
    }
    case 'haproxy': {
      const replicas = (values.replica ?? []).map((r) => {
        const eq = r.indexOf('=');
        if (eq <= 0) throw new UsageError(`--replica ${r}: expected NAME=HOST:PORT`);
        return { name: r.slice(0, eq), address: r.slice(eq + 1) };
      });
      if (replicas.length === 0) throw new UsageError('haproxy: name the replicas with --replica NAME=HOST:PORT (once each)');
      const config = loadConfig(values.config, process.env, { upstreamAuth: false, adminToken: false });
      try {
        const text = haproxyConfig(config, { bind: values.bind ?? ':5000', replicas, checkInterval: values['check-interval'], dns: values.dns });
        if (values.out === undefined) process.stdout.write(text);
        else writeFileSync(values.out, text);
      } catch (err) {
        throw new UsageError(`haproxy: ${(err as Error).message}`);
      }
      return;
    }
    default:
      process.stderr.write(`unknown command ${command}\n${USAGE}`);
      process.exitCode = 2;
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  if (err instanceof ConfigError || err instanceof UsageError || (err as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
    process.stderr.write(`${(err as Error).message}\n`);
    process.exit(2);
  }
  if (err instanceof CacheInUse) {
    process.stderr.write(`ocicache: ${err.message}\n`);
    process.exit(1);
  }
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
