"""GPU check of the injection step: what the CUDA path (bf16 autocast) does against the CPU path (fp32).

One JSON object (stdout and OUT/gpu_check.json) with:
  * m3oe: the `benchmarks.m3oe` figures on this device;
  * round: one full FedKIM round (4 sites train, aggregate, inject, evaluate) on the default params, with the
    seconds of each phase, the peak CUDA memory and the headline metrics;
  * parity: the same injection, from the same initial state and batches, on CUDA in bf16 and on the CPU in fp32:
    the loss curves side by side, their largest gap, each side's seconds, and whether the FM's weights stayed
    bit-identical on CUDA;
  * merge: a merged (task, modality) adapter loaded through peft on CUDA against the M3OE model (fp32).

    python -m benchmarks.gpu_check --out DIR [--foundation smollm2|tiny|DIR] [--random-init-from DIR]
                                   [--work DIR] [--data-root DIR] [--set key=value ...] [--skip CHECK] [--profile]

`--random-init-from DIR` builds the FM from DIR's config.json and tokenizer with random weights (seeded): the
shapes, and so the costs, of the real model where its weights cannot travel (the device machine takes 64 MiB).
Without a GPU it runs on the CPU and says so; `--foundation tiny` makes that a quick smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def random_foundation(source: Path, target: Path, seed: int = 0) -> Path:
    """An FM directory with source's config and tokenizer and seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(source / name, target / name)
    return target


def fm_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.fm.named_parameters() if "lora_" not in n}


def peak_cuda_mb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def m3oe_figures(foundation: str, profile: Path | None = None) -> dict:
    extra = ["--profile", str(profile)] if profile is not None else []
    run = subprocess.run([sys.executable, "-m", "benchmarks.m3oe", "--foundation", foundation, *extra],
                         cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def full_round(params, work: Path) -> dict:
    from fedkim.experiment import run_variant

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run_variant(params, "fedkim", work)
    seconds = time.perf_counter() - started
    record = result.rounds[0]
    sites = sum(s["seconds"] for s in record.sites.values())
    inject_s = record.injection["seconds"]
    return {"seconds": round(seconds, 1), "sites_seconds": round(sites, 1), "inject_seconds": inject_s,
            "evaluate_and_rest_seconds": round(seconds - sites - inject_s, 1),
            "inject_steps": record.injection["steps"], "first_loss": record.injection["first_loss"],
            "last_loss": record.injection["last_loss"], "peak_cuda_mb": peak_cuda_mb(),
            "site_metrics": {s: v["metrics"] for s, v in record.sites.items()},
            **{k: result.metrics[k] for k in ("train_mean_f1", "zeroshot_mean", "mean_auroc", "gate_distance")},
            "tasks": {t: m.get("primary") for t, m in result.metrics["tasks"].items()}}


def injection_parity(params) -> dict:
    """The same injection on CUDA (bf16 autocast) and on the CPU (fp32): same initial state, same batches."""
    from fedkim.central.inject import inject
    from fedkim.central.variants import VARIANTS, build_central
    from fedkim.members import split_dir

    public = split_dir(params, "public")
    out = {}
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        p = params.inject.model_copy(update={"device": device})
        model = build_central(params, VARIANTS["fedkim"])
        before = fm_weights(model)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = inject(model, public, p, params.site, params.data, round_id="parity")
        after = {k: v.cpu() for k, v in fm_weights(model).items()}
        out[device] = {"seconds": round(result.seconds, 2), "steps": len(result.losses),
                       "ms_per_step": round(1000 * result.seconds / max(1, len(result.losses)), 1),
                       "losses": [round(x, 4) for x in result.losses],
                       "fm_bit_identical": all(torch.equal(before[k].cpu(), after[k]) for k in before),
                       "all_finite": all(math.isfinite(x) for x in result.losses)}
        if device == "cuda":
            out[device]["peak_cuda_mb"] = peak_cuda_mb()
        del model
    if "cuda" in out:
        pairs = list(zip(out["cuda"]["losses"], out["cpu"]["losses"]))
        out["max_abs_loss_gap"] = round(max(abs(a - b) for a, b in pairs), 4)
        out["mean_abs_loss_gap"] = round(sum(abs(a - b) for a, b in pairs) / len(pairs), 4)
        out["cuda_vs_cpu_speedup"] = round(out["cpu"]["seconds"] / out["cuda"]["seconds"], 2)
    return out


def merge_check(foundation: str) -> dict:
    """merge() on the device: the exported adapter, loaded through peft, against the M3OE model (fp32)."""
    from peft import PeftModel

    from fedkim.central.foundation import load_foundation
    from fedkim.central.m3oe import DEFAULT_TARGETS, M3OEConfig, attach_m3oe, merge
    from fedkim.central.model import reference_pairs
    from fedkim.data.catalogue import load_catalogue

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the comparison is at fp32 precision
    fm = load_foundation(foundation)
    fm.model.to(device)
    clean = copy.deepcopy(fm.model)
    config = M3OEConfig(num_experts=12, rank=8, alpha=16.0, targets=DEFAULT_TARGETS)
    m3oe = attach_m3oe(fm.model, config, fm.tokenizer, reference=reference_pairs(load_catalogue(), config.gate_norm)).to(device)
    with torch.no_grad():
        for layer in m3oe.layers.values():
            layer.lora_B.normal_(0, 0.02, generator=None)
    m3oe.eval()
    task = load_catalogue()["lung_opacity"]
    ids = torch.randint(0, fm.tokenizer.vocab_size, (4, 24), generator=torch.Generator().manual_seed(3)).to(device)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folder = merge(m3oe, task.task_description, task.modality_description, tmp)
        base = clean(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(clean, folder).eval()
        ours = m3oe([task.task_description] * 4, [task.modality_description] * 4, input_ids=ids).logits
        theirs = loaded(input_ids=ids).logits
    return {"adapter_changes_logits_by": round(float((ours - base).abs().max()), 4),
            "max_abs_diff_vs_peft": float((ours - theirs).abs().max()), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu_check.json goes")
    parser.add_argument("--work", type=Path, default=None, help="scratch: the FM's weights, round files (default: a temp dir)")
    parser.add_argument("--foundation", default="smollm2", help="smollm2, tiny or a local HF causal-LM directory")
    parser.add_argument("--random-init-from", type=Path, default=None,
                        help="build the FM from this directory's config and tokenizer, random weights")
    parser.add_argument("--data-root", type=Path, default=None, help="federation folder (generated if missing)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--skip", action="append", default=[], choices=["m3oe", "round", "parity", "merge"])
    parser.add_argument("--profile", action="store_true",
                        help="profile the M3OE benchmark's steps too (op tables in OUT/m3oe_profile/)")
    args = parser.parse_args()
    from fedkim.config import load_params, parse_overrides
    from fedkim.data.synth.federation import generate_federation

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedkim-gpu-check-"))
    foundation = args.foundation
    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "cpu_threads": torch.get_num_threads()}
    if args.random_init_from is not None:
        foundation = str(random_foundation(args.random_init_from, work / "fm"))
        report["foundation"] = f"random weights, shapes of {args.random_init_from.name}"
    else:
        report["foundation"] = foundation

    def save() -> None:
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    overrides = {"inject.foundation_model": foundation, **parse_overrides(args.set)}
    if args.data_root is not None:
        overrides["data.root"] = str(args.data_root.resolve())
    params = load_params(overrides=overrides)
    if not {"round", "parity"} <= set(args.skip):  # only these two read the federation
        started = time.perf_counter()
        generated = generate_federation(params)
        report["data"] = {"root": params.data.root.name, "reused": generated.cached,  # no machine paths in reports
                          "seconds": round(time.perf_counter() - started, 1)}
    save()
    profile = args.out / "m3oe_profile" if args.profile else None
    # cheapest first and the CPU-heavy parity last, so that a run cut short by its time limit keeps the most
    steps = [("m3oe", lambda: m3oe_figures(foundation, profile) | {"foundation": report["foundation"]}),
             ("merge", lambda: merge_check(foundation)), ("round", lambda: full_round(params, work / "round")),
             ("parity", lambda: injection_parity(params))]
    for name, step in steps:
        if name in args.skip:
            continue
        started = time.perf_counter()
        try:
            report[name] = step()
        except Exception as exc:  # report what broke and go on: one GPU call runs every check
            import traceback

            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        report[name + "_wall_s"] = round(time.perf_counter() - started, 1)
        save()
        print(f"{name}: {report[name + '_wall_s']} s", file=sys.stderr, flush=True)
    print(json.dumps({k: v for k, v in report.items() if k not in ("round",)} | {
        "round": {k: v for k, v in report.get("round", {}).items() if k != "site_metrics"}}, default=str))


if __name__ == "__main__":
    main()
