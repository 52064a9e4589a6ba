/**
 * Warming the cache: fetch named images (an index and all or some of its platforms, then every
 * config and layer) through the cache's own fill path, reporting progress as events. Used by
 * `ocicache prefetch` and POST /admin/prefetch.
 */
import type { UpstreamIndex } from '../core/api-path.js';
import { checkDigest } from '../core/digest.js';
import { OciError } from '../core/errors.js';
import { parseImageReference } from '../core/image-reference.js';
import { INDEX_TYPES } from '../core/media-types.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { Blobs } from './blobs.js';
import type { Manifests } from './manifests.js';

export interface PrefetchEvent {
  event: 'manifest' | 'blob' | 'error' | 'done';
  ref: string;
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

export async function prefetch(
  s: { manifests: Manifests; blobs: Blobs; upstreams: UpstreamIndex; metrics: Metrics },
  refs: string[],
  platforms: string[] | undefined,
  emit: (e: PrefetchEvent) => void,
  signal?: AbortSignal,
  /** Called with each blob's digest before it is fetched (the keep list protects it from there on). */
  before?: (digest: string) => void,
): Promise<PrefetchSummary> {
  const summary: PrefetchSummary = { refs: refs.length, failedRefs: 0, blobs: 0, fetched: 0, bytes: 0 };
  for (const ref of refs) {
    let failed = false;
    try {
      signal?.throwIfAborted();
      const { target, reference } = parseImageReference(ref, s.upstreams);
      const top = await s.manifests.get(target, reference, undefined, true);
      emit({ event: 'manifest', ref, digest: top.digest, mediaType: top.mediaType, size: top.size, result: top.cache === 'hit' ? 'cached' : 'fetched' });
      let images: Array<{ digest: string; body: Buffer; platform: string }> = [{ digest: top.digest, body: top.body!, platform: '' }];
      if (INDEX_TYPES.has(top.mediaType)) {
        const children = ((JSON.parse(top.body!.toString('utf8')) as { manifests?: Descriptor[] }).manifests ?? []).filter((d) => typeof d.digest === 'string' && wanted(d, platforms));
        if (children.length === 0) throw new OciError('MANIFEST_UNKNOWN', `no manifest in ${ref} for platform ${platforms?.join(', ')}`);
        images = [];
        for (const child of children) {
          signal?.throwIfAborted();
          // Digests come from upstream content: validate before they name anything.
          const m = await s.manifests.get(target, checkDigest(child.digest!), undefined, true);
          emit({ event: 'manifest', ref, digest: m.digest, mediaType: m.mediaType, platform: platformOf(child), size: m.size, result: m.cache === 'hit' ? 'cached' : 'fetched' });
          if (!INDEX_TYPES.has(m.mediaType)) images.push({ digest: m.digest, body: m.body!, platform: platformOf(child) });
        }
      }
      for (const img of images) {
        const json = JSON.parse(img.body.toString('utf8')) as { config?: Descriptor; layers?: Descriptor[] };
        const blobs = [json.config, ...(json.layers ?? [])].filter((d): d is Descriptor => typeof d?.digest === 'string');
        await parallel(blobs, BLOB_CONCURRENCY, async (d) => {
          summary.blobs++;
          // Foreign (non-distributable) layers live elsewhere by design; registries do not serve them.
          if (Array.isArray(d.urls) || /nondistributable|foreign/.test(d.mediaType ?? '')) {
            emit({ event: 'blob', ref, digest: d.digest, platform: img.platform, size: d.size, result: 'skipped' });
            return;
          }
          try {
            signal?.throwIfAborted();
            before?.(checkDigest(d.digest!));
            const b = await s.blobs.ensure(target, checkDigest(d.digest!));
            summary.bytes += b.size;
            if (b.result === 'fetched') summary.fetched++;
            s.metrics.prefetchBlobs.inc({ result: b.result });
            s.metrics.prefetchBytes.inc(b.size);
            emit({ event: 'blob', ref, digest: d.digest, platform: img.platform, size: b.size, result: b.result });
          } catch (err) {
            failed = true;
            s.metrics.prefetchBlobs.inc({ result: 'failed' });
            emit({ event: 'blob', ref, digest: d.digest, platform: img.platform, size: d.size, result: 'failed', error: (err as Error).message });
          }
        });
      }
    } catch (err) {
      failed = true;
      emit({ event: 'error', ref, error: (err as Error).message });
    }
    if (failed) summary.failedRefs++;
  }
  emit({ event: 'done', ref: '', summary });
  return summary;
}
