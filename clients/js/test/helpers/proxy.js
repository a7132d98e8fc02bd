// A tiny HTTP proxy for the retry tests: forwards to a real optserve, records every request,
// and on demand loses an answer (the server acted, the client never hears) or answers itself.
import http from "node:http";

export class Proxy {
  constructor(upstream) {
    this.upstream = new URL(upstream);
    this.requests = [];
    this._rules = [];
    this._sockets = new Set();
    this.server = http.createServer((req, res) => this._handle(req, res));
    this.server.on("connection", (socket) => {
      this._sockets.add(socket);
      socket.on("close", () => this._sockets.delete(socket));
    });
  }

  /** Listen on `port` (0: any free port); resolves to this. */
  start(port = 0) {
    return new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(port, "127.0.0.1", () => {
        this.port = this.server.address().port;
        this.url = `http://127.0.0.1:${this.port}`;
        resolve(this);
      });
    });
  }

  close() {
    for (const socket of this._sockets) socket.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  /** The next request matching `match` reaches the server, which answers; the client gets a reset. */
  dropResponse(match) {
    this._rules.push({ match, drop: true });
  }

  /** The next request matching `match` is answered by the proxy itself (never forwarded). */
  respond(match, status, headers, body) {
    this._rules.push({ match, respond: { status, headers, body } });
  }

  seen(method, suffix = "") {
    return this.requests.filter((r) => r.method === method && r.path.endsWith(suffix));
  }

  _handle(req, res) {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const seen = { method: req.method, path: new URL(req.url, "http://x").pathname, url: req.url, headers: req.headers, body };
      this.requests.push(seen);
      const index = this._rules.findIndex((rule) => rule.match(seen));
      const rule = index >= 0 ? this._rules.splice(index, 1)[0] : null;
      if (rule?.respond) {
        res.writeHead(rule.respond.status, rule.respond.headers);
        res.end(rule.respond.body);
        return;
      }
      const forward = http.request(
        {
          host: this.upstream.hostname,
          port: this.upstream.port,
          method: req.method,
          path: req.url,
          headers: { ...req.headers, host: this.upstream.host },
        },
        (answer) => {
          const parts = [];
          answer.on("data", (chunk) => parts.push(chunk));
          answer.on("end", () => {
            if (rule?.drop) {
              req.socket.resetAndDestroy?.() ?? req.socket.destroy(); // the server answered in full
              return;
            }
            const headers = { ...answer.headers };
            delete headers["transfer-encoding"];
            delete headers["content-length"];
            res.writeHead(answer.statusCode, headers);
            res.end(Buffer.concat(parts));
          });
        },
      );
      forward.on("error", () => req.socket.destroy());
      forward.end(body);
    });
  }
}

/** A port nothing listens on (yet). */
export async function freePort() {
  const server = http.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}
