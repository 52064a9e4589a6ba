/**
 * An HAProxy configuration for a fleet of ocicache replicas behind one consistent-hash balancer
 * (README, "Running a fleet"). Every request for one blob, and for one manifest reference, lands
 * on the same replica, so the fleet fetches each from its upstream once, and a replica that leaves
 * moves only its own share of keys (hash-type consistent).
 *
 * The key, computed from the same config the replicas run on, so that every routing form a client
 * uses for one request gives the same key (core/api-path.ts decides the same way):
 * - a digest at the end of the path (blobs, manifests by digest, referrers): the digest alone,
 *   whatever the repository or upstream;
 * - otherwise (manifests by tag, tag lists): the upstream, from `ns` (names, aliases, `:443`), a
 *   path prefix (`/v2/<upstream>/`, `/<upstream>/v2/`, `/<upstream>/`) or the default upstream,
 *   then the path with the prefix removed and Docker Hub's `library/` added where the replica adds it.
 * A request that matches none of these (the base endpoint, /token, the status page) has the path
 * as its key. Where the key is wrong for a request a replica refuses anyway, only where it lands
 * changes: the replica still decides everything.
 *
 * HAProxy 2.6 (Debian bookworm) accepts every directive used here (`haproxy -c`). An expression
 * whose converter arguments hold parentheses is one double-quoted word, its arguments single-quoted,
 * or HAProxy's argument parser would end them at the first ')'.
 */
import type { Config } from '../core/config.js';

export interface Replica {
  /** The server name HAProxy logs and its consistent-hash identity: keep it stable (the pod name). */
  name: string;
  /** host:port */
  address: string;
}

export interface HaproxyOptions {
  /** Where HAProxy listens, as its `bind` line takes it. */
  bind: string;
  replicas: Replica[];
  /** How often a replica's /readyz is checked. */
  checkInterval?: string;
  /**
   * Replica addresses are DNS names that may not resolve yet (a StatefulSet's pods behind a
   * headless Service): resolve them through /etc/resolv.conf's servers, and keep re-resolving;
   * a replica without an address waits, out of the ring, instead of stopping HAProxy's start.
   */
  dns?: boolean;
}

const DIGEST_AT_END = '/(blobs|manifests|referrers)/sha(256:[a-f0-9]{64}|512:[a-f0-9]{128})$';
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;
const ADDRESS = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/;

/** A regex for `key` (an upstream name or alias) as a path segment, with an optional :443. */
function segment(key: string): string {
  const escaped = key.replace(/[.]/g, '\\.');
  return key.includes(':') ? escaped : `${escaped}(:443)?`;
}

export function haproxyConfig(config: Pick<Config, 'upstreams' | 'defaultUpstream'>, options: HaproxyOptions): string {
  if (options.replicas.length === 0) throw new Error('at least one replica is needed');
  for (const r of options.replicas) {
    if (!NAME.test(r.name)) throw new Error(`replica name ${JSON.stringify(r.name)}: letters, digits, '.', '_' and '-' only`);
    if (!ADDRESS.test(r.address)) throw new Error(`replica ${r.name}: address ${JSON.stringify(r.address)} is not host:port`);
  }
  if (new Set(options.replicas.map((r) => r.name)).size !== options.replicas.length) throw new Error('replica names must differ');
  if (options.checkInterval !== undefined && !/^\d+(ms|s|m)$/.test(options.checkInterval)) throw new Error(`check interval ${JSON.stringify(options.checkInterval)}: expected a duration such as 500ms or 2s`);

  const lines: string[] = [];
  const rule = (text: string): void => void lines.push(`  ${text}`);
  rule('# 1. The upstream: ns names it (a name or alias, case-insensitively, with or without :443) ...');
  for (const u of config.upstreams) {
    const keys = [u.name, ...u.aliases];
    const ns = keys.flatMap((k) => (k.includes(':') ? [k] : [k, `${k}:443`]));
    rule(`http-request set-var(txn.up) str(${u.name}) if { url_param(ns) -m str -i ${ns.join(' ')} }`);
  }
  rule('# ... or the path starts with it: /v2/<upstream>/, /<upstream>/v2/ or /<upstream>/ (the prefix is dropped from the key) ...');
  rule('http-request set-var(txn.rest) path');
  for (const u of config.upstreams) {
    const alt = [u.name, ...u.aliases].map(segment).join('|');
    const prefix = `^/((v2/)?(${alt})/(v2/)?)`;
    rule(`http-request set-var(txn.up) str(${u.name}) if !{ var(txn.up) -m found } { path -m reg -i ${prefix} }`);
    rule(`http-request set-var(txn.rest) "path,regsub('${prefix}','/v2/',i)" if { path -m reg -i ${prefix} }`);
  }
  if (config.defaultUpstream !== undefined) {
    rule('# ... or it is the default upstream.');
    rule(`http-request set-var(txn.up) str(${config.defaultUpstream}) if !{ var(txn.up) -m found }`);
  }
  const hubs = config.upstreams.filter((u) => u.dockerHubLibrary).map((u) => u.name);
  if (hubs.length > 0) {
    rule('# 2. Docker Hub: a one-component name is library/<name>.');
    rule(`http-request set-var(txn.rest) "var(txn.rest),regsub('^/v2/([^/]+)/(manifests|tags)/','/v2/library/\\1/\\2/')" if { var(txn.up) -m str ${hubs.join(' ')} }`);
  }
  rule('# 3. The key: the upstream and the rest of the path; a digest alone where the path ends in one.');
  rule('http-request set-var(txn.key) var(txn.up),concat(,txn.rest,) if { var(txn.up) -m found }');
  rule('http-request set-var(txn.key) path unless { var(txn.key) -m found }');
  rule(`http-request set-var(txn.key) path,field(-1,/) if { path -m reg ${DIGEST_AT_END} }`);

  return `# Generated by \`ocicache haproxy\`: a consistent-hash balancer for ${options.replicas.length} ocicache replicas.
# Regenerate it when the upstreams or the replicas change.
global
  # As many client connections as one replica takes by default (server.maxConnections).
  maxconn 4096
  log stdout format raw local0

defaults
  mode http
  log global
  option httplog
  timeout connect 5s
  timeout http-request 10s
  # Blobs can take long to stream; the replicas bound their own clients and upstreams.
  timeout client 10m
  timeout server 10m

${options.dns ? 'resolvers dns\n  parse-resolv-conf\n  hold valid 10s\n\n' : ''}frontend ocicache
  bind ${options.bind}
${lines.join('\n')}
  default_backend replicas

backend replicas
  balance hash var(txn.key)
  hash-type consistent
  # A replica that is down (or draining: /readyz answers 503 from SIGTERM on) leaves the ring;
  # only its keys move. A request whose connection fails is sent to another replica.
  option httpchk GET /readyz
  http-check expect status 200
  option redispatch 1
  retries 2
  retry-on conn-failure empty-response
  default-server check inter ${options.checkInterval ?? '2s'} fall 2 rise 2${options.dns ? ' resolvers dns init-addr last,libc,none' : ''}
${options.replicas.map((r) => `  server ${r.name} ${r.address}`).join('\n')}
`;
}
