/**
 * Users from an htpasswd file with bcrypt entries, as `htpasswd -B` writes them (`user:$2y$…`).
 * The file is checked for changes (mtime and size) at most once a second, when used; a file that
 * no longer parses, or is gone, keeps the users read before, so a half-written edit never locks
 * everyone out: that is logged once per version of the file, and `onStale` says so until a good
 * file is read again (ocicache_access_htpasswd_stale), since a user removed meanwhile stays valid. At start-up it must parse (ConfigError naming access.htpasswd).
 *
 * bcrypt costs tens of milliseconds by design, too much for every request of a pull that sends
 * Basic credentials each time: a verified (user, password, hash) is remembered for VERIFIED_TTL
 * under a SHA-256 of the three, so the password itself is never kept. A changed hash (new
 * password) or a removed user misses the memo at the next reload.
 *
 * Failed checks are what an attacker can make cheap for themselves and costly for us: at most
 * MAX_CHECKS bcrypt comparisons run at once (more get 429 with Retry-After), a failure is
 * remembered for FAILED_TTL, and an unknown user is compared against a dummy hash of the file's
 * own highest cost, so its answer takes as long as a known user's wrong password.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import bcrypt from 'bcryptjs';
import { LRUCache } from 'lru-cache';
import { ConfigError } from '../core/config-error.js';
import { fileStamp } from '../core/file-stamp.js';
import { OciError } from '../core/errors.js';

const RELOAD_CHECK_MS = 1000;
const VERIFIED_TTL = 5 * 60_000;
const VERIFIED_MAX = 10_000;
const FAILED_TTL = 10_000;
const MAX_CHECKS = 4;
/** bcrypt as htpasswd -B writes it, with a cost bcryptjs accepts (4 to 31). */
const BCRYPT = /^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$/;

/** A hash to compare unknown users against, as costly as the costliest entry of `users`. */
function dummyFor(users: Map<string, string>): string {
  let cost = 4;
  for (const hash of users.values()) cost = Math.max(cost, Number(hash.slice(4, 6)));
  return bcrypt.hashSync(randomBytes(16).toString('hex'), cost);
}

/** The users of an htpasswd text; throws on anything that is not `user:<bcrypt>`, a comment or blank. */
export function parseHtpasswd(text: string): Map<string, string> {
  const users = new Map<string, string>();
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const colon = line.indexOf(':');
    const user = line.slice(0, colon);
    const hash = line.slice(colon + 1);
    if (colon <= 0 || /\s/.test(user)) throw new Error(`line ${i + 1}: expected user:hash`);
    if (!BCRYPT.test(hash)) throw new Error(`line ${i + 1}: the entry for ${user} is not bcrypt (use htpasswd -B)`);
    users.set(user, hash);
  });
  return users;
}

export class Htpasswd {
  private users: Map<string, string>;
  private checkedAt = 0;
  private stamp: string;
  private readonly verified = new LRUCache<string, true>({ max: VERIFIED_MAX, ttl: VERIFIED_TTL });
  private readonly failed = new LRUCache<string, true>({ max: VERIFIED_MAX, ttl: FAILED_TTL });
  private dummy: string;
  private checking = 0;
  /** The version of the file that last failed to load (undefined: the file loaded). */
  private failedStamp: string | undefined;

  constructor(
    private readonly path: string,
    private readonly warn: (obj: object, msg: string) => void,
    private readonly now: () => number = Date.now,
    private readonly onStale: (stale: boolean) => void = () => undefined,
  ) {
    try {
      this.stamp = fileStamp(path);
      this.users = parseHtpasswd(readFileSync(path, 'utf8'));
    } catch (err) {
      throw new ConfigError('access.htpasswd', `${path}: ${(err as Error).message}`);
    }
    this.dummy = dummyFor(this.users);
    this.checkedAt = now();
  }

  /** Rereads the file if it changed; at most one stat a second. */
  private refresh(): void {
    const now = this.now();
    if (now - this.checkedAt < RELOAD_CHECK_MS) return;
    this.checkedAt = now;
    let stamp = 'missing';
    try {
      stamp = fileStamp(this.path);
      if (stamp === this.stamp) return;
      this.users = parseHtpasswd(readFileSync(this.path, 'utf8'));
      this.dummy = dummyFor(this.users);
    } catch (err) {
      if (stamp !== this.failedStamp) this.warn({ path: this.path, err: (err as Error).message }, 'htpasswd not reloaded: keeping the users read before');
      this.failedStamp = stamp;
      this.onStale(true);
      return;
    }
    this.stamp = stamp;
    if (this.failedStamp !== undefined) this.onStale(false);
    this.failedStamp = undefined;
  }

  has(user: string): boolean {
    this.refresh();
    return this.users.has(user);
  }

  private key(user: string, password: string, hash: string): string {
    return createHash('sha256').update(`${user}\0${password}\0${hash}`).digest('base64');
  }

  /** true or false when known without bcrypt (a remembered verification), else undefined. */
  verifiedSync(user: string, password: string): boolean | undefined {
    this.refresh();
    const hash = this.users.get(user);
    if (hash === undefined) return undefined;
    return this.verified.has(this.key(user, password, hash)) ? true : undefined;
  }

  async verify(user: string, password: string): Promise<boolean> {
    this.refresh();
    const hash = this.users.get(user) ?? this.dummy;
    const key = this.key(user, password, hash);
    if (this.verified.has(key)) return true;
    if (this.failed.has(key)) return false;
    if (this.checking >= MAX_CHECKS) {
      throw new OciError('TOOMANYREQUESTS', 'too many password checks at once: retry shortly (a token from the realm needs none)', { headers: { 'retry-after': '1' } });
    }
    this.checking++;
    let ok: boolean;
    try {
      ok = (await bcrypt.compare(password, hash)) && hash !== this.dummy;
    } finally {
      this.checking--;
    }
    (ok ? this.verified : this.failed).set(key, true);
    return ok;
  }
}
