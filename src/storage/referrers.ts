/**
 * The last referrers index each upstream gave for a subject (and artifactType filter), so that
 * signatures, SBOMs and attestations can still be listed when the upstream is down or the cache
 * is offline (cache/manifests.ts getReferrers). The rows go with their subject: dropping the
 * subject's manifest drops them (Db.dropManifest, and eviction through it). What clients ask for
 * cannot grow the table without bound: a list is remembered only for a subject whose manifest is
 * cached, and for at most MAX_FILTERS artifactType filters per subject.
 *
 * Referrer manifests themselves are ordinary manifests, linked to their subject (`subjects`, and a
 * `refs` edge from referrer to subject): by their `subject` field, or by a tag of the referrers tag
 * schema (`sha256-<hex>`, cosign's `sha256-<hex>.sig`). The `refs` edge makes them go with the
 * subject: whatever drops the subject drops its referrers (Db.dropManifest, dropBlob). And they
 * stay as long as the subject does: a referrer's blob counts as used whenever its subject's blobs
 * were last used (ageWithSubject, asked by eviction and expiry), so a signature read once is not
 * evicted from under the image it signs. A link counts only when the subject was seen in the
 * referrer's own repository: another repository's referrer says nothing of this one.
 */
import type Database from 'better-sqlite3';

export interface ReferrersRecord {
  body: Buffer;
  contentType: string;
  filtersApplied: string | undefined;
}

const MAX_FILTERS = 16;

export class ReferrersIndex {
  private readonly stmt;

  constructor(db: Database.Database) {
    this.stmt = {
      link: db.prepare('INSERT OR IGNORE INTO subjects (referrer, subject, upstream, name) VALUES (?, ?, ?, ?)'),
      linkRef: db.prepare('INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)'),
      unlink: db.prepare('DELETE FROM subjects WHERE referrer = @d OR subject = @d'),
      // The latest use of a blob of any cached subject of a referrer that points to the blob @d
      // (directly or through an index), not counting subjects that depend on @d (they go with it).
      subjectAccess: db.prepare<{ d: string }, { at: number | null; own: number | null }>(
        `WITH RECURSIVE
           up(d) AS (SELECT parent FROM refs WHERE child = @d UNION SELECT r.parent FROM refs r JOIN up ON r.child = up.d),
           subject(d) AS (
             SELECT s.subject FROM subjects s JOIN up ON s.referrer = up.d
             WHERE s.subject NOT IN (SELECT d FROM up)
               AND EXISTS (SELECT 1 FROM manifest_repos m WHERE m.upstream = s.upstream AND m.name = s.name AND m.digest = s.subject)),
           down(d) AS (SELECT d FROM subject UNION SELECT r.child FROM refs r JOIN down ON r.parent = down.d)
         SELECT (SELECT max(b.last_access) FROM blobs b JOIN down ON b.digest = down.d) AS at,
                (SELECT last_access FROM blobs WHERE digest = @d) AS own`,
      ),
      touchBlob: db.prepare('UPDATE blobs SET last_access = max(last_access, @at) WHERE digest = @d'),
      touchAccess: db.prepare('UPDATE blob_access SET last_access = max(last_access, @at) WHERE digest = @d'),
      any: db.prepare<[], { one: number }>('SELECT 1 AS one FROM subjects LIMIT 1'),
      get: db.prepare<[string, string, string, string], { body: Buffer; content_type: string; filters: string | null }>(
        'SELECT body, content_type, filters FROM referrers WHERE upstream = ? AND name = ? AND subject = ? AND artifact_type = ?',
      ),
      put: db.prepare(
        `INSERT INTO referrers (upstream, name, subject, artifact_type, body, content_type, filters, checked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (upstream, name, subject, artifact_type) DO UPDATE SET body = excluded.body, content_type = excluded.content_type, filters = excluded.filters, checked_at = excluded.checked_at`,
      ),
      forget: db.prepare('DELETE FROM referrers WHERE subject = ?'),
      room: db.prepare<[string, string, string, string, string, string, number], { ok: number }>(
        `SELECT EXISTS (SELECT 1 FROM manifests WHERE digest = ?)
            AND (EXISTS (SELECT 1 FROM referrers WHERE upstream = ? AND name = ? AND subject = ? AND artifact_type = ?)
                 OR (SELECT count(*) FROM referrers WHERE subject = ?) < ?) AS ok`,
      ),
    };
  }

  /** `artifactType` '' for the unfiltered list. */
  get(upstream: string, name: string, subject: string, artifactType: string): ReferrersRecord | undefined {
    const row = this.stmt.get.get(upstream, name, subject, artifactType);
    return row && { body: row.body, contentType: row.content_type, filtersApplied: row.filters ?? undefined };
  }

  /** Remembers `r`, unless the subject is not cached or has MAX_FILTERS other filters remembered already. */
  put(upstream: string, name: string, subject: string, artifactType: string, r: ReferrersRecord, now: number): void {
    if (!this.stmt.room.get(subject, upstream, name, subject, artifactType, subject, MAX_FILTERS)?.ok) return;
    this.stmt.put.run(upstream, name, subject, artifactType, r.body, r.contentType, r.filtersApplied ?? null, now);
  }

  /** `referrer`, seen in (upstream, name), refers to `subject`: it goes with it and stays as long as it. Inside Db's transactions. */
  link(upstream: string, name: string, referrer: string, subject: string): void {
    if (referrer === subject) return;
    this.stmt.link.run(referrer, subject, upstream, name);
    this.stmt.linkRef.run(referrer, subject);
  }

  /** Whether any referrer is linked: eviction asks ageWithSubject only then. */
  any(): boolean {
    return this.stmt.any.get() !== undefined;
  }

  /**
   * A blob of a referrer is as recent as its subject: when a blob of the subject was used after
   * `blob` was, `blob`'s access times move up to that use and true is returned (not evictable in
   * this pass; a later pass finds it in its new place in the line).
   */
  ageWithSubject(blob: string): boolean {
    const row = this.stmt.subjectAccess.get({ d: blob });
    if (!row || row.at === null || row.own === null || row.at <= row.own) return false;
    try {
      this.stmt.touchBlob.run({ d: blob, at: row.at });
      this.stmt.touchAccess.run({ d: blob, at: row.at });
    } catch {
      // A full disk: spared in this pass all the same, and asked again in the next.
    }
    return true;
  }

  /** Drops what is known of `digest` as a subject or a referrer (its manifest is gone). */
  forget(digest: string): void {
    this.stmt.forget.run(digest);
    this.stmt.unlink.run({ d: digest });
  }
}
