/**
 * Manifest hits: what is answered from the index alone, with no upstream and no write. A tag is a
 * hit when its row was checked within the upstream's tagTtl; a digest when the manifest is cached
 * and this repository is known to hold it (manifest_repos). Manifests (manifests.ts) asks this
 * first; a worker process (http/worker.ts) asks only this and leaves the rest to the coordinator.
 */
import { LRUCache } from 'lru-cache';
import type { Target } from '../core/api-path.js';
import type { CacheResult } from '../core/cache-result.js';
import type { Clock } from '../core/clock.js';
import { isDigest } from '../core/digest.js';
import { accepts } from '../core/media-types.js';
import type { Db, ManifestRecord, TagRecord } from '../storage/db.js';

export interface ManifestResult {
  digest: string;
  mediaType: string;
  size: number;
  /** undefined for HEAD answers that never fetched the body */
  body: Buffer | undefined;
  cache: CacheResult;
}

export function manifestResult(manifest: ManifestRecord, cache: CacheResult, wantBody: boolean): ManifestResult {
  return { digest: manifest.digest, mediaType: manifest.mediaType, size: manifest.body.length, body: wantBody ? manifest.body : undefined, cache };
}

/** One tag of one repository of one upstream, as a map key. */
export function tagKey(target: Target, tag: string): string {
  return `${target.upstream.name}\n${target.name}\n${tag}`;
}

export class ManifestHits {
  /** Recently used tag rows. SQLite stays the truth; a tag whose manifest was evicted misses and revalidates. */
  private readonly tagMemory: LRUCache<string, TagRecord>;

  /**
   * @param rowTtl How long a tag row read from SQLite is trusted in memory (ms; undefined: until
   * this process changes it). A worker, whose index is written by another process, sets it short.
   */
  constructor(
    private readonly db: Db,
    private readonly now: Clock,
    rowTtl?: number,
  ) {
    this.tagMemory = new LRUCache<string, TagRecord>(rowTtl === undefined ? { max: 100_000 } : { max: 100_000, ttl: rowTtl });
  }

  /** A hit in a type the client accepts; undefined when the answer would need the upstream. */
  cached(target: Target, reference: string, accept: string | undefined, wantBody: boolean): ManifestResult | undefined {
    const hit = this.hit(target, reference);
    return hit && accepts(accept, hit.mediaType) ? manifestResult(hit, 'hit', wantBody) : undefined;
  }

  /** A manifest served without asking the upstream: a fresh tag, or a digest this repository is known to hold. */
  hit(target: Target, reference: string): ManifestRecord | undefined {
    return isDigest(reference) ? this.digestHit(target, reference) : this.freshTag(target, reference);
  }

  /** A tag's row, from memory when recently used: a warm tag lookup never touches SQLite. */
  tag(target: Target, tag: string): TagRecord | undefined {
    const key = tagKey(target, tag);
    let row = this.tagMemory.get(key);
    if (!row) {
      row = this.db.getTag(target.upstream.name, target.name, tag);
      if (row) this.tagMemory.set(key, row);
    }
    return row;
  }

  /** What this process just wrote for a tag (undefined: the row is gone). */
  remember(target: Target, tag: string, row: TagRecord | undefined): void {
    if (row) this.tagMemory.set(tagKey(target, tag), row);
    else this.tagMemory.delete(tagKey(target, tag));
  }

  /** The manifest of a digest cached and known to be in this repository on this upstream. */
  private digestHit(target: Target, digest: string): ManifestRecord | undefined {
    const cached = this.db.getManifest(digest);
    return cached && this.db.isSeenIn(target.upstream.name, target.name, digest) ? cached : undefined;
  }

  /** The manifest of a tag checked within the upstream's tagTtl. */
  private freshTag(target: Target, tag: string): ManifestRecord | undefined {
    const row = this.tag(target, tag);
    const manifest = row && this.db.getManifest(row.digest);
    return manifest && this.now() - row.checkedAt < target.upstream.tagTtl ? manifest : undefined;
  }
}
