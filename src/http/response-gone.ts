/**
 * Knowing when a response is over: finished, or cut short by the client. A pipelined response
 * queued behind another on a keep-alive connection gets no 'close' of its own when the client
 * hangs up (and no write callbacks either), so the connection's 'close' counts too.
 */
import type { ServerResponse } from 'node:http';

/**
 * Calls `fn` once, when `res` or its connection closes, whichever is first. Returns a function that
 * stops watching. Once means once even when the connection's 'close' is what closes `res`: an
 * emitter calls the listeners it had when the event began, so removing the connection's listener
 * from inside the response's 'close' does not stop it being called in the same event.
 */
export function onResponseGone(res: ServerResponse, fn: () => void): () => void {
  const socket = res.req.socket;
  let called = false;
  const unwatch = (): void => {
    res.off('close', gone);
    socket.off('close', gone);
  };
  const gone = (): void => {
    unwatch();
    if (called) return;
    called = true;
    fn();
  };
  res.once('close', gone);
  socket.once('close', gone);
  return unwatch;
}

/**
 * A signal that aborts when the client leaves before `res` has finished, for upstream requests
 * made for this client alone (tag lists, referrers): they end with it. `done()` stops watching;
 * call it once the upstream's answer is in.
 */
export function clientGone(res: ServerResponse): { signal: AbortSignal; done: () => void } {
  const controller = new AbortController();
  const done = onResponseGone(res, () => {
    if (!res.writableFinished) controller.abort(new Error('the client went away'));
  });
  return { signal: controller.signal, done };
}
