"""What `foundry generate` and `foundry chat` do once their flags are parsed."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from foundry.errors import UserError
from foundry.infer.chat import PLAIN_FORMAT_NOTE, ChatSession
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams

CHAT_HELP = "type a message and press Enter; /reset clears the conversation, /exit (or Ctrl-D) quits"


def _engine(model: str, device: str, compile: bool) -> Engine:
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
