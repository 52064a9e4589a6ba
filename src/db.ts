/**
 * The SQLite index (better-sqlite3, WAL). Invariants:
 * - `manifests` holds exact upstream bytes keyed by their verified digest; rows are immutable.
 * - `manifest_repos` records under which (upstream, name) a manifest digest was seen upstream, so a
 *   cached digest is never served for a repository the upstream did not confirm.
 * - `tags` maps (upstream, name, tag) to a digest present in `manifests`; every key starts with the
 *   upstream, so one upstream's tags are never served for another (dependency confusion).
 * - `refs` lists what each manifest points to (config, layers, children), for eviction.
 * - `blobs` mirrors the files in the blob store: a row is written only after the file is in place.
 * Schema changes bump `user_version` and add a step to MIGRATIONS.
 */
import Database from 'better-sqlite3';

export interface ManifestRecord {
  digest: string;
  mediaType: string;
  body: Buffer;
}

export interface TagRecord {
  digest: string;
  checkedAt: number;
}

const MIGRATIONS = [
  `CREATE TABLE manifests (
     digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, body BLOB NOT NULL,
     size INTEGER NOT NULL, created_at INTEGER NOT NULL);
   CREATE TABLE manifest_repos (
     upstream TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL,
     PRIMARY KEY (upstream, name, digest)) WITHOUT ROWID;
   CREATE INDEX manifest_repos_digest ON manifest_repos (digest);
   CREATE TABLE tags (
     upstream TEXT NOT NULL, name TEXT NOT NULL, tag TEXT NOT NULL,
     digest TEXT NOT NULL, checked_at INTEGER NOT NULL,
     PRIMARY KEY (upstream, name, tag)) WITHOUT ROWID;
   CREATE INDEX tags_digest ON tags (digest);
   CREATE TABLE refs (parent TEXT NOT NULL, child TEXT NOT NULL, PRIMARY KEY (parent, child)) WITHOUT ROWID;
   CREATE INDEX refs_child ON refs (child);
   CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, created_at INTEGER NOT NULL, last_access INTEGER NOT NULL);`,
];

export class Db {
  private readonly db: Database.Database;
  private readonly stmt;

  constructor(file: string) {
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    // NORMAL in WAL mode survives a process crash (kill -9); only power loss may drop the last commits.
    this.db.pragma('synchronous = NORMAL');
    this.db.pragma('busy_timeout = 5000');
    this.migrate();
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
      putBlob: db.prepare(
        `INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?)
         ON CONFLICT (digest) DO UPDATE SET last_access = excluded.last_access`,
      ),
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

  getManifest(digest: string): ManifestRecord | undefined {
    const row = this.stmt.getManifest.get(digest);
    return row && { digest: row.digest, mediaType: row.media_type, body: row.body };
  }

  /** Stores a verified manifest, its refs, that (upstream, name) holds it, and optionally a tag, atomically. */
  putManifest(m: ManifestRecord, children: string[], upstream: string, name: string, tag?: string, now = Date.now()): void {
    this.db.transaction(() => {
      this.stmt.putManifest.run(m.digest, m.mediaType, m.body, m.body.length, now);
      for (const c of children) this.stmt.putRef.run(m.digest, c);
      this.stmt.putSeen.run(upstream, name, m.digest);
      if (tag !== undefined) this.stmt.putTag.run(upstream, name, tag, m.digest, now);
    })();
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
  putTag(upstream: string, name: string, tag: string, digest: string, now = Date.now()): void {
    this.db.transaction(() => {
      this.stmt.putTag.run(upstream, name, tag, digest, now);
      this.stmt.putSeen.run(upstream, name, digest);
    })();
  }

  deleteTag(upstream: string, name: string, tag: string): void {
    this.stmt.deleteTag.run(upstream, name, tag);
  }

  listTags(upstream: string, name: string): string[] {
    return this.stmt.listTags.all(upstream, name).map((r) => r.tag);
  }

  putBlob(digest: string, size: number, now = Date.now()): void {
    this.stmt.putBlob.run(digest, size, now, now);
  }

  ping(): boolean {
    return this.db.prepare('SELECT 1 AS one').get() !== undefined;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
