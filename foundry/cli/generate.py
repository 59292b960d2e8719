"""`foundry generate` and `foundry chat`: prompts from flags, a file or stdin; completions as text or JSON Lines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TextIO

from foundry.cli.engine_flags import add_engine_flags, build_engine, engine_options
from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError

if TYPE_CHECKING:  # imported when a verb runs: `foundry --help` needs no torch
    from foundry.infer.engine import Completion
    from foundry.infer.sampling import SamplingParams

CHAT_HELP = "type a message and press Enter; /reset clears the conversation, /exit (or Ctrl-D) quits"


def read_prompts(path: str, stdin: TextIO | None = None) -> list[str]:
    """The prompts of a prompts file, one a line ("-": stdin); blank lines are skipped."""
    if path == "-":
        text = (stdin or sys.stdin).read()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--prompts-file {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompts: write one prompt a line")
    return prompts


def completion_record(index: int, prompt: str, c: "Completion") -> dict:
    """The JSON Lines object of one completion."""
    return {"index": index, "prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "time_to_first_token_s": round(c.time_to_first_token, 6), "seconds": round(c.seconds, 6),
            "tokens_per_s": round(c.tokens_per_second, 3)}


def _in_prompt_order(deltas: Iterable) -> Iterator[tuple[int, "Completion"]]:
    """(index, completion) in prompt order, each as soon as it and every earlier one have finished."""
    done: dict[int, "Completion"] = {}
    following = 0
    for delta in deltas:
        if delta.completion is None:
            continue
        done[delta.index] = delta.completion
        while following in done:
            yield following, done.pop(following)
            following += 1


def run_generate(model: str, prompts: list[str], params: SamplingParams, out: TextIO | None = None,
                 err: TextIO | None = None, as_json: bool = False, **engine: Any) -> None:
    """Complete the prompts in batches through one engine: one prompt streams to `out`, several print in order;
    as_json writes one JSON object a prompt (JSON Lines). `engine`: build_engine's options (device, dtype, ...)."""
    out, err = out or sys.stdout, err or sys.stderr  # looked up now, so redirections made later apply
    if not prompts:
        raise UserError("give at least one --prompt or --prompts-file (or pipe the prompt on stdin)")
    engine = build_engine(model, err=err, **engine)
    start = time.perf_counter()
    completions = []
    if len(prompts) == 1 and not as_json:
        for delta in engine.stream(prompts, params):
            out.write(delta.text)
            out.flush()
            if delta.completion is not None:
                completions.append(delta.completion)
        out.write("\n")
    else:
        for i, c in _in_prompt_order(engine.stream(prompts, params)):
            completions.append(c)
            if as_json:
                out.write(json.dumps(completion_record(i, prompts[i], c), ensure_ascii=False) + "\n")
            else:
                first_line = prompts[i].splitlines()[0] if prompts[i].strip() else ""
                out.write(f"--- {i + 1}/{len(prompts)}: {first_line[:60]}\n{c.text}\n")
            out.flush()
    seconds = time.perf_counter() - start
    tokens = sum(c.completion_tokens for c in completions)
    reasons = ", ".join(sorted({c.finish_reason for c in completions}))
    dtype_name = str(engine.dtype).removeprefix("torch.")
    err.write(f"[{len(completions)} prompt(s), {tokens} tokens in {seconds:.2f} s, "
              f"{tokens / max(seconds, 1e-9):.1f} tokens/s on {engine.device} ({dtype_name}); "
              f"finished by {reasons}]\n")


def run_chat(model: str, params: SamplingParams, system: str | None = None, stdin: TextIO | None = None,
             out: TextIO | None = None, err: TextIO | None = None, **engine: Any) -> None:
    """An interactive conversation over stdin/stdout, streaming each reply; works with piped input too.
    `engine`: build_engine's options (device, dtype, ...)."""
    from foundry.infer.chat import PLAIN_FORMAT_NOTE, ChatSession

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    session = ChatSession(build_engine(model, err=err, **engine), system, params)
    interactive = stdin.isatty()
    if not session.templated:
        err.write(f"note: {PLAIN_FORMAT_NOTE}\n")
    if interactive:
        err.write(f"{CHAT_HELP}\n")
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            err.write("(conversation cleared)\n")
            continue
        if not command:
            continue
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
        except UserError as exc:
            # A conversation that outgrew the context is not fatal: say so and keep the session.
            err.write(f"error: {exc}; /reset starts a new conversation\n")
            continue
        out.write("\n")
        out.flush()


def _sampling_params(args: argparse.Namespace) -> "SamplingParams":
    from foundry.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=args.stop or [])


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    # Unset flags stay None so that the model's generation_config.json supplies the default.
    add_engine_flags(p, compiled_by_default=False)
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's, else 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="sample within probability mass P (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop before this text (repeatable)")


def add_kv_cache_flag(p: argparse.ArgumentParser) -> None:
    """Add --kv-cache-memory (shared with `foundry serve`)."""
    p.add_argument("--kv-cache-memory", default=None, metavar="BYTES",
                   help="size of the KV-cache pool: bytes, or e.g. 2GB, 512MiB (default: room for the batch's "
                        "full contexts, at most 2 GiB); more fits more or longer requests at once")


def _cmd_generate(args: argparse.Namespace) -> None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    elif not prompts and not sys.stdin.isatty():
        text = sys.stdin.read()  # piped text is one prompt (a whole file of code, say)
        prompts = [text] if text.strip() else []
    run_generate(args.model, prompts, _sampling_params(args), as_json=args.json, kv_cache_memory=args.kv_cache_memory,
                 **engine_options(args))


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "generate", _cmd_generate, "Complete prompts with a model, batched (one prompt streams as "
                 "it goes). Prompts come from --prompt, --prompts-file (one a line), or else stdin (all one prompt).")
    p.add_argument("model", help="model directory, run directory or Hub id")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text to complete (repeatable; default: read stdin as one prompt)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="one prompt a line, blank lines skipped; '-' reads them from stdin")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object a prompt (JSON Lines, in prompt order): index, prompt, text, "
                        "finish_reason, prompt_tokens, completion_tokens, time_to_first_token_s, seconds, tokens_per_s")
    add_kv_cache_flag(p)
    _add_sampling_flags(p)


def _cmd_chat(args: argparse.Namespace) -> None:
    run_chat(args.model, _sampling_params(args), system=args.system, **engine_options(args))


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "chat", _cmd_chat, "Talk with a model: one message per line on stdin, replies stream back.")
    p.add_argument("model", help="model directory or run directory")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    _add_sampling_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `generate` and `chat` verbs."""
    _add_generate(sub)
    _add_chat(sub)
