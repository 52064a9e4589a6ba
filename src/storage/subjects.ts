/**
 * Referrers linked to their subject, so that signatures, SBOMs and attestations stay in the cache
 * as long as the image they refer to. A referrer is an ordinary manifest; a link (upstream, name,
 * subject, referrer, tag) says that in that repository it refers to the subject:
 * - by its own `subject` field (tag ''): the manifest's bytes say so. Its `refs` edge to the
 *   subject (media-types childrenOf) also drops it with the subject, as an index goes with its
 *   children;
 * - by a tag of the referrers tag schema (`sha256-<hex>`, cosign's `sha256-<hex>.sig`): only that
 *   tag says so, and tags are whatever a repository's owner chose, so such a link never reaches
 *   `refs` (it must not decide what another repository's manifest is dropped with or kept for),
 *   ends when the tag moves or goes, and is scoped to the tag's repository.
 *
 * What a link does: in an eviction pass, a referrer's blob counts as used when its subject's blobs
 * were last used (`inheritedAccess`), so a signature read once is not evicted from under the image
 * it signs, and goes right after it. A link counts only while the subject is cached and seen in the
 * referrer's repository, for referrers whose blobs add up to at most a small size (signatures and
 * SBOMs are small), and for at most MAX_LINKS referrers per subject and repository: what clients
 * can make the cache fetch must not be able to keep large amounts alive. Eviction also caps what
 * it spares this way per pass (cache/lifecycle.ts).
 */
import type Database from 'better-sqlite3';

/** Referrers linked per (upstream, repository, subject); more are cached but not kept with it. */
const MAX_LINKS = 16;

export class SubjectLinks {
  private readonly stmt;

  constructor(db: Database.Database) {
    this.stmt = {
      put: db.prepare<{ upstream: string; name: string; subject: string; referrer: string; tag: string; bytes: number; max: number }>(
        `INSERT OR IGNORE INTO subjects (upstream, name, subject, referrer, tag, bytes)
         SELECT @upstream, @name, @subject, @referrer, @tag, @bytes
         WHERE (SELECT count(*) FROM subjects WHERE upstream = @upstream AND name = @name AND subject = @subject) < @max`,
      ),
      dropTag: db.prepare('DELETE FROM subjects WHERE upstream = ? AND name = ? AND tag = ?'),
      forget: db.prepare('DELETE FROM subjects WHERE referrer = @d OR subject = @d'),
      any: db.prepare<[], { one: number }>('SELECT 1 AS one FROM subjects LIMIT 1'),
      // Each blob of a linked referrer with the latest use of a blob of its subject (the subject's
      // config and layers, or those of its children when it is an index).
      inherited: db.prepare<{ max: number }, { blob: string; at: number }>(
        `WITH linked(subject, referrer) AS (
           SELECT s.subject, s.referrer FROM subjects s
           WHERE s.bytes <= @max
             AND EXISTS (SELECT 1 FROM manifest_repos m WHERE m.upstream = s.upstream AND m.name = s.name AND m.digest = s.subject)),
         subject_blobs(subject, blob) AS (
           SELECT l.subject, r.child FROM (SELECT DISTINCT subject FROM linked) l JOIN refs r ON r.parent = l.subject
           UNION
           SELECT l.subject, g.child FROM (SELECT DISTINCT subject FROM linked) l JOIN refs r ON r.parent = l.subject JOIN refs g ON g.parent = r.child),
         used(subject, at) AS (
           SELECT sb.subject, max(b.last_access) FROM subject_blobs sb JOIN blobs b ON b.digest = sb.blob GROUP BY sb.subject)
         SELECT r.child AS blob, max(u.at) AS at
         FROM linked l JOIN used u ON u.subject = l.subject JOIN refs r ON r.parent = l.referrer
         GROUP BY r.child`,
      ),
      touchBlob: db.prepare('UPDATE blobs SET last_access = max(last_access, @at) WHERE digest = @d'),
      touchAccess: db.prepare('UPDATE blob_access SET last_access = max(last_access, @at) WHERE digest = @d'),
    };
  }

  /** In Db's transactions: `referrer` refers to `subject` in (upstream, name), by its subject field (tag '') or by `tag`. */
  link(upstream: string, name: string, subject: string, referrer: string, tag: string, bytes: number): void {
    if (referrer !== subject) this.stmt.put.run({ upstream, name, subject, referrer, tag, bytes, max: MAX_LINKS });
  }

  /** The tag moved or went: what it said of its manifest no longer holds. */
  dropTag(upstream: string, name: string, tag: string): void {
    this.stmt.dropTag.run(upstream, name, tag);
  }

  /** `digest`'s manifest is gone: the links of which it is the subject or the referrer go too. */
  forget(digest: string): void {
    this.stmt.forget.run({ d: digest });
  }

  /** Whether any referrer is linked: eviction asks inheritedAccess only then. */
  any(): boolean {
    return this.stmt.any.get() !== undefined;
  }

  /** For one eviction pass: each blob of a linked referrer of at most `maxBytes`, with when its subject was last used. */
  inheritedAccess(maxBytes: number): Map<string, number> {
    return new Map(this.stmt.inherited.all({ max: maxBytes }).map((r) => [r.blob, r.at]));
  }

  /** Moves a blob's access times up to `at` (a referrer's blob taking its subject's); a storage error leaves them. */
  touch(digest: string, at: number): void {
    try {
      this.stmt.touchBlob.run({ d: digest, at });
      this.stmt.touchAccess.run({ d: digest, at });
    } catch {
      // A full disk: spared in this pass all the same, and looked at again in the next.
    }
  }
}
