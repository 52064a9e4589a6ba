/**
 * Manifest, tag and referrer decisions: what to serve from the index, when to ask the upstream
 * (HEAD to revalidate a tag past its TTL, GET for new content), and what to do when it fails
 * (serve stale). Routes and prefetch call this; this calls the upstream client and the db.
 */
import type { Target } from '../core/api-path.js';
import type { CacheResult } from '../core/cache-result.js';
import type { Clock } from '../core/clock.js';
import { isDigest, splitDigest, digestOf } from '../core/digest.js';
import { OciError, isUpstreamUnavailable } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { accepts, childrenOf, mediaTypeOf } from '../core/media-types.js';
import { SingleFlight } from '../core/single-flight.js';
import type { Db, ManifestRecord } from '../storage/db.js';
import type { UpstreamClient } from '../upstream/client.js';
import { ManifestHits, manifestResult, tagKey, type ManifestResult } from './manifest-hits.js';
import type { StorageGuard } from './storage-guard.js';

export type { ManifestResult } from './manifest-hits.js';

export interface TagList {
  tags: string[];
  hasNext: boolean;
  cache: CacheResult;
}

type TagResult = { manifest: ManifestRecord; cache: CacheResult };

export class Manifests {
  private readonly tagFlights = new SingleFlight<TagResult>();
  private readonly lastWarned = new Map<string, number>();
  /** Hits: what the index answers alone (the warm path). */
  readonly hits: ManifestHits;

  constructor(
    private readonly db: Db,
    /** Every index write goes through it: a full disk serves manifests uncached instead of failing. */
    private readonly guard: StorageGuard,
    private readonly upstream: UpstreamClient,
    private readonly log: Logger,
    private readonly now: Clock,
  ) {
    this.hits = new ManifestHits(db, now);
  }

  /** During an outage every request would warn: one line per upstream and message every 30 s (the metrics count them all). */
  private warnOnce(upstream: string, obj: object, msg: string): void {
    const key = `${upstream}\n${msg}`;
    const now = this.now();
    if ((this.lastWarned.get(key) ?? 0) > now - 30_000) return;
    this.lastWarned.set(key, now);
    this.log.warn(obj, msg);
  }

  /**
   * A manifest by tag or digest, negotiated against the client's Accept. A hit that needs no
   * upstream (a fresh tag, or a digest this repository is known to hold) is answered without a
   * promise: it is the warm path of every pull (http/warm-path.ts).
   */
  get(target: Target, reference: string, accept: string | undefined, wantBody: boolean): ManifestResult | Promise<ManifestResult> {
    const hit = this.hits.hit(target, reference);
    if (!hit) return this.fetchOrRevalidate(target, reference, isDigest(reference), accept, wantBody);
    return this.negotiate({ manifest: hit, cache: 'hit' }, target, reference, accept, wantBody);
  }

  /** Everything but a hit: the upstream is asked (HEAD for a known digest or a stale tag, GET for new content). */
  private async fetchOrRevalidate(target: Target, reference: string, byDigest: boolean, accept: string | undefined, wantBody: boolean): Promise<ManifestResult> {
    const found = byDigest ? await this.manifestByDigest(target, reference) : await this.manifestByTag(target, reference);
    return this.negotiate(found, target, reference, accept, wantBody);
  }

  /** Never hands a client a type it did not ask for: the upstream then negotiates with its Accept. */
  private negotiate({ manifest, cache }: TagResult, target: Target, reference: string, accept: string | undefined, wantBody: boolean): ManifestResult | Promise<ManifestResult> {
    if (!accepts(accept, manifest.mediaType)) return this.passthrough(target, reference, accept, wantBody);
    return manifestResult(manifest, cache, wantBody);
  }

  private async manifestByDigest(target: Target, digest: string): Promise<TagResult> {
    const { upstream, name } = target;
    const cached = this.db.getManifest(digest);
    // Cached for another repository of this upstream: the digest proves the bytes, not that this
    // repository holds them, and the upstream is the authority on its repositories: ask it (HEAD
    // is free on Docker Hub). Cached only from other upstreams: their bytes prove nothing here and
    // this upstream's HEAD is no proof of possession (a hostile one answers 200 to anything), so
    // it is fetched from this upstream and verified like an uncached one.
    if (cached && this.db.fromUpstream('manifest', upstream.name, digest)) {
      await this.upstream.headManifest(target, digest);
      this.guard.write('manifest repository', () => this.db.markSeenIn(upstream.name, name, digest));
      return { manifest: cached, cache: 'revalidated' };
    }
    return this.fetchManifest(target, digest, digest, 'miss');
  }

  /**
   * GETs a manifest, verifies its bytes against `expected` (or the upstream's digest header), and
   * stores it; `cache` says how it was found. When the index cannot be written (storage full) the
   * verified manifest is still served, as `passthrough`.
   */
  private async fetchManifest(target: Target, reference: string, expected: string | undefined, cache: CacheResult, tag?: string, accept?: string): Promise<TagResult> {
    const res = await this.upstream.getManifest(target, reference, accept);
    const claimed = expected ?? (res.digest && isDigest(res.digest) ? res.digest : undefined);
    const digest = digestOf(res.body, claimed === undefined ? 'sha256' : splitDigest(claimed).algorithm);
    if (claimed !== undefined && digest !== claimed) {
      throw new OciError('UNKNOWN', `upstream ${target.upstream.name} sent manifest bytes hashing to ${digest} for ${claimed}`, { status: 502 });
    }
    const manifest = { digest, mediaType: mediaTypeOf(res.body, res.contentType), body: res.body };
    const now = this.now();
    if (!this.guard.write('manifest', () => this.db.putManifest(manifest, childrenOf(res.body), target.upstream.name, target.name, tag, now))) {
      return { manifest, cache: 'passthrough' };
    }
    if (tag !== undefined) this.hits.remember(target, tag, { digest, checkedAt: now });
    return { manifest, cache };
  }

  /** Points a tag at a digest, checked now; without storage the tag simply stays due for revalidation. */
  private putTag(target: Target, tag: string, digest: string): void {
    const now = this.now();
    if (!this.guard.write('tag', () => this.db.putTag(target.upstream.name, target.name, tag, digest, now))) return;
    this.hits.remember(target, tag, { digest, checkedAt: now });
  }

  private async manifestByTag(target: Target, tag: string): Promise<TagResult> {
    const { upstream } = target;
    const row = this.hits.tag(target, tag);
    const manifest = row && this.db.getManifest(row.digest);
    // Offline by choice: the cached tag is the answer, with no warning per request.
    if (manifest && this.upstream.gate(upstream.name).offline) return { manifest, cache: 'stale' };
    return this.tagFlights.do(tagKey(target, tag), () => this.revalidateTag(target, tag));
  }

  /** HEAD the tag upstream; GET only when the digest is new. Serve stale when the upstream is down. */
  private async revalidateTag(target: Target, tag: string): Promise<TagResult> {
    const { upstream, name } = target;
    const row = this.hits.tag(target, tag);
    try {
      const head = await this.upstream.headManifest(target, tag);
      const digest = head.digest && isDigest(head.digest) ? head.digest : undefined;
      // The upstream's HEAD vouches for bytes only one of its own repositories served (see manifestByDigest).
      const known = digest && this.db.fromUpstream('manifest', target.upstream.name, digest) && this.db.getManifest(digest);
      if (digest && known) {
        this.putTag(target, tag, digest);
        return { manifest: known, cache: row?.digest === digest ? 'revalidated' : 'miss' };
      }
      // By digest when the HEAD named one (Docker Hub counts either GET as a pull; this one is verifiable).
      return await this.fetchManifest(target, digest ?? tag, digest, 'miss', tag);
    } catch (err) {
      const stale = row && isUpstreamUnavailable(err) ? this.db.getManifest(row.digest) : undefined;
      if (stale) {
        this.warnOnce(upstream.name, { upstream: upstream.name, name, reference: tag, digest: stale.digest, err: (err as Error).message }, 'upstream unavailable, serving stale tag');
        return { manifest: stale, cache: 'stale' };
      }
      if (row && err instanceof OciError && err.status === 404) {
        this.hits.remember(target, tag, undefined);
        this.guard.write('tag', () => this.db.deleteTag(upstream.name, name, tag));
      }
      throw err;
    }
  }

  private async passthrough(target: Target, reference: string, accept: string | undefined, wantBody: boolean): Promise<ManifestResult> {
    if (!wantBody) {
      const head = await this.upstream.headManifest(target, reference, accept);
      if (head.digest && isDigest(head.digest) && head.size !== undefined && head.contentType) {
        return { digest: head.digest, mediaType: mediaTypeOf(Buffer.alloc(0), head.contentType), size: head.size, body: undefined, cache: 'passthrough' };
      }
    }
    const { manifest } = await this.fetchManifest(target, reference, isDigest(reference) ? reference : undefined, 'passthrough', undefined, accept);
    return manifestResult(manifest, 'passthrough', wantBody);
  }

  /**
   * The upstream's tag list; from the tags this cache knows when the upstream is unreachable.
   * `signal`: the client left. A tag list is asked for one client alone, so it ends with it.
   */
  async listTags(target: Target, n: number | undefined, last: string | undefined, signal?: AbortSignal): Promise<TagList> {
    const query = new URLSearchParams();
    if (n !== undefined) query.set('n', String(n));
    if (last !== undefined) query.set('last', last);
    try {
      const res = await this.upstream.listTags(target, query, signal);
      let tags: unknown;
      try {
        tags = (JSON.parse(res.body.toString('utf8')) as { tags?: unknown }).tags ?? [];
      } catch {
        throw new OciError('UNKNOWN', `upstream ${target.upstream.name} sent an invalid tag list`, { status: 502 });
      }
      if (!Array.isArray(tags) || !tags.every((t) => typeof t === 'string')) {
        throw new OciError('UNKNOWN', `upstream ${target.upstream.name} sent an invalid tag list`, { status: 502 });
      }
      if (res.hasNext) return { tags: [...(tags as string[])].sort(), hasNext: true, cache: 'passthrough' };
      // A last or only page; or an upstream that ignores n and last (distribution 2.8 does, and does not sort).
      return { ...paginate(tags as string[], n, last), cache: 'passthrough' };
    } catch (err) {
      if (!isUpstreamUnavailable(err)) throw err;
      const known = this.db.listTags(target.upstream.name, target.name);
      if (known.length === 0) throw err;
      this.warnOnce(target.upstream.name, { upstream: target.upstream.name, name: target.name, err: (err as Error).message }, 'upstream unavailable, listing cached tags');
      return { ...paginate(known, n, last), cache: 'stale' };
    }
  }

  /**
   * Asked of the upstream, for one client alone (`signal`: the client left, ends it). The answer
   * is remembered per (upstream, repository, subject, filter), and served `stale` when the
   * upstream cannot be asked (down, offline), so signatures can be checked offline.
   */
  async getReferrers(
    target: Target,
    digest: string,
    artifactType: string | undefined,
    signal?: AbortSignal,
  ): Promise<{ body: Buffer; contentType: string; filtersApplied: string | undefined; cache: 'passthrough' | 'stale' }> {
    const query = new URLSearchParams();
    if (artifactType !== undefined) query.set('artifactType', artifactType);
    let res: Awaited<ReturnType<UpstreamClient['getReferrers']>>;
    try {
      res = await this.upstream.getReferrers(target, digest, query, signal);
    } catch (err) {
      const known = isUpstreamUnavailable(err) ? this.db.referrers.get(target.upstream.name, target.name, digest, artifactType ?? '') : undefined;
      if (!known) throw err;
      this.warnOnce(target.upstream.name, { upstream: target.upstream.name, name: target.name, err: (err as Error).message }, 'upstream unavailable, serving remembered referrers');
      return { ...known, cache: 'stale' };
    }
    // Passed through as sent, but only an image index: a client must not parse garbage as one.
    let index: unknown;
    try {
      index = JSON.parse(res.body.toString('utf8'));
    } catch {
      index = undefined;
    }
    if (typeof index !== 'object' || index === null || !Array.isArray((index as { manifests?: unknown }).manifests)) {
      throw new OciError('UNKNOWN', `upstream ${target.upstream.name} sent an invalid referrers index`, { status: 502 });
    }
    const answer = { body: res.body, contentType: res.contentType ?? 'application/vnd.oci.image.index.v1+json', filtersApplied: res.filtersApplied };
    this.guard.write('referrers', () => this.db.referrers.put(target.upstream.name, target.name, digest, artifactType ?? '', answer, this.now()));
    return { ...answer, cache: 'passthrough' };
  }
}

/** One page of a tag list: lexically sorted, after `last`, at most `n` (spec: "Listing Tags"). */
function paginate(all: string[], n: number | undefined, last: string | undefined): { tags: string[]; hasNext: boolean } {
  const after = [...all].sort().filter((t) => last === undefined || t > last);
  const tags = n === undefined ? after : after.slice(0, n);
  return { tags, hasNext: tags.length < after.length };
}
