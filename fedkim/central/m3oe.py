"""M3OE: a mixture of LoRA experts inside a frozen foundation model, mixed by one gate per sample.

Every targeted `nn.Linear` of the FM becomes an `M3OELinear`: the frozen base layer plus P LoRA experts of rank r,
stored stacked (`lora_A` (P, r, in), `lora_B` (P, out, r)). One gate per sample, computed from the sample's task
description and modality description, gives weights g (batch, P) shared by all layers and tokens (FedKIM §3.2). The
gate acts on the rank dimension,

    y = W0 x + s * B_flat ((x A_flat^T) * repeat(g, r)),    A_flat (P*r, in), B_flat (out, P*r),

so one step costs about one LoRA of rank P*r and no Python loop over experts runs. Because the gate depends only on
the (task, modality) pair, the mixture of one pair is itself a LoRA of rank P*r: `merge` exports it as a plain
peft adapter folder.
The gate modules, the routing of description pairs through them and the GateState the layers read are in
fedkim.central.gates; this module holds the expert layers, the controller (M3OE), attach_m3oe and the export.

Usage:
    m3oe = attach_m3oe(fm.model, M3OEConfig(), fm.tokenizer)
    out = m3oe(task_descriptions, modality_descriptions, input_ids=..., attention_mask=..., labels=...)
    loss = out.loss + m3oe.config.balance_weight * m3oe.aux_loss
    torch.optim.AdamW(m3oe.trainable_parameters())
    torch.save(m3oe.state_dict(), path)            # gate + experts only
    merge(m3oe, task.task_description, task.modality_description, folder)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedkim.central.gates import (GATE_NORMS, REFERENCE_NORMS, Gate, GateState, IdGate, SingleGate, XAttnGate,
    encode_texts, route_pairs, with_shared)

GateKind = Literal["xattn", "id", "single"]
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BALANCE_SCOPES = ("batch", "tasks")


@dataclass
class M3OEConfig:
    num_experts: int = 12
    rank: int = 8
    shared_experts: int = 0                   # always-on experts (weight 1) beside the routed ones
    alpha: float = 16.0
    dropout: float = 0.1                      # on the adapter input
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes or full-name regexes
    lm_head: bool = False                     # also put experts on the output embedding (FedKIM's intent)
    scale_one: bool = False                   # the reference code never applies alpha/r: scale 1.0
    gate: GateKind = "xattn"
    top_k: int | None = None                  # None: dense soft gate (as in the reference code)
    balance_weight: float = 0.0               # weight of M3OE.aux_loss in the training loss (reference: none)
    balance_scope: str = "batch"              # batch: load over the batch's samples | tasks: over the training pairs
    gate_dropout: float = 0.1                 # attention dropout inside the xattn gate (reference code)
    mask_padding: bool = True                 # the reference code attends to and pools over padding
    gate_norm: str = "train"                  # xattn: none | layer | catalogue | train (see gates.XAttnGate)
    id_dim: int = 64                          # embedding width of the id gate

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.gate_norm not in GATE_NORMS:
            raise ValueError(f"gate_norm must be one of {GATE_NORMS}, got {self.gate_norm!r}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}")
        if self.gate not in ("xattn", "id", "single"):
            raise ValueError(f"gate must be 'xattn', 'id' or 'single', got {self.gate!r}")
        if self.gate == "single" and self.num_experts != 1:
            raise ValueError("gate 'single' is a plain LoRA: it needs num_experts=1")
        if self.num_experts < 1 or self.rank < 1:
            raise ValueError("num_experts and rank must be >= 1")
        if self.shared_experts < 0 or (self.gate == "single" and self.shared_experts):
            raise ValueError("shared_experts must be >= 0, and 0 with the single gate (a plain LoRA)")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..{self.num_experts} or None, got {self.top_k}")

    @property
    def scaling(self) -> float:
        return 1.0 if self.scale_one else self.alpha / self.rank

    @property
    def total_experts(self) -> int:
        return self.num_experts + self.shared_experts


# ------------------------------------------------------------------------------------------------ expert layers
class LoraExperts(nn.Module):
    """P stacked LoRA experts of one linear layer. A separate module so that the controller can register the experts
    (and only them) for parameters(), state_dict() and train()/eval()."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # peft's init, expert by expert: kaiming_uniform_ on a 3-D tensor would take r*in as the fan-in.
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_flat (P*r, in), B_flat (out, P*r)): all experts as one LoRA of rank P*r, row p*r+j = expert p, j."""
        num, out, rank = self.lora_B.shape
        return self.lora_A.flatten(0, 1), self.lora_B.permute(1, 0, 2).reshape(out, num * rank)

    def forward(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """factor: (batch, 1, P*r) gate x scaling on the rank dimension (GateState.factor), broadcast over tokens."""
        a_flat, b_flat = self.flat()
        h = F.linear(self.dropout(x), a_flat)  # (batch, ..., P*r): one matmul for every expert
        if h.dim() != 3:
            factor = factor.view(factor.shape[0], *([1] * (h.dim() - 2)), factor.shape[-1])
        return F.linear(h * factor, b_flat)


class M3OELinear(nn.Module):
    """A frozen `nn.Linear` plus a gated mixture of LoRA experts."""

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, scaling: float, dropout: float,
                 state: GateState):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.experts = LoraExperts(base.in_features, base.out_features, num_experts, rank, dropout,
                                   device=base.weight.device, dtype=base.weight.dtype)
        self.scaling = scaling
        self.state = state

    @property
    def lora_A(self) -> nn.Parameter:
        return self.experts.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.experts.lora_B

    @property
    def weight(self) -> torch.Tensor:  # code that inspects e.g. lm_head.weight keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_rank = self.state.per_rank
        if per_rank is None:
            raise RuntimeError("M3OE gate not set: call M3OE.set_gate(...) (or M3OE(...)) before the forward")
        if per_rank.shape[0] not in (1, x.shape[0]):
            raise RuntimeError(f"gate set for {per_rank.shape[0]} samples but the batch has {x.shape[0]}")
        base = self.base(x)
        return base + self.experts(x, self.state.factor(base.dtype))


# ------------------------------------------------------------------------------------------------ controller
def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


class M3OE(nn.Module):
    """The gate and the experts of every wrapped layer of one FM. Its parameters and state_dict hold only these
    (gate.*, experts.<layer>.lora_A/B), so checkpoints are small; the FM itself is referenced, not registered."""

    def __init__(self, model: nn.Module, config: M3OEConfig, layers: dict[str, M3OELinear], gate: Gate,
                 state: GateState, tokenizer=None, task_vocab: Sequence[str] = (),
                 modality_vocab: Sequence[str] = (), reference: Sequence[tuple[str, str]] = ()):
        super().__init__()
        self.config = config
        self.gate = gate
        self.experts = nn.ModuleDict({name.replace(".", "__"): layer.experts for name, layer in layers.items()})
        self.layers = layers  # a plain dict: name in the FM -> M3OELinear
        self.state = state
        self.tokenizer = tokenizer
        self.task_vocab = {t: i for i, t in enumerate(task_vocab)}
        self.modality_vocab = {m: i for i, m in enumerate(modality_vocab)}
        self._model = [model]
        self._token_cache: dict[str, list[int]] = {}
        # The (task, modality) descriptions the gate norm places a description against (see gates.XAttnGate).
        self.reference: list[tuple[str, str]] = list(reference)

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A.device

    @property
    def aux_loss(self) -> torch.Tensor:
        """Unweighted load-balancing loss of the last gate computation; the trainer adds
        config.balance_weight * aux_loss (it is computed, and worth logging, whatever the weight)."""
        return self.gate.aux_loss

    # -- gate -----------------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (no special tokens) right-padded to the longest text, and the mask of real tokens."""
        return encode_texts(self.tokenizer, self._token_cache, texts, self.device)

    def compute_gate(self, tasks: str | Sequence[str], modalities: str | Sequence[str]) -> torch.Tensor:
        """Gate weights (batch, P) for (task description, modality description) pairs, with autograd.

        Each distinct pair is routed once and the result gathered back per sample (batches repeat pairs)."""
        weights = self._route(_as_list(tasks), _as_list(modalities))
        self.gate.aux_loss = self.gate.balance(weights)
        return weights

    def pairs_balance(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """Load-balancing loss over the gates of a set of (task, modality) description pairs, with autograd.

        Training batches hold one task each, so the per-batch loss (aux_loss) can only pull every task's own gate
        toward uniform. Over the training pairs the load is uniform when the tasks *together* use every expert:
        a task may route sharply, but not all tasks onto the same one or two experts, which would leave the rest
        untrained and a new description's mixture mostly made of untrained experts."""
        return self.gate.balance(self._route([t for t, _ in pairs], [m for _, m in pairs]))

    def _route(self, tasks: list[str], modalities: list[str]) -> torch.Tensor:
        return route_pairs(self.gate, tasks, modalities, encode=self.encode, reference=self.reference,
                           task_vocab=self.task_vocab, modality_vocab=self.modality_vocab, device=self.device)

    @torch.no_grad()
    def gate_weights(self, tasks: str | Sequence[str], modalities: str | Sequence[str]) -> torch.Tensor:
        """Deterministic (eval-mode, no grad) gate weights, for logging and export."""
        was_training = self.gate.training
        self.gate.eval()
        try:
            return self.compute_gate(tasks, modalities)
        finally:
            self.gate.train(was_training)

    def set_gate(self, tasks: str | Sequence[str], modalities: str | Sequence[str]) -> torch.Tensor:
        """Compute the gate for a batch of pairs and hand it to every wrapped layer; returns (batch, P)."""
        weights = self.compute_gate(tasks, modalities)
        self.state.set(weights)
        return weights

    def set_gate_weights(self, weights: torch.Tensor) -> None:
        """Use explicit gate weights (batch or 1, P), e.g. a fixed mixture."""
        if weights.dim() != 2 or weights.shape[1] != self.config.num_experts:
            raise ValueError(f"gate weights must be (batch, {self.config.num_experts}), got {tuple(weights.shape)}")
        self.state.set(weights)

    def clear_gate(self) -> None:
        self.state.clear()

    def forward(self, tasks: str | Sequence[str], modalities: str | Sequence[str], **model_inputs):
        """Set the gate for this batch's pairs, then run the FM on `model_inputs`."""
        self.set_gate(tasks, modalities)
        return self.model(**model_inputs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- export ---------------------------------------------------------------------------------------------------
    def export_peft(self, folder: str | Path, task_description: str, modality_description: str) -> Path:
        """Write the mixture of one (task, modality) pair as a standard peft LoRA adapter folder.

        Exact: with g the pair's gate (1 for shared experts), the mixture is the rank-(P+S)*r LoRA
        A' = stack_p A_p, B' = [g_p B_p]_p, and lora_alpha = s * (P+S)*r makes peft's scaling lora_alpha / r' equal ours."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        cfg = self.config
        g = with_shared(self.gate_weights(task_description, modality_description)[0], cfg.shared_experts)
        rank = cfg.total_experts * cfg.rank
        tensors = {}
        for name, layer in self.layers.items():
            a_flat, _ = layer.experts.flat()
            b = layer.lora_B.detach() * g.to(layer.lora_B.dtype)[:, None, None]
            b_flat = b.permute(1, 0, 2).reshape(b.shape[1], rank)
            # peft's saved keys: base_model.model.<module name>.lora_{A,B}.weight (adapter name stripped)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a_flat.detach().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b_flat.contiguous().cpu()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lora = LoraConfig(r=rank, lora_alpha=cfg.scaling * rank, lora_dropout=cfg.dropout, bias="none",
                          target_modules=sorted(self.layers),  # full module names: exactly the wrapped layers
                          base_model_name_or_path=getattr(self.model.config, "name_or_path", None) or None)
        lora.save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "m3oe_export.json").write_text(json.dumps({
            "task_description": task_description, "modality_description": modality_description,
            "gate": g.tolist(), "config": asdict(cfg)}, indent=2))
        return folder


# ------------------------------------------------------------------------------------------------ entry points
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def attach_m3oe(model: nn.Module, config: M3OEConfig, tokenizer=None, *,
                reference: Sequence[tuple[str, str]] = (), task_vocab: Sequence[str] = (),
                modality_vocab: Sequence[str] = ()) -> M3OE:
    """Wrap the FM's matching nn.Linear layers with M3OELinear, in place, and return the controller.

    tokenizer: the FM's tokenizer (needed by the xattn gate). reference: the (task, modality) description pairs
    the xattn gate's norms 'train' and 'catalogue' place a description against. task_vocab / modality_vocab: the
    descriptions the id gate knows. Like peft's layers, M3OE knows no domain: the caller brings the texts."""
    if any(isinstance(m, M3OELinear) for m in model.modules()):
        raise ValueError("this model already has M3OE layers attached")
    if config.gate == "xattn" and config.gate_norm in REFERENCE_NORMS and not reference:
        raise ValueError(f"gate_norm {config.gate_norm!r} places descriptions against reference pairs: "
                         "pass reference=[(task description, modality description), ...]")
    if config.gate == "id" and not (task_vocab and modality_vocab):
        raise ValueError("the id gate needs task_vocab and modality_vocab (the descriptions it can route)")
    output = model.get_output_embeddings() if config.lm_head and hasattr(model, "get_output_embeddings") else None
    state = GateState(config.rank, config.shared_experts, config.scaling)
    layers: dict[str, M3OELinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not (module is output or _matches(name, config.targets)):
            continue
        wrapped = M3OELinear(module, config.total_experts, config.rank, config.scaling, config.dropout, state)
        wrapped.train(model.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
        layers[name] = wrapped
    if not layers:
        raise ValueError(f"no nn.Linear in the model matches targets {config.targets}")

    if config.gate == "xattn":
        if tokenizer is None:
            raise ValueError("the xattn gate needs the FM tokenizer")
        gate = XAttnGate(model.get_input_embeddings(), config.num_experts, config.top_k, config.gate_dropout,
                         config.mask_padding, config.gate_norm)
    elif config.gate == "id":
        gate = IdGate(len(task_vocab), len(modality_vocab), config.num_experts, config.id_dim, config.top_k)
    else:
        gate = SingleGate()
    weight = next(iter(layers.values())).base.weight
    gate.to(device=weight.device)
    gate.train(model.training)
    return M3OE(model, config, layers, gate, state, tokenizer, task_vocab, modality_vocab, reference)


def merge(m3oe: M3OE, task_description: str, modality_description: str, folder: str | Path) -> Path:
    """Export the mixture for one (task, modality) pair as a peft LoRA adapter folder (see M3OE.export_peft)."""
    return m3oe.export_peft(folder, task_description, modality_description)
