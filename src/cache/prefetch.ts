/**
 * Warming the cache: fetch named images (an index and all or some of its platforms, then every
 * config and layer) through the cache's own fill path, reporting progress as events. Used by
 * `ocicache prefetch`, POST /admin/prefetch and the keep list.
 *
 * With referrers, each manifest's signatures, SBOMs and attestations come along: the referrers
 * API (distribution-spec "Listing Referrers"), or, where the upstream has none (a 404), the
 * referrers tag schema: the `sha256-<hex>` index and cosign's `.sig`, `.att` and `.sbom` tags.
 * A referrer listed by the API or the tag schema's index is taken only when its own `subject`
 * names the manifest: the list is the upstream's word, the manifest's bytes are verified. At most
 * MAX_REFERRERS per manifest. A referrer that fails is reported (events carry its `subject`) and
 * does not fail the image: the keep list still keeps what it fetched. They are cached like any
 * manifest and linked to their subject (storage/referrers.ts).
 */
import type { UpstreamIndex } from '../core/api-path.js';
import { checkDigest, splitDigest } from '../core/digest.js';
import { OciError } from '../core/errors.js';
import { parseImageReference } from '../core/image-reference.js';
import { INDEX_TYPES, subjectOf } from '../core/media-types.js';
import type { Target } from '../core/api-path.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { Blobs } from './blobs.js';
import type { Manifests } from './manifests.js';

export interface PrefetchEvent {
  event: 'manifest' | 'blob' | 'error' | 'done';
  ref: string;
  /** For a referrer's manifest: the manifest it refers to. */
  subject?: string;
  digest?: string;
  mediaType?: string;
  platform?: string;
  size?: number;
  result?: 'fetched' | 'cached' | 'failed' | 'skipped';
  error?: string;
  summary?: PrefetchSummary;
}

export interface PrefetchSummary {
  refs: number;
  failedRefs: number;
  blobs: number;
  fetched: number;
  bytes: number;
}

interface Descriptor {
  mediaType?: string;
  digest?: string;
  size?: number;
  urls?: unknown;
  platform?: { os?: string; architecture?: string; variant?: string };
}

export interface PrefetchOptions {
  /** Only these platforms of a multi-platform image (`linux/amd64`, `linux/arm64/v8`). */
  platforms?: string[] | undefined;
  /** Also every manifest's referrers, and theirs, REFERRER_DEPTH deep. */
  withReferrers?: boolean | undefined;
  signal?: AbortSignal | undefined;
  /** Called with each blob's digest before it is fetched (the keep list protects it from there on). */
  before?: ((digest: string) => void) | undefined;
}

type Services = { manifests: Manifests; blobs: Blobs; upstreams: UpstreamIndex; metrics: Metrics };

/** Referrers of referrers (a signature of an SBOM) are followed this deep. */
const REFERRER_DEPTH = 2;
/** Referrers taken per manifest: an upstream's list must not make one image fetch without end. */
const MAX_REFERRERS = 64;
/** cosign's tags beside the referrers tag schema's own `sha256-<hex>`. */
const TAG_SUFFIXES = ['', '.sig', '.att', '.sbom'];

/** Blobs fetched at once per image: enough to overlap round trips, few enough to be polite upstream. */
const BLOB_CONCURRENCY = 4;

function platformOf(d: Descriptor): string {
  const p = d.platform;
  return p ? [p.os, p.architecture, p.variant].filter(Boolean).join('/') : '';
}

/** `linux/arm64` matches linux/arm64 of any variant; `linux/arm64/v8` only that variant. */
function wanted(d: Descriptor, platforms: string[] | undefined): boolean {
  if (!platforms || platforms.length === 0) return true;
  const have = platformOf(d);
  return platforms.some((p) => have === p || have.startsWith(`${p}/`));
}

async function parallel<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) await fn(items[next++]!);
  }));
}

export async function prefetch(s: Services, refs: string[], options: PrefetchOptions, emit: (e: PrefetchEvent) => void): Promise<PrefetchSummary> {
  const summary: PrefetchSummary = { refs: refs.length, failedRefs: 0, blobs: 0, fetched: 0, bytes: 0 };
  for (const ref of refs) {
    const one = new OneImage(s, ref, options, emit, summary);
    try {
      await one.run();
    } catch (err) {
      one.failed = true;
      emit({ event: 'error', ref, error: (err as Error).message });
    }
    if (one.failed) summary.failedRefs++;
  }
  emit({ event: 'done', ref: '', summary });
  return summary;
}

/** One reference: its manifests, their blobs and, on request, their referrers. */
class OneImage {
  failed = false;
  private readonly seen = new Set<string>();

  constructor(
    private readonly s: Services,
    private readonly ref: string,
    private readonly options: PrefetchOptions,
    private readonly emit: (e: PrefetchEvent) => void,
    private readonly summary: PrefetchSummary,
  ) {}

  async run(): Promise<void> {
    const { signal, platforms } = this.options;
    signal?.throwIfAborted();
    const { target, reference } = parseImageReference(this.ref, this.s.upstreams);
    const top = await this.manifest(target, reference, {});
    const manifests = [top.digest];
    if (INDEX_TYPES.has(top.mediaType)) {
      const children = childrenOf(top.body!).filter((d) => wanted(d, platforms));
      if (children.length === 0) throw new OciError('MANIFEST_UNKNOWN', `no manifest in ${this.ref} for platform ${platforms?.join(', ')}`);
      for (const child of children) {
        signal?.throwIfAborted();
        // Digests come from upstream content: validate before they name anything.
        const m = await this.manifest(target, checkDigest(child.digest!), { platform: platformOf(child) });
        manifests.push(m.digest);
        if (!INDEX_TYPES.has(m.mediaType)) await this.blobs(target, m.body!, platformOf(child));
      }
    } else {
      await this.blobs(target, top.body!, '');
    }
    if (this.options.withReferrers) for (const digest of manifests) await this.referrers(target, digest, 1);
  }

  private async manifest(target: Target, reference: string, extra: Partial<PrefetchEvent>): Promise<{ digest: string; mediaType: string; body: Buffer | undefined }> {
    const m = await this.s.manifests.get(target, reference, undefined, true);
    this.seen.add(m.digest);
    this.emit({ event: 'manifest', ref: this.ref, digest: m.digest, mediaType: m.mediaType, size: m.size, result: m.cache === 'hit' ? 'cached' : 'fetched', ...extra });
    return m;
  }

  /** The config and layers of one image manifest (of a referrer of `subject`). */
  private async blobs(target: Target, body: Buffer, platform: string, subject?: string): Promise<void> {
    const json = JSON.parse(body.toString('utf8')) as { config?: Descriptor; layers?: Descriptor[] };
    const blobs = [json.config, ...(json.layers ?? [])].filter((d): d is Descriptor => typeof d?.digest === 'string');
    const { s, ref, summary, emit } = this;
    await parallel(blobs, BLOB_CONCURRENCY, async (d) => {
      summary.blobs++;
      // Foreign (non-distributable) layers live elsewhere by design; registries do not serve them.
      if (Array.isArray(d.urls) || /nondistributable|foreign/.test(d.mediaType ?? '')) {
        emit({ event: 'blob', ref, digest: d.digest, platform, subject, size: d.size, result: 'skipped' });
        return;
      }
      try {
        this.options.signal?.throwIfAborted();
        this.options.before?.(checkDigest(d.digest!));
        const b = await s.blobs.ensure(target, checkDigest(d.digest!));
        summary.bytes += b.size;
        if (b.result === 'fetched') summary.fetched++;
        s.metrics.prefetchBlobs.inc({ result: b.result });
        s.metrics.prefetchBytes.inc(b.size);
        emit({ event: 'blob', ref, digest: d.digest, platform, subject, size: b.size, result: b.result });
      } catch (err) {
        this.failed = true;
        s.metrics.prefetchBlobs.inc({ result: 'failed' });
        emit({ event: 'blob', ref, digest: d.digest, platform, subject, size: d.size, result: 'failed', error: (err as Error).message });
      }
    });
  }

  /** The referrers of `subject`, their blobs, and their own referrers up to REFERRER_DEPTH. A failure is reported, and the next one tried. */
  private async referrers(target: Target, subject: string, depth: number): Promise<void> {
    let found: Array<{ reference: string; listed: boolean }>;
    try {
      found = await this.referrersOf(target, subject);
    } catch (err) {
      this.referrerFailed(subject, undefined, err);
      return;
    }
    for (const { reference, listed } of found) {
      this.options.signal?.throwIfAborted();
      try {
        const taken = await this.referrer(target, subject, reference, listed);
        if (depth < REFERRER_DEPTH) for (const d of taken) await this.referrers(target, d, depth + 1);
      } catch (err) {
        if (this.options.signal?.aborted) throw err;
        this.referrerFailed(subject, listed ? reference : undefined, err);
      }
    }
  }

  /**
   * One referrer of `subject` (a digest the API listed, or a tag of the schema) with its blobs, or
   * for the schema's index, each referrer it lists. The manifests taken; none when a tag is not there.
   */
  private async referrer(target: Target, subject: string, reference: string, listed: boolean): Promise<string[]> {
    let m;
    try {
      m = await this.s.manifests.get(target, reference, undefined, true);
    } catch (err) {
      // A tag of the schema that is not there is the common case, not a failure.
      if (!listed && err instanceof OciError && err.status === 404) return [];
      throw err;
    }
    if (this.seen.has(m.digest)) return [];
    if (listed && subjectOf(m.body!) !== subject) throw new OciError('MANIFEST_INVALID', `upstream ${target.upstream.name} listed ${m.digest} as a referrer of ${subject}, but its subject is not that manifest`);
    this.seen.add(m.digest);
    this.emit({ event: 'manifest', ref: this.ref, digest: m.digest, mediaType: m.mediaType, size: m.size, subject, result: m.cache === 'hit' ? 'cached' : 'fetched' });
    if (!INDEX_TYPES.has(m.mediaType)) {
      await this.blobs(target, m.body!, '', subject);
      return [m.digest];
    }
    // The tag schema's index lists the referrers themselves, each checked like the API's.
    const taken = [m.digest];
    for (const child of childrenOf(m.body!).slice(0, MAX_REFERRERS)) {
      try {
        taken.push(...(await this.referrer(target, subject, checkDigest(child.digest!), true)));
      } catch (err) {
        if (this.options.signal?.aborted) throw err;
        this.referrerFailed(subject, child.digest, err);
      }
    }
    return taken;
  }

  private referrerFailed(subject: string, digest: string | undefined, err: unknown): void {
    this.failed = true;
    this.emit({ event: 'error', ref: this.ref, digest, subject, error: (err as Error).message });
  }

  /** What refers to `subject`: the referrers API's list, or the tag schema's tags where the upstream has no API. */
  private async referrersOf(target: Target, subject: string): Promise<Array<{ reference: string; listed: boolean }>> {
    try {
      const r = await this.s.manifests.getReferrers(target, subject, undefined, this.options.signal);
      return childrenOf(r.body).slice(0, MAX_REFERRERS).map((d) => ({ reference: checkDigest(d.digest!), listed: true }));
    } catch (err) {
      if (!(err instanceof OciError && err.status === 404)) throw err;
      const { algorithm, hex } = splitDigest(subject);
      return TAG_SUFFIXES.map((suffix) => ({ reference: `${algorithm}-${hex}${suffix}`, listed: false }));
    }
  }
}

/** The descriptors of an index's `manifests` that name a digest. */
function childrenOf(body: Buffer): Descriptor[] {
  const manifests = (JSON.parse(body.toString('utf8')) as { manifests?: unknown }).manifests;
  return (Array.isArray(manifests) ? (manifests as Descriptor[]) : []).filter((d) => typeof d?.digest === 'string');
}
