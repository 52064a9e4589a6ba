/**
 * Figure 3's floors: the least a cache written in Node does per byte, timed in the same run as
 * ocicache. A TCP proxy from 127.0.0.1:<port> to the upstream, one request per connection:
 *
 *   node --import tsx bench/relay.ts <port> <upstream-url>                 bytes socket to socket
 *   node --import tsx bench/relay.ts <port> <upstream-url> --verify <dir>  and what a verifying
 *                                                                          cache cannot skip
 *
 * With --verify, every body byte from the upstream is hashed (sha256) and written to a file in
 * <dir> by positional writev batches on the thread pool, as src/blob-store.ts does, and the last
 * byte waits until the hash is done and the file is written, as ocicache's does. Nothing else: the
 * response head is found with indexOf and passed on as it is, there is no HTTP parser, no stream
 * other than the two sockets, no index, no log.
 */
import { createHash } from 'node:crypto';
import { open, rm } from 'node:fs/promises';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';

const [port, upstreamUrl, flag, dir] = process.argv.slice(2);
const upstream = new URL(upstreamUrl!);
let files = 0;

createServer((client) => {
  const up = connect(Number(upstream.port), upstream.hostname);
  client.on('error', () => up.destroy());
  up.on('error', () => client.destroy());
  client.pipe(up);
  if (flag === '--verify') verifying(up, client, join(dir!, `body-${files++}`));
  else up.pipe(client);
}).listen(Number(port), '127.0.0.1');

function verifying(up: Socket, client: Socket, path: string): void {
  up.pause();
  const hash = createHash('sha256');
  const queue: Buffer[] = [];
  let writing: Promise<void> | undefined;
  let written = 0;
  let head: Buffer | undefined = Buffer.alloc(0);
  let remaining = 0;
  const send = (b: Buffer): void => {
    if (!client.write(b)) {
      up.pause();
      client.once('drain', () => up.resume());
    }
  };
  void open(path, 'w').then((file) => {
    const pump = (): void => {
      if (writing || queue.length === 0) return;
      const batch = queue.splice(0, 64);
      const at = written;
      for (const b of batch) written += b.length;
      writing = file.writev(batch, at).then(() => {
        writing = undefined;
        pump();
      });
    };
    const finish = async (last: Buffer): Promise<void> => {
      while (writing) await writing;
      hash.digest('hex');
      await file.close();
      await rm(path);
      send(last);
    };
    up.on('data', (chunk: Buffer) => {
      let body = chunk;
      if (head) {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        remaining = Number(/^content-length: *(\d+)/im.exec(head.subarray(0, end).toString('latin1'))?.[1] ?? 0);
        send(head.subarray(0, end + 4));
        body = head.subarray(end + 4);
        head = undefined;
      }
      if (body.length === 0) return;
      remaining -= body.length;
      hash.update(body);
      queue.push(body);
      pump();
      if (remaining > 0) return send(body);
      send(body.subarray(0, body.length - 1));
      void finish(body.subarray(body.length - 1));
    });
    up.resume();
  });
}
