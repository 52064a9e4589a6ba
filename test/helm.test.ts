/**
 * The Helm chart, proven offline: `helm lint --strict` and `helm template` for the central and the
 * node-local shapes (helm built from its Go module by scripts/build-helm.sh), every rendered
 * document validated against the Kubernetes API schemas (kubernetes-models), the rendered config
 * accepted by ocicache's own config validation, and the Grafana dashboard's metrics checked
 * against what /metrics exposes.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { cpSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import test from 'node:test';
import { parse } from 'yaml';
import { buildConfig } from '../src/core/config.js';
import { buildApp } from '../src/http/app.js';
import { metricsText, startProxy } from './helpers/proxy.js';
import { readmeSnippet } from './helpers/readme.js';
import { startDistribution } from './helpers/distribution.js';
import { image, OCI_MANIFEST, Pusher } from './helpers/seed.js';
import { exec, need, tempDir } from './helpers/tools.js';
import { CHART, helm, helmBinary, render, type Doc } from './helpers/helm.js';

const FULL = `
credentials:
  passwords: {ghcr-password: s3cret}
admin:
  existingSecret: ocicache-admin
serviceMonitor: {enabled: true}
dashboard: {enabled: true}
config:
  server: {maxConnectionsPerAddress: 0, idleTimeout: 5m}
  cache: {notFoundTtl: 1m, fillMemory: 32MiB}
  storage: {maxBlobSize: 8GiB}
  upstreamDefaults: {maxRetryAfter: 2m}
  upstreams:
    - name: docker.io
      url: https://registry-1.docker.io
      dockerHubLibrary: true
    - name: ghcr.io
      url: https://ghcr.io
      auth: {username: bot, passwordSecretKey: ghcr-password}
      maxAge: 30d
      maxRetryAfter: 10s
`;

test('helm chart: lint --strict, template, Kubernetes schemas, rendered config, both shapes', async (t) => {
  if (!helmBinary(t)) return;
  const dir = tempDir(t, 'helm');
  const fullValues = join(dir, 'full.yaml');
  writeFileSync(fullValues, FULL);
  const cases = [
    { what: 'default values (central)', values: [] as string[], workload: 'StatefulSet' },
    { what: 'values-node.yaml (DaemonSet)', values: [join(CHART, 'values-node.yaml')], workload: 'DaemonSet' },
    { what: 'node mode with emptyDir and hostNetwork', values: [join(CHART, 'values-node.yaml')], set: ['node.cache.type=emptyDir', 'node.hostNetwork=true'], workload: 'DaemonSet' },
    { what: 'credentials, admin token, ServiceMonitor, dashboard', values: [fullValues], workload: 'StatefulSet' },
  ];
  for (const c of cases) {
    await t.test(c.what, async () => {
      const args = [...c.values.flatMap((v) => ['-f', v]), ...(c.set ?? []).flatMap((s) => ['--set', s])];
      const { docs, configText } = await render(args);
      const kinds = docs.map((d) => d.kind).sort();
      assert.ok(kinds.includes(c.workload) && kinds.includes('Service') && kinds.includes('ConfigMap') && kinds.includes('PodDisruptionBudget'), kinds.join(','));

      const workload = docs.find((d) => d.kind === c.workload)!;
      const pod = workload.spec.template.spec;
      const container = pod.containers[0];
      assert.equal(pod.securityContext.runAsNonRoot, true);
      assert.deepEqual(container.securityContext, { allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ['ALL'] } });
      assert.deepEqual([container.readinessProbe.httpGet.path, container.livenessProbe.httpGet.path], ['/readyz', '/healthz']);
      if (c.workload === 'StatefulSet') assert.equal(workload.spec.volumeClaimTemplates[0].metadata.name, 'cache');
      else {
        const cache = pod.volumes.find((v: { name: string }) => v.name === 'cache');
        assert.ok(c.set ? cache.emptyDir : cache.hostPath.path === '/var/cache/ocicache');
        if (!c.set) assert.equal(container.ports[0].hostPort, 5000);
        else assert.equal(pod.hostNetwork, true);
      }

      // The rendered config passes ocicache's own validation (secrets are files in the pod).
      const config = buildConfig(parse(configText), {}, { upstreamAuth: false, adminToken: false });
      assert.equal(config.storage.root, '/data');
      assert.equal(config.server.port, 5000);
      if (c.values[0] === fullValues) {
        const ghcr = parse(configText).upstreams[1];
        assert.deepEqual(ghcr.auth, { username: 'bot', passwordFile: '/etc/ocicache/secrets/ghcr-password' });
        assert.deepEqual(parse(configText).admin, { tokenFile: '/etc/ocicache/admin/token' });
        assert.deepEqual([config.cache.notFoundTtl, ...config.upstreams.map((u) => u.maxRetryAfter)], [60_000, 120_000, 10_000]);
        // Client limits pass through; where the server listens stays the chart's.
        assert.deepEqual([config.server.host, config.server.port, config.server.maxConnectionsPerAddress, config.server.idleTimeout], ['0.0.0.0', 5000, 0, 300_000]);
        assert.deepEqual([config.cache.fillMemory, config.storage.maxBlobSize], [32 * 1024 ** 2, 8 * 1024 ** 3]);
        assert.ok(kinds.includes('Secret') && kinds.includes('ServiceMonitor'));
        const dash = docs.find((d) => d.metadata.name === 'cache-ocicache-dashboard')!;
        assert.equal(JSON.parse(dash.data!['ocicache.json']!).uid, 'ocicache');
      }
    });
  }
});

test('helm chart: values.schema.json refuses bad values with a message that names them', async (t) => {
  if (!helmBinary(t)) return;
  for (const [set, message] of [
    ['mode=sideways', /mode.*(must be one of|value must be one of)/],
    ['config.storage.maxSize=lots', /maxSize/],
    ['node.cache.type=nfs', /type/],
    ['credentials.pullSecret=Not_A_Secret_Name', /pullSecret/],
    ['credentials.helpers[0].name=ecr-login,credentials.helpers[0].image=x', /helpers\/0/],
    ['config.credentials.dockerConfig=/root/.docker/config.json', /dockerConfig/],
    ['config.upstreams[0].name=a,config.upstreams[0].url=https://a.example,config.upstreams[0].auth.pullSecret=s,config.upstreams[0].auth.helper=h', /auth/],
    ['credentials.helpers[0].name=gcr,credentials.helpers[0].image=x,credentials.helpers[0].path=/h,credentials.helpers[1].name=gcr,credentials.helpers[1].image=y,credentials.helpers[1].path=/h', /credentials\.helpers: gcr is listed twice/],
    ['credentials.pullSecret=s,config.parent.url=http://parent:5000', /credentials\.pullSecret and credentials\.helpers are set, but config\.parent is too/],
  ] as const) {
    const out = await helm(['template', 'cache', CHART, '--set', set]);
    assert.notEqual(out.code, 0, set);
    assert.match(out.stderr, message, out.stderr);
  }
});

/** Access control: the README's Helm values, with a users line the real `htpasswd -nB` printed. */
async function accessValues(dir: string): Promise<string> {
  const line = (await exec('htpasswd', ['-nbB', 'alice', 'alice-pw'])).stdout.trim();
  const snippet = readmeSnippet('helm-access-values.yaml');
  assert.ok(snippet.includes("'alice:$2y$05$...'"), snippet);
  const file = join(dir, 'access.yaml');
  writeFileSync(file, snippet.replace("'alice:$2y$05$...'", `'${line}'`));
  return file;
}

test('helm chart: access control mounts the htpasswd and token key Secrets and points the config at them', async (t) => {
  if (!helmBinary(t) || !need(t, 'htpasswd', 'apt-get install apache2-utils')) return;
  const dir = tempDir(t, 'helm-access');
  const values = await accessValues(dir);
  for (const c of [
    { what: 'central, inline users', args: ['-f', values], workload: 'StatefulSet' },
    { what: 'node, existing htpasswd Secret', args: ['-f', join(CHART, 'values-node.yaml'), '-f', values, '--set', 'access.htpasswd.users=null', '--set', 'access.htpasswd.existingSecret=team-htpasswd', '--set', 'access.htpasswd.key=users'], workload: 'DaemonSet' },
  ]) {
    await t.test(c.what, async () => {
      const { docs, configText } = await render(c.args);
      const config = buildConfig(parse(configText), {}, { upstreamAuth: false, adminToken: false });
      const access = config.access!;
      assert.deepEqual([access.htpasswd, access.tokenKeyFile, access.realm, access.tokenTtl], ['/etc/ocicache/access/htpasswd', '/etc/ocicache/token-key/key', 'https://cache.example.internal/token', 300_000]);
      assert.deepEqual(access.groups, { ci: ['builder'] });
      assert.deepEqual(access.rules[1], { upstreams: ['ghcr.io'], repositories: ['myorg/**'], allow: ['group:ci', 'alice'], exposeCredentials: false });

      // The paths in the config are the files the pod mounts, read-only, from the right Secrets.
      const pod = docs.find((d) => d.kind === c.workload)!.spec.template.spec;
      const fileOf = (volume: string): { path: string; secret: string; key: string } => {
        const mount = pod.containers[0].volumeMounts.find((m: { name: string }) => m.name === volume);
        assert.equal(mount?.readOnly, true, `${volume} is mounted read-only`);
        assert.equal(mount.subPath, undefined, `${volume}: a whole-volume mount, so Secret edits reach the pod`);
        const { secret } = pod.volumes.find((v: { name: string }) => v.name === volume);
        return { path: `${mount.mountPath}/${secret.items[0].path}`, secret: secret.secretName, key: secret.items[0].key };
      };
      const inline = c.workload === 'StatefulSet';
      assert.deepEqual(fileOf('htpasswd'), { path: access.htpasswd, secret: inline ? 'cache-ocicache-htpasswd' : 'team-htpasswd', key: inline ? 'htpasswd' : 'users' });
      assert.deepEqual(fileOf('token-key'), { path: access.tokenKeyFile, secret: 'ocicache-token-key', key: 'token-key' });
      const htpasswdSecret = docs.find((d) => d.kind === 'Secret' && d.metadata.name === 'cache-ocicache-htpasswd') as (Doc & { stringData?: Record<string, string> }) | undefined;
      if (!inline) {
        assert.equal(htpasswdSecret, undefined, 'an existing Secret is not rendered');
        return;
      }
      // The Secret the chart rendered is an htpasswd file ocicache accepts: alice logs in with it.
      const htpasswdFile = join(dir, 'htpasswd');
      const keyFile = join(dir, 'token-key');
      writeFileSync(htpasswdFile, htpasswdSecret!.stringData!.htpasswd!);
      writeFileSync(keyFile, randomBytes(32));
      const local = buildConfig({ ...parse(configText), storage: { root: join(dir, 'data') }, server: { host: '127.0.0.1', port: 0 }, log: { level: 'silent' }, access: { ...parse(configText).access, htpasswd: htpasswdFile, tokenKeyFile: keyFile } }, {});
      const app = await buildApp(local, { logger: false });
      t.after(() => app.close());
      const basic = (pw: string): string => `Basic ${Buffer.from(`alice:${pw}`).toString('base64')}`;
      assert.equal((await app.inject({ url: '/token?service=ocicache', headers: { authorization: basic('alice-pw') } })).statusCode, 200);
      assert.equal((await app.inject({ url: '/token?service=ocicache', headers: { authorization: basic('wrong') } })).statusCode, 401);
    });
  }
});

test('helm chart: access values are refused when unsafe or inconsistent, with a message that names them', async (t) => {
  if (!helmBinary(t)) return;
  const rules = 'config.access={"rules":[{"upstreams":["*"],"repositories":["**"],"allow":["authenticated"]}]}';
  for (const [args, message] of [
    // A plain password where a bcrypt line belongs: refused by the schema.
    [['--set', 'access.htpasswd.users[0]=alice:alice-pw', '--set-json', rules], /\/access\/htpasswd\/users\/0.*does not match pattern/],
    // The chart sets the file paths itself.
    [['--set', 'access.htpasswd.existingSecret=x', '--set-json', 'config.access={"htpasswd":"/etc/htpasswd","rules":[{"upstreams":["*"],"repositories":["**"],"allow":["authenticated"]}]}'], /\/config\/access.*htpasswd.*not allowed/],
    [['--set', 'access.htpasswd.existingSecret=x', '--set-json', 'config.access={"realm":"cache:5000/token","rules":[{"upstreams":["*"],"repositories":["**"],"allow":["authenticated"]}]}'], /\/config\/access\/realm/],
    [['--set', 'access.htpasswd.existingSecret=x', '--set-json', 'config.access={"rules":[]}'], /\/config\/access\/rules.*minItems/],
    [['--set', 'access.htpasswd.existingSecret=x', '--set-json', 'config.access={"rules":[{"upstreams":["*"],"repositories":["**"]}]}'], /\/config\/access\/rules\/0.*allow/],
    // Rules without users, and users without rules (access control would silently be off).
    [['--set-json', rules], /config\.access is set but no users/],
    [['--set', 'access.htpasswd.existingSecret=x'], /config\.access is not: access control would be off/],
  ] as const) {
    const out = await helm(['template', 'cache', CHART, ...args]);
    assert.notEqual(out.code, 0, args.join(' '));
    assert.match(out.stderr, message, out.stderr);
  }
});

/** TLS: the README's Helm values (central), and a node variant with HTTPS probes and `insecure`. */
const TLS_NODE = `
tls: {clientCaSecret: ""}
config:
  server: {tls: {reloadInterval: 10s}}
  upstreams:
    - {name: docker.io, url: https://registry-1.docker.io, dockerHubLibrary: true}
    - {name: lab, url: https://lab.internal, insecure: true}
    - {name: registry.internal, url: https://registry.internal, clientCertSecret: {name: registry-internal-client}}
`;

test('helm chart: TLS mounts the certificate Secrets read-only, points the config at them and probes over HTTPS', async (t) => {
  if (!helmBinary(t)) return;
  const dir = tempDir(t, 'helm-tls');
  const values = join(dir, 'tls.yaml');
  writeFileSync(values, readmeSnippet('helm-tls-values.yaml'));
  const nodeValues = join(dir, 'tls-node.yaml');
  writeFileSync(nodeValues, TLS_NODE);
  for (const c of [
    { what: 'central, README values: HTTPS, client CA, upstream CA and client certificate', args: ['-f', values, '--set', 'serviceMonitor.enabled=true'], workload: 'StatefulSet' },
    { what: 'node, HTTPS without client CA, insecure upstream', args: ['-f', join(CHART, 'values-node.yaml'), '-f', values, '-f', nodeValues], workload: 'DaemonSet' },
  ]) {
    await t.test(c.what, async () => {
      const { docs, configText } = await render(c.args);
      const raw = parse(configText);
      // buildConfig names the server's files without reading them (http/tls.ts does, at start-up),
      // and reads the upstreams' files only when upstream credentials are needed.
      const config = buildConfig(raw, {}, { upstreamAuth: false, adminToken: false });
      const central = c.workload === 'StatefulSet';
      assert.deepEqual(config.server.tls, {
        certFile: '/etc/ocicache/tls/tls.crt',
        keyFile: '/etc/ocicache/tls/tls.key',
        clientCaFile: central ? '/etc/ocicache/client-ca/ca.crt' : undefined,
        clientCertificates: 'required',
        reloadInterval: central ? 5_000 : 10_000,
      });
      for (const u of raw.upstreams) assert.ok(!('caSecret' in u) && !('clientCertSecret' in u), `${u.name}: Secret references are stripped`);

      // Every file the config names is a key of the right Secret, mounted read-only as a whole volume.
      const pod = docs.find((d) => d.kind === c.workload)!.spec.template.spec;
      const container = pod.containers[0];
      const secretOf = (file: string): { secret: string; key: string } => {
        const mount = container.volumeMounts.find((m: { mountPath: string }) => file.startsWith(`${m.mountPath}/`));
        assert.ok(mount, `${file} is mounted`);
        assert.equal(mount.readOnly, true, `${mount.name} is mounted read-only`);
        assert.equal(mount.subPath, undefined, `${mount.name}: a whole-volume mount, so a renewed certificate reaches the pod`);
        const { secret } = pod.volumes.find((v: { name: string }) => v.name === mount.name);
        const item = secret.items.find((i: { path: string }) => `${mount.mountPath}/${i.path}` === file);
        assert.ok(item, `${file} is an item of ${secret.secretName}`);
        return { secret: secret.secretName, key: item.key };
      };
      assert.deepEqual(secretOf(config.server.tls!.certFile), { secret: 'ocicache-tls', key: 'tls.crt' });
      assert.deepEqual(secretOf(config.server.tls!.keyFile), { secret: 'ocicache-tls', key: 'tls.key' });
      const upstream = (name: string): Record<string, unknown> => raw.upstreams.find((u: { name: string }) => u.name === name);
      const internal = upstream('registry.internal');
      assert.deepEqual(secretOf(internal.clientCertFile as string), { secret: 'registry-internal-client', key: 'tls.crt' });
      assert.deepEqual(secretOf(internal.clientKeyFile as string), { secret: 'registry-internal-client', key: 'tls.key' });
      const probes = [container.readinessProbe, container.livenessProbe];
      if (central) {
        assert.deepEqual(secretOf(config.server.tls!.clientCaFile!), { secret: 'ocicache-tls', key: 'ca.crt' });
        assert.deepEqual(secretOf(internal.caFile as string), { secret: 'registry-internal-ca', key: 'ca.crt' });
        assert.equal(config.upstreams.find((u) => u.name === 'registry.internal')!.tls?.insecure, false);
        // Client certificates required: the kubelet has none, so the probes check the port only.
        for (const p of probes) assert.deepEqual([p.tcpSocket, p.httpGet], [{ port: 'http' }, undefined]);
        const monitor = docs.find((d) => d.kind === 'ServiceMonitor')!;
        assert.equal(monitor.spec.endpoints[0].scheme, 'https');
      } else {
        assert.equal(internal.caFile, undefined);
        assert.deepEqual(upstream('lab'), { name: 'lab', url: 'https://lab.internal', insecure: true });
        assert.equal(config.upstreams.find((u) => u.name === 'lab')!.tls?.insecure, true);
        assert.ok(!pod.volumes.some((v: { name: string }) => v.name === 'client-ca'));
        assert.deepEqual(probes.map((p) => [p.httpGet.path, p.httpGet.scheme]), [['/readyz', 'HTTPS'], ['/healthz', 'HTTPS']]);
      }
    });
  }
});

test('helm chart: client certificates as users, without htpasswd: no htpasswd mount, and HTTPS probes when certificates are optional', async (t) => {
  if (!helmBinary(t)) return;
  const access = 'config.access={"clientCertificates":true,"groups":{"nodes":["node-a"]},"rules":[{"upstreams":["*"],"repositories":["**"],"allow":["group:nodes"]}]}';
  for (const [clientCertificates, probe] of [
    ['optional', { httpGet: { path: '/readyz', port: 'http', scheme: 'HTTPS' } }],
    ['required', { tcpSocket: { port: 'http' } }],
  ] as const) {
    const { docs, configText } = await render(['--set', 'tls.existingSecret=ocicache-tls', '--set', 'tls.clientCaSecret=nodes-ca', '--set', `config.server.tls.clientCertificates=${clientCertificates}`, '--set-json', access]);
    const config = buildConfig(parse(configText), {}, { upstreamAuth: false, adminToken: false });
    assert.deepEqual([config.access?.htpasswd, config.access?.clientCertificates, config.server.tls?.clientCaFile, config.server.tls?.clientCertificates], [undefined, true, '/etc/ocicache/client-ca/ca.crt', clientCertificates]);
    // The certificate is checked where TLS ends: a single process (the chart's default workers is auto here).
    assert.equal(parse(configText).server.workers, 'auto');
    assert.equal(config.server.workers, 1);
    const pod = docs.find((d) => d.kind === 'StatefulSet')!.spec.template.spec;
    assert.ok(!pod.volumes.some((v: { name: string }) => v.name === 'htpasswd'), 'no htpasswd volume');
    assert.ok(!docs.some((d) => d.kind === 'Secret' && d.metadata.name.endsWith('-htpasswd')), 'no htpasswd Secret');
    const { initialDelaySeconds: _d, periodSeconds: _p, failureThreshold: _f, timeoutSeconds: _t, ...readiness } = pod.containers[0].readinessProbe;
    assert.deepEqual(readiness, probe, clientCertificates);
  }
});

test('helm chart: server.workers is 2 unless set (auto would be every core of a node without a CPU limit), and as set when set', async (t) => {
  if (!helmBinary(t)) return;
  for (const c of [
    { set: [] as string[], rendered: 2 },
    { set: ['resources.limits.cpu=8'], rendered: 2 },
    { set: ['resources.limits.cpu=4', 'resources.limits.memory=1Gi', 'config.server.workers=auto'], rendered: 'auto' },
    { set: ['config.server.workers=1'], rendered: 1 },
  ]) {
    const { configText } = await render(c.set.flatMap((s) => ['--set', s]));
    assert.equal(parse(configText).server.workers, c.rendered, c.set.join(' '));
    buildConfig(parse(configText), {}, { upstreamAuth: false, adminToken: false });
  }
});

test('helm chart: TLS values are refused when set by hand or inconsistent, with a message that names them', async (t) => {
  if (!helmBinary(t)) return;
  const ups = (u: string): string[] => ['--set-json', `config.upstreams=[${u}]`, '--set', 'config.defaultUpstream=null'];
  for (const [args, message] of [
    // The chart sets the file paths itself.
    [['--set', 'tls.existingSecret=x', '--set', 'config.server.tls.certFile=/etc/tls.crt'], /\/config\/server\/tls.*certFile.*not allowed/],
    [['--set', 'tls.existingSecret=x', '--set', 'config.server.tls.clientCaFile=/etc/ca.crt'], /\/config\/server\/tls.*clientCaFile.*not allowed/],
    [ups('{"name":"r","url":"https://r","caFile":"/etc/ca.crt"}'), /\/config\/upstreams\/0.*caFile.*not allowed/],
    [ups('{"name":"r","url":"https://r","clientKeyFile":"/etc/tls.key"}'), /\/config\/upstreams\/0.*clientKeyFile.*not allowed/],
    // Secret references must name their Secret; TLS settings need an https upstream.
    [ups('{"name":"r","url":"https://r","caSecret":{"key":"ca.crt"}}'), /\/config\/upstreams\/0\/caSecret.*missing property 'name'/],
    [ups('{"name":"r","url":"https://r","clientCertSecret":{}}'), /\/config\/upstreams\/0\/clientCertSecret.*missing property 'name'/],
    [ups('{"name":"r","url":"http://r","caSecret":{"name":"ca"}}'), /\/config\/upstreams\/0\/url.*\^https:\/\//],
    [ups('{"name":"r","url":"https://r","insecure":"yes"}'), /\/config\/upstreams\/0\/insecure/],
    [['--set', 'tls.existingSecret=My_Cert'], /\/tls\/existingSecret/],
    // TLS settings without the certificate (HTTPS would silently be off).
    [['--set', 'tls.clientCaSecret=clients-ca'], /tls\.clientCaSecret is set but tls\.existingSecret is not/],
    [['--set', 'config.server.tls.reloadInterval=10s'], /config\.server\.tls is set but tls\.existingSecret is not/],
    [['--set', 'tls.existingSecret=x', '--set', 'config.server.tls.clientCertificates=maybe'], /\/config\/server\/tls\/clientCertificates/],
    // Certificates as users need a client CA.
    [['--set', 'tls.existingSecret=x', '--set-json', 'config.access={"clientCertificates":true,"rules":[{"upstreams":["*"],"repositories":["**"],"allow":["alice"]}]}'], /config\.access\.clientCertificates is set but tls\.clientCaSecret is not/],
  ] as const) {
    const out = await helm(['template', 'cache', CHART, ...args]);
    assert.notEqual(out.code, 0, args.join(' '));
    assert.match(out.stderr, message, out.stderr);
  }
});

test('helm chart: NOTES print the containerd hosts.toml for the chosen shape', async (t) => {
  if (!helmBinary(t)) return;
  // helm renders NOTES.txt only on install, and helm 3.22's `install --dry-run=client` still asks
  // a cluster for its API. So render the same text with the same engine, as a document of a copy.
  const copy = join(tempDir(t, 'helm-notes'), 'ocicache');
  cpSync(CHART, copy, { recursive: true });
  const notes = readFileSync(join(copy, 'templates', 'NOTES.txt'), 'utf8');
  writeFileSync(
    join(copy, 'templates', 'zz-notes.yaml'),
    `{{- define "zz.notes" -}}\n${notes}\n{{- end -}}\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  NOTES.txt: {{ include "zz.notes" . | toJson }}\n`,
  );
  const render = async (args: string[]): Promise<string> => {
    const out = await helm(['template', 'cache', copy, '--namespace', 'registry', '--show-only', 'templates/zz-notes.yaml', ...args]);
    assert.equal(out.code, 0, out.stderr);
    return (parse(out.stdout) as Doc).data!['NOTES.txt']!;
  };
  assert.match(await render([]), /\[host\."http:\/\/cache-ocicache\.registry\.svc\.cluster\.local:5000"\]\n\s+capabilities = \["pull", "resolve"\]/);
  assert.match(await render(['-f', join(CHART, 'values-node.yaml')]), /\[host\."http:\/\/127\.0\.0\.1:5000"\]\n\s+capabilities = \["pull", "resolve"\]/);
  assert.doesNotMatch(await render([]), /Access control/);
  const access = await render(['-f', join(CHART, 'values-node.yaml'), '--set', 'access.htpasswd.existingSecret=team-htpasswd', '--set-json', 'config.access={"rules":[{"upstreams":["*"],"repositories":["**"],"allow":["authenticated"]}]}']);
  assert.match(access, /Access control is on[\s\S]*Secret\s+team-htpasswd/);
  assert.match(access, /\[host\."http:\/\/127\.0\.0\.1:5000"\.header\]\n\s+Authorization = "Basic <base64 of user:password>"/);
  assert.match(access, /podman login --tls-verify=false 127\.0\.0\.1:5000/);
  assert.match(access, /No access\.tokenKey/);
  // With TLS: https endpoints, podman without --tls-verify=false, no advice to add a proxy.
  const tls = await render(['-f', join(CHART, 'values-node.yaml'), '--set', 'tls.existingSecret=ocicache-tls', '--set', 'access.htpasswd.existingSecret=team-htpasswd', '--set-json', 'config.access={"rules":[{"upstreams":["*"],"repositories":["**"],"allow":["authenticated"]}]}']);
  assert.match(tls, /\[host\."https:\/\/127\.0\.0\.1:5000"\]\n\s+capabilities = \["pull", "resolve"\]/);
  assert.match(tls, /podman login 127\.0\.0\.1:5000/);
  assert.doesNotMatch(tls, /http:\/\/|tls-verify=false|in the clear/);
  assert.match(await render(['--set', 'tls.existingSecret=ocicache-tls', '--set', 'tls.clientCaSecret=clients-ca']), /\[host\."https:\/\/cache-ocicache\.registry\.svc\.cluster\.local:5000"\][\s\S]*client = \[\[/);
});

test('the Grafana dashboard only queries metrics that ocicache exposes', async (t) => {
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:9' }] });
  const text = await metricsText(proxy);
  const exposed = new Set([...text.matchAll(/^# HELP (\w+)/gm)].map((m) => m[1]!));
  const dashboard = readFileSync(join(CHART, 'dashboards', 'ocicache.json'), 'utf8');
  const used = new Set([...dashboard.matchAll(/\b(ocicache_\w+)/g)].map((m) => m[1]!.replace(/_(bucket|sum|count)$/, '')));
  assert.ok(used.size >= 10);
  for (const name of used) assert.ok(exposed.has(name), `${name} is not in /metrics`);
});

test('helm chart: fleet mode renders replicas behind an HAProxy balancer whose config `ocicache haproxy` makes at pod start', async (t) => {
  if (!helmBinary(t)) return;
  const haproxyBin = need(t, 'haproxy', 'apt-get install haproxy');
  if (!haproxyBin) return;
  const { docs, configText } = await render(['--set', 'fleet.enabled=true', '--set', 'replicaCount=3']);
  const sts = docs.find((d) => d.kind === 'StatefulSet')!;
  const balancer = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'cache-ocicache-balancer')!;
  const services = Object.fromEntries(docs.filter((d) => d.kind === 'Service').map((d) => [d.metadata.name, d.spec]));
  // Clients reach the balancer; the replicas have stable names under a headless Service.
  assert.equal(services['cache-ocicache']!.selector['app.kubernetes.io/component'], 'balancer');
  assert.deepEqual([services['cache-ocicache-replicas']!.clusterIP, services['cache-ocicache-replicas']!.selector['app.kubernetes.io/component']], ['None', 'cache']);
  assert.deepEqual([sts.spec.replicas, sts.spec.serviceName, sts.spec.template.metadata.labels['app.kubernetes.io/component']], [3, 'cache-ocicache-replicas', 'cache']);
  assert.deepEqual(sts.spec.template.spec.containers[0].env, [{ name: 'OCICACHE_REPLICA', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } }]);
  assert.equal(balancer.spec.replicas, 2);
  assert.equal(balancer.spec.template.spec.containers[0].image, 'haproxy:3.0');

  // The init container's arguments, run by the real CLI against the rendered config: HAProxy accepts the result.
  const init = balancer.spec.template.spec.initContainers[0];
  const args: string[] = init.args;
  assert.deepEqual(args.filter((a, i) => args[i - 1] === '--replica'), [0, 1, 2].map((i) => `cache-ocicache-${i}=cache-ocicache-${i}.cache-ocicache-replicas.registry.svc.cluster.local:5000`));
  const dir = tempDir(t, 'helm-fleet');
  writeFileSync(join(dir, 'config.yaml'), configText);
  const out = join(dir, 'haproxy.cfg');
  const local = args.map((a) => (a === '/etc/ocicache/config.yaml' ? join(dir, 'config.yaml') : a === '/etc/haproxy/haproxy.cfg' ? out : a));
  const { runCli } = await import('./helpers/cli.js');
  const made = await runCli(local);
  assert.equal(made.code, 0, made.stderr);
  const check = await exec(haproxyBin, ['-c', '-f', out]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.match(readFileSync(out, 'utf8'), /^ {2}server cache-ocicache-2 cache-ocicache-2\.cache-ocicache-replicas\.registry\.svc\.cluster\.local:5000$/m);

  // What the chart cannot do, it refuses, naming it.
  for (const [set, message] of [
    [['--set', 'fleet.enabled=true', '--set', 'mode=node'], /fleet\.enabled needs mode: central/],
    [['--set', 'fleet.enabled=true', '--set', 'tls.existingSecret=x'], /fleet\.enabled with tls\.existingSecret/],
  ] as const) {
    const r = await helm(['template', 'cache', CHART, ...set]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, message);
  }
});

test('helm chart: a node tier chained to the fleet (node mode with config.parent) and a keep list render configs ocicache accepts', async (t) => {
  if (!helmBinary(t)) return;
  const parent = 'config.parent={"url":"http://ocicache.registry.svc.cluster.local:5000","fallback":false}';
  const { docs, configText } = await render(['-f', join(CHART, 'values-node.yaml'), '--set-json', parent]);
  assert.ok(docs.some((d) => d.kind === 'DaemonSet'));
  const config = buildConfig(parse(configText), {}, { upstreamAuth: false, adminToken: false });
  assert.equal(config.parent?.url.href, 'http://ocicache.registry.svc.cluster.local:5000/');
  assert.ok(config.upstreams.every((u) => u.viaParent && u.url.href === config.parent!.url.href), 'every upstream goes through the parent');
  // The keep list passes through to the config.
  const withKeep = await render(['--set-json', 'config.keep={"images":["registry.k8s.io/pause:3.*"],"platforms":["linux/amd64"],"refresh":"12h","withReferrers":true}']);
  assert.deepEqual(buildConfig(parse(withKeep.configText), {}, { upstreamAuth: false, adminToken: false }).keep, { images: ['registry.k8s.io/pause:3.*'], platforms: ['linux/amd64'], refresh: 12 * 3_600_000, withReferrers: true });
  // The balancer pod runs HAProxy under the official image's numeric uid, so runAsNonRoot can be checked.
  const fleet = await render(['--set', 'fleet.enabled=true', '--set', 'replicaCount=3']);
  const balancer = fleet.docs.find((d) => d.kind === 'Deployment')!.spec.template.spec;
  assert.deepEqual([balancer.securityContext.runAsNonRoot, balancer.containers[0].securityContext.runAsUser], [true, 99]);
});

test('helm chart: pull secrets and credential helpers, mounted and put on the PATH as the rendered pod says, pull from a registry with Basic auth', async (t) => {
  if (!helmBinary(t)) return;
  const registry = await startDistribution(t, { basic: { username: 'puller', password: 'pull-pw' } });
  if (!registry) return;
  await new Pusher({ url: registry.url, basic: { username: 'puller', password: 'pull-pw' } }).pushImage('team/app', 'v1', image({ 'app.txt': Buffer.from('private\n') }));
  const dir = tempDir(t, 'helm-credentials');
  const values = join(dir, 'values.yaml');
  // Three names for the one registry, each with its own way to the password.
  writeFileSync(
    values,
    `
credentials:
  pullSecret: registry-pull-secret
  helpers:
    - {name: ocitest, image: registry.example/tools/ocitest:1, path: ${dir}/image/docker-credential-ocitest}
serviceAccount:
  create: true
  annotations: {eks.amazonaws.com/role-arn: "arn:aws:iam::123456789012:role/ocicache-pull"}
extraEnv:
  - {name: AWS_REGION, value: eu-west-1}
config:
  credentials: {ttl: 5m}
  defaultUpstream: everyone.example
  upstreams:
    - {name: everyone.example, url: ${registry.url}}
    - {name: own-secret.example, url: ${registry.url}, auth: {pullSecret: team-pull-secret}}
    - {name: helper.example, url: ${registry.url}, auth: {helper: ocitest}}
`,
  );
  const { docs, configText } = await render(['-f', values]);
  const pod = docs.find((d) => d.kind === 'StatefulSet')!.spec.template.spec;
  const sa = docs.find((d) => d.kind === 'ServiceAccount')!;
  assert.equal(pod.serviceAccountName, sa.metadata.name);
  assert.deepEqual((sa as Doc & { metadata: { annotations: Record<string, string> } }).metadata.annotations, { 'eks.amazonaws.com/role-arn': 'arn:aws:iam::123456789012:role/ocicache-pull' });
  const container = pod.containers[0];
  const env = Object.fromEntries(container.env.map((e: { name: string; value: string }) => [e.name, e.value]));
  assert.equal(env.AWS_REGION, 'eu-west-1');
  // Each pull secret mounted whole (a rotated secret reaches the pod), read-only, where the config looks.
  const mountOf = (secret: string): string => {
    const volume = pod.volumes.find((v: { secret?: { secretName: string } }) => v.secret?.secretName === secret);
    assert.deepEqual(volume.secret.items, [{ key: '.dockerconfigjson', path: '.dockerconfigjson' }], secret);
    const mount = container.volumeMounts.find((m: { name: string }) => m.name === volume.name);
    assert.deepEqual([mount.readOnly, mount.subPath], [true, undefined], secret);
    return `${mount.mountPath}/.dockerconfigjson`;
  };
  const rendered = parse(configText);
  assert.equal(rendered.credentials.dockerConfig, mountOf('registry-pull-secret'));
  assert.equal(rendered.upstreams[1].auth.dockerConfig, mountOf('team-pull-secret'));

  // The pod, played here: the Secrets' files where the mounts put them, the init container's
  // command run as rendered, the PATH as rendered, the config as rendered; then pull through each.
  const local = (path: string): string => path.replace(/^\/etc\/ocicache\//, `${dir}/etc/`).replace(/^\/helpers\b/, `${dir}/helpers`).replace(/^\/opt\/ocicache\/helpers\b/, `${dir}/helpers`);
  const dockerConfig = JSON.stringify({ auths: { [registry.host]: { auth: Buffer.from('puller:pull-pw').toString('base64') } } });
  for (const file of [rendered.credentials.dockerConfig, rendered.upstreams[1].auth.dockerConfig]) {
    mkdirSync(dirname(local(file)), { recursive: true });
    writeFileSync(local(file), dockerConfig);
  }
  mkdirSync(join(dir, 'image'));
  mkdirSync(join(dir, 'helpers'));
  writeFileSync(join(dir, 'image', 'docker-credential-ocitest'), '#!/bin/sh\nread server\necho \'{"ServerURL":"\'"$server"\'","Username":"puller","Secret":"pull-pw"}\'\n', { mode: 0o755 });
  const [init] = pod.initContainers;
  assert.deepEqual(init.volumeMounts, [{ name: 'helpers', mountPath: '/helpers' }]);
  const copied = await exec(init.command[0], init.command.slice(1).map(local));
  assert.equal(copied.code, 0, copied.stderr);
  assert.ok(container.volumeMounts.some((m: { name: string; mountPath: string }) => m.name === 'helpers' && env.PATH.split(':')[0] === m.mountPath));
  const path = process.env.PATH;
  process.env.PATH = env.PATH.split(':').map(local).join(':');
  t.after(() => void (process.env.PATH = path));
  const config = buildConfig(
    {
      ...rendered,
      storage: { root: join(dir, 'data') },
      server: { host: '127.0.0.1', port: 0 },
      log: { level: 'silent' },
      credentials: { ...rendered.credentials, dockerConfig: local(rendered.credentials.dockerConfig) },
      upstreams: rendered.upstreams.map((u: { auth?: { dockerConfig?: string } }) => (u.auth?.dockerConfig ? { ...u, auth: { dockerConfig: local(u.auth.dockerConfig) } } : u)),
    },
    {},
  );
  const app = await buildApp(config, { logger: false });
  t.after(() => app.close());
  for (const ns of ['everyone.example', 'own-secret.example', 'helper.example']) {
    const res = await app.inject({ url: `/v2/team/app/manifests/v1?ns=${ns}`, headers: { accept: OCI_MANIFEST } });
    assert.equal(res.statusCode, 200, `${ns}: ${res.body}`);
  }
});
