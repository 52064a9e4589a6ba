/**
 * Access control's tables: repository globs ('*' one path component, '**' any number), the
 * `access` config section's errors (each names the bad key), htpasswd parsing and the rules'
 * decisions. The end-to-end flows are in access.test.ts.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import bcrypt from 'bcryptjs';
import { Access, NO_CREDENTIALS } from '../src/access/access.js';
import { compileGlob } from '../src/access/glob.js';
import { Htpasswd, parseHtpasswd } from '../src/access/htpasswd.js';
import { buildConfig, ConfigError } from '../src/core/config.js';
import { Metrics } from '../src/telemetry/metrics.js';
import { tempDir } from './helpers/tools.js';

// Written by `htpasswd -Bbn alice alice-pw`.
const ALICE = 'alice:$2y$05$mV8cEv1mUbVq.WEufF//xOUkH3.qbju0nTmURgUFze.QKxQY4KHJS';

test('repository globs: * is one path component, ** any number', () => {
  const cases: Array<[string, string, boolean]> = [
    ['library/*', 'library/alpine', true],
    ['library/*', 'library/a/b', false],
    ['library/*', 'alpine', false],
    ['myorg/**', 'myorg/app', true],
    ['myorg/**', 'myorg/team/app', true],
    ['myorg/**', 'myorg', false],
    ['myorg/**', 'myorgx/app', false],
    ['a/**/b', 'a/b', true],
    ['a/**/b', 'a/x/y/b', true],
    ['a/**/b', 'a/x/c', false],
    ['**/app', 'app', true],
    ['**/app', 'x/y/app', true],
    ['**', 'anything/at/all', true],
    ['team-*', 'team-a', true],
    ['team-*', 'team-a/b', false],
    ['*/app', 'x/app', true],
    ['*/app', 'x/y/app', false],
    ['a.b', 'axb', false],
  ];
  for (const [glob, name, want] of cases) assert.equal(compileGlob(glob).test(name), want, `${glob} ~ ${name}`);
});

test('config: the access section, errors name the bad key', () => {
  const upstreams = [{ name: 'docker.io', url: 'https://r' }, { name: 'ghcr.io', url: 'https://g', aliases: ['g.io'], auth: { username: 'u', passwordEnv: 'PW' } }];
  const ok = { htpasswd: '/x', rules: [{ upstreams: ['*'], repositories: ['**'], allow: ['authenticated'] }] };
  const rule = (r: Record<string, unknown>): Record<string, unknown> => ({ ...ok, rules: [{ ...ok.rules[0], ...r }] });
  const cases: Array<[Record<string, unknown>, string]> = [
    [{ ...ok, htpassword: '/x' }, 'config: access.htpassword: unknown key (known: htpasswd, clientCertificates, tokenKeyFile, tokenTtl, realm, groups, rules)'],
    [{ rules: ok.rules }, 'config: access.htpasswd: is required (unless clientCertificates: true): the path of an htpasswd file with bcrypt entries (htpasswd -B)'],
    [{ ...ok, rules: [] }, 'config: access.rules: must list at least one rule (no matching rule: denied)'],
    [{ ...ok, tokenTtl: 'soon' }, 'config: access.tokenTtl: expected a duration of at least 1s such as 5m, got "soon"'],
    [{ ...ok, realm: 'cache.example.com/token' }, 'config: access.realm: must be an absolute http(s) URL, got "cache.example.com/token"'],
    [{ ...ok, groups: { ci: 'bob' } }, 'config: access.groups.ci: must be a non-empty list of strings'],
    [rule({ upstream: ['*'] }), 'config: access.rules[0].upstream: unknown key (known: upstreams, repositories, allow, exposeCredentials)'],
    [rule({ upstreams: ['quay.io'] }), 'config: access.rules[0].upstreams[0]: quay.io is not the name or alias of a configured upstream'],
    [rule({ repositories: ['lib***'] }), 'config: access.rules[0].repositories[0]: must be a repository glob such as library/*, myorg/** or **, got "lib***"'],
    [rule({ repositories: ['Library/*'] }), 'config: access.rules[0].repositories[0]: must be a repository glob such as library/*, myorg/** or **, got "Library/*"'],
    [rule({ repositories: ['a/**/**'] }), 'config: access.rules[0].repositories[0]: must be a repository glob such as library/*, myorg/** or **, got "a/**/**"'],
    [rule({ repositories: [] }), 'config: access.rules[0].repositories: must be a non-empty list of strings'],
    [rule({ allow: ['group:ci'] }), 'config: access.rules[0].allow[0]: group:ci: no such group in access.groups'],
    [rule({ allow: ['two words'] }), 'config: access.rules[0].allow[0]: must be a user name, group:<name>, anonymous or authenticated, got "two words"'],
    [rule({ exposeCredentials: 'yes' }), 'config: access.rules[0].exposeCredentials: must be true or false'],
    [rule({ allow: ['anonymous'] }), 'config: access.rules[0]: lets anonymous read ghcr.io, whose auth credentials would then serve anyone: set exposeCredentials: true on this rule if that is intended'],
    [rule({ upstreams: ['g.io'], allow: ['anonymous'] }), 'config: access.rules[0]: lets anonymous read ghcr.io, whose auth credentials would then serve anyone: set exposeCredentials: true on this rule if that is intended'],
  ];
  for (const [access, message] of cases) {
    assert.throws(() => buildConfig({ upstreams, access }, { PW: 'pw' }), (e: unknown) => e instanceof ConfigError && e.message === message, message);
  }
  // Said explicitly, or limited to upstreams without credentials: accepted.
  buildConfig({ upstreams, access: rule({ allow: ['anonymous'], exposeCredentials: true }) }, { PW: 'pw' });
  const c = buildConfig({ upstreams, access: rule({ upstreams: ['docker.io'], allow: ['anonymous'] }) }, { PW: 'pw' });
  assert.deepEqual(c.access?.rules[0]?.upstreams, ['docker.io']);
  assert.equal(c.access?.tokenTtl, 300_000);
  // Absent: off.
  assert.equal(buildConfig({ upstreams }, { PW: 'pw' }).access, undefined);
});

test('htpasswd: bcrypt entries, comments and blank lines; anything else is refused', () => {
  assert.deepEqual([...parseHtpasswd(`# users\n\n${ALICE}\n`).keys()], ['alice']);
  assert.throws(() => parseHtpasswd('bob:{SHA}fEqNCco3Yq9h5ZUglD3CZJT4lBs='), /not bcrypt/);
  // A cost bcrypt refuses would fail every request of that user: refused when the file is read.
  assert.throws(() => parseHtpasswd(ALICE.replace(/\$\d\d\$/, '$03$')), /not bcrypt/);
  assert.throws(() => parseHtpasswd(ALICE.replace(/\$\d\d\$/, '$99$')), /not bcrypt/);
  assert.throws(() => parseHtpasswd('no colon here'), /expected user:hash/);
});

test('rules: first match wins, no match is denied, groups expand, memoised decisions', async (t) => {
  const dir = tempDir(t, 'access-units');
  const file = join(dir, 'htpasswd');
  writeFileSync(file, `${ALICE}\n`);
  const config = buildConfig({
    upstreams: [{ name: 'docker.io', url: 'https://r' }, { name: 'quay.io', url: 'https://q' }],
    access: {
      htpasswd: file,
      groups: { ops: ['bob', 'alice'] },
      rules: [
        { upstreams: ['quay.io'], repositories: ['**'], allow: ['group:ops'] },
        { upstreams: ['*'], repositories: ['public/*'], allow: ['anonymous'] },
        { upstreams: ['docker.io'], repositories: ['public/**', 'team/*'], allow: ['carol'] },
        { upstreams: ['*'], repositories: ['shared/**'], allow: ['authenticated'] },
      ],
    },
  }, {});
  const access = new Access(config.access!, new Metrics(), () => {});
  const who = (user?: string): { user: string | undefined; presented: boolean } => ({ user, presented: user !== undefined });
  const cases: Array<[string | undefined, string, string, boolean]> = [
    ['bob', 'quay.io', 'public/x', true],
    [undefined, 'quay.io', 'public/x', false], // the first rule matched: anonymous is not in it
    [undefined, 'docker.io', 'public/x', true],
    ['carol', 'docker.io', 'public/x/y', true],
    ['carol', 'docker.io', 'team/a', true],
    ['carol', 'docker.io', 'team/a/b', false], // no rule matches
    ['dave', 'docker.io', 'shared/a/b', true],
    [undefined, 'docker.io', 'shared/a', false],
    ['alice', 'docker.io', 'other', false],
  ];
  for (const [user, upstream, name, want] of cases) {
    assert.equal(access.allowed(who(user), upstream, name), want, `${user} ${upstream} ${name}`);
    assert.equal(access.allowed(who(user), upstream, name), want, `${user} ${upstream} ${name} (memoised)`);
  }
  assert.equal(access.identifySync(undefined), NO_CREDENTIALS);
  assert.equal(access.identifySync('Digest x'), null);
  const alice = `Basic ${Buffer.from('alice:alice-pw').toString('base64')}`;
  assert.equal(access.identifySync(alice), undefined, 'not verified yet: only asynchronously');
  assert.deepEqual(await access.identify(alice), { user: 'alice', presented: true });
  assert.deepEqual(access.identifySync(alice), { user: 'alice', presented: true }, 'remembered');
  assert.equal(await access.identify(`Basic ${Buffer.from('alice:wrong').toString('base64')}`), null);
  assert.equal(await access.identify(`Basic ${Buffer.from('nobody:x').toString('base64')}`), null);
});

test('htpasswd: failed checks cannot pile up: at most four bcrypt comparisons at once, failures remembered', async (t) => {
  const file = join(tempDir(t, 'htpasswd'), 'htpasswd');
  writeFileSync(file, `${ALICE}\n`);
  const users = new Htpasswd(file, () => undefined);
  const guesses = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => users.verify(i % 2 ? 'alice' : `nobody${i}`, `guess${i}`)));
  assert.deepEqual(guesses.map((g) => g.status), ['fulfilled', 'fulfilled', 'fulfilled', 'fulfilled', 'rejected', 'rejected']);
  for (const g of guesses.slice(4)) assert.equal((g as PromiseRejectedResult).reason.code, 'TOOMANYREQUESTS');
  const compare = t.mock.method(bcrypt, 'compare');
  assert.equal(await users.verify('alice', 'guess1'), false);
  assert.equal(compare.mock.callCount(), 0, 'a remembered failure costs no bcrypt');
});
