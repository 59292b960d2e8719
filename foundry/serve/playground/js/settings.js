// The settings panel: what it holds becomes the request's fields, exactly as an OpenAI client sends them.

import { validate } from "./schema.js";

const $ = (id) => document.getElementById(id);

export const EXAMPLE_SCHEMA = {
  type: "object",
  properties: {
    name: { type: "string", maxLength: 20 },
    age: { type: "integer", minimum: 0, maximum: 120 },
    mood: { enum: ["happy", "calm", "tired"] },
  },
  required: ["name", "age", "mood"],
  additionalProperties: false,
};

export const EXAMPLE_TOOLS = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", maxLength: 20 }, unit: { enum: ["celsius", "fahrenheit"] } },
      required: ["city", "unit"],
      additionalProperties: false,
    },
  },
}];

/** A setting that cannot become a request: shown as a message, nothing is sent. */
export class SettingsError extends Error {
  describe() {
    return `settings: ${this.message}`;
  }
}

function parseJSON(text, what) {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new SettingsError(`${what} is not valid JSON: ${err.message}`);
  }
}

function number(id, what, integer = false) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new SettingsError(`${what} must be ${integer ? "a whole number" : "a number"}, got "${raw}"`);
  }
  return value;
}

function tools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  const value = parseJSON(text, "the tools");
  if (!Array.isArray(value)) throw new SettingsError("the tools must be a JSON array of {type: \"function\", function: {...}}");
  return value;
}

/** The request fields of the panel; mode "chat" or "completion" (which has no format or tools). */
export function readSettings(mode) {
  const body = {};
  const set = (key, value) => { if (value !== undefined) body[key] = value; };
  set("temperature", number("temperature", "temperature"));
  set("top_p", number("top-p", "top-p"));
  set("max_tokens", number("max-tokens", "max tokens", true));
  set("seed", number("seed", "seed", true));
  const stops = $("stops").value.split("\n").filter((s) => s !== "");
  if (stops.length) body.stop = stops;
  const k = Number($("logprobs").value);
  if (k > 0) {
    if (mode === "chat") Object.assign(body, { logprobs: true, top_logprobs: k });
    else body.logprobs = k;
  }
  let schema = null;
  const format = mode === "chat" ? $("format").value : "text";
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    schema = parseJSON($("schema").value, "the JSON schema");
    body.response_format = { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
  }
  if (mode === "chat") {
    const list = tools();
    if (list) {
      body.tools = list;
      const choice = $("tool-choice").value;
      body.tool_choice = choice.startsWith("fn:") ? { type: "function", function: { name: choice.slice(3) } } : choice;
    }
  }
  return { body, format, schema, tokens: k > 0 };
}

/** A finished reply read as JSON: {parsed, value, error, schema, errors, unchecked}. */
export function checkJSON(text, schema) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (err) {
    return { parsed: false, error: err.message, schema, errors: [], unchecked: [] };
  }
  if (schema === null) {
    const errors = value && typeof value === "object" && !Array.isArray(value) ? [] : ["$: not a JSON object"];
    return { parsed: true, value, schema, errors, unchecked: [] };
  }
  return { parsed: true, value, schema, ...validate(value, schema) };
}

function refreshSchemaStatus() {
  const status = $("schema-status");
  if ($("format").value !== "json_schema") {
    status.textContent = $("format").value === "json_object" ? "replies are constrained to a JSON object" : "";
    return;
  }
  try {
    JSON.parse($("schema").value);
    status.textContent = "replies are constrained to this schema (checked again here when they end)";
    status.classList.remove("error-text");
  } catch (err) {
    status.textContent = `not valid JSON: ${err.message}`;
    status.classList.add("error-text");
  }
}

function refreshToolChoices() {
  const select = $("tool-choice");
  const before = select.value;
  const status = $("tools-status");
  let names = [];
  status.classList.remove("error-text");
  status.textContent = "";
  try {
    const list = tools();
    names = (list || []).map((t) => t?.function?.name).filter(Boolean);
    if (list) status.textContent = `${names.length} function${names.length === 1 ? "" : "s"}`;
  } catch (err) {
    status.textContent = err.message;
    status.classList.add("error-text");
  }
  select.replaceChildren(...["auto", "required", "none", ...names.map((n) => `fn:${n}`)].map((value) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value.startsWith("fn:") ? `function ${value.slice(3)}` : value;
    return option;
  }));
  if ([...select.options].some((o) => o.value === before)) select.value = before;
}

export function initSettings() {
  $("schema").value = JSON.stringify(EXAMPLE_SCHEMA, null, 2);
  $("format").addEventListener("change", refreshSchemaStatus);
  $("schema").addEventListener("input", refreshSchemaStatus);
  $("tools").addEventListener("input", refreshToolChoices);
  $("tools-example").addEventListener("click", () => {
    $("tools").value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
    refreshToolChoices();
  });
  refreshSchemaStatus();
  refreshToolChoices();
}
