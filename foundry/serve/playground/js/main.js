// The page's wiring: the model's name, the key dialog, tabs, theme, keyboard, and the two modes.

import { APIError, apiKey, getJSON, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { Completions } from "./complete.js";
import { MetricsPanel } from "./metrics.js";
import { initTooltips } from "./render.js";
import { initSettings } from "./settings.js";

const $ = (id) => document.getElementById(id);
let modelId = "";
const metrics = new MetricsPanel();

function busy(sendId, stopId) {
  return (on) => {
    $(sendId).disabled = on;
    $(stopId).disabled = !on;
    document.body.dataset.busy = String(on);
  };
}

function onError(err) {
  if (err instanceof APIError && err.status === 401) askForKey(err.describe());
}

const chat = new Chat({ list: $("messages"), system: $("system"), model: () => modelId,
                        busy: busy("send", "stop"), onError });
const completions = new Completions({ list: $("raw-output"), model: () => modelId,
                                      busy: busy("raw-send", "raw-stop"), onError });

// --- the server: health, model, key -------------------------------------------------------------

async function checkHealth() {
  const pill = $("health");
  try {
    const response = await fetch("/health");
    const body = await response.json();
    pill.textContent = response.ok ? "ready" : body.status;
    pill.dataset.state = response.ok ? "ok" : "wait";
    if (!response.ok) setTimeout(checkHealth, 1000);
    return response.ok;
  } catch {
    pill.textContent = "unreachable";
    pill.dataset.state = "down";
    setTimeout(checkHealth, 2000);
    return false;
  }
}

/** The served model's id (GET /v1/models): true once known; a 401 opens the key dialog. */
async function connect() {
  try {
    const models = await getJSON("/v1/models");
    modelId = models.data[0].id;
    $("model").textContent = modelId;
    metrics.start();
    return true;
  } catch (err) {
    if (err instanceof APIError && err.status === 401) askForKey(apiKey() ? err.describe() : "");
    else $("model").textContent = err instanceof APIError ? err.describe() : String(err);
    return false;
  }
}

function askForKey(message) {
  $("key-button").hidden = false;
  $("key-error").textContent = message || "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function initKeyDialog() {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault(); // the key never leaves in a form submission, and never reaches a URL
    setApiKey($("key-input").value.trim());
    $("key-error").textContent = "checking…";
    if (await connect()) {
      $("key-error").textContent = "";
      $("key-input").value = "";
      $("key-dialog").close();
    }
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    $("key-input").value = "";
    $("key-error").textContent = "key forgotten";
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("key-button").addEventListener("click", () => askForKey(""));
}

// --- tabs, theme, keyboard ------------------------------------------------------------------------

function initTabs() {
  const tabs = [$("tab-chat"), $("tab-complete")];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    tab.focus();
  };
  for (const tab of tabs) {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      if (event.key === "ArrowRight" || event.key === "ArrowLeft") select(tabs[1 - tabs.indexOf(tab)]);
    });
  }
}

const THEMES = ["auto", "light", "dark"];

function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  $("theme-button").textContent = `Theme: ${theme}`;
}

function initTheme() {
  let theme = localStorage.getItem("foundry.theme") || "auto";
  applyTheme(theme);
  $("theme-button").addEventListener("click", () => {
    theme = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
    localStorage.setItem("foundry.theme", theme);
    applyTheme(theme);
  });
}

/** Enter sends, Shift+Enter is a new line (and so is Enter while an input method composes). */
function sendOnEnter(area, send) {
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
}

function initKeyboard() {
  const say = () => {
    if (chat.say($("prompt").value)) $("prompt").value = "";
  };
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    say();
  });
  sendOnEnter($("prompt"), say);
  const complete = () => completions.complete($("raw-prompt").value);
  $("raw-send").addEventListener("click", complete);
  sendOnEnter($("raw-prompt"), complete);
  $("stop").addEventListener("click", () => chat.stop());
  $("raw-stop").addEventListener("click", () => completions.stop());
  $("clear").addEventListener("click", () => chat.clear());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && (chat.running || completions.running)) {
      event.preventDefault();
      chat.stop();
      completions.stop();
    }
  });
}

initSettings();
initTooltips();
initKeyDialog();
initTabs();
initTheme();
initKeyboard();
if (await checkHealth()) await connect();
else {
  // still loading: connect once /health answers 200
  const wait = setInterval(async () => {
    if ($("health").dataset.state === "ok") {
      clearInterval(wait);
      await connect();
    }
  }, 500);
}
document.body.dataset.ready = "true";
