/**
 * The `keep` section: images never evicted by size or age, fetched at start-up and refreshed on a
 * schedule (cache/keep.ts). Validated here with messages naming the bad key; whether each image
 * names a configured upstream is checked when the server starts (it needs the upstream index).
 */
import { ConfigError } from './config-error.js';
import { section } from './config-values.js';
import { parseDuration } from './units.js';

export interface KeepConfig {
  /** `[registry/]name[:tag|@digest]`; the tag may be a glob (`*` any characters, `?` one): `registry.k8s.io/pause:*`. */
  images: string[];
  /** Only these platforms of a multi-platform image (`linux/amd64`, `linux/arm64/v8`); undefined: all. */
  platforms: string[] | undefined;
  /** How often tags are resolved again and the images fetched. */
  refresh: number;
  /** Also each kept manifest's referrers (signatures, SBOMs, attestations), kept with it. */
  withReferrers: boolean;
}

const IMAGE = /^[a-z0-9][a-z0-9._:/-]*?(@sha(256:[a-f0-9]{64}|512:[a-f0-9]{128})|:[A-Za-z0-9_*?][A-Za-z0-9_.*?-]{0,127})?$/;
const PLATFORM = /^[a-z0-9]+\/[a-z0-9_]+(\/[a-z0-9]+)?$/;

function list(value: unknown, path: string, check: RegExp, example: string): string[] {
  if (!Array.isArray(value) || value.length === 0) throw new ConfigError(path, 'must be a non-empty list');
  return value.map((v, i) => {
    if (typeof v !== 'string' || !check.test(v)) throw new ConfigError(`${path}[${i}]`, `must be ${example}, got ${JSON.stringify(v)}`);
    return v;
  });
}

export function buildKeepConfig(raw: unknown): KeepConfig | undefined {
  if (raw === undefined || raw === null) return undefined;
  const o = section({ keep: raw }, 'keep', 'keep', ['images', 'platforms', 'refresh', 'withReferrers']);
  const images = list(o.images, 'keep.images', IMAGE, 'an image reference such as registry.k8s.io/pause:3.10, docker.io/library/busybox:1.* or ghcr.io/org/app@sha256:…');
  const platforms = o.platforms === undefined ? undefined : list(o.platforms, 'keep.platforms', PLATFORM, 'a platform such as linux/amd64 or linux/arm64/v8');
  const refresh = parseDuration(o.refresh ?? '6h');
  if (refresh === undefined || refresh < 60_000) throw new ConfigError('keep.refresh', `expected a duration of at least 1m such as 6h, got ${JSON.stringify(o.refresh)}`);
  if (o.withReferrers !== undefined && typeof o.withReferrers !== 'boolean') throw new ConfigError('keep.withReferrers', `expected true or false, got ${JSON.stringify(o.withReferrers)}`);
  return { images, platforms, refresh, withReferrers: o.withReferrers === true };
}
