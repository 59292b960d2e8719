"""Tool calls: a forced call constrained to the functions' schemas, and model text parsed into `tool_calls`.

A forced call (`tool_choice` "required" or a named function) is constrained to one JSON object
`{"name": <a function>, "arguments": <its parameters>}`, the call format of the Hermes/Qwen/Llama 3
tool templates without their tags; `name` comes first so the grammar knows which schema the
arguments follow. `auto` is constrained to text or such a call: a reply that opens with `{` must be
a valid call (llguidance's documented pattern for Llama 3.1's JSON tool calling); one that opens
otherwise is free text. `none` is not constrained. `parse_tool_calls` picks out the calls a reply
made (a bare call object or list, or `<tool_call>` blocks).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from typing import Any

from foundry.core.errors import UserError
from foundry.infer.constrained import JSON_OPTIONS, Constraint, constraint_for_grammar, constraint_for_schema
from foundry.tokenizer import Tokenizer

# OpenAI: a function without `parameters` takes an empty parameter list.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_LITERAL_KEYWORDS = {"const", "enum", "default", "examples"}
_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# tool_choice "auto": free text that opens with neither "{" nor a space, or one call (an empty reply too).
AUTO_GRAMMAR = "start: TEXT | call\nTEXT: /([^{\\s](.|\\n)*)?/\ncall: %json "
CALL_OPENINGS = ("{", "<tool_call>")  # how a reply that is a call starts


def function_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """Each function's name -> its parameters schema, from OpenAI `tools`; malformed tools are a UserError."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise UserError("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    schemas: dict[str, dict] = {}
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise UserError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise UserError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in schemas:
            raise UserError(f"{where}: the function name {name!r} is used twice")
        parameters = function.get("parameters", NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise UserError(f"{where}.function.parameters must be a JSON schema object")
        schemas[name] = parameters
    return schemas


def chosen_functions(tools: list[dict] | None, tool_choice: Any) -> list[str] | None:
    """Names a forced call may use ("required": all, a named function: it), or None when not forced."""
    schemas = function_schemas(tools)
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if not schemas:
        raise UserError("tool_choice forces a tool call but no tools were given")
    if tool_choice == "required":
        return list(schemas)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in schemas:
            raise UserError(f"tool_choice names the function {name!r}, which is not among the tools "
                            f"({', '.join(schemas)})")
        return [name]
    raise UserError("tool_choice must be \"auto\", \"none\", \"required\" or "
                    "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def call_schema(name: str, parameters: dict, at: str = "") -> dict:
    """Schema of one call object (placed at JSON pointer `at`): the name, then arguments for that function."""
    # Local refs ("#/$defs/Item", as pydantic writes them) point into the parameters' own root, which
    # now sits at <at>/properties/arguments: rebase them so they still find their definitions.
    arguments = _rebase_refs(parameters, f"{at}/properties/arguments")
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _rebase_refs(schema: Any, base: str) -> Any:
    if isinstance(schema, list):
        return [_rebase_refs(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + base + value[1:]
        elif key in _LITERAL_KEYWORDS:
            out[key] = value  # data, not schema: a "$ref" key in there is just a key
        else:
            out[key] = _rebase_refs(value, base)
    return out


def constraint_for_tool_call(tools: list[dict] | None, tool_choice: Any, tokenizer: Tokenizer,
                             stop_ids: Iterable[int] | None = None) -> Constraint | None:
    """The Constraint of a forced tool call, or of `auto`'s text-or-call; None for "none" or no tools."""
    names = chosen_functions(tools, tool_choice)
    schemas = function_schemas(tools)
    if names is None:
        if tool_choice == "none" or not schemas:
            return None
        # The call written as a forced one is (x-guidance: the same separators as constraint_for_schema's).
        calls = {**_calls_schema(list(schemas), schemas, tokenizer, stop_ids), "x-guidance": JSON_OPTIONS}
        return constraint_for_grammar(AUTO_GRAMMAR + json.dumps(calls), tokenizer, "tool call", stop_ids)
    return constraint_for_schema(_calls_schema(names, schemas, tokenizer, stop_ids), tokenizer, "tool call", stop_ids)


def _calls_schema(names: list[str], schemas: dict[str, dict], tokenizer: Tokenizer,
                  stop_ids: Iterable[int] | None) -> dict:
    """The schema of one call to any of `names`; each function's schema is checked alone first."""
    # Compile each function alone first, so an invalid schema is named by its function.
    for name in names:
        constraint_for_schema(call_schema(name, schemas[name]), tokenizer, f"tool {name!r} parameters", stop_ids)
    if len(names) == 1:
        return call_schema(names[0], schemas[names[0]])
    return {"anyOf": [call_schema(name, schemas[name], f"/anyOf/{i}") for i, name in enumerate(names)]}


def parse_tool_calls(text: str, tools: list[dict] | None) -> list[dict]:
    """Calls to known functions in model output, in OpenAI's `tool_calls` shape ([] when there are none)."""
    schemas = function_schemas(tools)
    stripped = text.strip()
    try:
        found = [json.loads(stripped)]
    except ValueError:
        found = []
        for block in _TAGGED_CALL.findall(text):
            try:
                found.append(json.loads(block))
            except ValueError:
                continue  # a malformed block is text, not a call
    if len(found) == 1 and isinstance(found[0], list):
        found = found[0]  # parallel calls written as one JSON list
    calls = []
    for item in found:
        call = _as_call(item, schemas)
        if call is not None:
            calls.append(call)
    return calls


def split_tool_calls(text: str, tools: list[dict] | None) -> tuple[str | None, list[dict]]:
    """(message content, tool_calls) of a reply: the calls' text is taken out; content None when nothing is left."""
    calls = parse_tool_calls(text, tools)
    if not calls:
        return text, []
    rest = _TAGGED_CALL.sub("", text).strip()
    try:
        json.loads(text.strip())
        rest = ""  # the whole reply was the call (a bare object or list)
    except ValueError:
        pass
    return (rest or None), calls


def _as_call(item: Any, schemas: dict[str, dict]) -> dict | None:
    """One OpenAI tool call from a parsed {"name", "arguments"} object, or None if it is not a known call."""
    if not isinstance(item, dict) or item.get("name") not in schemas:
        return None
    # Llama 3.1's templates write the arguments under "parameters".
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
