/**
 * The README's "Private and cloud registries", run as far as it can be here: each cloud's Helm
 * values rendered and linted, then the pod played locally (the mounted pull secret in the form
 * `kubectl create secret docker-registry` makes, the init container's copy of a helper, the PATH
 * and the config the chart renders) and a pull through ocicache from a real registry. Registry
 * names such as harbor.example.com resolve to loopback through the proxy's DNS lookup. Amazon's
 * docker-credential-ecr-login is the real helper, built from its Go module; the ECR API it calls
 * is a stand-in on loopback (no cloud is reachable), answering GetAuthorizationToken.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import test, { type TestContext } from 'node:test';
import { parse } from 'yaml';
import { startDistribution } from './helpers/distribution.js';
import { helmBinary, render } from './helpers/helm.js';
import { fakeLookup } from './helpers/hosts.js';
import { fetchBody, startProxy } from './helpers/proxy.js';
import { readmeSnippet } from './helpers/readme.js';
import { image, OCI_MANIFEST, Pusher } from './helpers/seed.js';
import { startTokenIssuer } from './helpers/token-issuer.js';
import { exec, tempDir } from './helpers/tools.js';

const ECR_HELPER = resolve('.tools/docker-credential-ecr-login');

type Upstream = { name: string; url: string; auth?: { dockerConfig?: string; helper?: string }; caFile?: string; [k: string]: unknown };

/** The README's values for one cloud, rendered by the chart: the pod spec and the config it mounts. */
async function renderSnippet(t: TestContext, snippet: string): Promise<{ pod: any; config: { upstreams: Upstream[]; credentials?: { dockerConfig?: string } } }> {
  const file = join(tempDir(t, 'values'), 'values.yaml');
  writeFileSync(file, readmeSnippet(snippet));
  const { docs, configText } = await render(['-f', file]);
  return { pod: docs.find((d) => d.kind === 'StatefulSet')!.spec.template.spec, config: parse(configText) };
}

/** A file in the form `kubectl create secret docker-registry` gives the .dockerconfigjson key. */
function pullSecret(path: string, server: string, username: string, password: string): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, JSON.stringify({ auths: { [server]: { username, password, auth: Buffer.from(`${username}:${password}`).toString('base64') } } }));
}

test('Artifact Registry, ACR and Harbor: the README values, the pull secret kubectl makes, and a pull from a registry whose token server checks it', async (t) => {
  if (!helmBinary(t)) return;
  const header = Buffer.from(JSON.stringify({ alg: 'RS256', typ: 'JWT' })).toString('base64url');
  const refreshToken = `${header}.${Buffer.from(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 3 * 3600 })).toString('base64url')}.c2ln`;
  const cases = [
    { cloud: 'Artifact Registry', snippet: 'helm-gar-values.yaml', username: '_json_key_base64', password: Buffer.from('{"type":"service_account","private_key":"..."}').toString('base64') },
    { cloud: 'ACR', snippet: 'helm-acr-values.yaml', username: '00000000-0000-0000-0000-000000000000', password: refreshToken },
    { cloud: 'Harbor', snippet: 'helm-harbor-values.yaml', username: 'robot$ocicache', password: 'robot-secret' },
  ];
  for (const c of cases) {
    await t.test(c.cloud, async (t) => {
      const issuer = await startTokenIssuer(t, { [c.username]: c.password });
      if (!issuer) return;
      const registry = await startDistribution(t, { token: issuer });
      if (!registry) return;
      await new Pusher({ url: registry.url, basic: { username: c.username, password: c.password } }).pushImage('team/app', 'v1', image({ 'app.txt': Buffer.from(`${c.cloud}\n`) }));
      const { config } = await renderSnippet(t, c.snippet);
      const upstream = config.upstreams.find((u) => !['docker.io', 'ghcr.io', 'quay.io', 'registry.k8s.io'].includes(u.name))!;
      const host = new URL(upstream.url).hostname;
      // The pod's mounts, here: the Secret's file where the config looks for it.
      const dir = tempDir(t, 'pod');
      const mounted = upstream.auth?.dockerConfig ?? config.credentials?.dockerConfig;
      assert.ok(mounted?.startsWith('/etc/ocicache/'), `${c.cloud}: ${mounted}`);
      const local = join(dir, mounted!);
      pullSecret(local, host, c.username, c.password);
      const port = new URL(registry.url).port;
      const { caFile: _ca, ...rest } = upstream;
      const proxy = await startProxy(t, {
        upstreams: [{ ...rest, url: `http://${host}:${port}`, tokenRealms: [new URL(issuer.realm).origin], ...(upstream.auth?.dockerConfig ? { auth: { dockerConfig: local } } : {}) }],
        credentials: upstream.auth ? undefined : { dockerConfig: local },
        network: { lookup: fakeLookup({ [host]: '127.0.0.1' }) },
      });
      const res = await fetchBody(`${proxy.url}/v2/team/app/manifests/v1?ns=${upstream.name}`, { accept: OCI_MANIFEST });
      assert.equal(res.status, 200, `${c.cloud}: ${res.body?.toString()}`);
      assert.ok(issuer.requests.some((r) => r.user === c.username), `${c.cloud}: the token server saw ${c.username}`);
    });
  }
});

test('ECR: the README values, the real docker-credential-ecr-login copied by the init container, run by ocicache with the pod AWS credentials', async (t) => {
  if (!helmBinary(t)) return;
  if (!existsSync(ECR_HELPER)) {
    if (process.env.CI) throw new Error('.tools/docker-credential-ecr-login missing: run scripts/build-ecr-login.sh (required under CI)');
    return t.skip('.tools/docker-credential-ecr-login missing: run scripts/build-ecr-login.sh');
  }
  const { pod, config } = await renderSnippet(t, 'helm-ecr-values.yaml');
  const upstream = config.upstreams.find((u) => u.auth?.helper === 'ecr-login')!;
  const host = new URL(upstream.url).hostname;
  const accountId = host.split('.')[0]!;
  const token = 'ecr-token-for-ocicache';
  const registry = await startDistribution(t, { basic: { username: 'AWS', password: token } });
  if (!registry) return;
  await new Pusher({ url: registry.url, basic: { username: 'AWS', password: token } }).pushImage('team/app', 'v1', image({ 'app.txt': Buffer.from('ECR\n') }));

  // The ECR API's GetAuthorizationToken (AWS JSON 1.1), as the helper calls it.
  const calls: Array<{ target: string; authorization: string; body: unknown }> = [];
  const ecrApi = createServer((req: IncomingMessage, res) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      calls.push({ target: String(req.headers['x-amz-target']), authorization: String(req.headers.authorization), body: JSON.parse(body || '{}') });
      const answer = { authorizationData: [{ authorizationToken: Buffer.from(`AWS:${token}`).toString('base64'), expiresAt: Date.now() / 1000 + 12 * 3600, proxyEndpoint: `https://${host}` }] };
      res.writeHead(200, { 'content-type': 'application/x-amz-json-1.1' }).end(JSON.stringify(answer));
    });
  });
  await new Promise<void>((r) => ecrApi.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => ecrApi.close(() => r())));

  // The pod, here: the init container's copy of the helper out of its image, onto the PATH it renders.
  const dir = tempDir(t, 'pod');
  const [init] = pod.initContainers;
  const local = (p: string): string => p.replace(/^\/usr\/local\/bin\/docker-credential-ecr-login$/, ECR_HELPER).replace(/^\/helpers\b/, `${dir}/helpers`).replace(/^\/opt\/ocicache\/helpers\b/, `${dir}/helpers`);
  mkdirSync(join(dir, 'helpers'));
  const copied = await exec(init.command[0], init.command.slice(1).map(local));
  assert.equal(copied.code, 0, copied.stderr);
  const container = pod.containers[0];
  const env = Object.fromEntries(container.env.map((e: { name: string; value: string }) => [e.name, e.value]));
  const saved = { ...process.env };
  t.after(() => {
    for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
    Object.assign(process.env, saved);
  });
  Object.assign(process.env, {
    PATH: env.PATH.split(':').map(local).join(':'),
    AWS_REGION: env.AWS_REGION,
    // What IRSA gives the pod, as static keys here; and the ECR API's address.
    AWS_ACCESS_KEY_ID: 'AKIAOCICACHETEST0001',
    AWS_SECRET_ACCESS_KEY: 'ocicache-test-secret',
    AWS_ENDPOINT_URL_ECR: `http://127.0.0.1:${(ecrApi.address() as AddressInfo).port}`,
    AWS_ECR_CACHE_DIR: join(dir, 'ecr-cache'),
    HOME: dir,
  });

  const proxy = await startProxy(t, {
    upstreams: [{ ...upstream, url: `http://${host}:${new URL(registry.url).port}` }],
    network: { lookup: fakeLookup({ [host]: '127.0.0.1' }) },
  });
  for (let i = 0; i < 3; i++) {
    const res = await fetchBody(`${proxy.url}/v2/team/app/manifests/v1?ns=${upstream.name}`, { accept: OCI_MANIFEST });
    assert.equal(res.status, 200, res.body?.toString());
  }
  // One token for the three pulls (kept for credentials.ttl), asked for this account, signed with the pod's keys for ECR in its region.
  assert.equal(calls.length, 1);
  assert.deepEqual([calls[0]!.target, calls[0]!.body], ['AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken', { registryIds: [accountId] }]);
  assert.match(calls[0]!.authorization, new RegExp(`^AWS4-HMAC-SHA256 Credential=AKIAOCICACHETEST0001/\\d{8}/${env.AWS_REGION}/ecr/aws4_request`));
});
