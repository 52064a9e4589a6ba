/**
 * The keep list (config `keep`): images that are never evicted by size or age. At start-up (in
 * the background, not delaying readiness) and every keep.refresh, each entry is resolved (a tag
 * glob against the upstream's tag list) and fetched through the cache like `ocicache prefetch`,
 * only the configured platforms of a multi-platform image (and, with withReferrers, the referrers
 * of each manifest: signatures, SBOMs, attestations); the digests of every manifest and blob
 * involved are then recorded (storage/kept.ts), and eviction skips them and whatever would drop
 * them (Lifecycle). An entry that fails to refresh (upstream down) keeps what it held; a tag that
 * no longer matches a glob, or an entry removed from the config, is kept no more. Kept blobs count
 * against storage.maxSize like any other: a warning says when they alone exceed it.
 */
import type { UpstreamIndex } from '../core/api-path.js';
import type { Clock } from '../core/clock.js';
import { ConfigError } from '../core/config-error.js';
import type { KeepConfig } from '../core/keep-config.js';
import { parseImageReference } from '../core/image-reference.js';
import type { Logger } from '../core/logger.js';
import type { Db } from '../storage/db.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { Blobs } from './blobs.js';
import type { Manifests } from './manifests.js';
import { prefetch } from './prefetch.js';

export interface KeptEntry {
  /** The keep.images entry. */
  pattern: string;
  /** Its upstream and repository (for access rules: who may see it on the status page). */
  upstream: string;
  name: string;
  /** What it resolved to, each with the digests it holds; empty until the first refresh succeeds. */
  refs: Array<{ ref: string; digests: number }>;
  /** When it was last refreshed, and why that failed (what it held before is still kept). */
  refreshedAt: number | undefined;
  error: string | undefined;
}

const TAGS_PAGE = 1000;
/** Most tags a glob is matched against: an upstream paging without end must not hold the refresh, or memory. */
const MAX_TAGS = 100_000;

/** `name:tag*` → [`name`, `tag*`] when the tag is a glob; undefined otherwise. */
function globOf(pattern: string): [string, RegExp] | undefined {
  const colon = pattern.lastIndexOf(':');
  if (colon < 0 || colon < pattern.lastIndexOf('/') || pattern.includes('@')) return undefined;
  const tag = pattern.slice(colon + 1);
  if (!/[*?]/.test(tag)) return undefined;
  const re = new RegExp(`^${tag.replace(/[.]/g, '\\.').replace(/\*/g, '.*').replace(/\?/g, '.')}$`);
  return [pattern.slice(0, colon), re];
}

export class Keeper {
  private readonly state = new Map<string, { at: number; error: string | undefined }>();
  private readonly targets = new Map<string, { upstream: string; name: string }>();
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private closed = false;

  constructor(
    private readonly s: { manifests: Manifests; blobs: Blobs; upstreams: UpstreamIndex; metrics: Metrics; db: Db; log: Logger },
    private readonly config: KeepConfig | undefined,
    private readonly maxSize: number | undefined,
    private readonly now: Clock,
  ) {
    const images = config?.images ?? [];
    images.forEach((pattern, i) => {
      try {
        const { target } = parseImageReference(globOf(pattern)?.[0] ?? pattern, s.upstreams);
        this.targets.set(pattern, { upstream: target.upstream.name, name: target.name });
      } catch (err) {
        throw new ConfigError(`keep.images[${i}]`, (err as Error).message);
      }
    });
    // An entry taken out of the config is kept no more.
    s.db.kept.retainPatterns(new Set(images));
  }

  /** Refreshes now, in the background, and every keep.refresh. */
  start(): void {
    if (!this.config || this.closed) return;
    const run = (): void => {
      this.running ??= this.refresh()
        .catch((err: Error) => this.s.log.warn({ err: err.message }, 'keep: refresh failed'))
        .finally(() => (this.running = undefined));
    };
    setImmediate(run);
    this.timer = setInterval(run, this.config.refresh);
    this.timer.unref();
  }

  /** Resolves and fetches every entry; records what each holds. */
  async refresh(): Promise<void> {
    for (const pattern of this.config?.images ?? []) {
      if (this.closed) return;
      let error: string | undefined;
      try {
        const refs = await this.resolve(pattern);
        for (const ref of refs) {
          const failed = await this.fetch(pattern, ref);
          if (failed) error = `${ref}: ${failed}`;
        }
        this.s.db.kept.retain(pattern, new Set(refs));
      } catch (err) {
        error = (err as Error).message;
      }
      this.state.set(pattern, { at: this.now(), error });
      if (error) this.s.log.warn({ pattern, err: error }, 'keep: an entry was not refreshed; what it held is still kept');
    }
    const bytes = this.s.db.kept.bytes();
    this.s.metrics.keptBytes.set(bytes);
    if (this.maxSize !== undefined && bytes > this.maxSize) {
      this.s.log.warn({ keptBytes: bytes, maxSize: this.maxSize }, 'keep: the kept images alone exceed storage.maxSize; the cache stays above its limit');
    }
  }

  /** The refs an entry stands for now: itself, or the tags its glob matches. */
  private async resolve(pattern: string): Promise<string[]> {
    const glob = globOf(pattern);
    if (!glob) return [pattern];
    const [base, re] = glob;
    const { target } = parseImageReference(base, this.s.upstreams);
    const tags: string[] = [];
    let last: string | undefined;
    for (;;) {
      const page = await this.s.manifests.listTags(target, TAGS_PAGE, last);
      tags.push(...page.tags);
      if (!page.hasNext || page.tags.length === 0) break;
      const next = page.tags[page.tags.length - 1]!;
      // Pages come in tag order (distribution spec, "Listing Tags"): one that does not move on, or a list past the bound, ends here.
      if ((last !== undefined && next <= last) || tags.length >= MAX_TAGS) {
        throw new Error(`${base}: the upstream's tag list does not end within ${MAX_TAGS} tags`);
      }
      last = next;
    }
    return tags.filter((t) => re.test(t)).map((t) => `${base}:${t}`);
  }

  /** Fetches one ref and records its digests; the reason when something failed (then nothing changes, unless only a referrer failed). */
  private async fetch(pattern: string, ref: string): Promise<string | undefined> {
    const digests = new Set<string>();
    const held: string[] = [];
    let failure: string | undefined;
    let referrerFailure: string | undefined;
    try {
      await prefetch(
        this.s,
        [ref],
        {
          platforms: this.config?.platforms,
          withReferrers: this.config?.withReferrers,
          // Protected from eviction as soon as it lands, not only once the ref is recorded.
          before: (digest) => {
            held.push(digest);
            this.s.db.kept.hold(digest);
          },
        },
        (e) => {
          // A referrer that fails is reported; what the image and its other referrers hold is kept.
          if (e.event === 'error' || e.result === 'failed') {
            if (e.subject) referrerFailure ??= e.error ?? 'failed';
            else failure ??= e.error ?? 'failed';
          } else if ((e.event === 'manifest' || e.event === 'blob') && e.digest && e.result !== 'skipped') digests.add(e.digest);
        },
      );
      if (failure === undefined) this.s.db.kept.set(pattern, ref, digests);
    } finally {
      this.s.db.kept.release(held);
    }
    return failure ?? (referrerFailure && `a referrer: ${referrerFailure}`);
  }

  /** Every entry, what it holds and how its last refresh went (the status page, GET /admin/keep). */
  entries(): KeptEntry[] {
    const rows = this.s.db.kept.list();
    return (this.config?.images ?? []).map((pattern) => ({
      pattern,
      ...this.targets.get(pattern)!,
      refs: rows.filter((r) => r.pattern === pattern).map((r) => ({ ref: r.ref, digests: r.digests.length })),
      refreshedAt: this.state.get(pattern)?.at,
      error: this.state.get(pattern)?.error,
    }));
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    await this.running;
  }
}
