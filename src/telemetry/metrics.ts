/**
 * Prometheus metrics on a registry of their own (not prom-client's global), so tests can build
 * many apps in one process. Labels never include the repository name: its cardinality is
 * unbounded (https://prometheus.io/docs/practices/naming/#labels).
 */
import { AggregatorRegistry, Counter, Gauge, Registry, collectDefaultMetrics, type Metric, type MetricObjectWithValues, type MetricValue } from 'prom-client';

/** One process's metrics as prom-client's getMetricsAsJSON() gives them. */
export type MetricsJson = Array<MetricObjectWithValues<MetricValue<string>>>;

/**
 * The metrics a worker (http/worker.ts) keeps, summed into the coordinator's for one /metrics; the
 * process_ and nodejs_ ones are each process's (summed, or by prom-client's own aggregator).
 */
export const WORKER_METRICS = new Set(['ocicache_cache_requests_total', 'ocicache_served_bytes_total', 'ocicache_http_request_duration_seconds', 'ocicache_access_denied_total']);

const START_TIME = 'ocicache_process_start_time_seconds';

/** A worker's share of the group's metrics. */
export async function workerShare(registry: Registry): Promise<MetricsJson> {
  const all = (await registry.getMetricsAsJSON()) as MetricsJson;
  return all.filter((m) => WORKER_METRICS.has(m.name) || m.name.startsWith('ocicache_process_') || m.name.startsWith('ocicache_nodejs_'));
}

export class Metrics {
  readonly registry = new Registry();

  readonly cacheRequests = new HotCounter(this.registry, 'ocicache_cache_requests_total', 'Requests for manifests, blobs, tag lists and referrers by cache result.', ['upstream', 'kind', 'result']);

  readonly servedBytes = new HotCounter(this.registry, 'ocicache_served_bytes_total', 'Blob and manifest bytes sent to clients, by where they came from (cache or upstream).', ['upstream', 'source']);

  readonly keptBytes = this.gauge('ocicache_kept_bytes', 'Bytes of blobs held for the keep list (never evicted), as of its last refresh.');

  readonly parentFallbacks = this.counter('ocicache_parent_fallbacks_total', 'Requests sent to the upstream itself because the parent cache could not be reached (parent.fallback).', ['upstream']);

  readonly upstreamRequests = this.counter('ocicache_upstream_requests_total', 'Requests sent to upstream registries, by kind and HTTP status ("error" for transport failures).', ['upstream', 'kind', 'status']);

  readonly upstreamBytes = this.counter('ocicache_upstream_bytes_total', 'Blob bytes downloaded from upstream registries into the cache.', ['upstream']);

  readonly fillsInFlight = this.gauge('ocicache_fills_in_flight', 'Blob downloads from upstream currently being written to the cache.');

  readonly fillFailures = this.counter('ocicache_fill_failures_total', 'Blob downloads that did not enter the cache, by reason.', ['upstream', 'reason']);

  readonly diskUsed = this.gauge('ocicache_disk_used_bytes', 'Bytes of blobs in the cache.');

  readonly diskLimit = this.gauge('ocicache_disk_limit_bytes', 'storage.maxSize in bytes (0: unbounded).');

  readonly evictions = this.counter('ocicache_evictions_total', 'Blobs removed from the cache, by reason (size: watermark, age: maxAge, gc: on demand).', ['reason']);

  readonly evictedBytes = this.counter('ocicache_evicted_bytes_total', 'Bytes of blobs removed from the cache, by reason.', ['reason']);

  readonly storageWritable = this.gauge('ocicache_storage_writable', '1 while new blobs are cached; 0 while storage is full or failing and blobs stream through uncached.');

  readonly storageErrors = this.counter('ocicache_storage_errors_total', 'Storage failures (ENOSPC, EROFS, ...) that turned caching off for a while, by errno code.', ['code']);

  readonly bucketRequests = this.counter('ocicache_bucket_requests_total', 'Requests to the S3 bucket (storage.backend: s3), by operation and result (ok, missing, error).', ['op', 'result']);

  readonly uploadsPending = this.gauge('ocicache_uploads_pending', 'Verified blobs on local disk waiting to be written to the S3 bucket (served from disk meanwhile).');

  readonly uncachedBlobs = this.counter('ocicache_uncached_blobs_total', 'Blobs streamed to a client without being cached because storage was full or failing.', ['upstream']);

  readonly blobResumes = this.counter('ocicache_blob_resumes_total', 'Broken blob downloads resumed, by how (range: 206 from the offset; restart: the upstream ignored Range).', ['upstream', 'how']);

  readonly breakerState = this.gauge('ocicache_upstream_breaker_state', 'Circuit breaker per upstream: 0 closed, 1 open (failing fast), 2 half-open (probing).', ['upstream']);

  readonly upstreamOffline = this.gauge('ocicache_upstream_offline', '1 when the upstream is in offline mode (served from the cache only).', ['upstream']);

  readonly rateLimited = this.counter('ocicache_upstream_rate_limited_total', '429 answers from upstreams (each blocks its repository, or the whole upstream, for its Retry-After).', ['upstream']);

  readonly upstreamRefused = this.counter('ocicache_upstream_refused_total', 'Requests answered without calling the upstream, by why (offline, breaker, retry_after, queue_timeout, not_found_cached).', ['upstream', 'reason']);

  readonly ratelimitLimit = this.gauge('ocicache_upstream_ratelimit_limit', "The upstream's ratelimit-limit header (Docker Hub: pulls per window).", ['upstream']);

  readonly ratelimitRemaining = this.gauge('ocicache_upstream_ratelimit_remaining', "The upstream's ratelimit-remaining header (Docker Hub: pulls left in the window).", ['upstream']);

  readonly prefetchBlobs = this.counter('ocicache_prefetch_blobs_total', 'Blobs handled by prefetch, by result (fetched, cached: already there, failed).', ['result']);

  readonly htpasswdStale = this.gauge('ocicache_access_htpasswd_stale', '1 while access.htpasswd on disk cannot be read or parsed: the users read before stay valid, removed users included.');

  readonly accessDenied = this.counter('ocicache_access_denied_total', 'Requests refused by access control, by reason (unauthenticated: no credentials where the rules want some; bad_credentials: wrong password or invalid token; forbidden: the rules do not allow this user).', ['reason']);

  readonly prefetchBytes = this.counter('ocicache_prefetch_bytes_total', 'Blob bytes prefetch made sure are in the cache.');

  readonly httpDuration = new HotHistogram(
    this.registry,
    'ocicache_http_request_duration_seconds',
    'Time to answer client requests, by API kind, method and status.',
    ['kind', 'method', 'status'],
    [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120],
  );

  private counter<L extends string = never>(name: string, help: string, labelNames: readonly L[] = []): Counter<L> {
    return new Counter({ name, help, labelNames, registers: [this.registry] });
  }

  private gauge<L extends string = never>(name: string, help: string, labelNames: readonly L[] = []): Gauge<L> {
    return new Gauge({ name, help, labelNames, registers: [this.registry] });
  }

  /** The workers' shares, when this is a coordinator (http/cluster.ts). */
  peers: (() => Promise<MetricsJson[]>) | undefined;

  /** The Prometheus text of this process, or of the whole group with its workers. */
  async text(): Promise<string> {
    if (!this.peers) return this.registry.metrics();
    const own = (await this.registry.getMetricsAsJSON()) as MetricsJson;
    // The group started when its coordinator did: its start time, not the workers' (prom-client omits the metric when aggregating).
    for (const m of own) if (m.name === START_TIME) m.aggregator = 'first';
    const peers = (await this.peers()).map((share) => share.filter((m) => m.name !== START_TIME));
    return AggregatorRegistry.aggregate([own, ...peers] as never).metrics();
  }

  constructor(replica?: string) {
    collectDefaultMetrics({ register: this.registry, prefix: 'ocicache_' });
    this.storageWritable.set(1);
    // Which replica of a fleet these metrics are from (server.replica), for dashboards that join on it.
    if (replica !== undefined) this.gauge('ocicache_replica_info', 'Always 1: the replica name this process answers as (server.replica).', ['replica']).set({ replica }, 1);
  }
}

/*
 * The metrics every request updates. prom-client hashes and validates the label set on each
 * inc() and observe(), a measurable share of a cached manifest answer (README, Performance).
 * These keep their cells here instead, and hand them over when scraped.
 */

function labelsOf<L extends string>(names: readonly L[], values: readonly string[]): Record<L, string> {
  return Object.fromEntries(names.map((n, i) => [n, values[i]])) as Record<L, string>;
}

/**
 * Cells by label values, one Map level per label. Joining the values into one key string cost a
 * string and its hash per update; the values here are mostly the same string objects each time
 * (upstream names from the config, literals), whose hashes V8 keeps.
 */
class Cells<C> {
  private readonly root = new Map<string, unknown>();
  readonly all: C[] = [];

  constructor(
    private readonly metric: string,
    private readonly labelNames: readonly string[],
    private readonly make: (labels: Record<string, string>) => C,
  ) {}

  get(values: readonly string[]): C {
    const last = this.labelNames.length - 1;
    if (values.length !== last + 1) throw new TypeError(`${this.metric}: ${values.length} label values for ${last + 1} labels`);
    let level = this.root;
    for (let i = 0; i < last; i++) {
      let next = level.get(values[i]!) as Map<string, unknown> | undefined;
      if (!next) level.set(values[i]!, (next = new Map()));
      level = next;
    }
    let cell = level.get(values[last]!) as C | undefined;
    if (!cell) {
      level.set(values[last]!, (cell = this.make(labelsOf(this.labelNames, values))));
      this.all.push(cell);
    }
    return cell;
  }

  clear(): void {
    this.root.clear();
    this.all.length = 0;
  }
}

/** A prom-client Counter whose increments are summed here and added to it when scraped (its `collect` hook). */
export class HotCounter<L extends string> {
  private readonly cells: Cells<{ labels: Record<string, string>; n: number }>;
  readonly counter: Counter<L>;

  constructor(registry: Registry, readonly name: string, help: string, labelNames: readonly L[]) {
    this.cells = new Cells(name, labelNames, (labels) => ({ labels, n: 0 }));
    const flush = (): void => this.flush();
    this.counter = new Counter({ name, help, labelNames, registers: [registry], collect: flush });
    // registry.resetMetrics() resets the Counter: increments not scraped yet go with it.
    const reset = this.counter.reset.bind(this.counter);
    this.counter.reset = () => {
      this.cells.clear();
      reset();
    };
  }

  /** `values` in the order of the label names. Refuses what prom-client would, at once rather than at the next scrape. */
  inc(values: readonly string[], n = 1): void {
    if (!Number.isFinite(n) || n < 0) throw new TypeError(`${this.name}: a counter cannot be increased by ${n}`);
    this.cells.get(values).n += n;
  }

  private flush(): void {
    for (const cell of this.cells.all) {
      if (cell.n === 0) continue;
      this.counter.inc(cell.labels as Partial<Record<L, string>>, cell.n);
      cell.n = 0;
    }
  }
}

interface ExportedValue {
  metricName: string;
  labels: Record<string, string | number>;
  value: number;
}

/** A histogram kept here whole, exported in prom-client's format through its registry. */
export class HotHistogram<L extends string> {
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  private readonly cells: Cells<{ labels: Record<string, string>; counts: number[]; sum: number; count: number }>;

  constructor(
    registry: Registry,
    readonly name: string,
    readonly help: string,
    labelNames: readonly L[],
    private readonly buckets: readonly number[],
  ) {
    this.cells = new Cells(name, labelNames, (labels) => ({ labels, counts: buckets.map(() => 0), sum: 0, count: 0 }));
    registry.registerMetric(this as unknown as Metric);
  }

  /** `values` in the order of the label names. */
  observe(values: readonly string[], value: number): void {
    if (!Number.isFinite(value)) throw new TypeError(`${this.name}: cannot observe ${value}`);
    const cell = this.cells.get(values);
    let i = 0;
    while (i < this.buckets.length && value > this.buckets[i]!) i++;
    if (i < this.buckets.length) cell.counts[i]!++;
    cell.sum += value;
    cell.count++;
  }

  /** What prom-client's Histogram.get() returns; its registry renders it. */
  async get(): Promise<{ name: string; help: string; type: 'histogram'; aggregator: 'sum'; values: ExportedValue[] }> {
    const values: ExportedValue[] = [];
    for (const { labels, counts, sum, count } of this.cells.all) {
      let cumulative = 0;
      this.buckets.forEach((le, i) => {
        cumulative += counts[i]!;
        values.push({ metricName: `${this.name}_bucket`, labels: { le, ...labels }, value: cumulative });
      });
      values.push({ metricName: `${this.name}_bucket`, labels: { le: '+Inf', ...labels }, value: count });
      values.push({ metricName: `${this.name}_sum`, labels, value: sum });
      values.push({ metricName: `${this.name}_count`, labels, value: count });
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }

  reset(): void {
    this.cells.clear();
  }
}
