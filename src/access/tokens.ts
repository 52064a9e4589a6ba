/**
 * The tokens our /token endpoint issues: JWTs signed HS256 (jose) that say who the client is,
 * never what it may read. The rules are applied to every request, so a rule changed or a user
 * removed from htpasswd takes effect at once, not when tokens expire.
 *
 * The key comes from access.tokenKeyFile (at least 32 bytes), shared by replicas and kept across
 * restarts; without it a random key is made at start and tokens die with the process (clients
 * then get a 401 and fetch a new one, as they do when a token expires).
 *
 * Verifying is asynchronous (WebCrypto); a verified token is remembered until it expires, so the
 * warm path (http/warm-path.ts) can tell who a client is synchronously from the second request on.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { jwtVerify, SignJWT } from 'jose';
import { LRUCache } from 'lru-cache';
import { ConfigError } from '../core/config-error.js';

const ISSUER = 'ocicache';
export const SERVICE = 'ocicache';
const REMEMBERED = 10_000;

export interface Issued {
  token: string;
  access_token: string;
  expires_in: number;
  issued_at: string;
}

/** A verified token: its user (undefined: anonymous) and when it expires (ms). */
interface Verified {
  user: string | undefined;
  exp: number;
}

export function readTokenKey(file: string | undefined): Uint8Array {
  if (file === undefined) return randomBytes(32);
  let key: Buffer;
  try {
    key = readFileSync(file);
  } catch (err) {
    throw new ConfigError('access.tokenKeyFile', `cannot read ${file}: ${(err as Error).message}`);
  }
  // A key shorter than the hash's output weakens HS256 (RFC 7518, 3.2).
  if (key.length < 32) throw new ConfigError('access.tokenKeyFile', `${file} holds ${key.length} bytes: at least 32 are needed (e.g. head -c 32 /dev/urandom > ${file})`);
  return new Uint8Array(key);
}

export class Tokens {
  private readonly remembered = new LRUCache<string, Verified>({ max: REMEMBERED });

  constructor(
    private readonly key: Uint8Array,
    private readonly ttlMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  async issue(user: string | undefined): Promise<Issued> {
    const iat = Math.floor(this.now() / 1000);
    const expiresIn = Math.floor(this.ttlMs / 1000);
    const jwt = new SignJWT({}).setProtectedHeader({ alg: 'HS256', typ: 'JWT' }).setIssuer(ISSUER).setAudience(SERVICE).setIssuedAt(iat).setExpirationTime(iat + expiresIn);
    if (user !== undefined) jwt.setSubject(user);
    const token = await jwt.sign(this.key);
    return { token, access_token: token, expires_in: expiresIn, issued_at: new Date(iat * 1000).toISOString() };
  }

  /** The token's user ({user: undefined}: anonymous) when remembered as valid; null when known bad; undefined: not known yet. */
  verifiedSync(token: string): { user: string | undefined } | null | undefined {
    const v = this.remembered.get(token);
    if (!v) return undefined;
    return v.exp > this.now() ? v : null;
  }

  /** The token's user, or null when it is not one of ours, tampered with or expired. */
  async verify(token: string): Promise<{ user: string | undefined } | null> {
    const known = this.verifiedSync(token);
    if (known !== undefined) return known;
    try {
      const { payload } = await jwtVerify(token, this.key, { issuer: ISSUER, audience: SERVICE, algorithms: ['HS256'], currentDate: new Date(this.now()) });
      const v: Verified = { user: payload.sub, exp: (payload.exp ?? 0) * 1000 };
      this.remembered.set(token, v);
      return v;
    } catch {
      return null;
    }
  }
}
