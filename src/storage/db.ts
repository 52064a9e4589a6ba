/**
 * The SQLite index (better-sqlite3, WAL). Invariants:
 * - `manifests` holds exact upstream bytes keyed by their verified digest; rows are immutable.
 * - `manifest_repos` records under which (upstream, name) a manifest digest was seen upstream, so a
 *   cached digest is never served for a repository the upstream did not confirm.
 * - `tags` maps (upstream, name, tag) to a digest present in `manifests`; every key starts with the
 *   upstream, so one upstream's tags are never served for another (dependency confusion).
 * - `refs` lists what each manifest points to (config, layers, children), for eviction.
 * - `blobs` mirrors the files in the blob store: a row is written only after the file is in place,
 *   and removed before the file is deleted. `last_access` drives eviction (least recent first).
 * - `blob_access` records when each upstream last used a blob, for per-upstream expiry (maxAge).
 * - `blob_repos` records under which (upstream, name) a blob was fetched or confirmed upstream. A
 *   cached blob is served for a repository only when this table says the repository holds it. A
 *   manifest pointing to a digest is no proof: its `subject`, or a layer a registry did not check
 *   at push, can name any digest.
 * - `subjects` links a referrer to its subject in one repository, by its `subject` field or by a
 *   referrers-tag-schema tag (storage/subjects.ts); eviction keeps a referrer's blobs as recent as
 *   its subject's. Only the subject field makes a `refs` edge (the bytes say it; a tag does not).
 * - Dropping a blob drops, in the same transaction, every manifest that points to it (directly or
 *   through an index) and the tags of those: no cached manifest ever points to an evicted blob.
 * Schema changes bump `user_version` and add a step to MIGRATIONS (storage/schema.ts).
 *
 * Recently read manifests are also kept in memory, in front of SQLite: the warm path of every pull
 * reads them. What drops a manifest row drops it there too, in the same call, so memory never
 * serves a manifest the index no longer has.
 */
import Database from 'better-sqlite3';
import { LRUCache } from 'lru-cache';
import { subjectOfTag } from '../core/digest.js';
import { blobBytesOf, isMediaType, mediaTypeOf, subjectOf } from '../core/media-types.js';
import { KeptIndex } from './kept.js';
import { ReferrersIndex } from './referrers.js';
import { MIGRATIONS } from './schema.js';
import { SubjectLinks } from './subjects.js';

export interface ManifestRecord {
  digest: string;
  mediaType: string;
  body: Buffer;
}

export interface TagRecord {
  digest: string;
  checkedAt: number;
}


export interface BlobAccess {
  digest: string;
  size: number;
  upstream: string;
  at: number;
}

export interface BlobRow {
  digest: string;
  size: number;
  /** When it was last used (ms). */
  lastAccess: number;
}

export interface Dropped {
  /** manifests removed because they pointed to the blob, directly or through an index */
  manifests: string[];
  tags: number;
}

export interface DbOptions {
  /** Bytes of manifests kept in memory in front of SQLite; 0: none. */
  manifestMemory?: number;
  /** A worker beside the index's owner (http/cluster.ts), which migrated it: SQLite refuses writes. */
  reader?: boolean;
}

export class Db {
  private readonly db: Database.Database;
  private readonly stmt;
  private readonly memory: LRUCache<string, ManifestRecord> | undefined;
  /** The manifests and blobs of kept images (cache/keep.ts), protected from eviction and expiry. */
  readonly kept: KeptIndex;
  /** The last referrers list per subject, for when the upstream cannot be asked; dropped with the subject. */
  readonly referrers: ReferrersIndex;
  /** Referrer manifests linked to their subject, kept as long as it (storage/subjects.ts). */
  readonly subjects: SubjectLinks;

  constructor(file: string, options: DbOptions = {}) {
    const bytes = options.manifestMemory ?? 0;
    this.memory = bytes > 0 ? new LRUCache({ maxSize: bytes, sizeCalculation: (m) => m.body.length + 200 }) : undefined;
    this.db = new Database(file, { fileMustExist: options.reader === true });
    this.db.pragma('busy_timeout = 5000');
    if (options.reader) {
      this.db.pragma('query_only = ON');
    } else {
      this.db.pragma('journal_mode = WAL');
      // NORMAL in WAL mode survives a process crash (kill -9); only power loss may drop the last commits.
      this.db.pragma('synchronous = NORMAL');
      this.migrate();
    }
    this.kept = new KeptIndex(this.db);
    this.referrers = new ReferrersIndex(this.db);
    this.subjects = new SubjectLinks(this.db);
    const db = this.db;
    this.stmt = {
      getManifest: db.prepare<[string], { digest: string; media_type: string; body: Buffer }>(
        'SELECT digest, media_type, body FROM manifests WHERE digest = ?',
      ),
      putManifest: db.prepare('INSERT OR IGNORE INTO manifests (digest, media_type, body, size, created_at) VALUES (?, ?, ?, ?, ?)'),
      putRef: db.prepare('INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)'),
      seenIn: db.prepare<[string, string, string], { one: number }>(
        'SELECT 1 AS one FROM manifest_repos WHERE upstream = ? AND name = ? AND digest = ?',
      ),
      putSeen: db.prepare('INSERT OR IGNORE INTO manifest_repos (upstream, name, digest) VALUES (?, ?, ?)'),
      getTag: db.prepare<[string, string, string], { digest: string; checked_at: number }>(
        'SELECT digest, checked_at FROM tags WHERE upstream = ? AND name = ? AND tag = ?',
      ),
      putTag: db.prepare(
        `INSERT INTO tags (upstream, name, tag, digest, checked_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (upstream, name, tag) DO UPDATE SET digest = excluded.digest, checked_at = excluded.checked_at`,
      ),
      deleteTag: db.prepare('DELETE FROM tags WHERE upstream = ? AND name = ? AND tag = ?'),
      listTags: db.prepare<[string, string], { tag: string }>('SELECT tag FROM tags WHERE upstream = ? AND name = ? ORDER BY tag'),
      // Rows are inserted only for a file just renamed into place (or verified by verify).
      putBlob: db.prepare(
        `INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?)
         ON CONFLICT (digest) DO UPDATE SET last_access = max(last_access, excluded.last_access)`,
      ),
      // Access times only ever update: a use recorded just as the blob was evicted must not
      // bring back a row for a deleted file.
      touchBlob: db.prepare('UPDATE blobs SET last_access = max(last_access, ?) WHERE digest = ?'),
      touchAccess: db.prepare(
        `INSERT INTO blob_access (digest, upstream, last_access) SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM blobs WHERE digest = ?)
         ON CONFLICT (digest, upstream) DO UPDATE SET last_access = max(last_access, excluded.last_access)`,
      ),
      blobSize: db.prepare<[string], { size: number }>('SELECT size FROM blobs WHERE digest = ?'),
      originOf: db.prepare<[string], { upstream: string; name: string }>('SELECT upstream, name FROM blob_repos WHERE digest = ? LIMIT 1'),
      usedBytes: db.prepare<[], { total: number | null; count: number }>('SELECT sum(size) AS total, count(*) AS count FROM blobs'),
      oldestBlobs: db.prepare<[number], BlobRow>('SELECT digest, size, last_access AS lastAccess FROM blobs ORDER BY last_access LIMIT ?'),
      allBlobs: db.prepare<[], BlobRow>('SELECT digest, size, last_access AS lastAccess FROM blobs'),
      // A blob expires when no upstream that used it still wants it: each access row is older than
      // that upstream's cut-off (no cut-off: kept). Blobs without access rows use the fallback.
      expiredBlobs: db.prepare<[string, number], BlobRow>(
        `WITH policy(upstream, cutoff) AS (SELECT key, value FROM json_each(?))
         SELECT b.digest, b.size, b.last_access AS lastAccess FROM blobs b
         WHERE NOT EXISTS (
                 SELECT 1 FROM blob_access a LEFT JOIN policy p ON p.upstream = a.upstream
                 WHERE a.digest = b.digest AND (p.cutoff IS NULL OR a.last_access >= p.cutoff))
           AND (EXISTS (SELECT 1 FROM blob_access a WHERE a.digest = b.digest) OR b.last_access < ?)
         ORDER BY b.last_access`,
      ),
      dependents: db.prepare<[string], { digest: string }>(
        `WITH RECURSIVE doomed(digest) AS (
           SELECT parent FROM refs WHERE child = ?
           UNION SELECT r.parent FROM refs r JOIN doomed d ON r.child = d.digest)
         SELECT digest FROM doomed`,
      ),
      deleteBlob: db.prepare('DELETE FROM blobs WHERE digest = ?'),
      deleteAccess: db.prepare('DELETE FROM blob_access WHERE digest = ?'),
      deleteBlobRepos: db.prepare('DELETE FROM blob_repos WHERE digest = ?'),
      putBlobRepo: db.prepare('INSERT OR IGNORE INTO blob_repos (upstream, name, digest) VALUES (?, ?, ?)'),
      blobHeldBy: db.prepare<[string, string, string], { one: number }>('SELECT 1 AS one FROM blob_repos WHERE upstream = ? AND name = ? AND digest = ?'),
      blobFromUpstream: db.prepare<[string, string], { one: number }>('SELECT 1 AS one FROM blob_repos WHERE upstream = ? AND digest = ? LIMIT 1'),
      manifestFromUpstream: db.prepare<[string, string], { one: number }>('SELECT 1 AS one FROM manifest_repos WHERE upstream = ? AND digest = ? LIMIT 1'),
      deleteManifest: db.prepare('DELETE FROM manifests WHERE digest = ?'),
      deleteManifestRepos: db.prepare('DELETE FROM manifest_repos WHERE digest = ?'),
      deleteRefs: db.prepare('DELETE FROM refs WHERE parent = ?'),
      deleteTagsOf: db.prepare('DELETE FROM tags WHERE digest = ?'),
      allManifests: db.prepare<[], { digest: string; body: Buffer }>('SELECT digest, body FROM manifests'),
    };
  }

  private migrate(): void {
    const version = this.db.pragma('user_version', { simple: true }) as number;
    for (let v = version; v < MIGRATIONS.length; v++) {
      this.db.transaction(() => {
        this.db.exec(MIGRATIONS[v]!);
        this.db.pragma(`user_version = ${v + 1}`);
      })();
    }
  }

  /** A manifest by digest, from memory when recently read. */
  getManifest(digest: string): ManifestRecord | undefined {
    let m = this.memory?.get(digest);
    if (m) return m;
    const row = this.stmt.getManifest.get(digest);
    if (!row) return undefined;
    // A row stored before media types were checked must never put a malformed one in a header.
    m = { digest: row.digest, mediaType: isMediaType(row.media_type) ? row.media_type : mediaTypeOf(row.body, undefined), body: row.body };
    this.memory?.set(digest, m);
    return m;
  }

  /** Stores a verified manifest, its refs, that (upstream, name) holds it, and optionally a tag, atomically. */
  putManifest(m: ManifestRecord, children: string[], upstream: string, name: string, tag: string | undefined, now: number): void {
    this.db.transaction(() => {
      this.stmt.putManifest.run(m.digest, m.mediaType, m.body, m.body.length, now);
      for (const c of children) this.stmt.putRef.run(m.digest, c);
      this.stmt.putSeen.run(upstream, name, m.digest);
      const subject = subjectOf(m.body);
      if (subject !== undefined) this.subjects.link(upstream, name, subject, m.digest, '', blobBytesOf(m.body));
      if (tag !== undefined) this.tagged(upstream, name, tag, m.digest, now);
    })();
  }

  /** A tag row, and the referrer link a tag of the referrers tag schema makes (replacing what it said before). */
  private tagged(upstream: string, name: string, tag: string, digest: string, now: number): void {
    this.stmt.putTag.run(upstream, name, tag, digest, now);
    const subject = subjectOfTag(tag);
    if (subject === undefined) return;
    this.subjects.dropTag(upstream, name, tag);
    const body = this.getManifest(digest)?.body;
    this.subjects.link(upstream, name, subject, digest, tag, body ? blobBytesOf(body) : Number.MAX_SAFE_INTEGER);
  }

  isSeenIn(upstream: string, name: string, digest: string): boolean {
    return this.stmt.seenIn.get(upstream, name, digest) !== undefined;
  }

  markSeenIn(upstream: string, name: string, digest: string): void {
    this.stmt.putSeen.run(upstream, name, digest);
  }

  getTag(upstream: string, name: string, tag: string): TagRecord | undefined {
    const row = this.stmt.getTag.get(upstream, name, tag);
    return row && { digest: row.digest, checkedAt: row.checked_at };
  }

  /** Points a tag at a digest already in `manifests` and marks it checked now. */
  putTag(upstream: string, name: string, tag: string, digest: string, now: number): void {
    this.db.transaction(() => {
      this.tagged(upstream, name, tag, digest, now);
      this.stmt.putSeen.run(upstream, name, digest);
    })();
  }

  deleteTag(upstream: string, name: string, tag: string): void {
    this.db.transaction(() => {
      this.stmt.deleteTag.run(upstream, name, tag);
      this.subjects.dropTag(upstream, name, tag);
    })();
  }

  listTags(upstream: string, name: string): string[] {
    return this.stmt.listTags.all(upstream, name).map((r) => r.tag);
  }

  /** Records blob uses, many in one transaction: the hot path never writes SQLite itself. Unknown digests are ignored. */
  touchBlobs(entries: Iterable<BlobAccess>): void {
    this.db.transaction(() => {
      for (const e of entries) {
        this.stmt.touchBlob.run(e.at, e.digest);
        this.stmt.touchAccess.run(e.digest, e.upstream, e.at, e.digest);
      }
    })();
  }

  /** Indexes a blob file that was just renamed into place, and from which upstream repository it came. */
  putBlob(digest: string, size: number, upstream: string, name: string, at: number): void {
    this.db.transaction(() => {
      this.stmt.putBlob.run(digest, size, at, at);
      this.stmt.touchAccess.run(digest, upstream, at, digest);
      this.stmt.putBlobRepo.run(upstream, name, digest);
    })();
  }

  /** Whether (upstream, name) is known to hold a blob: it was fetched or confirmed there. */
  blobHeldBy(upstream: string, name: string, digest: string): boolean {
    return this.stmt.blobHeldBy.get(upstream, name, digest) !== undefined;
  }

  /** Whether any repository of `upstream` served these bytes: its HEAD may then vouch for another of its repositories. */
  fromUpstream(kind: 'blob' | 'manifest', upstream: string, digest: string): boolean {
    return (kind === 'blob' ? this.stmt.blobFromUpstream : this.stmt.manifestFromUpstream).get(upstream, digest) !== undefined;
  }

  /** The upstream confirmed that (upstream, name) holds a blob. */
  markBlobIn(upstream: string, name: string, digest: string): void {
    this.stmt.putBlobRepo.run(upstream, name, digest);
  }

  /** Indexes a verified file found without a row (ocicache verify). */
  adoptBlob(digest: string, size: number, at: number): void {
    this.stmt.putBlob.run(digest, size, at, at);
  }

  hasBlob(digest: string): boolean {
    return this.stmt.blobSize.get(digest) !== undefined;
  }

  /** The size of an indexed blob; undefined when the index has none. */
  blobSize(digest: string): number | undefined {
    return this.stmt.blobSize.get(digest)?.size;
  }

  /** An upstream repository a blob was fetched from or confirmed in, if any. */
  originOf(digest: string): { upstream: string; name: string } | undefined {
    return this.stmt.originOf.get(digest);
  }

  usage(): { bytes: number; count: number } {
    const row = this.stmt.usedBytes.get()!;
    return { bytes: row.total ?? 0, count: row.count };
  }

  /** The least recently used blobs first. */
  oldestBlobs(limit: number): BlobRow[] {
    return this.stmt.oldestBlobs.all(limit);
  }

  allBlobs(): BlobRow[] {
    return this.stmt.allBlobs.all();
  }

  /** Blobs past their upstreams' maxAge; `cutoffs` maps upstream name to the oldest access time it keeps. */
  expiredBlobs(cutoffs: Record<string, number>, fallbackCutoff: number): BlobRow[] {
    return this.stmt.expiredBlobs.all(JSON.stringify(cutoffs), fallbackCutoff);
  }

  /** Removes a blob's row and every manifest (and its tags) that depends on it, atomically, from SQLite and memory. */
  dropBlob(digest: string): Dropped {
    const dropped = this.db.transaction((): Dropped => {
      this.stmt.deleteBlob.run(digest);
      this.stmt.deleteAccess.run(digest);
      this.stmt.deleteBlobRepos.run(digest);
      return this.dropDependents(digest);
    })();
    this.forget(dropped.manifests);
    return dropped;
  }

  /** Whether dropping `digest` would drop something kept: itself, or a kept manifest pointing to it (directly or through an index). */
  protectsKept(digest: string): boolean {
    if (this.kept.size === 0) return false;
    return this.kept.has(digest) || this.stmt.dependents.all(digest).some((r) => this.kept.has(r.digest));
  }

  /** Removes a manifest and everything that points to it (indexes, their tags), from SQLite and memory. */
  dropManifest(digest: string): Dropped {
    const dropped = this.db.transaction((): Dropped => {
      const d = this.dropDependents(digest);
      let tags = d.tags;
      this.stmt.deleteManifestRepos.run(digest);
      this.stmt.deleteRefs.run(digest);
      tags += this.stmt.deleteTagsOf.run(digest).changes;
      this.stmt.deleteManifest.run(digest);
      this.referrers.forget(digest);
      this.subjects.forget(digest);
      return { manifests: [digest, ...d.manifests], tags };
    })();
    this.forget(dropped.manifests);
    return dropped;
  }

  private forget(manifests: string[]): void {
    if (this.memory) for (const d of manifests) this.memory.delete(d);
  }

  private dropDependents(digest: string): Dropped {
    const manifests = this.stmt.dependents.all(digest).map((r) => r.digest);
    let tags = 0;
    for (const m of manifests) {
      tags += this.stmt.deleteTagsOf.run(m).changes;
      this.stmt.deleteManifestRepos.run(m);
      this.stmt.deleteRefs.run(m);
      this.stmt.deleteManifest.run(m);
      this.referrers.forget(m);
      this.subjects.forget(m);
    }
    return { manifests, tags };
  }

  /** Every manifest, for verification; iterates so a big index is never loaded whole. */
  *manifests(): Generator<{ digest: string; body: Buffer }> {
    yield* this.stmt.allManifests.iterate();
  }

  /** Removes rows that point at nothing (tags without a manifest, repos and refs of missing manifests). */
  pruneDangling(): number {
    return this.db.transaction(() => {
      let n = this.db.prepare('DELETE FROM tags WHERE digest NOT IN (SELECT digest FROM manifests)').run().changes;
      n += this.db.prepare('DELETE FROM manifest_repos WHERE digest NOT IN (SELECT digest FROM manifests)').run().changes;
      n += this.db.prepare('DELETE FROM refs WHERE parent NOT IN (SELECT digest FROM manifests)').run().changes;
      n += this.db.prepare('DELETE FROM subjects WHERE referrer NOT IN (SELECT digest FROM manifests)').run().changes;
      n += this.db.prepare('DELETE FROM blob_access WHERE digest NOT IN (SELECT digest FROM blobs)').run().changes;
      n += this.db.prepare('DELETE FROM blob_repos WHERE digest NOT IN (SELECT digest FROM blobs)').run().changes;
      return n;
    })();
  }

  ping(): boolean {
    return this.db.prepare('SELECT 1 AS one').get() !== undefined;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
