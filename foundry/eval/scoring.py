"""Scoring a model on data: perplexity and bits per byte of text, and exact match of generated answers.

Text is scored document by document, the way lm-eval's `loglikelihood_rolling` does: the document's
tokens follow one prefix token (bos, else eos) so that the first token is predicted too, and a document
longer than the context is cut into windows of `max_length` predictions where every window after the
first reads the full `max_length` tokens before its last prediction. So every token is scored exactly once,
with as much context as fits. Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foundry.core.errors import UserError
from foundry.data.jsonl import Record, read_jsonl
from foundry.data.shards import TokenShards
from foundry.eval.perplexity import evaluate

# Files read from a directory of text: these suffixes (or none), so a corpus folder's binaries are skipped.
TEXT_SUFFIXES = {"", ".txt", ".md", ".rst", ".text", ".py", ".json", ".html", ".tex", ".csv"}


@dataclass
class TextScore:
    """Total negative log-likelihood (nats) of `tokens` scored tokens over `documents` documents of `bytes`
    UTF-8 bytes (None for a token data directory, whose text is not kept)."""

    nats: float
    tokens: int
    documents: int
    bytes: int | None = None

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float | None:
        return self.nats / math.log(2) / self.bytes if self.bytes else None

    def metrics(self) -> dict[str, Any]:
        """The figures as one flat dict (what `foundry eval` prints and records)."""
        out: dict[str, Any] = {"loss": self.loss, "perplexity": self.perplexity}
        if self.bits_per_byte is not None:
            out["bits_per_byte"] = self.bits_per_byte
        out["tokens"] = self.tokens
        if self.documents:  # a token data directory's stream is not counted in documents
            out["documents"] = self.documents
        if self.bytes is not None:
            out["bytes"] = self.bytes
        return out


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


@torch.no_grad()
def score_continuations(model: torch.nn.Module, sequences: Sequence[tuple[Sequence[int], int]],
                        batch_size: int = 8, autocast: AbstractContextManager | None = None) -> list[tuple[float, bool]]:
    """For each (tokens, n): the model reads tokens[:-1] and the last n tokens are scored, each under the tokens
    before it. Returns (sum of their log-probabilities, whether each is the argmax), in the input order.

    Rows are batched longest first and right-padded (a causal model's real positions never see the padding);
    log-softmax is taken in fp32 over the scored positions only."""
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    for tokens, n in sequences:
        if not 1 <= n < len(tokens):
            raise ValueError(f"cannot score the last {n} of {len(tokens)} tokens: each needs a token before it")
    was_training = model.training
    model.eval()
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(sequences)
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            width = len(sequences[rows[0]][0]) - 1
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                inputs = list(sequences[i][0])[:-1]
                ids[r, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
            with autocast or nullcontext():
                hidden = model.hidden_states(ids.to(device))
            for r, i in enumerate(rows):
                tokens, n = sequences[i]
                end = len(tokens) - 1  # positions [end - n, end) predict the last n tokens
                with autocast or nullcontext():
                    logits = model.logits(hidden[r, end - n:end])
                logprobs = logits.float().log_softmax(dim=-1)
                targets = torch.tensor(list(tokens)[-n:], dtype=torch.long, device=logprobs.device)
                total = logprobs.gather(-1, targets[:, None]).sum().item()
                greedy = bool((logprobs.argmax(dim=-1) == targets).all())
                results[i] = (total, greedy)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix: int | None, max_length: int) -> list[tuple[list[int], int]]:
    """A document's scoring windows as (tokens, n) for score_continuations: each token scored once (see the
    module docstring; the same windows as lm-eval's get_rolling_token_windows with context_len 1).

    With no prefix token the first token has nothing to be predicted from and is not scored."""
    tokens = list(tokens)
    return _windows(tokens if prefix is None else [prefix] + tokens, max_length)


def _windows(seq: list[int], max_length: int) -> list[tuple[list[int], int]]:
    """Windows over seq whose tokens after the first are all predicted: the first window predicts seq[1:L+1]
    from seq[:L]; each later one predicts up to L new tokens from the L tokens before its last."""
    if max_length < 1:
        raise UserError(f"the scoring length must be positive, got {max_length}")
    predict = len(seq) - 1
    if predict < 1:
        return []
    first = min(max_length, predict)
    out = [(seq[:first + 1], first)]
    done = first
    while done < predict:
        n = min(predict - done, max_length)
        end = done + n + 1  # seq[end - 1] is the last token predicted in this window
        out.append((seq[max(0, end - 1 - max_length):end], n))
        done += n
    return out


def score_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                batch_size: int = 8, autocast: AbstractContextManager | None = None) -> TextScore:
    """Perplexity and bits per byte of `model` over documents of text (see the module docstring)."""
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    windows: list[tuple[list[int], int]] = []
    for text in texts:
        windows += rolling_windows(tokenizer.encode(text), prefix, max_length)
    if not windows:
        raise UserError("nothing to score: the text holds no tokens the model can predict")
    scores = score_continuations(model, windows, batch_size, autocast)
    return TextScore(nats=-sum(s for s, _ in scores), tokens=sum(n for _, n in windows), documents=len(texts),
                     bytes=sum(len(t.encode("utf-8")) for t in texts))


def read_texts(path: str | Path, field: str = "text", skip_bad_lines: bool = False) -> tuple[list[str], list[str]]:
    """The documents of a text file (one document), a directory of text files (one each, in name order) or a
    JSONL file (each record's `field`), and the bad JSONL lines skipped (`path:line: why`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or directory")
    if path.suffix == ".jsonl":
        def check(record: Record) -> None:
            if not isinstance(record.data.get(field), str):
                raise UserError(f"{record.where}: expected a string field {field!r}")
        records = read_jsonl(path, skip_bad_lines, check)
        return [r.data[field] for r in records], records.skipped
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.suffix.lower() in TEXT_SUFFIXES
                                                 and not any(part.startswith(".") for part in p.parts))
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"{file} is not UTF-8 text (byte {exc.start}); give text files") from None
        except OSError as exc:
            raise UserError(f"cannot read {file}: {exc.strerror}") from None
    texts = [t for t in texts if t]
    if not texts:
        raise UserError(f"--data {path} holds no text")
    return texts, []


def is_token_data(path: str | Path) -> bool:
    """Whether `path` is a data directory made by `foundry prepare` (it has meta.json)."""
    return (Path(path) / "meta.json").is_file()


def score_token_data(model: torch.nn.Module, data_dir: str | Path, seq_len: int, batch_size: int = 8,
                     split: str = "val", tokenizer: Any = None, max_batches: int | None = None,
                     autocast: AbstractContextManager | None = None) -> TextScore:
    """Perplexity over one split of a token data directory (the text is not kept there, so no bits per byte)."""
    shards = TokenShards(data_dir, split, tokenizer)
    result = evaluate(model, shards, batch_size, seq_len, max_batches, model_device(model), autocast)
    return TextScore(nats=result.loss * result.tokens, tokens=result.tokens, documents=0)


def normalize_answer(text: str) -> str:
    """What exact match compares: the text with leading and trailing whitespace removed (case, inner spacing
    and punctuation count)."""
    return text.strip()


def exact_match(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """The fraction of predictions equal to their answer (or to one of a list of answers) after
    normalize_answer."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not predictions:
        raise UserError("exact match needs at least one example")
    hits = 0
    for prediction, answer in zip(predictions, answers):
        accepted = [answer] if isinstance(answer, str) else list(answer)
        hits += normalize_answer(prediction) in {normalize_answer(a) for a in accepted}
    return hits / len(predictions)


def read_qa(path: str | Path, skip_bad_lines: bool = False
            ) -> tuple[list[str], list[str | list[str]], list[str]]:
    """Prompts and answers of a JSONL of {"prompt": str, "answer": str or list of str}, and the bad lines
    skipped."""
    def check(record: Record) -> None:
        prompt, answer = record.data.get("prompt"), record.data.get("answer")
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{record.where}: expected a non-empty string field 'prompt'")
        if not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                            and all(isinstance(a, str) for a in answer))):
            raise UserError(f"{record.where}: expected 'answer' as a string or a list of strings")
    if not Path(path).exists():
        raise UserError(f"--data {path}: no such file")
    records = read_jsonl(path, skip_bad_lines, check)
    return [r.data["prompt"] for r in records], [r.data["answer"] for r in records], records.skipped
