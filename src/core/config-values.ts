/**
 * The value parsers shared by config.ts and the sections it delegates to: each throws a
 * ConfigError naming the key at fault.
 */
import { readFileSync } from 'node:fs';
import { parseDuration, parseSize } from './units.js';
import { ConfigError } from './config-error.js';


/**
 * Which secrets a command needs. `serve` needs all; `prefetch` only upstream credentials; `gc`
 * and `verify` none, so an operator can run them without the server's environment. A secret that
 * is not needed is still validated in shape but not read.
 */
export interface SecretNeeds {
  upstreamAuth: boolean;
  adminToken: boolean;
}

export const HOST_KEY = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$/;

export function duration(value: unknown, key: string): number {
  const ms = parseDuration(value);
  if (ms === undefined) throw new ConfigError(key, `expected a duration such as 30s, 5m or 24h, got ${JSON.stringify(value)}`);
  return ms;
}

export function size(value: unknown, key: string): number {
  const bytes = parseSize(value);
  if (bytes === undefined) throw new ConfigError(key, `expected a size such as 512MiB or 50GiB, got ${JSON.stringify(value)}`);
  return bytes;
}

export type Obj = Record<string, unknown>;

export function section(parent: Obj, key: string, path: string, allowed: string[]): Obj {
  const value = parent[key] ?? {};
  if (typeof value !== 'object' || Array.isArray(value) || value === null) throw new ConfigError(path, 'must be a mapping');
  for (const k of Object.keys(value)) {
    if (!allowed.includes(k)) throw new ConfigError(`${path}.${k}`, `unknown key (known: ${allowed.join(', ')})`);
  }
  return value as Obj;
}

export function str(o: Obj, key: string, path: string, fallback?: string): string {
  const v = o[key] ?? fallback;
  if (typeof v !== 'string' || v === '') throw new ConfigError(`${path}.${key}`, 'must be a non-empty string');
  return v;
}

export function bool(o: Obj, key: string, path: string, fallback: boolean): boolean {
  const v = o[key] ?? fallback;
  if (typeof v !== 'boolean') throw new ConfigError(path ? `${path}.${key}` : key, 'must be true or false');
  return v;
}

export function int(o: Obj, key: string, path: string, fallback: number, min = 0): number {
  const v = o[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) throw new ConfigError(`${path}.${key}`, `must be a whole number >= ${min}`);
  return v;
}

export function percent(o: Obj, key: string, path: string, fallback: number): number {
  const v = o[key] ?? fallback;
  if (typeof v !== 'number' || !(v > 0 && v <= 100)) throw new ConfigError(`${path}.${key}`, 'must be a percentage above 0 and at most 100');
  return v;
}

export function hostKey(value: unknown, path: string): string {
  if (typeof value !== 'string' || !HOST_KEY.test(value.toLowerCase())) {
    throw new ConfigError(path, `must be a registry host name such as docker.io or registry.example.com:5000, got ${JSON.stringify(value)}`);
  }
  return value.toLowerCase();
}

export function readSecret(o: Obj, path: string, env: NodeJS.ProcessEnv, field = 'password'): string {
  if (o[field] !== undefined) throw new ConfigError(`${path}.${field}`, `secrets are never written in the config: use ${field}Env or ${field}File`);
  const fromEnv = o[`${field}Env`];
  const fromFile = o[`${field}File`];
  if (typeof fromEnv === 'string') {
    const v = env[fromEnv];
    if (!v || v.trim() === '') throw new ConfigError(`${path}.${field}Env`, `environment variable ${fromEnv} is not set`);
    return v;
  }
  if (typeof fromFile === 'string') {
    let v: string;
    try {
      v = readFileSync(fromFile, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      throw new ConfigError(`${path}.${field}File`, `cannot read ${fromFile}: ${(err as Error).message}`);
    }
    // An empty secret would compare equal to an empty guess.
    if (v.trim() === '') throw new ConfigError(`${path}.${field}File`, `${fromFile} is empty`);
    return v;
  }
  throw new ConfigError(path, `needs ${field}Env or ${field}File`);
}
