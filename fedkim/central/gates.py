"""The M3OE gate: from a sample's (task description, modality description) pair to its weights over the experts.

Three gate modules (FedKIM's cross-attention gate, an id gate, the single-expert gate), the routing of a batch's
pairs through them (each distinct pair once), and the GateState that hands the weights to every expert layer of
one model (fedkim.central.m3oe). Like the layers, the gates know no domain: the caller brings the texts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

GATE_NORMS = ("none", "layer", "catalogue", "train")
# The norms that place a description relative to a reference set of (task, modality) descriptions.
REFERENCE_NORMS = ("catalogue", "train")


# ------------------------------------------------------------------------------------------------ gate state
class GateState:
    """Per-sample gate weights shared by every M3OELinear of one model; the controller sets them once per forward.

    Shared experts (if any) come after the P routed ones and always weigh 1. The factor each layer multiplies its
    rank activations by (gate repeated over the rank, times the LoRA scaling) is built here once per forward and
    dtype, not in each of the ~200 layers: on a GPU every extra elementwise kernel per layer costs launch time."""

    def __init__(self, rank: int, shared: int = 0, scaling: float = 1.0):
        self.rank, self.shared, self.scaling = rank, shared, scaling
        self.weights: torch.Tensor | None = None   # (batch, P): the routed experts' gate
        self.per_rank: torch.Tensor | None = None  # (batch, (P+S)*r): each expert's weight repeated over its rank
        self._factors: dict[torch.dtype, torch.Tensor] = {}

    def set(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.per_rank = with_shared(weights, self.shared).repeat_interleave(self.rank, dim=-1)
        self._factors = {}

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, (P+S)*r): per_rank * scaling in `dtype`, broadcast over the tokens of a (batch, seq, ...)
        activation. Cached until the next set(); autograd sums the layers' gradients into the one cached tensor."""
        if dtype not in self._factors:
            self._factors[dtype] = (self.per_rank * self.scaling).to(dtype).unsqueeze(1)
        return self._factors[dtype]

    def clear(self) -> None:
        self.weights = self.per_rank = None
        self._factors = {}


def with_shared(weights: torch.Tensor, shared: int) -> torch.Tensor:
    """(..., P) routed gate -> (..., P+S) weights of every expert: the shared ones weigh 1."""
    if not shared:
        return weights
    return torch.cat([weights, weights.new_ones(*weights.shape[:-1], shared)], dim=-1)


# ------------------------------------------------------------------------------------------------ gate modules
class Gate(nn.Module):
    """Logits -> softmax -> optional top-k (renormalised) -> (batch, P)."""

    def __init__(self, num_experts: int, top_k: int | None = None):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss = torch.zeros(())

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        if self.top_k is not None and self.top_k < self.num_experts:
            top, idx = probs.topk(self.top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return probs

    def balance(self, weights: torch.Tensor) -> torch.Tensor:
        """Load-balancing loss, unweighted: squared coefficient of variation of the mean expert load over the batch
        (Shazeer et al. 2017). 0 when every expert gets the same share."""
        if self.num_experts == 1:
            return weights.new_zeros(())
        load = weights.mean(0)
        return load.var(unbiased=False) / load.mean().pow(2)


class XAttnGate(Gate):
    """FedKIM's gate: queries from the modality-description tokens, keys and values from the task-description tokens,
    both embedded with the FM's frozen input embedding table; single head scaled by sqrt(d); mean-pool; Linear; softmax.
    Unlike the reference code, padding is masked in the attention and in the pool (unless mask_padding=False).

    `norm` acts on the pooled vector before the Linear. A pretrained FM's input embeddings are small (SmolLM2: std
    ~0.03), so with `none` (the paper's gate) the logits are ~1e-2 for every description: the gate starts uniform,
    the experts (B = 0 at init) get identical gradients and the mixture trains as one wide LoRA. `layer` (a
    LayerNorm without parameters) fixes the scale, but every description shares a large common component, so all
    tasks start with the same routing and collapse onto the same few experts. `catalogue` standardises each
    feature against the pooled vectors of a reference set of descriptions (the catalogue's (task, modality)
    pairs, recomputed every forward: no running statistics): what is left is what tells the descriptions apart,
    so each task starts with its own routing, and a new description is placed relative to the known ones. Its
    reference holds the zero-shot descriptions too, so rewording or adding a task the model never trains on
    changes its training and the routing of every task (transductive). `train` fixes that: it centres on the mean
    of the *training* pairs only and divides by one scale, their RMS spread. One scale, not one per feature: with
    four training pairs a per-feature std is so noisy that a new description lands at z ~ 30 on some feature
    (measured on SmolLM2), while the single scale keeps it at the spread of the known ones."""

    def __init__(self, embedding: nn.Embedding, num_experts: int, top_k=None, dropout: float = 0.1,
                 mask_padding: bool = True, norm: str = "train"):
        super().__init__(num_experts, top_k)
        d = embedding.embedding_dim
        self._embedding = [embedding]  # the FM's table: used, not registered (neither trained nor saved here)
        self.w_q, self.w_k, self.w_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, num_experts)
        self.drop = nn.Dropout(dropout)
        self.mask_padding = mask_padding
        self.norm = norm
        self.layer_norm = nn.LayerNorm(d, elementwise_affine=False)

    def pool(self, task_ids, task_mask, modality_ids, modality_mask) -> torch.Tensor:
        """(batch, d): modality tokens attend to task tokens, mean-pooled over the modality tokens."""
        embed = self._embedding[0]
        dtype = self.w_q.weight.dtype
        e_t, e_m = embed(task_ids).to(dtype), embed(modality_ids).to(dtype)
        q, k, v = self.w_q(e_m), self.w_k(e_t), self.w_v(e_t)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (batch, L_M, L_T)
        if self.mask_padding:
            scores = scores.masked_fill(~task_mask.bool()[:, None, :], float("-inf"))
        beta = self.drop(scores.softmax(-1)) @ v  # (batch, L_M, d)
        if self.mask_padding:
            keep = modality_mask.to(beta.dtype)[..., None]
            return (beta * keep).sum(1) / keep.sum(1)
        return beta.mean(1)

    def forward(self, task_ids, task_mask, modality_ids, modality_mask, reference=None) -> torch.Tensor:
        """reference: (task_ids, task_mask, modality_ids, modality_mask) of the reference descriptions (needed by
        norms 'catalogue' and 'train')."""
        pooled = self.pool(task_ids, task_mask, modality_ids, modality_mask)
        if self.norm == "layer":
            pooled = self.layer_norm(pooled)
        elif self.norm == "catalogue":
            if reference is None:
                raise ValueError("gate_norm 'catalogue' needs the reference descriptions")
            ref = self.pool(*reference).float()
            pooled = (pooled.float() - ref.mean(0)) / (ref.std(0, unbiased=False) + 1e-5)
            pooled = pooled.to(self.out.weight.dtype)
        elif self.norm == "train":
            if reference is None:
                raise ValueError("gate_norm 'train' needs the reference descriptions")
            ref = self.pool(*reference).float()
            centre = ref.mean(0)
            spread = (ref - centre).pow(2).mean().sqrt()
            pooled = ((pooled.float() - centre) / (spread + 1e-5)).to(self.out.weight.dtype)
        return self.route(self.out(pooled))


class IdGate(Gate):
    """A cheaper discrete router: learned task and modality embeddings, indexed by id -> Linear -> softmax."""

    def __init__(self, num_tasks: int, num_modalities: int, num_experts: int, dim: int = 64, top_k=None):
        super().__init__(num_experts, top_k)
        self.task = nn.Embedding(num_tasks, dim)
        self.modality = nn.Embedding(num_modalities, dim)
        self.out = nn.Linear(2 * dim, num_experts)

    def forward(self, task_ids: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        return self.route(self.out(torch.cat([self.task(task_ids), self.modality(modality_ids)], -1)))


class SingleGate(Gate):
    """P = 1 with weight 1: the experts reduce to one plain LoRA (the single-adapter baseline)."""

    def __init__(self):
        super().__init__(1)

    def forward(self, batch: int, device=None) -> torch.Tensor:
        return torch.ones(batch, 1, device=device)


# ------------------------------------------------------------------------------------------------ routing
def encode_texts(tokenizer, cache: dict[str, list[int]], texts: Sequence[str],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (no special tokens) right-padded to the longest text, and the mask of real tokens; `cache`
    keeps each text's ids across calls."""
    rows = []
    for text in texts:
        if text not in cache:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"description {text!r} has no tokens")
            cache[text] = ids
        rows.append(cache[text])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def vocab_ids(vocab: dict[str, int], texts: list[str], what: str, device: torch.device) -> torch.Tensor:
    unknown = sorted({t for t in texts if t not in vocab})
    if unknown:
        raise KeyError(f"the id gate has no {what} id for {unknown}; pass it in {what}_vocab at attach time")
    return torch.tensor([vocab[t] for t in texts], device=device)


Encode = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


def route_pairs(gate: Gate, tasks: list[str], modalities: list[str], *, encode: Encode,
                reference: Sequence[tuple[str, str]], task_vocab: dict[str, int],
                modality_vocab: dict[str, int], device: torch.device) -> torch.Tensor:
    """Gate weights (batch, P) of each sample's pair: each distinct pair is routed once and the result gathered
    back per sample (batches repeat pairs). reference: the pairs the xattn gate's norm places a pair against."""
    if len(tasks) != len(modalities):
        raise ValueError(f"{len(tasks)} task descriptions but {len(modalities)} modality descriptions")
    slot: dict[tuple[str, str], int] = {}
    index = torch.tensor([slot.setdefault(p, len(slot)) for p in zip(tasks, modalities)], device=device)
    pairs = list(slot)
    u_tasks, u_mods = [p[0] for p in pairs], [p[1] for p in pairs]
    if isinstance(gate, XAttnGate):
        ref = None
        if gate.norm in REFERENCE_NORMS:
            ref = (*encode([t for t, _ in reference]), *encode([m for _, m in reference]))
        unique = gate(*encode(u_tasks), *encode(u_mods), ref)
    elif isinstance(gate, IdGate):
        unique = gate(vocab_ids(task_vocab, u_tasks, "task", device),
                      vocab_ids(modality_vocab, u_mods, "modality", device))
    else:
        unique = gate(len(pairs), device=device)
    return unique[index]
