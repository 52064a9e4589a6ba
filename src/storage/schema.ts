/**
 * The index's schema as the steps that build it: step N takes a database at `user_version` N to
 * N + 1 (Db.migrate runs each in a transaction). A step, once released, never changes: a new
 * table or index is a new step. The invariants the tables keep are in storage/db.ts.
 */
export const MIGRATIONS = [
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
  `CREATE INDEX blobs_last_access ON blobs (last_access);
   CREATE TABLE blob_access (
     digest TEXT NOT NULL, upstream TEXT NOT NULL, last_access INTEGER NOT NULL,
     PRIMARY KEY (digest, upstream)) WITHOUT ROWID;`,
  `CREATE TABLE blob_repos (
     upstream TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL,
     PRIMARY KEY (upstream, name, digest)) WITHOUT ROWID;
   CREATE INDEX blob_repos_digest ON blob_repos (digest);`,
  `CREATE TABLE kept (pattern TEXT NOT NULL, ref TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (pattern, ref, digest)) WITHOUT ROWID;`,
  `CREATE TABLE referrers (
     upstream TEXT NOT NULL, name TEXT NOT NULL, subject TEXT NOT NULL, artifact_type TEXT NOT NULL,
     body BLOB NOT NULL, content_type TEXT NOT NULL, filters TEXT, checked_at INTEGER NOT NULL,
     PRIMARY KEY (upstream, name, subject, artifact_type)) WITHOUT ROWID;
   CREATE INDEX referrers_subject ON referrers (subject);`,
  // Referrers linked to their subject (storage/subjects.ts); those cached before are linked from
  // their subject field and their sha256-<hex> referrers-tag-schema tags. `bytes`: what the
  // referrer's config and layers add up to.
  `CREATE TABLE subjects (
     upstream TEXT NOT NULL, name TEXT NOT NULL, subject TEXT NOT NULL, referrer TEXT NOT NULL, tag TEXT NOT NULL, bytes INTEGER NOT NULL,
     PRIMARY KEY (upstream, name, subject, referrer, tag)) WITHOUT ROWID;
   CREATE INDEX subjects_referrer ON subjects (referrer);
   CREATE INDEX subjects_subject ON subjects (subject);
   CREATE INDEX subjects_tag ON subjects (upstream, name, tag);
   CREATE TEMP VIEW sized AS
     SELECT digest, CAST(body AS TEXT) AS json,
            coalesce(json_extract(CAST(body AS TEXT), '$.config.size'), 0)
              + coalesce((SELECT sum(json_extract(l.value, '$.size')) FROM json_each(CAST(body AS TEXT), '$.layers') l), 0) AS bytes
     FROM manifests WHERE json_valid(CAST(body AS TEXT));
   INSERT OR IGNORE INTO subjects
     SELECT r.upstream, r.name, json_extract(m.json, '$.subject.digest'), m.digest, '', m.bytes
     FROM sized m JOIN manifest_repos r ON r.digest = m.digest
     WHERE json_type(m.json, '$.subject.digest') = 'text' AND json_extract(m.json, '$.subject.digest') GLOB 'sha256:*'
       AND length(json_extract(m.json, '$.subject.digest')) = 71 AND NOT substr(json_extract(m.json, '$.subject.digest'), 8) GLOB '*[^0-9a-f]*';
   INSERT OR IGNORE INTO subjects
     SELECT t.upstream, t.name, 'sha256:' || substr(t.tag, 8, 64), t.digest, t.tag, coalesce(m.bytes, 0)
     FROM tags t LEFT JOIN sized m ON m.digest = t.digest
     WHERE substr(t.tag, 1, 7) = 'sha256-' AND t.tag IN (substr(t.tag, 1, 71), substr(t.tag, 1, 71) || '.sig', substr(t.tag, 1, 71) || '.att', substr(t.tag, 1, 71) || '.sbom')
       AND length(t.tag) >= 71 AND NOT substr(t.tag, 8, 64) GLOB '*[^0-9a-f]*';
   DELETE FROM subjects WHERE referrer = subject;
   DROP VIEW sized;`,
];
