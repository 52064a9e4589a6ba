/**
 * The last referrers index each upstream gave for a subject (and artifactType filter), so that
 * signatures, SBOMs and attestations can still be listed when the upstream is down or the cache
 * is offline (cache/manifests.ts getReferrers). The rows go with their subject: dropping the
 * subject's manifest drops them (Db.dropManifest, and eviction through it).
 */
import type Database from 'better-sqlite3';

export interface ReferrersRecord {
  body: Buffer;
  contentType: string;
  filtersApplied: string | undefined;
}

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
    };
  }

  /** `artifactType` '' for the unfiltered list. */
  get(upstream: string, name: string, subject: string, artifactType: string): ReferrersRecord | undefined {
    const row = this.stmt.get.get(upstream, name, subject, artifactType);
    return row && { body: row.body, contentType: row.content_type, filtersApplied: row.filters ?? undefined };
  }

  put(upstream: string, name: string, subject: string, artifactType: string, r: ReferrersRecord, now: number): void {
    this.stmt.put.run(upstream, name, subject, artifactType, r.body, r.contentType, r.filtersApplied ?? null, now);
  }

  /** Drops what is known of `subject`'s referrers (its manifest is gone). */
  forget(subject: string): void {
    this.stmt.forget.run(subject);
  }
}
