/** Certificates made by the real openssl at run time: CAs and leaves for 127.0.0.1 and localhost. */
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Agent } from 'undici';
import { exec, need, tempDir, type Scope } from './tools.js';

export type Pair = { crt: string; key: string };

/** An undici agent that trusts `ca` and presents `client` when given; closed when the test ends. */
export function tlsAgent(t: Scope, ca: Pair, client?: Pair): Agent {
  const a = new Agent({ connect: { ca: readFileSync(ca.crt), ...(client ? { cert: readFileSync(client.crt), key: readFileSync(client.key) } : {}) } });
  t.after(() => a.close());
  return a;
}

/** A containers-style cert directory (skopeo's --cert-dir): ca.crt, and client.cert and client.key when given. */
export function certDir(dir: string, ca: Pair, client?: Pair): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'ca.crt'), readFileSync(ca.crt));
  if (client) {
    writeFileSync(join(dir, 'client.cert'), readFileSync(client.crt));
    writeFileSync(join(dir, 'client.key'), readFileSync(client.key));
  }
  return dir;
}

export interface Pki {
  dir: string;
  openssl: string;
  ca(name: string): Promise<Pair>;
  /** A leaf certificate for 127.0.0.1 and localhost (server and client use) whose subject is CN=`name`, signed by `ca`. */
  leaf(ca: Pair, name: string, serial: number): Promise<Pair>;
}

export async function pki(t: Scope): Promise<Pki | undefined> {
  const openssl = need(t, 'openssl', 'apt-get install openssl');
  if (!openssl) return undefined;
  const dir = tempDir(t, 'tls');
  const run = async (args: string[]): Promise<void> => {
    const r = await exec(openssl, args);
    assert.equal(r.code, 0, `openssl ${args.join(' ')}: ${r.stderr}`);
  };
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  return {
    dir,
    openssl,
    async ca(name) {
      const crt = join(dir, `${name}.crt`);
      const key = join(dir, `${name}.key`);
      await run(['req', '-x509', ...ec, '-keyout', key, '-out', crt, '-days', '2', '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
      return { crt, key };
    },
    async leaf(ca, name, serial) {
      const crt = join(dir, `${name}.crt`);
      const key = join(dir, `${name}.key`);
      const csr = join(dir, `${name}.csr`);
      const ext = join(dir, `${name}.ext`);
      writeFileSync(ext, 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n');
      await run(['req', ...ec, '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
      await run(['x509', '-req', '-in', csr, '-CA', ca.crt, '-CAkey', ca.key, '-set_serial', String(serial), '-days', '2', '-out', crt, '-extfile', ext]);
      return { crt, key };
    },
  };
}

