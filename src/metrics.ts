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

  readonly httpDuration = new Histogram({
    name: 'ocicache_http_request_duration_seconds',
    help: 'Time to answer client requests, by API kind, method and status.',
    labelNames: ['kind', 'method', 'status'] as const,
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120],
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'ocicache_' });
  }
}
