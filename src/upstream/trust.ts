/**
 * Where an upstream may send the cache, and with what: the decisions, as pure functions, for a
 * token realm named by a 401's challenge and for each hop of a redirect. What they answer is a
 * Hop: refused (with the reason), or followed, `restrict`ed to public addresses and the
 * upstream's own kind of address (addresses.ts) when the host is one the upstream chose rather
 * than one the operator named. The rules and the built-in lists, with their sources, are in
 * docs/upstreams.md, "Tokens, redirects and credentials".
 */
import type { UpstreamConfig } from '../core/config.js';

export type Hop = { restrict: boolean } | { refused: string };

/**
 * Token servers known to belong to a registry on another host, over HTTPS only: Docker Hub's
 * registry hosts get their tokens from auth.docker.io. ghcr.io, quay.io, gcr.io, public.ecr.aws and
 * registry.k8s.io name realms on their own origin, which needs no entry.
 */
const KNOWN_REALMS: ReadonlyArray<{ upstreams: readonly string[]; realms: readonly string[] }> = [
  { upstreams: ['registry-1.docker.io', 'index.docker.io'], realms: ['auth.docker.io'] },
];

/**
 * Hosts a registry is known to redirect its manifests, tag lists and referrers to, over HTTPS
 * only: registry.k8s.io sends every request but some blobs to a regional Artifact Registry,
 * `<region>-docker.pkg.dev` (kubernetes/registry.k8s.io, cmd/archeio/docs/request-handling.md).
 */
const KNOWN_REDIRECT_HOSTS: ReadonlyArray<{ upstreams: readonly string[]; hosts: readonly string[] }> = [
  { upstreams: ['registry.k8s.io'], hosts: ['*.pkg.dev'] },
];

/** Whether `hostname` matches `pattern`: a host name, or `*.` and a domain for any name under it (not the domain itself). */
export function hostMatches(pattern: string, hostname: string): boolean {
  const h = hostname.toLowerCase().replace(/\.$/, '');
  const p = pattern.toLowerCase();
  return p.startsWith('*.') ? h.endsWith(p.slice(1)) && h.length > p.length - 1 : h === p;
}

function listed(patterns: readonly string[], hostname: string): boolean {
  return patterns.some((p) => hostMatches(p, hostname));
}

/** The built-in entry of `table` for this upstream: its URL must be HTTPS on one of the entry's hosts. */
function builtIn<T extends { upstreams: readonly string[] }>(table: ReadonlyArray<T>, upstream: UpstreamConfig): T | undefined {
  if (upstream.url.protocol !== 'https:') return undefined;
  return table.find((e) => e.upstreams.includes(upstream.url.hostname.toLowerCase()));
}

/** A realm or redirect target whose scheme is not HTTP(S), or that would take an HTTPS upstream's exchange to plain HTTP. */
function badScheme(upstream: UpstreamConfig, url: URL): string | undefined {
  if (url.protocol !== 'https:' && url.protocol !== 'http:') return `${url.protocol} is not HTTP`;
  if (url.protocol === 'http:' && upstream.url.protocol === 'https:') return 'plain HTTP for an HTTPS upstream';
  return undefined;
}

/**
 * Whether the cache may ask `realm` for a token for `upstream`, and with its credentials. A realm
 * receives the upstream's credentials only when it is the upstream's own origin (same scheme,
 * host and port), listed in the upstream's `tokenRealms`, or a known pair (KNOWN_REALMS); never
 * over HTTP when the upstream is HTTPS. Without credentials configured any other realm may be
 * asked anonymously, over HTTPS only and at a public address or one of the upstream's own kind
 * (`restrict`): registries name realms elsewhere (GitLab's is on gitlab.com), and an anonymous
 * token request carries nothing but the repository name.
 */
export function realmAccess(upstream: UpstreamConfig, realm: URL, withCredentials: boolean): Hop {
  const scheme = badScheme(upstream, realm);
  if (scheme) return { refused: scheme };
  if (realm.origin === upstream.url.origin || upstream.tokenRealms.includes(realm.origin)) return { restrict: false };
  const known = builtIn(KNOWN_REALMS, upstream);
  if (known && realm.protocol === 'https:' && known.realms.includes(realm.hostname.toLowerCase())) return { restrict: true };
  if (withCredentials) {
    return { refused: `it is neither the upstream's origin nor listed in its tokenRealms, so it gets no credentials (add ${realm.origin} to upstreams[].tokenRealms to trust it)` };
  }
  if (realm.protocol !== 'https:') return { refused: 'a token realm on another origin is asked over HTTPS only' };
  return { restrict: true };
}

/**
 * Whether one hop of a redirect, from `from` to `to`, is followed for a request of `kind`. Never
 * from HTTPS to HTTP. The upstream's own host and its `redirectHosts` are followed for every
 * kind, wherever they resolve (the operator named them). Blob downloads follow any other host (a
 * CDN, S3), restricted to public addresses and the upstream's own kind. Manifests, tag lists and
 * referrers follow only those and the built-in hosts (KNOWN_REDIRECT_HOSTS): their answers are
 * cached under a tag or returned as the upstream's, so a host outside the list could put any
 * content there, or have the cache fetch an internal URL and hand back what it got.
 */
export function redirectRule(upstream: UpstreamConfig, kind: string, from: URL, to: URL): Hop {
  if (to.protocol !== 'https:' && to.protocol !== 'http:') return { refused: `${to.protocol} is not HTTP` };
  if (from.protocol === 'https:' && to.protocol === 'http:') return { refused: 'a redirect from HTTPS to HTTP is never followed' };
  // The upstream's own origin (its port too: another port of its host is another service).
  if (to.origin === upstream.url.origin || listed(upstream.redirectHosts, to.hostname)) return { restrict: false };
  if (kind === 'blob') return { restrict: true };
  const known = builtIn(KNOWN_REDIRECT_HOSTS, upstream);
  if (known && to.protocol === 'https:' && listed(known.hosts, to.hostname)) return { restrict: true };
  return { refused: `${to.host} is not a host its ${kind === 'tags' ? 'tag lists' : kind === 'referrers' ? 'referrers' : 'manifests'} may be redirected to (upstreams[].redirectHosts)` };
}
