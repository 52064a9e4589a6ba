/**
 * What stands between the cache and one upstream: offline mode, a circuit breaker, the upstream's
 * own Retry-After (for one repository, or for the whole upstream), and limits on concurrent
 * requests and request rate. Every request to the upstream takes a permit here first; a refusal
 * is an OciError cache/manifests.ts treats as "upstream unavailable", so cached tags are still
 * served. A cache must absorb a fleet's pulls, not
 * multiply them, and must go quiet after a 429 (docs/upstreams.md, "Thundering herds" and "Rate
 * limits: 429, Retry-After and `ratelimit-*`").
 */
import { LRUCache } from 'lru-cache';
import type { Clock } from '../core/clock.js';
import type { UpstreamConfig } from '../core/config.js';
import { OciError } from '../core/errors.js';
import type { Metrics } from '../telemetry/metrics.js';
import { header, type Headers } from './responses.js';

export type BreakerState = 'closed' | 'open' | 'half-open';
const STATE_VALUE: Record<BreakerState, number> = { closed: 0, open: 1, 'half-open': 2 };

/** Without a usable Retry-After, a 429 keeps the upstream quiet this long (at most maxRetryAfter). */
export const DEFAULT_RETRY_AFTER_MS = 30_000;

/** Repositories with a pending Retry-After remembered at once; the least recently limited go first. */
const MAX_LIMITED_REPOSITORIES = 10_000;

interface Waiter {
  resolve: () => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

export interface Permit {
  /**
   * Report how the request went, once: 'ok' for any HTTP answer below 500, 'failed' for transport
   * errors (also while reading a body) and 5xx, 'cancelled' when it ended for a reason that says
   * nothing about the upstream (the client left, the deadline passed before it was sent): the
   * breaker neither counts it nor waits for it, and a half-open breaker lets the next request probe.
   */
  done(outcome: 'ok' | 'failed' | 'cancelled'): void;
  /** Frees the concurrency slot (when the response body is finished). Idempotent. */
  release(): void;
}

export class Gate {
  state: BreakerState = 'closed';
  private failures = 0;
  private openUntil = 0;
  private probing = false;
  /** Retry-After of a 429 that holds for the whole upstream. */
  private blockedUntil = 0;
  /** Retry-After of 429s that held for one repository, by repository name. */
  private readonly repositoryBlockedUntil = new LRUCache<string, number>({ max: MAX_LIMITED_REPOSITORIES });
  private active = 0;
  private readonly queue: Waiter[] = [];
  /** GCRA: the theoretical arrival time of the next request. */
  private tat = 0;

  constructor(
    readonly upstream: UpstreamConfig,
    private readonly globalOffline: boolean,
    private readonly queueTimeout: number,
    private readonly metrics: Metrics,
    private readonly now: Clock,
  ) {
    metrics.breakerState.set({ upstream: upstream.name }, 0);
    metrics.upstreamOffline.set({ upstream: upstream.name }, this.offline ? 1 : 0);
  }

  get offline(): boolean {
    return this.globalOffline || this.upstream.offline;
  }

  /** Seconds until an upstream-wide 429's Retry-After passes; 0 when not blocked (the status page's "rate limited"). */
  get retryAfterSeconds(): number {
    return this.secondsUntil(this.blockedUntil);
  }

  /** Seconds until requests for `repository` may go out again: the longer of the upstream's and the repository's wait. */
  retryAfterFor(repository: string): number {
    return Math.max(this.retryAfterSeconds, this.secondsUntil(this.repositoryBlockedUntil.get(repository) ?? 0));
  }

  private secondsUntil(until: number): number {
    return Math.max(0, Math.ceil((until - this.now()) / 1000));
  }

  private refuse(reason: string, err: OciError): never {
    this.metrics.upstreamRefused.inc({ upstream: this.upstream.name, reason });
    throw err;
  }

  /** A permit for one request, for `repository` when it is about one (Retry-After may hold for it alone). */
  async acquire(repository?: string): Promise<Permit> {
    const name = this.upstream.name;
    if (this.offline) this.refuse('offline', new OciError('UNAVAILABLE', `upstream ${name} is offline: serving from the cache only`));
    const wait = this.retryAfterSeconds;
    if (wait > 0) {
      this.refuse('retry_after', new OciError('TOOMANYREQUESTS', `upstream ${name} asked to wait ${wait}s (Retry-After)`, { headers: { 'retry-after': String(wait) } }));
    }
    const repositoryWait = repository === undefined ? 0 : this.retryAfterFor(repository);
    if (repositoryWait > 0) {
      const headers = { 'retry-after': String(repositoryWait) };
      this.refuse('retry_after', new OciError('TOOMANYREQUESTS', `upstream ${name} asked to wait ${repositoryWait}s for ${repository} (Retry-After)`, { headers }));
    }
    let probe = false;
    if (this.state === 'open') {
      if (this.now() < this.openUntil) {
        const seconds = Math.ceil((this.openUntil - this.now()) / 1000);
        this.refuse('breaker', new OciError('UNAVAILABLE', `upstream ${name} is failing: circuit open, next try in ${seconds}s`, { headers: { 'retry-after': String(seconds) } }));
      }
      this.setState('half-open');
    }
    if (this.state === 'half-open') {
      if (this.probing) this.refuse('breaker', new OciError('UNAVAILABLE', `upstream ${name} is failing: circuit half-open, a probe is under way`));
      this.probing = true;
      probe = true;
    }
    try {
      await this.slot();
      await this.pace();
    } catch (err) {
      if (probe) this.probing = false;
      throw err;
    }
    let released = false;
    let reported = false;
    return {
      done: (outcome) => {
        if (reported) return;
        reported = true;
        if (probe) this.probing = false;
        if (outcome === 'ok') this.succeeded();
        else if (outcome === 'failed') this.failed();
      },
      release: () => {
        if (released) return;
        released = true;
        this.active--;
        this.queue.shift()?.resolve();
      },
    };
  }

  /**
   * What an answer says about rate limits. 429: honour Retry-After, for the repository asked about
   * unless the answer says the whole upstream is limited: Docker Hub's account-wide pull limit
   * reports `ratelimit-remaining: 0` (docs/upstreams.md, "Rate limits"). Docker Hub's ratelimit-*
   * headers ("100;w=21600") go to gauges.
   */
  observe(status: number, headers: Headers, repository: string): void {
    const limit = /^\s*(\d+)/.exec(header(headers, 'ratelimit-limit') ?? '');
    const remaining = /^\s*(\d+)/.exec(header(headers, 'ratelimit-remaining') ?? '');
    if (status === 429) this.rateLimited(header(headers, 'retry-after'), remaining && Number(remaining[1]) === 0 ? undefined : repository);
    if (limit) this.metrics.ratelimitLimit.set({ upstream: this.upstream.name }, Number(limit[1]));
    if (remaining) this.metrics.ratelimitRemaining.set({ upstream: this.upstream.name }, Number(remaining[1]));
  }

  /**
   * A 429: no calls for `repository`, or to the whole upstream without one, until Retry-After
   * (seconds or an HTTP date) has passed. Bounded by maxRetryAfter: one answer, hostile or broken,
   * must not switch off a repository or an upstream for long (docs/upstreams.md, "Rate limits").
   * Returns the seconds requests now wait (0 when maxRetryAfter is 0).
   */
  rateLimited(retryAfter: string | undefined, repository?: string): number {
    let ms = DEFAULT_RETRY_AFTER_MS;
    if (retryAfter !== undefined) {
      if (/^\d+$/.test(retryAfter.trim())) ms = Number(retryAfter.trim()) * 1000;
      else if (!Number.isNaN(Date.parse(retryAfter))) ms = Date.parse(retryAfter) - this.now();
    }
    const until = this.now() + Math.min(Math.max(ms, 0), this.upstream.maxRetryAfter);
    this.metrics.rateLimited.inc({ upstream: this.upstream.name });
    if (repository === undefined) {
      this.blockedUntil = Math.max(this.blockedUntil, until);
      return this.retryAfterSeconds;
    }
    this.repositoryBlockedUntil.set(repository, Math.max(this.repositoryBlockedUntil.get(repository) ?? 0, until));
    return this.retryAfterFor(repository);
  }

  private succeeded(): void {
    this.failures = 0;
    if (this.state !== 'closed') this.setState('closed');
  }

  private failed(): void {
    this.failures++;
    const threshold = this.upstream.breakerFailures;
    if (this.state === 'half-open' || (threshold > 0 && this.failures >= threshold && this.state === 'closed')) {
      this.openUntil = this.now() + this.upstream.breakerCooldown;
      this.setState('open');
    }
  }

  private setState(state: BreakerState): void {
    this.state = state;
    this.metrics.breakerState.set({ upstream: this.upstream.name }, STATE_VALUE[state]);
  }

  /** Waits for one of maxConcurrent slots, at most queueTimeout. */
  private slot(): Promise<void> {
    if (this.active < this.upstream.maxConcurrent) {
      this.active++;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = {
        resolve: () => {
          clearTimeout(waiter.timer);
          this.active++;
          resolve();
        },
        reject,
        timer: setTimeout(() => {
          this.queue.splice(this.queue.indexOf(waiter), 1);
          this.metrics.upstreamRefused.inc({ upstream: this.upstream.name, reason: 'queue_timeout' });
          reject(new OciError('UNAVAILABLE', `upstream ${this.upstream.name}: ${this.upstream.maxConcurrent} requests in flight, waited too long for a slot`));
        }, this.queueTimeout),
      };
      this.queue.push(waiter);
    });
  }

  /** maxRequestsPerSecond with a burst of one second's worth (GCRA). */
  private async pace(): Promise<void> {
    const rps = this.upstream.maxRequestsPerSecond;
    if (rps <= 0) return;
    const interval = 1000 / rps;
    const burst = Math.max(0, 1000 - interval);
    const now = this.now();
    this.tat = Math.max(this.tat, now);
    const wait = this.tat - burst - now;
    this.tat += interval;
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
}
