// The chat: a multi-turn history sent whole to POST /v1/chat/completions each turn (the server's prefix
// cache keeps the earlier turns' keys and values), with stop, regenerate, retry, copy and tool results.

import { MessageView, chatEntries } from "./render.js";
import { checkJSON, readSettings } from "./settings.js";
import { streamTurn } from "./turn.js";

const readChat = (choice) => ({
  text: choice.delta?.content || "",
  entries: chatEntries(choice.logprobs),
  toolCalls: choice.delta?.tool_calls,
});

export class Chat {
  /** list: the <ol> of messages; model(): the served model's id; busy(on): toggles the send/stop buttons;
   *  onError(err): called with every error (a 401 asks for the key). */
  constructor({ list, system, model, busy, onError }) {
    Object.assign(this, { list, system, model, busy, onError });
    this.history = []; // {role, content, tool_calls?, tool_call_id?, view}
    this.controller = null;
  }

  get running() {
    return this.controller !== null;
  }

  say(text) {
    if (this.running || !text.trim()) return false;
    this.push({ role: "user", content: text }, new MessageView("user"));
    this.respond();
    return true;
  }

  stop() {
    this.controller?.abort();
  }

  clear() {
    this.stop();
    this.history = [];
    this.list.replaceChildren();
  }

  push(message, view) {
    if (view.text === "" && message.content) view.setText(message.content);
    this.history.push({ ...message, view });
    this.list.append(view.li);
    view.li.scrollIntoView({ block: "end" });
  }

  messages() {
    const out = [];
    const system = this.system.value.trim();
    if (system) out.push({ role: "system", content: system });
    for (const { view, ...message } of this.history) out.push(message);
    return out;
  }

  async respond() {
    let settings;
    const view = new MessageView("assistant");
    try {
      settings = readSettings("chat");
    } catch (err) {
      this.list.append(view.li);
      view.fail(err);
      return;
    }
    view.tokens = settings.tokens;
    this.list.append(view.li);
    for (const old of this.list.querySelectorAll(".regenerate")) old.remove();
    this.controller = new AbortController();
    this.busy(true);
    const body = { model: this.model(), messages: this.messages(), ...settings.body };
    let result;
    try {
      result = await streamTurn(view, "/v1/chat/completions", body, this.controller.signal, readChat);
    } finally {
      this.controller = null;
      this.busy(false);
    }
    if (result.state === "error") {
      view.fail(result.error, () => { view.li.remove(); this.respond(); });
      this.onError(result.error);
      return;
    }
    const message = { role: "assistant", content: result.text || null };
    if (result.calls.length) message.tool_calls = result.calls;
    this.history.push({ ...message, view });
    view.addCopy();
    view.addButton("Regenerate", () => this.regenerate(view), "drop this reply and ask again").classList.add("regenerate");
    if (result.calls.length) view.showCalls(result.calls, (call, content) => this.toolResult(call, content));
    if (settings.format !== "text" && result.state === "done" && !result.calls.length) {
      view.showJSON({ ...checkJSON(result.text, settings.schema), cut: result.finish === "length" });
    }
    view.li.scrollIntoView({ block: "end" });
  }

  regenerate(view) {
    const last = this.history[this.history.length - 1];
    if (this.running || !last || last.view !== view) return;
    this.history.pop();
    view.li.remove();
    this.respond();
  }

  toolResult(call, content) {
    if (this.running) return;
    const view = new MessageView("tool");
    view.setText(content);
    this.push({ role: "tool", tool_call_id: call.id, content }, view);
    this.respond();
  }
}
