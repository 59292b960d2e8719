// One message on the page: its text (or its tokens coloured by probability), tool-call cards, the JSON
// check, and its figures. Model output is only ever set as text, never parsed as HTML.

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, title) {
  const b = el("button", "small", label);
  b.type = "button";
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

const percent = (p) => `${(100 * p).toFixed(p > 0.995 || p < 0.005 ? 1 : 0)}%`;
// A token as the tooltip shows it: newlines and tabs visible; a piece of a UTF-8 character (OpenAI's
// "bytes:\xe2" form) as its bytes.
const shown = (token) => (token.startsWith("bytes:") ? token.slice(6) : JSON.stringify(token).slice(1, -1));

/** Entries {token, logprob, top: [{token, logprob}]} from a chat chunk's logprobs.content. */
export function chatEntries(logprobs) {
  return (logprobs?.content || []).map((e) => ({ token: e.token, logprob: e.logprob, top: e.top_logprobs || [] }));
}

/** The same from a completion chunk's logprobs {tokens, token_logprobs, top_logprobs: [{token: logprob}]}. */
export function completionEntries(logprobs) {
  if (!logprobs) return [];
  return logprobs.tokens.map((token, i) => ({
    token,
    logprob: logprobs.token_logprobs[i],
    top: Object.entries(logprobs.top_logprobs?.[i] || {}).map(([t, lp]) => ({ token: t, logprob: lp })),
  }));
}

export class MessageView {
  /** role: "user", "assistant", "tool" or "completion"; tokens: show coloured tokens when logprobs come. */
  constructor(role, { tokens = false, prefix = "" } = {}) {
    this.li = el("li", `message ${role}`);
    this.li.dataset.role = role;
    this.li.dataset.chunks = "0";
    this.tokens = tokens;
    this.text = "";
    const head = el("div", "head");
    head.append(el("span", "role", role === "completion" ? "completion" : role));
    this.tools = el("span", "tools");
    head.append(this.tools);
    this.li.append(head);
    this.body = el("div", "body");
    if (prefix) this.body.append(el("span", "prefix", prefix));
    this.li.append(this.body);
    this.extra = el("div", "extra");
    this.stats = el("div", "stats");
    this.li.append(this.extra, this.stats);
  }

  /** Add streamed text; with logprob entries (and tokens on), as one span per token. */
  append(text, entries = []) {
    this.text += text;
    this.li.dataset.chunks = String(Number(this.li.dataset.chunks) + 1);
    if (this.tokens && entries.length) {
      for (const entry of entries) this.body.append(tokenSpan(entry));
    } else if (text) {
      this.body.append(document.createTextNode(text));
    }
  }

  setText(text) {
    this.text = text;
    this.body.append(document.createTextNode(text));
  }

  /** The figures under a reply: tokens, time to first token, decode rate, finish reason. */
  finish({ state, finish, tokens, ttft, rate }) {
    this.li.dataset.state = state;
    this.li.dataset.finish = finish || "";
    if (tokens !== null && tokens !== undefined) this.li.dataset.tokens = String(tokens);
    const parts = [];
    if (tokens !== null && tokens !== undefined) parts.push(`${tokens} tokens`);
    if (ttft !== null && ttft !== undefined) parts.push(`TTFT ${Math.round(ttft)} ms`);
    if (rate) parts.push(`${rate.toFixed(1)} tok/s`);
    parts.push(`finish: ${finish || state}`);
    this.stats.textContent = parts.join(" · ");
    this.stats.title = "tokens: the server's usage (chunks, if stopped); TTFT: from sending to the first text; "
      + "tok/s: tokens after the first over the time after the first (vLLM's TPOT, inverted)";
  }

  streaming() {
    this.li.dataset.state = "streaming";
    this.stats.textContent = "…";
  }

  /** Turn this reply into an error message: the server's answer, readable, in place of a reply. */
  fail(error, onRetry) {
    this.li.classList.add("error");
    this.li.setAttribute("role", "alert");
    this.li.dataset.state = "error";
    this.li.dataset.status = String(error.status ?? 0);
    this.li.dataset.code = error.code || "";
    const line = el("p", "error-text", error.describe ? error.describe() : String(error.message || error));
    this.extra.prepend(line);
    this.stats.textContent = "";
    if (onRetry) this.tools.append(button("Retry", onRetry));
  }

  addCopy() {
    const copy = button("Copy", async () => {
      copy.textContent = (await copyText(this.text)) ? "Copied" : "Copy failed";
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    }, "copy this message's text");
    this.tools.append(copy);
  }

  addButton(label, onClick, title) {
    const b = button(label, onClick, title);
    this.tools.append(b);
    return b;
  }

  /** Tool calls as cards: name, arguments (parsed), and a box to send the tool's result back. */
  showCalls(calls, onResult) {
    for (const call of calls) {
      const card = el("div", "card tool-call");
      card.dataset.name = call.function.name;
      card.append(el("div", "card-title", `call ${call.function.name}`), el("code", "muted", call.id));
      let args;
      try {
        args = JSON.stringify(JSON.parse(call.function.arguments), null, 2);
        card.dataset.valid = "true";
      } catch (err) {
        args = call.function.arguments;
        card.dataset.valid = "false";
        card.append(el("p", "error-text", `the arguments are not JSON: ${err.message}`));
      }
      card.append(el("pre", "code arguments", args));
      if (onResult) {
        const label = el("label", "stacked", "Result");
        const area = el("textarea", "code");
        area.rows = 2;
        area.placeholder = '{"temperature": 21}';
        label.append(area);
        const send = button("Send result", () => {
          send.disabled = true;
          onResult(call, area.value);
        });
        card.append(label, send);
      }
      this.extra.append(card);
    }
  }

  /** The reply read as JSON and checked against the schema (validate() from schema.js), shown parsed. */
  showJSON(check) {
    const card = el("div", "card json-check");
    card.dataset.valid = String(check.parsed && check.errors.length === 0);
    if (!check.parsed) {
      const why = check.cut ? " (the reply was cut short at max tokens)" : "";
      card.append(el("p", "error-text", `not valid JSON${why}: ${check.error}`));
    } else {
      const verdict = check.schema === null ? "valid JSON"
        : check.errors.length ? `valid JSON, but it does not match the schema` : "valid JSON, matches the schema";
      card.append(el("div", check.errors.length ? "card-title error-text" : "card-title ok-text", verdict));
      for (const error of check.errors) card.append(el("p", "error-text", error));
      if (check.unchecked.length) card.append(el("p", "muted", `not checked here: ${check.unchecked.join(", ")}`));
      card.append(el("pre", "code", JSON.stringify(check.value, null, 2)));
    }
    this.extra.append(card);
  }
}

function tokenSpan(entry) {
  const p = Math.exp(entry.logprob);
  const partial = entry.token.startsWith("bytes:");
  const span = el("span", partial ? "tok bytes" : "tok", partial ? entry.token.slice(6) : entry.token);
  span.tabIndex = 0;
  span.style.setProperty("--p", p.toFixed(3));
  span.dataset.logprob = String(entry.logprob);
  const lines = [`"${shown(entry.token)}" ${percent(p)}`];
  for (const alt of entry.top) {
    if (alt.token !== entry.token) lines.push(`  "${shown(alt.token)}" ${percent(Math.exp(alt.logprob))}`);
  }
  span.dataset.tip = lines.join("\n");
  span.setAttribute("aria-label", lines.join("; "));
  return span;
}

/** One tooltip for every token (hover or keyboard focus), fixed to the viewport so no scrolling box cuts it. */
export function initTooltips() {
  const tip = document.getElementById("tip");
  const show = (event) => {
    const token = event.target.closest?.(".tok");
    if (!token) return;
    tip.textContent = token.dataset.tip;
    tip.hidden = false;
    const r = token.getBoundingClientRect();
    const below = r.bottom + 4 + tip.offsetHeight <= window.innerHeight;
    tip.style.left = `${Math.max(4, Math.min(r.left, window.innerWidth - tip.offsetWidth - 4))}px`;
    tip.style.top = `${below ? r.bottom + 4 : r.top - 4 - tip.offsetHeight}px`;
    token.setAttribute("aria-describedby", "tip");
  };
  const hide = (event) => {
    if (event.target.closest?.(".tok")) tip.hidden = true;
  };
  document.addEventListener("mouseover", show);
  document.addEventListener("focusin", show);
  document.addEventListener("mouseout", hide);
  document.addEventListener("focusout", hide);
}
