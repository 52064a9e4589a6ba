/**
 * What the `keep` list holds in the cache (cache/keep.ts decides it): rows of (pattern, ref,
 * digest) for every manifest and blob of a kept image, in SQLite so they are protected from the
 * first eviction pass after a restart on, before the list is refreshed. Kept digests are also in
 * memory: eviction asks about every candidate.
 */
import type Database from 'better-sqlite3';

export class KeptIndex {
  private readonly digests = new Map<string, number>();
  /** Blobs a refresh is fetching: protected from the moment they land, before their rows are written. */
  private readonly held = new Set<string>();
  private readonly stmt;

  constructor(private readonly db: Database.Database) {
    this.stmt = {
      all: db.prepare<[], { pattern: string; ref: string; digest: string }>('SELECT pattern, ref, digest FROM kept'),
      deleteRef: db.prepare('DELETE FROM kept WHERE pattern = ? AND ref = ?'),
      put: db.prepare('INSERT OR IGNORE INTO kept (pattern, ref, digest) VALUES (?, ?, ?)'),
      refsOf: db.prepare<[string], { ref: string }>('SELECT DISTINCT ref FROM kept WHERE pattern = ?'),
      patterns: db.prepare<[], { pattern: string }>('SELECT DISTINCT pattern FROM kept'),
      deletePattern: db.prepare('DELETE FROM kept WHERE pattern = ?'),
      bytes: db.prepare<[], { total: number | null }>('SELECT sum(size) AS total FROM blobs WHERE digest IN (SELECT digest FROM kept)'),
    };
    this.reload();
  }

  private reload(): void {
    this.digests.clear();
    for (const r of this.stmt.all.all()) this.digests.set(r.digest, (this.digests.get(r.digest) ?? 0) + 1);
  }

  has(digest: string): boolean {
    return this.digests.has(digest) || this.held.has(digest);
  }

  /** Protects `digest` until release(): a blob being fetched for the keep list, not yet recorded. */
  hold(digest: string): void {
    this.held.add(digest);
  }

  release(digests: Iterable<string>): void {
    for (const d of digests) this.held.delete(d);
  }

  get size(): number {
    return this.digests.size + this.held.size;
  }

  /** Bytes of the kept blobs on disk. */
  bytes(): number {
    return this.stmt.bytes.get()?.total ?? 0;
  }

  /** Every kept ref with its digests, by pattern. */
  list(): Array<{ pattern: string; ref: string; digests: string[] }> {
    const byRef = new Map<string, { pattern: string; ref: string; digests: string[] }>();
    for (const r of this.stmt.all.all()) {
      const key = `${r.pattern}\n${r.ref}`;
      let e = byRef.get(key);
      if (!e) byRef.set(key, (e = { pattern: r.pattern, ref: r.ref, digests: [] }));
      e.digests.push(r.digest);
    }
    return [...byRef.values()];
  }

  /** `ref` (matched by `pattern`) now holds exactly `digests`. */
  set(pattern: string, ref: string, digests: Iterable<string>): void {
    this.db.transaction(() => {
      this.stmt.deleteRef.run(pattern, ref);
      for (const d of digests) this.stmt.put.run(pattern, ref, d);
    })();
    this.reload();
  }

  /** Drops the refs of `pattern` not in `refs` (tags that no longer match), or every pattern not in `patterns`. */
  retain(pattern: string, refs: ReadonlySet<string>): void {
    this.db.transaction(() => {
      for (const { ref } of this.stmt.refsOf.all(pattern)) if (!refs.has(ref)) this.stmt.deleteRef.run(pattern, ref);
    })();
    this.reload();
  }

  retainPatterns(patterns: ReadonlySet<string>): void {
    this.db.transaction(() => {
      for (const { pattern } of this.stmt.patterns.all()) if (!patterns.has(pattern)) this.stmt.deletePattern.run(pattern);
    })();
    this.reload();
  }
}
