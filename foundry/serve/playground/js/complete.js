// Raw completions: a prompt goes to POST /v1/completions as it is, no chat template.

import { MessageView, completionEntries } from "./render.js";
import { readSettings } from "./settings.js";
import { streamTurn } from "./turn.js";

const readCompletion = (choice) => ({ text: choice.text || "", entries: completionEntries(choice.logprobs) });

export class Completions {
  constructor({ list, model, busy, onError }) {
    Object.assign(this, { list, model, busy, onError });
    this.controller = null;
  }

  get running() {
    return this.controller !== null;
  }

  stop() {
    this.controller?.abort();
  }

  async complete(prompt) {
    if (this.running || !prompt) return false;
    const view = new MessageView("completion", { prefix: prompt });
    this.list.prepend(view.li);
    let settings;
    try {
      settings = readSettings("completion");
    } catch (err) {
      view.fail(err);
      return true;
    }
    view.tokens = settings.tokens;
    this.controller = new AbortController();
    this.busy(true);
    let result;
    try {
      result = await streamTurn(view, "/v1/completions", { model: this.model(), prompt, ...settings.body },
                                this.controller.signal, readCompletion);
    } finally {
      this.controller = null;
      this.busy(false);
    }
    if (result.state === "error") {
      view.fail(result.error);
      this.onError(result.error);
    } else {
      view.addCopy();
    }
    return true;
  }
}
