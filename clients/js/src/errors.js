/**
 * One error class for everything that goes wrong talking to optserve.
 *
 * Branch on `code` (the server's stable problem code, e.g. "session_not_found",
 * "precondition_failed", or the client's own "transport_error" / "invalid_response"), never on
 * message text, so a new server error needs no new client release.
 */

/**
 * A server problem (RFC 9457), a transport failure, or a response the client cannot read.
 *
 * `status` is the HTTP status (null when no response arrived), `code` the stable error code,
 * `detail` the human explanation, `problem` the full problem document with any extra members
 * (e.g. `version` on a 412 or a 409 `stale_gradient`, `field` and `allowed` on an invalid
 * hyperparameter). `attempts` is how many times the client tried the call, retries included.
 * A transport error keeps the underlying fetch error as `cause`.
 */
export class OptservError extends Error {
  constructor(status, code, detail, problem, options) {
    super(`${status ?? "-"} ${code}: ${detail}`, options);
    this.name = "OptservError";
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.problem = problem ?? { code, detail };
    this.attempts = 1;
  }

  /** An error response -> OptservError; bodies that are not problem documents still map. */
  static fromResponse(status, statusText, bytes) {
    let problem = null;
    let text = "";
    try {
      text = new TextDecoder().decode(bytes ?? new Uint8Array());
      const body = JSON.parse(text);
      if (body !== null && typeof body === "object" && !Array.isArray(body)) problem = body;
    } catch {
      // not JSON: a proxy's HTML page, an empty body
    }
    const reason = statusText || `HTTP ${status}`;
    if (problem === null) {
      problem = { status, title: reason, detail: text.trim().slice(0, 500) || reason };
    }
    const code = typeof problem.code === "string" && problem.code ? problem.code : "http_error";
    const detail = String(problem.detail || problem.title || reason);
    return new OptservError(status, code, detail, problem);
  }

  /** No usable response at all: connection refused, timeout, broken stream. */
  static fromTransport(error) {
    const cause = error?.cause;
    const reason = cause?.code ?? cause?.message;
    const detail = `${error?.name ?? "Error"}: ${error?.message ?? String(error)}${reason ? ` (${reason})` : ""}`;
    return new OptservError(null, "transport_error", detail, undefined, { cause: error });
  }

  /** A success status whose body the client cannot decode (a server or proxy bug). */
  static invalidResponse(status, detail) {
    return new OptservError(status, "invalid_response", detail);
  }
}
