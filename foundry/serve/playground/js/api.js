// Talking to this server's OpenAI routes: the key, errors in OpenAI's shape, and server-sent events.

const KEY = "foundry.apiKey"; // sessionStorage only: gone when the tab closes, never in a URL

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

/** An error answer of the server ({"error": {message, type, param, code}}) or of the connection. */
export class APIError extends Error {
  constructor(status, message, code, retryAfter = null) {
    super(message);
    this.status = status; // 0: no HTTP answer (connection lost, stream cut)
    this.code = code;
    this.retryAfter = retryAfter;
  }

  /** One line for a person: "429 queue_full: the server's queue is full ... (retry after 1 s)". */
  describe() {
    const head = this.status ? `${this.status} ${this.code}` : this.code;
    const retry = this.retryAfter ? ` (retry after ${this.retryAfter} s)` : "";
    return `${head}: ${this.message}${retry}`;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let message = response.statusText || "request failed";
  let code = "http_error";
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message;
      code = body.error.code || body.error.type || code;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new APIError(response.status, message, code, response.headers.get("Retry-After"));
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new APIError(0, `cannot reach the server (${err.message})`, "connection_error");
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(path) {
  return (await send(path, { headers: headers(false) })).json();
}

export async function getText(path) {
  return (await send(path, { headers: headers(false) })).text();
}

/** POST `body` with stream: true; yields each chunk until data: [DONE]. An error event inside the stream
 *  (the server sends one only if it fails after its 200) is thrown as an APIError, like an error status. */
export async function* stream(path, body, signal) {
  const response = await send(path, {
    method: "POST", headers: headers(true), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(0, chunk.error.message, chunk.error.code || "stream_error");
      yield chunk;
    }
  }
  throw new APIError(0, "the stream ended before [DONE]: the server or the connection went away", "stream_cut");
}
