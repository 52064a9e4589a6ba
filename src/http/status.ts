/**
 * The status page at `/`: plain server-rendered HTML for an operator glancing at the cache.
 * Version, upstreams with their state, cache size against its limit, hit ratio, the most pulled
 * images. Counts live in memory since start-up (Prometheus has the long view).
 */
import type { FastifyInstance } from 'fastify';
import type { Access } from '../access/access.js';
import type { CacheResult } from '../core/cache-result.js';
import { formatBytes } from '../core/units.js';
import type { Services } from '../cache/services.js';

/** Pulled images kept for the "most pulled" list; the least pulled are dropped past this. */
const MAX_IMAGES = 10_000;

export class Stats {
  readonly startedAt = Date.now();
  private readonly results = new Map<string, Map<CacheResult, number>>();
  /** Pulls by upstream, then name: no `upstream/name` string is built per request. */
  private readonly pulls = new Map<string, Map<string, number>>();
  private images = 0;

  /** One answered manifest or blob request. A manifest GET by tag counts as a pull of the image. */
  record(upstream: string, kind: string, result: CacheResult, name: string | undefined, byTag: boolean, method: string): void {
    if (kind !== 'manifest' && kind !== 'blob') return;
    this.addResult(upstream, result, 1);
    if (kind === 'manifest' && byTag && method === 'GET' && name !== undefined && result !== 'error') this.addPull(upstream, name, 1);
  }

  /** The counts since the last take, cleared here: a worker's share for its coordinator (http/worker.ts), which adds them. */
  take(): StatsBatch {
    const batch: StatsBatch = { results: [], pulls: [] };
    for (const [upstream, m] of this.results) for (const [result, n] of m) batch.results.push([upstream, result, n]);
    for (const { upstream, name, n } of this.pulled()) batch.pulls.push([upstream, name, n]);
    this.results.clear();
    this.pulls.clear();
    this.images = 0;
    return batch;
  }

  /** A worker's counts (take()), added to these. */
  add(batch: StatsBatch): void {
    for (const [upstream, result, n] of batch.results) this.addResult(upstream, result, n);
    for (const [upstream, name, n] of batch.pulls) this.addPull(upstream, name, n);
  }

  private addResult(upstream: string, result: CacheResult, count: number): void {
    let m = this.results.get(upstream);
    if (!m) this.results.set(upstream, (m = new Map()));
    m.set(result, (m.get(result) ?? 0) + count);
  }

  private addPull(upstream: string, name: string, count: number): void {
    let names = this.pulls.get(upstream);
    if (!names) this.pulls.set(upstream, (names = new Map()));
    const n = names.get(name);
    names.set(name, (n ?? 0) + count);
    if (n === undefined && ++this.images > MAX_IMAGES) this.trim();
  }

  /** Every pulled image with its pulls. */
  private pulled(): Array<{ upstream: string; name: string; n: number }> {
    const all: Array<{ upstream: string; name: string; n: number }> = [];
    for (const [upstream, names] of this.pulls) for (const [name, n] of names) all.push({ upstream, name, n });
    return all;
  }

  private trim(): void {
    const sorted = this.pulled().sort((a, b) => a.n - b.n);
    for (const { upstream, name } of sorted.slice(0, sorted.length - MAX_IMAGES / 2)) this.pulls.get(upstream)!.delete(name);
    this.images = Math.min(sorted.length, MAX_IMAGES / 2);
  }

  /** Hits over answered requests (errors excluded), overall or for one upstream; undefined before any. */
  hitRatio(upstream?: string): number | undefined {
    let hits = 0;
    let all = 0;
    for (const [u, m] of this.results) {
      if (upstream !== undefined && u !== upstream) continue;
      for (const [result, n] of m) {
        if (result === 'error') continue;
        all += n;
        if (result === 'hit') hits += n;
      }
    }
    return all === 0 ? undefined : hits / all;
  }

  /** The most pulled images; with `visible`, only those it lets the viewer see. */
  topPulls(n: number, visible: (upstream: string, name: string) => boolean = () => true): Array<[string, number]> {
    const images = this.pulled()
      .filter(({ upstream, name }) => visible(upstream, name))
      .map(({ upstream, name, n: pulls }): [string, number] => [`${upstream}/${name}`, pulls]);
    return images.sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).slice(0, n);
  }
}

/** Counts of answers by upstream and result, and pulls by upstream and image: what Stats.take gives. */
export interface StatsBatch {
  results: Array<[upstream: string, result: CacheResult, n: number]>;
  pulls: Array<[upstream: string, name: string, n: number]>;
}

const escape = (s: string): string => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const percent = (r: number | undefined): string => (r === undefined ? '–' : `${(r * 100).toFixed(1)}%`);

function duration(ms: number): string {
  const s = Math.floor(ms / 1000);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172_800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

/** The keep list: each entry, what it resolved to, and how its last refresh went. */
function kept(s: Services, visible: ((upstream: string, name: string) => boolean) | undefined): string {
  const entries = s.keeper.entries().filter((e) => !visible || visible(e.upstream, e.name));
  if (entries.length === 0) return '';
  const rows = entries.map((e) => {
    const refs = e.refs.length === 0 ? 'not fetched yet' : e.refs.map((r) => `${escape(r.ref)} (${r.digests})`).join('<br>');
    const state = e.error ? `<span class="limited">${escape(e.error)}</span>` : e.refreshedAt ? `refreshed ${duration(Date.now() - e.refreshedAt)} ago` : 'refreshing';
    return `<tr><td>${escape(e.pattern)}</td><td>${refs}</td><td>${state}</td></tr>`;
  });
  return `<h2>Kept images</h2>
<table id="kept"><thead><tr><th>entry</th><th>images (manifests and blobs)</th><th>last refresh</th></tr></thead><tbody>
${rows.join('\n')}
</tbody></table>`;
}

/** `access`: with access control on, the page lists only images the viewer may pull (names can be private). */
export function registerStatus(app: FastifyInstance, s: Services, stats: Stats, version: string, access?: Access): void {
  app.get('/', { exposeHeadRoute: true }, async (req, reply) => {
    const rows = s.config.upstreams.map((u) => {
      const gate = s.upstream.gate(u.name);
      const retry = gate.retryAfterSeconds;
      const state = gate.offline
        ? ['offline', 'serving from the cache only']
        : gate.state === 'open'
          ? ['breaker-open', 'breaker open: failing fast']
          : gate.state === 'half-open'
            ? ['breaker-open', 'breaker half-open: probing']
            : retry > 0
              ? ['limited', `rate limited: waiting ${retry}s`]
              : ['ok', 'ok'];
      return `<tr><td>${escape(u.name)}</td><td>${escape(u.url.origin)}${u.tls?.insecure ? ' <strong class="insecure">insecure: TLS not verified</strong>' : ''}</td><td class="${state[0]}">${escape(state[1]!)}</td><td>${percent(stats.hitRatio(u.name))}</td></tr>`;
    });
    const usage = s.db.usage();
    const limit = s.config.storage.maxSize;
    const used = s.lifecycle.usedBytes;
    const fill = limit ? ` (${((used / limit) * 100).toFixed(1)}% of ${formatBytes(limit)})` : ' (no limit set)';
    const viewer = req.identity;
    const top = stats.topPulls(10, access ? (upstream, name) => viewer !== null && access.allowed(viewer, upstream, name) : undefined);
    const html = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="15">
<title>ocicache status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}
.ok{color:#1a7f37}.insecure{color:#b00020}.offline{color:#666}.breaker-open,.limited{color:#b35900;font-weight:600}dt{font-weight:600}dd{margin:0 0 .5em}
</style></head><body>
<h1>ocicache ${escape(version)}</h1>
<p id="uptime">${s.config.server.replica !== undefined ? `Replica <strong id="replica">${escape(s.config.server.replica)}</strong> · ` : ''}Up ${duration(Date.now() - stats.startedAt)}${s.config.offline ? ' · <strong>offline mode</strong>' : ''}</p>
<h2>Upstreams</h2>
<table id="upstreams"><thead><tr><th>name</th><th>url</th><th>state</th><th>hit ratio</th></tr></thead><tbody>
${rows.join('\n')}
</tbody></table>
<h2>Cache</h2>
<dl id="cache"><dt>disk</dt><dd id="disk">${formatBytes(used)} in ${usage.count} blobs${fill}</dd>
<dt>hit ratio</dt><dd id="hit-ratio">${percent(stats.hitRatio())} of manifest and blob requests since start</dd></dl>
${kept(s, access ? (upstream, name) => viewer !== null && access.allowed(viewer, upstream, name) : undefined)}
<h2>Most pulled images</h2>
${top.length === 0 ? '<p id="top-images">none yet</p>' : `<table id="top-images"><thead><tr><th>image</th><th>pulls</th></tr></thead><tbody>\n${top.map(([k, n]) => `<tr><td>${escape(k)}</td><td>${n}</td></tr>`).join('\n')}\n</tbody></table>`}
<p><a href="/metrics">metrics</a> · <a href="/readyz">readiness</a></p>
</body></html>
`;
    return reply.type('text/html; charset=utf-8').header('cache-control', 'no-store').send(html);
  });
}
