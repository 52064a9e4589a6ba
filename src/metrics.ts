/**
 * Prometheus metrics on a registry of their own (not prom-client's global), so tests can build
 * many apps in one process. Labels never include the repository name: its cardinality is
 * unbounded (landscape.md §6.9).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export type CacheResult = 'hit' | 'miss' | 'stale' | 'revalidated' | 'passthrough' | 'error';

export class Metrics {
  readonly registry = new Registry();

  readonly cacheRequests = new Counter({
    name: 'ocicache_cache_requests_total',
    help: 'Requests for manifests, blobs, tag lists and referrers by cache result.',
    labelNames: ['upstream', 'kind', 'result'] as const,
    registers: [this.registry],
  });

  readonly servedBytes = new Counter({
    name: 'ocicache_served_bytes_total',
    help: 'Blob and manifest bytes sent to clients, by where they came from (cache or upstream).',
    labelNames: ['upstream', 'source'] as const,
    registers: [this.registry],
  });

  readonly upstreamRequests = new Counter({
    name: 'ocicache_upstream_requests_total',
    help: 'Requests sent to upstream registries, by kind and HTTP status ("error" for transport failures).',
    labelNames: ['upstream', 'kind', 'status'] as const,
    registers: [this.registry],
  });

  readonly upstreamBytes = new Counter({
    name: 'ocicache_upstream_bytes_total',
    help: 'Blob bytes downloaded from upstream registries into the cache.',
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });

  readonly fillsInFlight = new Gauge({
    name: 'ocicache_fills_in_flight',
    help: 'Blob downloads from upstream currently being written to the cache.',
    registers: [this.registry],
  });

  readonly fillFailures = new Counter({
    name: 'ocicache_fill_failures_total',
    help: 'Blob downloads that did not enter the cache, by reason.',
    labelNames: ['upstream', 'reason'] as const,
    registers: [this.registry],
  });

  readonly diskUsed = new Gauge({
    name: 'ocicache_disk_used_bytes',
    help: 'Bytes of blobs in the cache.',
    registers: [this.registry],
  });

  readonly diskLimit = new Gauge({
    name: 'ocicache_disk_limit_bytes',
    help: 'storage.maxSize in bytes (0: unbounded).',
    registers: [this.registry],
  });

  readonly evictions = new Counter({
    name: 'ocicache_evictions_total',
    help: 'Blobs removed from the cache, by reason (size: watermark, age: maxAge, gc: on demand).',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });

  readonly evictedBytes = new Counter({
    name: 'ocicache_evicted_bytes_total',
    help: 'Bytes of blobs removed from the cache, by reason.',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });

  readonly storageWritable = new Gauge({
    name: 'ocicache_storage_writable',
    help: '1 while new blobs are cached; 0 while storage is full or failing and blobs stream through uncached.',
    registers: [this.registry],
  });

  readonly storageErrors = new Counter({
    name: 'ocicache_storage_errors_total',
    help: 'Storage failures (ENOSPC, EROFS, ...) that turned caching off for a while, by errno code.',
    labelNames: ['code'] as const,
    registers: [this.registry],
  });

  readonly uncachedBlobs = new Counter({
    name: 'ocicache_uncached_blobs_total',
    help: 'Blobs streamed to a client without being cached because storage was full or failing.',
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });

  readonly blobResumes = new Counter({
    name: 'ocicache_blob_resumes_total',
    help: 'Broken blob downloads resumed, by how (range: 206 from the offset; restart: the upstream ignored Range).',
    labelNames: ['upstream', 'how'] as const,
    registers: [this.registry],
  });

  readonly breakerState = new Gauge({
    name: 'ocicache_upstream_breaker_state',
    help: 'Circuit breaker per upstream: 0 closed, 1 open (failing fast), 2 half-open (probing).',
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });

  readonly upstreamOffline = new Gauge({
    name: 'ocicache_upstream_offline',
    help: '1 when the upstream is in offline mode (served from the cache only).',
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });

  readonly rateLimited = new Counter({
    name: 'ocicache_upstream_rate_limited_total',
    help: '429 answers from upstreams.',
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });

  readonly upstreamRefused = new Counter({
    name: 'ocicache_upstream_refused_total',
    help: 'Requests answered without calling the upstream, by why (offline, breaker, retry_after, queue_timeout).',
    labelNames: ['upstream', 'reason'] as const,
    registers: [this.registry],
  });

  readonly ratelimitLimit = new Gauge({
    name: 'ocicache_upstream_ratelimit_limit',
    help: "The upstream's ratelimit-limit header (Docker Hub: pulls per window).",
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });

  readonly ratelimitRemaining = new Gauge({
    name: 'ocicache_upstream_ratelimit_remaining',
    help: "The upstream's ratelimit-remaining header (Docker Hub: pulls left in the window).",
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });

  readonly prefetchBlobs = new Counter({
    name: 'ocicache_prefetch_blobs_total',
    help: 'Blobs handled by prefetch, by result (fetched, cached: already there, failed).',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });

  readonly prefetchBytes = new Counter({
    name: 'ocicache_prefetch_bytes_total',
    help: 'Blob bytes prefetch made sure are in the cache.',
    registers: [this.registry],
  });

  readonly httpDuration = new Histogram({
    name: 'ocicache_http_request_duration_seconds',
    help: 'Time to answer client requests, by API kind, method and status.',
    labelNames: ['kind', 'method', 'status'] as const,
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'ocicache_' });
    this.storageWritable.set(1);
  }
}
