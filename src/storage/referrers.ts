/**
 * The last referrers index each upstream gave for a subject (and artifactType filter), so that
 * signatures, SBOMs and attestations can still be listed when the upstream is down or the cache
 * is offline (cache/manifests.ts getReferrers). The rows go with their subject: dropping the
 * subject's manifest drops them (Db.dropManifest, and eviction through it). What clients ask for
 * cannot grow the table without bound: a list is remembered only for a subject whose manifest is
 * cached, and for at most MAX_FILTERS artifactType filters per subject. (The referrer manifests
 * themselves are linked to their subject in storage/subjects.ts.)
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

  /** Drops what is known of `subject`'s referrers (its manifest is gone). */
  forget(subject: string): void {
    this.stmt.forget.run(subject);
  }
}
