"""FoundryLM (lm-eval's model interface over a foundry Transformer) scores local lm-eval tasks exactly as
lm-eval's own `hf` backend does on the same weights, and `foundry lm-eval` runs a generation task end to end
through foundry's inference engine."""

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend, the reference

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from test_eval_cli import build_eval_model_dir

from foundry import hub
from foundry.cli import main
from foundry.cli.eval import harness_model_class
from foundry.eval.harness import FoundryLM
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams

MAX_LENGTH = 32  # small, so that long documents take several rolling windows and long prompts are cut
GEN_PROMPTS = ["def load(", "import json\n", "class Message", "return self.", "# Copyright"]


def _task(name: str, data: Path, **fields) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", **fields}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, sample_texts):
    root = tmp_path_factory.mktemp("harness")
    model_dir = build_eval_model_dir(root / "model", tiny_tokenizer)
    tasks = root / "tasks"
    tasks.mkdir()
    questions = [
        ("What does json.loads return?", ["a Python object", "bytes", "a file handle that is open for reading"], 0),
        ("Which module parses e-mail?", ["email", "json", "neither of them, it is done by hand"], 0),
        ("2 + 2 =", [" 4", " 5", " 22"], 2),
        (("A very long question that goes on and on so that the context and the continuation together outgrow "
          "the thirty-two tokens of context the model is given here"), ["yes", "no, it does not"], 1),
        ("", ["Starting with nothing", "x"], 1),  # an empty context: the prefix token stands for it
    ]
    mc = _write_jsonl(root / "mc.jsonl", [{"question": q, "choices": c, "label": a} for q, c, a in questions])
    docs = [sample_texts[0][:600], sample_texts[1][:90], "short one", sample_texts[2][:1500]]
    ppl = _write_jsonl(root / "ppl.jsonl", [{"text": d} for d in docs])
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump(_task(
        "tiny_mc", mc, output_type="multiple_choice", doc_to_text="{{question}}", doc_to_target="label",
        doc_to_choice="choices", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])))
    (tasks / "tiny_ppl.yaml").write_text(yaml.safe_dump(_task(
        "tiny_ppl", ppl, output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
        metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")])))
    # Answers made equal to the engine's greedy continuations, cut at the first newline as lm-eval cuts them.
    engine = Engine.load(model_dir)
    greedy = [c.text.split("\n")[0] for c in engine.generate(
        GEN_PROMPTS, SamplingParams(temperature=0, max_new_tokens=8, stop=["\n"]))]
    assert any(greedy)
    gen = _write_jsonl(root / "gen.jsonl", [{"prompt": p, "answer": a} for p, a in zip(GEN_PROMPTS, greedy)])
    (tasks / "tiny_gen.yaml").write_text(yaml.safe_dump(_task(
        "tiny_gen", gen, output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        metric_list=[{"metric": "exact_match"}])))
    return model_dir, tasks


def _metrics(results: dict, task: str) -> dict[str, float]:
    return {k: v for k, v in results["results"][task].items() if isinstance(v, (int, float))}


def test_loglikelihoods_match_lm_evals_hf_backend(setup):
    model_dir, tasks = setup
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    names = ["tiny_mc", "tiny_ppl"]
    loaded = hub.load(model_dir)
    ours = simple_evaluate(model=FoundryLM(loaded.model, loaded.tokenizer, batch_size=3, max_length=MAX_LENGTH),
                           tasks=names, task_manager=manager)
    reference = simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "device": "cpu",
                                                        "dtype": "float32", "max_length": MAX_LENGTH},
                                tasks=names, task_manager=manager, batch_size=2)
    for name in names:
        got, expected = _metrics(ours, name), _metrics(reference, name)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, key)
    assert {"acc,none", "acc_norm,none"} <= _metrics(ours, "tiny_mc").keys()
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= _metrics(ours, "tiny_ppl").keys()


def test_rolling_loglikelihoods_match_the_hf_backend_document_by_document(setup, sample_texts):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model_dir, _ = setup
    loaded = hub.load(model_dir)
    ours = FoundryLM(loaded.model, loaded.tokenizer, batch_size=4, max_length=MAX_LENGTH)
    reference = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", max_length=MAX_LENGTH, batch_size=4)
    docs = [sample_texts[3][:700], "x", sample_texts[4][:64]]
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    assert ours.loglikelihood_rolling(requests) == pytest.approx(reference.loglikelihood_rolling(requests), rel=1e-5)
    pairs = [("def load(", " path"), ("", "import json"), ("x" * 200, " tail end")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got, expected = ours.loglikelihood(requests), reference.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], rel=1e-5)


def test_generation_without_a_generate_is_refused(setup):
    from foundry.core.errors import UserError

    model_dir, _ = setup
    loaded = hub.load(model_dir)
    with pytest.raises(UserError, match="without a `generate`"):
        FoundryLM(loaded.model, loaded.tokenizer).generate_until([object()])


def test_registered_foundry_model_generates_through_the_engine(setup):
    model_dir, tasks = setup
    cls = harness_model_class()
    assert harness_model_class() is cls  # registering twice is harmless
    results = simple_evaluate(model="foundry", model_args={"pretrained": str(model_dir)}, tasks=["tiny_gen"],
                              task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                              batch_size=4, device="cpu", log_samples=True)
    assert results["results"]["tiny_gen"]["exact_match,none"] == 1.0
    responses = [s["filtered_resps"][0] for s in sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert responses == [json.loads(line)["answer"]
                         for line in (model_dir.parent / "gen.jsonl").read_text().splitlines()]


@pytest.mark.slow  # lm-eval's own command line indexes its ~15k built-in tasks first (~10 s)
def test_foundry_lm_eval_command_runs_a_generation_task(setup, capsys, tmp_path):
    model_dir, tasks = setup
    code = main(["lm-eval", "--model", "foundry", "--model_args", f"pretrained={model_dir}", "--tasks", "tiny_gen",
                 "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    row = [cell.strip() for cell in next(line for line in out.splitlines() if "exact_match" in line).split("|")]
    assert row[1] == "tiny_gen" and float(row[row.index("exact_match") + 2]) == 1.0
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results_file.read_text())["results"]["tiny_gen"]["exact_match,none"] == 1.0


def test_the_foundry_model_refuses_a_missing_directory_and_unknown_arguments(setup, tmp_path):
    from foundry.core.errors import UserError

    model_dir, _ = setup
    cls = harness_model_class()
    with pytest.raises(UserError, match="not found"):
        cls.create_from_arg_string(f"pretrained={tmp_path / 'nope'}", {"batch_size": 2, "device": "cpu"})
    with pytest.raises(UserError, match="temperature: not understood"):
        cls.create_from_arg_string(f"pretrained={model_dir},temperature=1")
    with pytest.raises(UserError, match="needs --model_args pretrained"):
        cls.create_from_arg_obj({}, {"batch_size": 1})


def test_foundry_eval_runs_an_lm_eval_task_and_records_it(setup, capsys):
    model_dir, tasks = setup
    assert main(["eval", str(model_dir), "--task", "lm-eval:tiny_mc", "--include-path", str(tasks),
                 "--seq-len", str(MAX_LENGTH), "--batch-size", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[str(model_dir)]["lm-eval:tiny_mc"]
    loaded = hub.load(model_dir)
    direct = simple_evaluate(model=FoundryLM(loaded.model, loaded.tokenizer, max_length=MAX_LENGTH),
                             tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks),
                                                                         include_defaults=False))
    assert got["acc"] == direct["results"]["tiny_mc"]["acc,none"]
    assert got["acc_norm"] == direct["results"]["tiny_mc"]["acc_norm,none"]
    recorded = json.loads((model_dir / "foundry.json").read_text())["eval"]["lm-eval:tiny_mc"]
    assert recorded["acc"] == got["acc"] and "acc_stderr" in recorded
