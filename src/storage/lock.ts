/**
 * One process per cache directory. The server, `gc`, `verify` and `prefetch` each hold an
 * exclusive lock on <root>/lock while they have the cache open: two writers would each believe
 * they own eviction, the temp directory and the index.
 *
 * The lock is SQLite's own (an exclusive transaction on a small database that stays open), which
 * rests on the kernel's advisory file locks: they are released when the process ends, even by
 * kill -9, so there is never a stale lock to clean up. Like the index, it needs a local filesystem.
 */
import { join } from 'node:path';
import Database from 'better-sqlite3';

export class CacheInUse extends Error {
  constructor(root: string) {
    super(`${root} is in use by another ocicache process (a server, gc, verify or prefetch): stop it first, or ask the running server through its admin API (POST /admin/gc, POST /admin/prefetch, ocicache prefetch --server)`);
    this.name = 'CacheInUse';
  }
}

export class CacheLock {
  private constructor(private readonly db: Database.Database) {}

  /** Takes the lock on `root` or throws CacheInUse at once (no waiting). */
  static acquire(root: string): CacheLock {
    const db = new Database(join(root, 'lock'), { timeout: 0 });
    try {
      // No journal file beside the lock: the lock database is never written.
      db.pragma('journal_mode = MEMORY');
      db.pragma('locking_mode = EXCLUSIVE');
      db.exec('BEGIN EXCLUSIVE');
    } catch (err) {
      db.close();
      if (String((err as { code?: unknown }).code).startsWith('SQLITE_BUSY')) throw new CacheInUse(root);
      throw err;
    }
    return new CacheLock(db);
  }

  release(): void {
    if (this.db.open) this.db.close();
  }
}
