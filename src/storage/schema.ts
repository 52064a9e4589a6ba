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
  // Referrers linked to their subject (storage/referrers.ts); those cached before are linked from
  // their subject field and their referrers-tag-schema tags.
  `CREATE TABLE subjects (
     referrer TEXT NOT NULL, subject TEXT NOT NULL, upstream TEXT NOT NULL, name TEXT NOT NULL,
     PRIMARY KEY (referrer, subject, upstream, name)) WITHOUT ROWID;
   CREATE INDEX subjects_subject ON subjects (subject);
   INSERT OR IGNORE INTO subjects
     SELECT m.digest, json_extract(CAST(m.body AS TEXT), '$.subject.digest'), r.upstream, r.name
     FROM manifests m JOIN manifest_repos r ON r.digest = m.digest
     WHERE json_valid(CAST(m.body AS TEXT)) AND json_type(CAST(m.body AS TEXT), '$.subject.digest') = 'text';
   INSERT OR IGNORE INTO subjects
     SELECT digest, 'sha256:' || substr(tag, 8, 64), upstream, name FROM tags
     WHERE substr(tag, 1, 7) = 'sha256-' AND (length(tag) = 71 OR (length(tag) > 72 AND substr(tag, 72, 1) = '.'))
       AND NOT substr(tag, 8, 64) GLOB '*[^0-9a-f]*';
   DELETE FROM subjects WHERE referrer = subject;
   INSERT OR IGNORE INTO refs (parent, child) SELECT referrer, subject FROM subjects;`,
];
