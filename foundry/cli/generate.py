"""`foundry generate` and `foundry chat`: prompts from flags or stdin, completions streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from typing import TYPE_CHECKING

from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError

if TYPE_CHECKING:  # imported when a verb runs: `foundry --help` needs no torch
    from foundry.infer.engine import Engine
    from foundry.infer.sampling import SamplingParams

CHAT_HELP = "type a message and press Enter; /reset clears the conversation, /exit (or Ctrl-D) quits"


def _engine(model: str, device: str, compile: bool) -> "Engine":
    from foundry.infer.engine import Engine

    engine = Engine.load(model, device=device, compile=compile)
    if engine.tokenizer is None:
        raise UserError(f"{model} has no tokenizer.json: text generation needs the model's tokenizer")
    return engine


def run_generate(model: str, prompts: list[str], params: SamplingParams, device: str = "cpu",
                 compile: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Complete each prompt: one prompt streams to `out`, several print one after another."""
    out, err = out or sys.stdout, err or sys.stderr  # looked up now, so redirections made later apply
    if not prompts:
        raise UserError("give at least one --prompt (or pipe the prompt on stdin)")
    engine = _engine(model, device, compile)
    start = time.perf_counter()
    if len(prompts) == 1:
        completions = []
        for delta in engine.stream(prompts, params):
            out.write(delta.text)
            out.flush()
            if delta.completion is not None:
                completions.append(delta.completion)
        out.write("\n")
    else:
        completions = engine.generate(prompts, params)
        for i, (prompt, c) in enumerate(zip(prompts, completions), 1):
            first_line = prompt.splitlines()[0] if prompt.strip() else ""
            out.write(f"--- {i}/{len(prompts)}: {first_line[:60]}\n{c.text}\n")
    seconds = time.perf_counter() - start
    tokens = sum(c.completion_tokens for c in completions)
    reasons = ", ".join(sorted({c.finish_reason for c in completions}))
    err.write(f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s; "
              f"finished by {reasons}]\n")


def run_chat(model: str, params: SamplingParams, system: str | None = None, device: str = "cpu",
             compile: bool = False, stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """An interactive conversation over stdin/stdout, streaming each reply; works with piped input too."""
    from foundry.infer.chat import PLAIN_FORMAT_NOTE, ChatSession

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    session = ChatSession(_engine(model, device, compile), system, params)
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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster tokens after a one-off compile of tens of seconds")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's, else 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="sample within probability mass P (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop before this text (repeatable)")


def _cmd_generate(args: argparse.Namespace) -> None:
    prompts = args.prompt
    if not prompts and not sys.stdin.isatty():
        prompts = [sys.stdin.read()]
    run_generate(args.model, prompts or [], _sampling_params(args), device=args.device, compile=args.compile)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "generate", _cmd_generate, "Complete prompts with a model (one prompt streams as it goes).")
    p.add_argument("model", help="model directory or run directory")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text to complete (repeatable; default: read stdin)")
    _add_sampling_flags(p)


def _cmd_chat(args: argparse.Namespace) -> None:
    run_chat(args.model, _sampling_params(args), system=args.system, device=args.device, compile=args.compile)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "chat", _cmd_chat, "Talk with a model: one message per line on stdin, replies stream back.")
    p.add_argument("model", help="model directory or run directory")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    _add_sampling_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `generate` and `chat` verbs."""
    _add_generate(sub)
    _add_chat(sub)
