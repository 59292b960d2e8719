"""`foundry plan`: the planner's figures as tables or JSON (torch-free, like the planner)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from foundry.cli.parsing import add_verb


def _cmd_plan(args: argparse.Namespace) -> None:
    import dataclasses

    from foundry.hub import resolve_model_source
    from foundry.plan import PlanRequest, make_plan

    fields = {f.name for f in dataclasses.fields(PlanRequest)}
    request = PlanRequest(**{k: v for k, v in vars(args).items() if k in fields})
    if args.model is not None and args.params is None:  # the planner takes a config; the hub resolves the spec
        request.model, request.model_name = resolve_model_source(args.model)[0], args.model
    print_plan(make_plan(request), as_json=args.json)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `plan` verb."""
    from foundry.plan.hardware import NAMES

    p = add_verb(sub, "plan", _cmd_plan, "Training FLOPs, time, cost and memory per device, compute-optimal sizing "
                                     "and inference limits, before you spend (no torch needed).")
    p.add_argument("model", nargs="?", help="preset, config YAML/JSON, model directory or run directory")
    p.add_argument("--params", help="parameter count instead of a model, e.g. 70B (no shape: 6ND only)")
    p.add_argument("--tokens", help="training tokens, e.g. 15.6T (default: compute-optimal for the size)")
    p.add_argument("--hardware", default="h100-sxm", help=f"one of {', '.join(NAMES)} (default h100-sxm)")
    p.add_argument("--gpus", type=int, help="devices in all (default dp x tp x pp)")
    p.add_argument("--dp", type=int, help="data-parallel degree (default --gpus / (tp x pp))")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (default 1)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel degree for a mixture of experts: the routed experts' states split over "
                        "ep of the data-parallel ranks (default 1)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage over the data-parallel ranks")
    p.add_argument("--fsdp", choices=("full", "grad-op"), help="FSDP sharding: full = ZeRO-3, grad-op = ZeRO-2")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="Megatron sequence parallelism (default: on when --tp > 1)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective",
                   help="activation recompute (default selective: no attention scores kept, as FlashAttention)")
    p.add_argument("--kernels", choices=("fused", "eager"), default="fused",
                   help="fused (Megatron-style) or PyTorch eager activation accounting (default fused)")
    p.add_argument("--precision", choices=("bf16-mixed", "fp32"), default="bf16-mixed",
                   help="bf16-mixed: 2+2+12 bytes/parameter with Adam; fp32: 4+4+8 (default bf16-mixed)")
    p.add_argument("--mfu", type=float,
                   help="model-FLOPs utilisation, 0-1 (default: the hardware's, from published runs)")
    p.add_argument("--price", type=float, help="$ per device-hour (default: the catalog's indicative rate)")
    p.add_argument("--seq-len", type=int, help="training sequence length (default min(4096, model maximum))")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-batch (default 1)")
    p.add_argument("--budget-flops", help="size a compute-optimal model for this many FLOPs, e.g. 1e24")
    p.add_argument("--budget-dollars", help="size a compute-optimal model for this many dollars, e.g. 1M")
    p.add_argument("--loss-law", choices=("besiroglu2024", "hoffmann2022"), default="besiroglu2024",
                   help="fitted loss law for predicted loss (default besiroglu2024)")
    p.add_argument("--context", type=int, help="inference context length (default --seq-len)")
    p.add_argument("--weight-dtype", choices=("bf16", "fp16", "fp8", "int8", "int4"), default="bf16",
                   help="inference weight format (default bf16)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp16", "fp8", "int8"), default="bf16",
                   help="inference KV-cache format (default bf16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def print_plan(plan: dict[str, Any], as_json: bool = False) -> None:
    """Print the plan as rich tables, or as JSON."""
    if as_json:
        print(json.dumps(plan, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    hw, lay = plan["hardware"], plan["layout"]
    head = f"[bold]{_model_line(plan['model'])}[/] on {lay['gpus']} x {hw['label']}"
    if "training" in plan:
        ep = f", ep {lay['ep']}" if plan["model"].get("experts") else ""
        head += (f": dp {lay['dp']}, tp {lay['tp']}, pp {lay['pp']}{ep}, ZeRO {lay['zero']}, "
                 f"recompute {lay['recompute']}, seq {lay['seq_len']}, micro-batch {lay['micro_batch']}")
    console.print(head)
    for title, rows in _sections(plan):
        table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in [f"MFU {hw['mfu']:.0%}: {hw['mfu_source']}", f"hardware: {hw['spec_source']}", *plan["notes"]]:
        console.print(f"[dim]- {note}[/]")


def _sections(plan: dict[str, Any]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    hw, lay, out = plan["hardware"], plan["layout"], []
    if "training" in plan:
        t, m = plan["training"], plan["memory"]
        loss = f"{t['predicted_loss']:.3f} nats/token" if t["predicted_loss"] is not None else "n/a (MoE)"
        out.append(("Training", [
            ("tokens", _count(t["tokens"]), f"{t['tokens_per_param']:.1f} per parameter; {t['tokens_source']}"),
            ("FLOPs", f"{t['flops']:.3g}", f"6ND {t['flops_6nd']:.3g} + attention {t['flops_attention']:.2g}"),
            ("time", _duration(t["seconds"]), f"{_devices(lay['gpus'])} at {hw['mfu']:.0%} MFU"),
            ("device-hours", _count(t["device_hours"]), ""),
            ("cost", _usd(t["cost"]), f"at ${hw['price_per_hour']:.2f}/device-hour"),
            ("predicted loss", loss, "loss law in the notes")]))
        fits = "n/a" if m["activations"] is None else ("yes" if m["fits"] else "NO")
        rows = [(k, _bytes(m[k]), "") for k in ("weights", "gradients", "optimizer")]
        rows += _expert_rows(plan)
        rows += [("activations", _bytes(m["activations"]), f"Korthikanti et al. 2022, {lay['kernels']} kernels"),
                 ("total", _bytes(m["total"]), f"of {_bytes(m['capacity'])}"),
                 ("fits", fits, "" if m["max_micro_batch"] is None else f"largest micro-batch {m['max_micro_batch']}")]
        out.append(("Memory per device", rows))
    if "compute_optimal" in plan:
        c = plan["compute_optimal"]
        lo = c["law_optimum"]
        out.append(("Compute-optimal for the budget", [
            ("budget", f"{c['budget_flops']:.3g} FLOPs",
             f"{_usd(c['cost'])}, {_count(c['device_hours'])} device-hours"),
            ("parameters", _count(c["params"]), "Chinchilla Table 3 (fit in the notes)"),
            ("tokens", _count(c["tokens"]), f"{c['tokens_per_param']:.1f} per parameter"),
            ("predicted loss", f"{c['predicted_loss']:.3f} nats/token", "loss law in the notes"),
            ("loss-law optimum", f"{_count(lo['params'])} params, {_count(lo['tokens'])} tokens",
             f"loss {lo['loss']:.3f}"),
            ("time", _duration(c["days"] * 86400), f"on {_devices(lay['gpus'])}")]))
    if "inference" in plan:
        i = plan["inference"]
        per_device = f"{_bytes(i['weights_per_device'])} on each of {i['replica_devices']}"
        rows = [("weights", _bytes(i["weights"]), per_device)]
        if i["kv_per_token"]:
            request = f"{_bytes(i['kv_per_request'])} per {i['context']}-token request"
            rows += [("KV cache", f"{_bytes(i['kv_per_token'])}/token", request),
                     ("largest batch", str(i["max_batch"]), f"at context {i['context']}")]
        rows.append(("decode, batch 1", f"{i['decode_tokens_per_s_batch1']:,.0f} tokens/s",
                     f"{i['bound_batch1']}-bound ceiling"))
        if i.get("decode_tokens_per_s"):
            rows += [("decode, full batch", f"{i['decode_tokens_per_s']:,.0f} tokens/s", f"{i['bound']}-bound ceiling"),
                     ("$ per million tokens", _usd(i["dollars_per_million_tokens"]), "at the full-batch ceiling")]
        out.append(("Inference", rows))
    return out


def _expert_rows(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The model states split into the routed experts' (over ep) and the rest's, for a mixture of experts."""
    m, model, lay = plan["memory"], plan["model"], plan["layout"]
    if not m.get("routed_expert_params"):
        return []
    share = m["routed_expert_params"] / model["params"]
    return [("  routed experts", _bytes(m["expert_states"]),
             f"weights + gradients + optimizer; {share:.1%} of the parameters, split over ep {lay['ep']}"),
            ("  the rest", _bytes(m["dense_states"]), "attention, dense layers, embeddings, routers, shared experts")]


def _model_line(model: dict[str, Any]) -> str:
    if model["params"] is None:
        return "compute-optimal sizing"
    active = model["active_params"]
    extra = f", {_count(active)} active" if active != model["params"] else ""
    return f"{model['source']} ({_count(model['params'])} parameters{extra})"


def _devices(n: int) -> str:
    return f"{n} device" + ("s" if n != 1 else "")


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _usd(n: float) -> str:
    return f"${_count(n)}" if n >= 1e3 else f"${n:.2f}" if n >= 0.01 else f"${n:.2g}"


def _duration(seconds: float) -> str:
    for unit, scale in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"
