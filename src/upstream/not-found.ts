/**
 * "The upstream said 404 recently": an upstream's 404 for a manifest or a blob, remembered for
 * cache.notFoundTtl per (upstream, repository, what was asked, reference). A client looping on a
 * missing tag then costs one upstream request per TTL, not one per try, so it cannot spend what
 * every client shares: the upstream's rate limits, its pull quota (a manifest GET counts on Docker
 * Hub) and this cache's own limits per upstream (docs/upstreams.md, "Missing references"). A
 * successful answer for the same key forgets it at once. Time comes from the injected clock, so
 * tests move it instead of sleeping.
 */
import { LRUCache } from 'lru-cache';
import type { Target } from '../core/api-path.js';
import type { Clock } from '../core/clock.js';
import { OciError } from '../core/errors.js';
import type { Metrics } from '../telemetry/metrics.js';

/** Keys remembered at once; the least recently used go first, so memory stays bounded whatever clients ask for. */
const MAX_REMEMBERED = 10_000;

export class NotFoundMemory {
  private readonly entries = new LRUCache<string, { error: OciError; until: number }>({ max: MAX_REMEMBERED });

  constructor(
    /** 0: nothing is remembered. */
    private readonly ttl: number,
    private readonly now: Clock,
    private readonly metrics: Metrics,
  ) {}

  /**
   * The key of one question: `what` is `blob`, or `manifest` with the Accept it was asked with (a
   * narrower Accept may be a 404 where the full one is not: docs/upstreams.md, "Accept").
   */
  key(target: Target, what: string, reference: string): string {
    return `${target.upstream.name}\n${target.name}\n${what}\n${reference}`;
  }

  /** Throws the upstream's remembered 404 for `key` while it is recent, counted as refused (reason not_found_cached). */
  check(upstream: string, key: string): void {
    const entry = this.entries.get(key);
    if (entry === undefined) return;
    if (this.now() >= entry.until) {
      this.entries.delete(key);
      return;
    }
    this.metrics.upstreamRefused.inc({ upstream, reason: 'not_found_cached' });
    const { code, message, status, detail, headers } = entry.error;
    throw new OciError(code, message, { status, detail, headers });
  }

  remember(key: string, error: OciError): void {
    if (this.ttl > 0) this.entries.set(key, { error, until: this.now() + this.ttl });
  }

  forget(key: string): void {
    this.entries.delete(key);
  }
}
