/**
 * The `access` section: client authentication (an htpasswd file, our own token endpoint) and the
 * rules that say who may read what. Absent, access control is off and every request is served as
 * before (the embedded default: public upstreams only). Validated here with messages naming the
 * bad key; the files it names (htpasswd, tokenKeyFile) are read by src/access/ when the server
 * starts, so one-shot commands (gc, verify) do not need them.
 */
import { ConfigError } from './config-error.js';
import { parseDuration } from './units.js';

export interface AccessRule {
  /** Upstream names, or ['*'] for all. Aliases in the YAML are resolved to names. */
  upstreams: string[] | '*';
  /** Repository globs on the upstream's own names ('library/alpine'): '*' one path component, '**' any number. */
  repositories: string[];
  /** User names, 'group:<name>', 'anonymous' (anyone, even without credentials), 'authenticated'. */
  allow: string[];
  /** Lets 'anonymous' read an upstream that has `auth` credentials: said explicitly or refused. */
  exposeCredentials: boolean;
}

export interface AccessConfig {
  /** An htpasswd file with bcrypt entries (`htpasswd -B`), reloaded when it changes; undefined only with clientCertificates. */
  htpasswd: string | undefined;
  /** A client certificate verified against server.tls.clientCaFile names its holder: the subject's CN is the user. */
  clientCertificates: boolean;
  /** A file holding the HS256 key for tokens; undefined: a random key per process (tokens die with it). */
  tokenKeyFile: string | undefined;
  /** Lifetime of the tokens /token issues. */
  tokenTtl: number;
  /** The token URL clients are told; undefined: derived from each request's own Host. */
  realm: string | undefined;
  groups: Record<string, string[]>;
  /** First match wins; no match: denied. */
  rules: AccessRule[];
}

/** What the `access` section needs to know of the upstreams: name, aliases and whether it has credentials. */
export interface UpstreamKeys {
  name: string;
  aliases: string[];
  auth?: unknown;
  credentials?: unknown;
}

const KEYS = ['htpasswd', 'clientCertificates', 'tokenKeyFile', 'tokenTtl', 'realm', 'groups', 'rules'];
const RULE_KEYS = ['upstreams', 'repositories', 'allow', 'exposeCredentials'];
/** A repository glob: path components of the name grammar's characters and '*', or '**' alone. */
const GLOB_COMPONENT = /^(\*\*|[a-z0-9._*-]+)$/;
const USER = /^[^\s:]+$/;

type Obj = Record<string, unknown>;

function mapping(value: unknown, path: string, allowed?: string[]): Obj {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new ConfigError(path, 'must be a mapping');
  if (allowed) {
    for (const k of Object.keys(value)) if (!allowed.includes(k)) throw new ConfigError(`${path}.${k}`, `unknown key (known: ${allowed.join(', ')})`);
  }
  return value as Obj;
}

function strings(value: unknown, path: string): string[] {
  if (!Array.isArray(value) || value.length === 0 || !value.every((v) => typeof v === 'string' && v !== '')) {
    throw new ConfigError(path, 'must be a non-empty list of strings');
  }
  return value as string[];
}

function optionalString(o: Obj, key: string, path: string): string | undefined {
  const v = o[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || v === '') throw new ConfigError(`${path}.${key}`, 'must be a non-empty string');
  return v;
}

function checkGlob(glob: string, path: string): string {
  // '**' only as a whole component: inside one ('lib**') it would read as '*' and mislead.
  const parts = glob.split('/');
  // '**' twice in a row says nothing more than once, and would compile to a pattern that matches nothing.
  const repeated = parts.some((c, i) => c === '**' && parts[i + 1] === '**');
  if (repeated || !parts.every((c) => GLOB_COMPONENT.test(c) && (c === '**' || !c.includes('**')))) {
    throw new ConfigError(path, `must be a repository glob such as library/*, myorg/** or **, got ${JSON.stringify(glob)}`);
  }
  return glob;
}

export function buildAccessConfig(raw: unknown, upstreams: UpstreamKeys[]): AccessConfig {
  const o = mapping(raw, 'access', KEYS);
  const htpasswd = optionalString(o, 'htpasswd', 'access');
  const clientCertificates = o.clientCertificates ?? false;
  if (typeof clientCertificates !== 'boolean') throw new ConfigError('access.clientCertificates', 'must be true or false');
  if (htpasswd === undefined && !clientCertificates) {
    throw new ConfigError('access.htpasswd', 'is required (unless clientCertificates: true): the path of an htpasswd file with bcrypt entries (htpasswd -B)');
  }
  const ttl = parseDuration(o.tokenTtl ?? '5m');
  if (ttl === undefined || ttl < 1000) throw new ConfigError('access.tokenTtl', `expected a duration of at least 1s such as 5m, got ${JSON.stringify(o.tokenTtl)}`);
  const realm = optionalString(o, 'realm', 'access');
  if (realm !== undefined) {
    let url: URL | undefined;
    try {
      url = new URL(realm);
    } catch {
      url = undefined;
    }
    if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:') || realm.includes('"')) throw new ConfigError('access.realm', `must be an absolute http(s) URL, got ${JSON.stringify(realm)}`);
  }

  const groups: Record<string, string[]> = {};
  for (const [name, members] of Object.entries(mapping(o.groups ?? {}, 'access.groups'))) {
    const list = strings(members, `access.groups.${name}`);
    list.forEach((u, j) => {
      if (!USER.test(u)) throw new ConfigError(`access.groups.${name}[${j}]`, `must be a user name, got ${JSON.stringify(u)}`);
    });
    groups[name] = list;
  }

  const byKey = new Map<string, UpstreamKeys>();
  for (const u of upstreams) for (const k of [u.name, ...u.aliases]) byKey.set(k, u);
  if (!Array.isArray(o.rules) || o.rules.length === 0) throw new ConfigError('access.rules', 'must list at least one rule (no matching rule: denied)');
  const rules = o.rules.map((r, i): AccessRule => {
    const path = `access.rules[${i}]`;
    const rule = mapping(r, path, RULE_KEYS);
    const names = strings(rule.upstreams, `${path}.upstreams`);
    const ups: string[] | '*' = names.includes('*')
      ? '*'
      : names.map((n, j) => {
          const u = byKey.get(n.toLowerCase());
          if (!u) throw new ConfigError(`${path}.upstreams[${j}]`, `${n} is not the name or alias of a configured upstream`);
          return u.name;
        });
    const repositories = strings(rule.repositories, `${path}.repositories`).map((g, j) => checkGlob(g, `${path}.repositories[${j}]`));
    const allow = strings(rule.allow, `${path}.allow`);
    allow.forEach((a, j) => {
      if (a.startsWith('group:')) {
        if (!Object.hasOwn(groups, a.slice(6))) throw new ConfigError(`${path}.allow[${j}]`, `${a}: no such group in access.groups`);
      } else if (!USER.test(a)) {
        throw new ConfigError(`${path}.allow[${j}]`, `must be a user name, group:<name>, anonymous or authenticated, got ${JSON.stringify(a)}`);
      }
    });
    const exposeCredentials = rule.exposeCredentials ?? false;
    if (typeof exposeCredentials !== 'boolean') throw new ConfigError(`${path}.exposeCredentials`, 'must be true or false');
    // An upstream's credentials serve whoever may read it: letting anyone at all do so must be said.
    if (allow.includes('anonymous') && !exposeCredentials) {
      const covered = ups === '*' ? upstreams : upstreams.filter((u) => ups.includes(u.name));
      const withAuth = covered.find((u) => u.auth !== undefined || u.credentials !== undefined);
      if (withAuth) {
        throw new ConfigError(path, `lets anonymous read ${withAuth.name}, whose auth credentials would then serve anyone: set exposeCredentials: true on this rule if that is intended`);
      }
    }
    return { upstreams: ups, repositories, allow, exposeCredentials };
  });

  return { htpasswd, clientCertificates, tokenKeyFile: optionalString(o, 'tokenKeyFile', 'access'), tokenTtl: ttl, realm, groups, rules };
}
