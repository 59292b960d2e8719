"""`foundry eval` (perplexity, exact match, lm-eval tasks; one model or two side by side) and `foundry lm-eval`
(lm-eval's own command line, with foundry model directories as `--model foundry`)."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from foundry.cli.engine_flags import add_device_flags, check_quantize_flags, resolve_run_dtype
from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError

if TYPE_CHECKING:  # imported when a verb runs: `foundry --help` needs no torch
    from foundry.hub.directory import LoadedModel
    from foundry.infer.engine import Engine

LM_EVAL_MISSING = "lm-eval is not installed; install it with: pip install 'foundry[eval]'"
LM_EVAL_PREFIX = "lm-eval:"


class ModelUnderTest:
    """One model of an evaluation: its directory, loaded once, and the one Engine its generative tasks share."""

    def __init__(self, spec: str, device: str = "auto", dtype: str = "auto", err: TextIO | None = None,
                 quantize: str | None = None, group_size: int | None = None):
        from foundry import hub
        from foundry.hub.device import resolve_device

        self.spec = spec
        self.dir = hub.resolve_model_dir(spec)
        self.device = resolve_device(device)
        self.dtype = resolve_run_dtype(self.dir, dtype, self.device, err)
        check_quantize_flags(quantize, group_size)
        self.quantize, self.group_size = quantize, group_size  # weight-only, applied on loading
        self._loaded: LoadedModel | None = None
        self._engine: Engine | None = None

    @property
    def loaded(self) -> LoadedModel:
        """The model, tokenizer and generation config (loaded at first use)."""
        if self._loaded is None:
            from foundry import hub

            self._loaded = hub.load(self.dir, device=self.device, dtype=self.dtype)
            if self.quantize is not None:
                from foundry.model.weight_only import quantize_model

                quantize_model(self._loaded.model, self.quantize, self.group_size)
        return self._loaded

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer; UserError when the directory has none."""
        if self.loaded.tokenizer is None:
            raise UserError(f"{self.spec} has no tokenizer.json: evaluating on text needs the model's tokenizer")
        return self.loaded.tokenizer

    @property
    def engine(self) -> Engine:
        """The inference engine over the same loaded model (built at first use)."""
        if self._engine is None:
            from foundry.infer.engine import Engine

            self.tokenizer  # noqa: B018  (generation needs one: say so before building anything)
            self._engine = Engine(self.loaded.model, self.loaded.tokenizer, self.device,
                                  self.loaded.generation_config)
        return self._engine

    @property
    def context(self) -> int:
        return self.loaded.config.max_position_embeddings


# A task: run(model, task name as given, data, args) -> metrics. Numbers are tabulated; other values are kept in
# foundry.json but not shown; keys starting with "_" are shown only with --predictions and never recorded.
TaskRun = Callable[[ModelUnderTest, str, "str | None", argparse.Namespace], dict[str, Any]]


@dataclass
class EvalTask:
    """A task `foundry eval --task NAME` runs; needs_data: it takes one --data."""

    name: str
    run: TaskRun
    needs_data: bool
    help: str


TASKS: dict[str, EvalTask] = {}


def register_task(task: EvalTask) -> None:
    """Make a task available to `foundry eval --task` (e.g. classification models' `classify`)."""
    TASKS[task.name] = task


def _task(name: str) -> EvalTask:
    if name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX):
        return TASKS["lm-eval"]
    if name in TASKS and name != "lm-eval":
        return TASKS[name]
    known = ", ".join([n for n in TASKS if n != "lm-eval"] + [f"{LM_EVAL_PREFIX}TASK"])
    raise UserError(f"unknown --task {name!r}; known tasks: {known}")


# ---- the tasks ------------------------------------------------------------------------------

def _seq_len(model: ModelUnderTest, args: argparse.Namespace) -> int:
    seq_len = args.seq_len or model.context
    if not 1 <= seq_len <= model.context:
        raise UserError(f"--seq-len must be in 1..{model.context} (the model's context), got {seq_len}")
    return seq_len


def run_perplexity(model: ModelUnderTest, task: str, data: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity (and bits per byte for text) over a text file or directory, a JSONL, or a token data dir."""
    from foundry.eval import scoring

    if scoring.is_token_data(data):
        score = scoring.score_token_data(model.loaded.model, data, _seq_len(model, args), args.batch_size,
                                         args.split, model.tokenizer, args.max_batches)
    else:
        texts, skipped = scoring.read_texts(data, args.field, args.skip_bad_lines)
        score = scoring.score_texts(model.loaded.model, model.tokenizer, texts, _seq_len(model, args),
                                    args.batch_size)
        return {**score.metrics(), **_skipped(skipped)}
    return score.metrics()


def run_exact_match(model: ModelUnderTest, task: str, data: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy answers to a JSONL's prompts (one batched engine call) against its answers."""
    from foundry.eval.scoring import exact_match, normalize_answer, read_qa
    from foundry.infer.sampling import SamplingParams

    prompts, answers, skipped = read_qa(data, args.skip_bad_lines)
    stop = ["\n"] if args.stop_at == "newline" else []
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, stop=stop)
    inputs = prompts
    if args.chat:  # a chat-tuned model answers a user turn rendered with its own template
        inputs = [model.tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
                  for p in prompts]
    predictions = [c.text for c in model.engine.generate(inputs, params)]
    score = exact_match(predictions, answers)
    examples = [{"prompt": p, "prediction": normalize_answer(t), "answer": a}
                for p, t, a in zip(prompts, predictions, answers)]
    return {"exact_match": score, "correct": round(score * len(prompts)), "examples": len(prompts),
            **_skipped(skipped), "_predictions": examples}


def run_classify(model: ModelUnderTest, task: str, data: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """A classification model's accuracy, macro-F1 and confusion on a {"text", "label"} JSONL."""
    from foundry.data.labels import eval_batches, read_labelled
    from foundry.eval.classification import evaluate_classifier
    from foundry.hub.classifier import is_classifier_dir, load_classifier

    if not is_classifier_dir(model.dir):
        raise UserError(f"--task classify needs a classification model (`foundry finetune --recipe classify`); "
                        f"{model.spec} is a causal language model")
    classifier, tokenizer, labels = load_classifier(model.dir, device=model.device)
    if tokenizer is None:
        raise UserError(f"{model.spec} has no tokenizer.json: classifying text needs the model's tokenizer")
    examples = read_labelled(data, args.skip_bad_lines)
    context = classifier.config.max_position_embeddings
    ids = examples.encode(tokenizer, min(args.seq_len or context, context))
    batches = eval_batches(ids, examples.label_ids(labels), args.batch_size, classifier.pad_token_id)
    report = evaluate_classifier(classifier, batches, labels, model.device)
    return {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "majority_baseline": report.majority_baseline,
            "examples": report.count, "report": report.to_dict(), **_skipped(examples.skipped)}


def _skipped(skipped: list[str]) -> dict[str, Any]:
    """The count of bad lines skipped, as a metric, and a warning naming the first (never a silent skip)."""
    if not skipped:
        return {}
    sys.stderr.write(f"warning: skipped {len(skipped)} bad line(s); the first: {skipped[0]}\n")
    return {"skipped_lines": len(skipped)}


def engine_generate(engine: Engine) -> Callable[[list, list[list[str]], list[int]], list[str]]:
    """The `generate` FoundryLM asks for, through foundry's one inference engine: greedy, one batched call."""
    from foundry.infer.sampling import SamplingParams

    def generate(prompts: list, until: list[list[str]], max_gen_toks: list[int]) -> list[str]:
        params = [SamplingParams(temperature=0.0, max_new_tokens=n, stop=[s for s in stops if s])
                  for stops, n in zip(until, max_gen_toks)]
        return [c.text for c in engine.generate(prompts, params)]

    return generate


def import_harness() -> Any:
    """foundry.eval.harness, or UserError saying how to install lm-eval."""
    import importlib

    try:
        harness = importlib.import_module("foundry.eval.harness")
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "lm_eval":
            raise
        raise UserError(LM_EVAL_MISSING) from None
    return harness


def run_lm_eval_task(model: ModelUnderTest, task: str, data: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """One lm-eval task through FoundryLM: its metrics (`acc`, `acc_norm`, `word_perplexity`, ...)."""
    harness = import_harness()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    name = task.removeprefix(LM_EVAL_PREFIX)
    lm = harness.FoundryLM(model.loaded.model, model.tokenizer, engine_generate(model.engine), args.batch_size,
                           args.seq_len)
    # Only the tasks of --include-path are indexed when it is given (indexing lm-eval's own takes seconds).
    manager = TaskManager(include_path=args.include_path, include_defaults=args.include_path is None)
    if name not in manager.all_tasks:
        raise UserError(f"lm-eval has no task {name!r}" + (f" in {args.include_path}" if args.include_path else "")
                        + "; see `lm-eval ls tasks`, or give --include-path DIR with its YAML")
    results = simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=args.limit,
                              num_fewshot=args.num_fewshot)
    metrics: dict[str, Any] = {}
    for key, value in results["results"].get(name, {}).items():
        metric, _, task_filter = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "alias":
            metrics[metric if task_filter in ("", "none") else f"{metric},{task_filter}"] = value
    return metrics


register_task(EvalTask("perplexity", run_perplexity, True,
                       "loss, perplexity and bits per byte over --data: a text file, a directory of text, a JSONL "
                       "(--field) or a `foundry prepare` data directory (--split)"))
register_task(EvalTask("exact-match", run_exact_match, True,
                       "greedy answers to --data JSONL {\"prompt\", \"answer\"} vs the answers (whitespace-stripped)"))
register_task(EvalTask("classify", run_classify, True,
                       "accuracy, macro-F1 and confusion of a classification model on a {text, label} JSONL"))
register_task(EvalTask("lm-eval", run_lm_eval_task, False, "lm-eval:TASK runs an lm-eval task (pip install "
                       "'foundry[eval]'; --include-path for local task YAMLs)"))


# ---- running and recording ------------------------------------------------------------------

def _plan(tasks: list[str], data: list[str]) -> list[tuple[str, str | None]]:
    """(task, data) pairs: one --data for every task that takes data, or one each in order."""
    takers = [t for t in tasks if _task(t).needs_data]
    if takers and not data:
        raise UserError(f"--task {takers[0]} needs --data FILE")
    if len(data) > 1 and len(data) != len(takers):
        raise UserError(f"got {len(data)} --data for {len(takers)} task(s) that take data; give one --data for all "
                        "or one per such --task, in order")
    paired = iter(data if len(data) > 1 else data * len(takers))
    plan = [(t, next(paired) if _task(t).needs_data else None) for t in tasks]
    for _, path in plan:
        if path is not None and not Path(path).exists():
            raise UserError(f"--data {path}: no such file or directory")
    return plan


def result_key(task: str, data: str | None) -> str:
    """Where a result lives under foundry.json's "eval": the task, and the data's file name."""
    return f"{task}:{Path(data).name}" if data else task


def record_results(model_dir: Path, results: dict[str, dict[str, Any]]) -> None:
    """Merge results into model_dir/foundry.json under "eval" (atomically; other keys and results kept)."""
    from foundry.core.files import write_json

    path = model_dir / "foundry.json"
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} to add the results ({exc}); fix or remove it, or pass --no-save") \
            from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object; fix or remove it, or pass --no-save")
    evals = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
    meta["eval"] = {**evals, **results}
    write_json(path, meta)


def evaluate_model(model: ModelUnderTest, plan: list[tuple[str, str | None]],
                   args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run every (task, data) of the plan on one model: {result key: metrics}."""
    out = {}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for task, data in plan:
        metrics = _task(task).run(model, task, data, args)
        extra = {"data": str(Path(data).resolve())} if data else {}
        out[result_key(task, data)] = {**metrics, **extra, "evaluated_at": stamp}
    return out


def _numbers(metrics: dict[str, Any]) -> dict[str, float | int]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")}


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}"


def result_rows(names: list[str], results: list[dict[str, dict[str, Any]]]) -> list[list[str]]:
    """Table rows: task, metric, each model's value, and with two models B - A."""
    header = ["task", "metric", *names] + (["difference (B - A)"] if len(names) == 2 else [])
    rows = [header]
    for key in results[0]:
        values = [_numbers(r.get(key, {})) for r in results]
        for metric in values[0]:
            cells = [v.get(metric) for v in values]
            row = [key, metric, *[_format(c) for c in cells]]
            if len(cells) == 2:
                a, b = cells
                diff = b - a if a is not None and b is not None else None
                row.append(_format(diff) if not isinstance(diff, int) else f"{diff:+,}")
            rows.append(row)
    return rows


def print_table(rows: list[list[str]], out: TextIO) -> None:
    """A rich table on a terminal, else plain aligned columns (never cut to 80 columns)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out)
    if not console.is_terminal:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out.writelines("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                for i, (cell, w) in enumerate(zip(row, widths))).rstrip() + "\n" for row in rows)
        return
    table = Table()
    for i, header in enumerate(rows[0]):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


def run_eval(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """`foundry eval`: run the tasks on one model (or two, side by side), print them and record them."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    plan = _plan(args.task, args.data or [])
    specs = [args.model] + ([args.model_b] if args.model_b else [])
    models, results = [], []
    for spec in specs:
        model = ModelUnderTest(spec, args.device, args.dtype, err, args.quantize, args.group_size)
        models.append(model)
        results.append(evaluate_model(model, plan, args))
        model._loaded = model._engine = None  # one model in memory at a time
    if not args.no_save:
        for model, result in zip(models, results):
            record_results(model.dir, {k: {m: v for m, v in r.items() if not m.startswith("_")}
                                       for k, r in result.items()})
    if args.json:
        payload = {spec: {k: {m: v for m, v in r.items() if not m.startswith("_") or args.predictions}
                          for k, r in result.items()} for spec, result in zip(specs, results)}
        out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        return
    names = specs if len(specs) == 1 else [f"A: {specs[0]}", f"B: {specs[1]}"]
    print_table(result_rows(names, results), out)
    if args.predictions:
        for spec, result in zip(specs, results):
            for key, r in result.items():
                for example in r.get("_predictions", []):
                    out.write(json.dumps({"model": spec, "task": key, **example}, ensure_ascii=False) + "\n")


def _cmd_eval(args: argparse.Namespace) -> None:
    run_eval(args)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "eval", _cmd_eval, "Measure a model (or two, side by side): perplexity and bits per byte, "
                 "exact match of greedy answers, lm-eval tasks. Results go into each model's foundry.json.")
    p.add_argument("model", help="model directory, run directory or Hub id")
    p.add_argument("model_b", nargs="?", default=None, help="a second model, compared with the first")
    p.add_argument("--task", action="append", required=True, metavar="TASK",
                   help="repeatable: " + "; ".join(f"{t.name}: {t.help}" for t in TASKS.values()))
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="the data of the tasks that take data: one for all, or one per such --task in order")
    p.add_argument("--field", default="text", help="the text field of a JSONL for perplexity")
    p.add_argument("--split", default="val", choices=("train", "val"), help="the split of a token data directory")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens of context per scored window (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows (or lm-eval requests) per forward")
    p.add_argument("--max-batches", type=int, default=None,
                   help="token data only: score a fixed sample of this many batches spread over the split")
    p.add_argument("--max-new-tokens", type=int, default=32, help="exact-match: most tokens per answer")
    p.add_argument("--chat", action="store_true",
                   help="exact-match: send each prompt as a user turn through the model's chat template")
    p.add_argument("--stop-at", default="newline", choices=("newline", "eos"),
                   help="exact-match: an answer ends at the first newline (or eos), or only at eos")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) JSONL lines that are not usable")
    p.add_argument("--include-path", default=None, metavar="DIR", help="lm-eval: a folder of task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (a count or fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples in each prompt")
    add_device_flags(p)
    p.add_argument("--no-save", action="store_true", help="do not write the results into foundry.json")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--predictions", action="store_true",
                   help="also print each exact-match prompt, prediction and answer (JSON Lines)")


# ---- `foundry lm-eval` ----------------------------------------------------------------------

def _batch_size(value: Any) -> int:
    # lm-eval passes its own --batch_size (default 1; "auto" means "find one", which a CPU need not).
    if value in (None, "auto") or str(value).startswith("auto"):
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise UserError(f"batch_size must be a positive integer, got {value!r}")
    return size


def _harness_device(device: Any) -> str:
    # lm-eval's --device defaults to cuda:0, so on a machine without CUDA that default means "here".
    import torch

    device = str(device or "auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.stderr.write(f"warning: device {device!r}: no CUDA device here; running on cpu\n")
        return "cpu"
    return device


@functools.cache
def harness_model_class() -> type:
    """lm-eval's model "foundry", registered: --model_args pretrained=DIR[,batch_size=N][,max_length=N]
    [,device=D][,dtype=auto|fp32|bf16|fp16]."""
    harness = import_harness()
    import lm_eval.models  # noqa: F401  (lm-eval registers its own models on import; the registry must know them)
    from lm_eval.api.registry import model_registry, register_model

    class FoundryHarnessModel(harness.FoundryLM):
        """A foundry model directory as an lm-eval model, generating through foundry's inference engine."""

        def __init__(self, pretrained: str | None = None, batch_size: Any = 8, max_length: Any = None,
                     device: Any = "auto", dtype: str = "auto", max_batch_size: Any = None, **unknown: Any):
            if not pretrained:
                raise UserError("--model foundry needs --model_args pretrained=MODEL_DIR")
            if unknown:
                raise UserError(f"--model_args {', '.join(sorted(unknown))}: not understood by the foundry model; "
                                "it takes pretrained, batch_size, max_length, device, dtype")
            model = ModelUnderTest(str(pretrained), _harness_device(device), str(dtype))
            super().__init__(model.loaded.model, model.tokenizer, engine_generate(model.engine),
                             _batch_size(batch_size), int(max_length) if max_length else None)
            self.model_under_test = model

    if "foundry" not in model_registry:
        register_model("foundry")(FoundryHarnessModel)
        return FoundryHarnessModel
    return model_registry.get("foundry")


def run_lm_eval_cli(argv: list[str]) -> int:
    """lm-eval's own command line (`lm-eval run ...`, `lm-eval ls tasks`, ...) with the model "foundry" known."""
    harness_model_class()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["foundry lm-eval", *argv]  # lm-eval reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's exits: --help is 0, a bad flag 2
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    return run_lm_eval_cli(args.lm_eval_args)


def _add_lm_eval(sub: argparse._SubParsersAction) -> None:
    help = ("lm-eval's own command line with foundry models: foundry lm-eval --model foundry --model_args "
            "pretrained=MODEL_DIR --tasks TASK [--include_path DIR] ... (pip install 'foundry[eval]')")
    p = sub.add_parser("lm-eval", help=help, description=help, add_help=False, prefix_chars="\0")
    p.set_defaults(handler=_cmd_lm_eval)
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments (-h for its help)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` and `lm-eval` verbs."""
    _add_eval(sub)
    _add_lm_eval(sub)
