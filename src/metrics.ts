/**
 * Prometheus metrics on a registry of their own (not prom-client's global), so tests can build
 * many apps in one process. Labels never include the repository name: its cardinality is
 * unbounded (landscape.md §6.9).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export type CacheResult = 'hit' | 'miss' | 'stale' | 'revalidated' | 'passthrough' | 'error';

export class Metrics {
  readonly registry = new Registry();

  readonly cacheRequests = this.counter('ocicache_cache_requests_total', 'Requests for manifests, blobs, tag lists and referrers by cache result.', ['upstream', 'kind', 'result']);

  readonly servedBytes = this.counter('ocicache_served_bytes_total', 'Blob and manifest bytes sent to clients, by where they came from (cache or upstream).', ['upstream', 'source']);

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

  readonly uncachedBlobs = this.counter('ocicache_uncached_blobs_total', 'Blobs streamed to a client without being cached because storage was full or failing.', ['upstream']);

  readonly blobResumes = this.counter('ocicache_blob_resumes_total', 'Broken blob downloads resumed, by how (range: 206 from the offset; restart: the upstream ignored Range).', ['upstream', 'how']);

  readonly breakerState = this.gauge('ocicache_upstream_breaker_state', 'Circuit breaker per upstream: 0 closed, 1 open (failing fast), 2 half-open (probing).', ['upstream']);

  readonly upstreamOffline = this.gauge('ocicache_upstream_offline', '1 when the upstream is in offline mode (served from the cache only).', ['upstream']);

  readonly rateLimited = this.counter('ocicache_upstream_rate_limited_total', '429 answers from upstreams.', ['upstream']);

  readonly upstreamRefused = this.counter('ocicache_upstream_refused_total', 'Requests answered without calling the upstream, by why (offline, breaker, retry_after, queue_timeout).', ['upstream', 'reason']);

  readonly ratelimitLimit = this.gauge('ocicache_upstream_ratelimit_limit', "The upstream's ratelimit-limit header (Docker Hub: pulls per window).", ['upstream']);

  readonly ratelimitRemaining = this.gauge('ocicache_upstream_ratelimit_remaining', "The upstream's ratelimit-remaining header (Docker Hub: pulls left in the window).", ['upstream']);

  readonly prefetchBlobs = this.counter('ocicache_prefetch_blobs_total', 'Blobs handled by prefetch, by result (fetched, cached: already there, failed).', ['result']);

  readonly prefetchBytes = this.counter('ocicache_prefetch_bytes_total', 'Blob bytes prefetch made sure are in the cache.');

  readonly httpDuration = new Histogram({
    name: 'ocicache_http_request_duration_seconds',
    help: 'Time to answer client requests, by API kind, method and status.',
    labelNames: ['kind', 'method', 'status'] as const,
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120],
    registers: [this.registry],
  });

  private counter<L extends string = never>(name: string, help: string, labelNames: readonly L[] = []): Counter<L> {
    return new Counter({ name, help, labelNames, registers: [this.registry] });
  }

  private gauge<L extends string = never>(name: string, help: string, labelNames: readonly L[] = []): Gauge<L> {
    return new Gauge({ name, help, labelNames, registers: [this.registry] });
  }

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'ocicache_' });
    this.storageWritable.set(1);
  }
}
