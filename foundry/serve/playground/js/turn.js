// One streamed request into one message view, timed as vLLM's benchmark times it (client side).

import { stream } from "./api.js";

function mergeCall(calls, piece) {
  const call = calls[piece.index ?? calls.length] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
  if (piece.id) call.id = piece.id;
  if (piece.function?.name) call.function.name += piece.function.name;
  if (piece.function?.arguments) call.function.arguments += piece.function.arguments;
}

/** Stream `body` to `path` into `view`; `read(choice)` gives {text, entries, calls} of one chunk's choice.
 *  Returns {state: "done"|"stopped"|"error", text, calls, finish, error}; the view shows its figures. */
export async function streamTurn(view, path, body, signal, read) {
  const started = performance.now();
  let first = null;
  let last = null;
  let usage = null;
  let finish = null;
  let pieces = 0;
  const calls = [];
  let state = "done";
  let error = null;
  view.streaming();
  try {
    for await (const chunk of stream(path, body, signal)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const { text, entries, toolCalls } = read(choice);
      if (text || toolCalls?.length) {
        last = performance.now();
        first ??= last;
        pieces += 1;
      }
      if (text || entries.length) view.append(text || "", entries);
      for (const piece of toolCalls || []) mergeCall(calls, piece);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (err) {
    if (err.name === "AbortError") state = "stopped";
    else {
      state = "error";
      error = err;
    }
  }
  const tokens = usage ? usage.completion_tokens : pieces;
  const rate = first !== null && last > first && tokens > 1 ? (tokens - 1) / ((last - first) / 1000) : null;
  if (state !== "error") {
    view.finish({ state, finish: state === "stopped" ? "stopped" : finish, tokens,
                  ttft: first === null ? null : first - started, rate });
  }
  return { state, text: view.text, calls, finish, error };
}
