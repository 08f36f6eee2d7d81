"""What M3OE costs: training step against one LoRA and against a loop over experts; merged inference against the base.

Setup: the SmolLM2 FM, 12 experts of rank 8 on every attention and MLP linear, a batch of 8 x 40 tokens, a training
step = forward + backward of the LM loss (no optimiser step, for every variant). Variants, timed interleaved in one
process (median over steps after warm-up):
  (a) M3OE (gate from the task and modality descriptions, batched experts);
  (b) one rank-8 peft LoRA on the same targets;
  (c) LoRAMoE-style: the same gate, but a Python loop over experts, each a LoRA over the whole batch. Two of them:
      `loop`, the leanest such loop we could write (one dropout mask per layer, the scaling folded into the gate),
      which the >= 2x target is judged against; and `loop_as_loramoe`, the loop as LoRAMoE's code writes it (each
      expert calls the dropout and multiplies by the scaling itself), reported beside it;
  (d) inference of one (task, modality) mixture exported with `merge` and merged into the weights, against the bare FM.

    python -m benchmarks.m3oe [--steps 7] [--threads N] [--foundation smollm2|tiny|DIR] [--profile DIR]
        -> one JSON object on stdout
`--profile DIR` also runs each training step once more under torch.profiler and writes its op table to
DIR/profile_<variant>.txt; the JSON then says, per variant, how the step's time splits into the gate, matrix
products and everything else (self time of each op, so nothing is counted twice).
Targets: m3oe_vs_single_lora <= 1.25, loop_vs_m3oe >= 2 (and loop_as_loramoe_vs_m3oe), merged_vs_base <= 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from fedkim.central.foundation import load_foundation
from fedkim.central.gates import GateState
from fedkim.central.m3oe import DEFAULT_TARGETS, M3OEConfig, attach_m3oe, merge
from fedkim.central.model import reference_pairs
from fedkim.data.catalogue import load_catalogue

BATCH, SEQ, EXPERTS, RANK = 8, 40, 12, 8


class LoopMoELinear(nn.Module):
    """Reference LoRAMoE-style layer: P separate LoRA modules, each run over the whole batch, summed with the gate."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout: float,
                 state: GateState, as_loramoe: bool = False):
        super().__init__()
        self.base, self.scaling, self.state, self.as_loramoe = base, scaling, state, as_loramoe
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.ModuleList(nn.Linear(base.in_features, lora_a.shape[1], bias=False) for _ in lora_a)
        self.lora_b = nn.ModuleList(nn.Linear(lora_b.shape[2], base.out_features, bias=False) for _ in lora_b)
        self.to(base.weight.device)  # the experts live where the frozen layer does
        with torch.no_grad():
            for p in range(len(lora_a)):
                self.lora_a[p].weight.copy_(lora_a[p])
                self.lora_b[p].weight.copy_(lora_b[p])

    def forward(self, x):
        out = self.base(x)
        if self.as_loramoe:  # LoRAMoE's loop: every expert draws its own dropout mask and scales its own output
            g = self.state.weights.to(x.dtype)
            for p, (a, b) in enumerate(zip(self.lora_a, self.lora_b)):
                out = out + g[:, p, None, None] * b(a(self.dropout(x))) * self.scaling
            return out
        x = self.dropout(x)
        g = self.state.weights.to(x.dtype) * self.scaling
        for p, (a, b) in enumerate(zip(self.lora_a, self.lora_b)):
            out = out + g[:, p, None, None] * b(a(x))
        return out


def to_loop(m3oe, as_loramoe: bool = False) -> None:
    """Replace every M3OELinear of the FM with the loop reference (same base, experts, gate state)."""
    for name, layer in m3oe.layers.items():
        parent, _, child = name.rpartition(".")
        setattr(m3oe.model.get_submodule(parent), child,
                LoopMoELinear(layer.base, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling,
                              m3oe.config.dropout, layer.state, as_loramoe))


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def profile_steps(steps_of: dict, folder: Path, cuda: bool, sync) -> dict:
    """One more step of each variant under torch.profiler: its op table in folder, and a split of its time.

    Self times (an op's own time, its children's excluded) add up to the step without double counting. On CUDA the
    split is of kernel time; the host time of a launch-bound step is the other half of the story and is reported
    beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {}
    for name, run in steps_of.items():
        run()  # warm (allocator, autocast cache) outside the trace
        sync()
        try:
            with profile(activities=activities) as prof:
                run()
                sync()
        except RuntimeError as exc:  # a profiler that cannot start here must not cost the timings
            out[name] = {"error": str(exc)}
            continue
        events = prof.key_averages()
        (folder / f"profile_{name}.txt").write_text(events.table(sort_by=key, row_limit=40))
        # On CUDA each kernel is listed twice, as its own row and in the self time of the op that launched it (and
        # a record_function range shows up as a device row too): count the ops' rows only.
        ops = [e for e in events if e.key.startswith("aten::")] if cuda else list(events)
        total = sum(getattr(e, key) for e in ops) / 1000
        matmul = sum(getattr(e, key) for e in ops if e.key in MATMUL_OPS) / 1000
        gate = max((e for e in events if e.key == "gate"), key=lambda e: e.cpu_time_total, default=None)
        out[name] = {"self_ms": round(total, 1), "matmul_ms": round(matmul, 1), "other_ms": round(total - matmul, 1),
                     "gate_cpu_ms": round(gate.cpu_time_total / 1000, 1) if gate else 0.0,
                     "ops": sum(e.count for e in events if e.key.startswith("aten::")),
                     "top": [[e.key, round(getattr(e, key) / 1000, 1)] for e in
                             sorted(ops, key=lambda e: -getattr(e, key))[:8]]}
        if cuda:
            out[name]["host_ms"] = round(sum(e.self_cpu_time_total for e in events) / 1000, 1)
            out[name]["kernels"] = sum(e.count for e in events if getattr(e, "self_device_time_total", 0) > 0
                                       and e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 7 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all cores)")
    parser.add_argument("--foundation", default="smollm2", help="smollm2 (the spec's FM), tiny, or a local directory")
    parser.add_argument("--profile", type=Path, default=None, help="also profile one step of each variant into DIR")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    steps = args.steps or (20 if cuda else 7)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    torch.manual_seed(0)

    foundation = load_foundation(args.foundation)
    base_model, tokenizer = foundation.model.to(device), foundation.tokenizer
    frozen = {id(t): t for t in [*base_model.parameters(), *base_model.buffers()]}

    def fm(share: bool = True):
        """A copy of the FM; it shares the frozen weights with the others unless a merge will write into them."""
        return copy.deepcopy(base_model, memo=dict(frozen) if share else None)

    ids = torch.randint(0, tokenizer.vocab_size, (BATCH, SEQ), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    # a realistic batch mixes the four training tasks
    catalogue = load_catalogue()
    train = [catalogue[n] for n in catalogue.train]
    tasks = [train[i % 4].task_description for i in range(BATCH)]
    modalities = [train[i % 4].modality_description for i in range(BATCH)]
    config = M3OEConfig(num_experts=EXPERTS, rank=RANK, alpha=16.0, dropout=0.1, targets=DEFAULT_TARGETS)

    m3oe_model = fm()
    m3oe = attach_m3oe(m3oe_model, config, tokenizer, reference=reference_pairs(catalogue, config.gate_norm))
    lora_model = get_peft_model(fm(), LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=list(DEFAULT_TARGETS)))

    def loop_copy(as_loramoe: bool):
        """An FM whose expert layers loop over M3OE's experts (same weights, same gate)."""
        model = fm()
        controller = attach_m3oe(model, config, tokenizer, reference=m3oe.reference)
        controller.load_state_dict(m3oe.state_dict())
        to_loop(controller, as_loramoe)
        return model, controller

    loop_model, loop = loop_copy(as_loramoe=False)
    loramoe_model, loramoe = loop_copy(as_loramoe=True)
    for model in (m3oe_model, lora_model, loop_model, loramoe_model):
        model.train()
    for controller in (m3oe, loop, loramoe):
        controller.train()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(fns: dict, rounds: int) -> dict[str, float]:
        """Median ms per call. Interleaved, with the order rotated each round, so that drifts in machine speed
        (other processes on a shared CPU) and cache effects hit every variant alike."""
        times = {k: [] for k in fns}
        names = list(fns)
        for i in range(args.warmup + rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                sync()
                start = time.perf_counter()
                fns[name]()
                sync()
                if i >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
        return {k: statistics.median(v) for k, v in times.items()}

    def step(model, controller=None):
        def run():
            model.zero_grad(set_to_none=True)
            if controller is not None:
                controller.zero_grad(set_to_none=True)
            with autocast():
                if controller is not None:
                    with record_function("gate"):
                        controller.set_gate(tasks, modalities)  # the gate is part of every M3OE step
                loss = model(**inputs).loss
            loss.backward()
        return run

    steps_of = {"m3oe": step(m3oe_model, m3oe), "single_lora": step(lora_model), "loop": step(loop_model, loop),
                "loop_as_loramoe": step(loramoe_model, loramoe)}
    train_ms = measure(steps_of, steps)
    profiled = profile_steps(steps_of, args.profile, cuda, sync) if args.profile else None

    # (d) inference: the exported mixture of one pair, merged into a clean FM, against the bare FM
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for layer in m3oe.layers.values():  # a non-trivial mixture (B starts at zero)
            layer.lora_B.normal_(0, 0.01)
        folder = merge(m3oe, tasks[0], modalities[0], tmp)
        merged_model = PeftModel.from_pretrained(fm(share=False), folder).merge_and_unload().eval()
    base_model.eval()
    m3oe_model.eval()
    m3oe.eval()
    fwd = {k: v for k, v in inputs.items() if k != "labels"}

    def infer(model, controller=None):
        def run():
            with torch.inference_mode(), autocast():
                if controller is not None:
                    controller.set_gate(tasks[:1] * BATCH, modalities[:1] * BATCH)
                model(**fwd)
        return run

    infer_ms = measure({"base": infer(base_model), "merged": infer(merged_model),
                        "m3oe_unmerged": infer(m3oe_model, m3oe)}, 3 * steps)

    result = {
        "m3oe_vs_single_lora": round(train_ms["m3oe"] / train_ms["single_lora"], 3),
        "loop_vs_m3oe": round(train_ms["loop"] / train_ms["m3oe"], 3),
        "loop_as_loramoe_vs_m3oe": round(train_ms["loop_as_loramoe"] / train_ms["m3oe"], 3),
        "merged_vs_base": round(infer_ms["merged"] / infer_ms["base"], 3),
        "unmerged_m3oe_vs_base": round(infer_ms["m3oe_unmerged"] / infer_ms["base"], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ms_per_train_step": {k: round(v, 2) for k, v in train_ms.items()},
        "ms_per_forward": {k: round(v, 2) for k, v in infer_ms.items()},
        "train_step": "forward + backward, no optimiser step",
        "trainable_params": {"m3oe": sum(p.numel() for p in m3oe.trainable_parameters()),
                             "single_lora": sum(p.numel() for p in lora_model.parameters() if p.requires_grad)},
        "device": torch.cuda.get_device_name() if cuda else "cpu", "foundation": args.foundation,
        "dtype": "bf16 autocast" if cuda else "fp32",
        "threads": torch.get_num_threads(),
        "batch": [BATCH, SEQ], "experts": EXPERTS, "rank": RANK, "steps": steps, "warmup": args.warmup,
    }
    if profiled:
        result["profile"] = profiled
    if cuda:
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["targets_met"] = {"m3oe_vs_single_lora": result["m3oe_vs_single_lora"] <= 1.25,
                             "loop_vs_m3oe": result["loop_vs_m3oe"] >= 2.0,
                             "loop_as_loramoe_vs_m3oe": result["loop_as_loramoe_vs_m3oe"] >= 2.0,
                             "merged_vs_base": result["merged_vs_base"] <= 1.05}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
