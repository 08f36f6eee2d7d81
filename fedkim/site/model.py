"""Site model: modality encoders that emit token sequences, and one head per training task.

State-dict keys are `encoders.<modality>.*` and `heads.<task>.*`: the knowledge package and the per-modality
aggregation rely on that naming. Encoders are what the foundation model later consumes (through projectors).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DeiTConfig, DeiTModel

from fedkim.config import DataParams, SiteTrainingParams
from fedkim.data.catalogue import catalogue_of
from fedkim.data.formats.clinical import STATIC, VARIABLES

MODALITIES = ("image", "ecg", "clinical")
STATIC_INIT_SEED = 1729  # the static covariates' projection has its own generator (see ClinicalEncoder)


class ConvStem(nn.Sequential):
    @property
    def weight(self) -> torch.Tensor:  # DeiTModel.forward reads projection.weight.dtype
        return self[-1].weight


def conv_stem(patch: int, hidden: int) -> ConvStem:
    """Xiao et al. 2021 ("Early convolutions help transformers see better"): log2(patch) 3x3 stride-2
    convolutions, widths doubling up to `hidden`, then a 1x1 projection. Same token grid as the patch projection,
    but local features (edges, blobs) come for free instead of being learned from a few hundred radiographs.
    GroupNorm, not BatchNorm: running statistics would be site-specific, and FedAvg would mix them."""
    steps = patch.bit_length() - 1
    layers, width = [], 1
    for i in range(steps):
        out = max(8, hidden >> (steps - 1 - i))
        layers += [nn.Conv2d(width, out, kernel_size=3, stride=2, padding=1), nn.GroupNorm(min(4, out), out),
                   nn.GELU()]
        width = out
    layers.append(nn.Conv2d(width, hidden, kernel_size=1))
    return ConvStem(*layers)


class ImageEncoder(nn.Module):
    """A DeiT-style ViT (CLS + distillation token + patches) from a transformers config, random init; its patch
    projection can be a small convolutional stem instead (params: site.image_stem)."""

    def __init__(self, p: SiteTrainingParams):
        super().__init__()
        config = DeiTConfig(image_size=p.image_input, patch_size=p.image_patch, num_channels=1,
                            hidden_size=p.image_hidden, num_hidden_layers=p.image_layers,
                            num_attention_heads=p.image_heads, intermediate_size=2 * p.image_hidden)
        self.vit = DeiTModel(config, add_pooling_layer=False)
        if p.image_stem == "conv":
            self.vit.embeddings.patch_embeddings.projection = conv_stem(p.image_patch, p.image_hidden)
        self.out_dim = p.image_hidden

    def forward(self, batch: dict) -> torch.Tensor:
        image = batch["image"]
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        std = image.std(dim=(1, 2, 3), keepdim=True)
        image = (image - mean) / (std + 1e-6)  # per image: robust to each site's exposure and gamma
        return self.vit(pixel_values=image).last_hidden_state  # (B, 2 + patches, hidden)


class EcgEncoder(nn.Module):
    """A 1-D CNN shared by the 12 leads, then mean/max/std pooling over time: one token per lead.

    Each lead is standardised on its own (robust to each site's amplifier gain and baseline), the filters are
    shared across leads (12x the data per filter) and a learned lead embedding says which lead a token is.
    GroupNorm rather than BatchNorm: running statistics would be site-specific, and FedAvg would mix them.
    """

    def __init__(self, p: SiteTrainingParams, samples: int, widths: tuple[int, ...] = (16, 32, 32)):
        super().__init__()
        layers, width = [], 1
        # Stride 2 each at 100 Hz: the last layer sees about 0.6 s, one beat and its intervals. At a higher rate
        # the first layer's kernel and stride grow with it, so the later layers see the same time scale while the
        # first still sees what only a higher rate keeps (50/60 Hz mains: the ECG noise question asks about it).
        factor = max(1, round(p.ecg_hz / 100))
        for i, out in enumerate(widths):
            kernel, stride = (7 * factor + (factor + 1) % 2, 2 * factor) if i == 0 else (7, 2)
            layers += [nn.Conv1d(width, out, kernel_size=kernel, stride=stride, padding=kernel // 2),
                       nn.GroupNorm(4, out), nn.GELU()]
            width = out
        self.conv = nn.Sequential(*layers)
        self.to_token = nn.Linear(3 * width, p.token_dim)
        self.lead = nn.Parameter(torch.zeros(12, p.token_dim))
        self.out_dim = p.token_dim

    def forward(self, batch: dict | torch.Tensor) -> torch.Tensor:
        ecg = batch["ecg"] if isinstance(batch, dict) else batch  # (B, 12, T)
        ecg = (ecg - ecg.mean(-1, keepdim=True)) / (ecg.std(-1, keepdim=True) + 1e-3)
        maps = self.conv(ecg.reshape(-1, 1, ecg.shape[-1]))  # (B*12, C, T')
        stats = torch.cat([maps.mean(-1), maps.amax(-1), maps.std(-1)], dim=-1)  # rhythm variability too
        return self.to_token(stats).view(ecg.shape[0], 12, -1) + self.lead  # (B, 12, token_dim)


class ClinicalEncoder(nn.Module):
    """Hourly values + measurement mask + the hour's position -> transformer encoder (batch_first) -> one token
    per hour. The sinusoidal position lets the encoder see trends (a 24 h or a 48 h window alike).

    Static covariates (age, sex, weight, height with their mask), where the batch has them, become one more
    token that the hours attend to. Its projection is initialised from its own generator, after the other
    layers: a model, its outputs and the global random stream are the same as without it when a batch has no
    covariates."""

    def __init__(self, p: SiteTrainingParams):
        super().__init__()
        width = p.token_dim
        self.inp = nn.Sequential(nn.Linear(2 * len(VARIABLES), width), nn.ReLU())
        self.layer = nn.TransformerEncoderLayer(width, p.clinical_heads, dim_feedforward=2 * width, dropout=0.1,
                                                batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width))
        self.out_dim = width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(STATIC_INIT_SEED)
            self.static = nn.Linear(2 * len(STATIC), width)

    @staticmethod
    def position(hours: int, width: int, device) -> torch.Tensor:
        t = torch.arange(hours, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(-torch.arange(0, width, 2, device=device, dtype=torch.float32) * (4.0 / width))
        table = torch.zeros(hours, width, device=device)
        table[:, 0::2], table[:, 1::2] = torch.sin(t * freq), torch.cos(t * freq)
        return table

    def forward(self, batch: dict) -> torch.Tensor:
        x = torch.cat([batch["clinical"], batch["clinical_mask"]], dim=-1)
        h = self.inp(x)
        h = h + self.position(h.shape[1], h.shape[2], h.device).to(h.dtype)
        if "static" in batch:
            static = self.static(torch.cat([batch["static"], batch["static_mask"]], dim=-1))
            h = torch.cat([h, static[:, None].to(h.dtype)], dim=1)
        return self.out(self.layer(h))  # (B, hours [+ 1 static], token_dim)


class TaskHead(nn.Module):
    """Mean-pool the tokens, MLP, one logit."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.mean(dim=1)).squeeze(-1)


def build_encoder(modality: str, p: SiteTrainingParams, data: DataParams) -> nn.Module:
    if modality == "image":
        return ImageEncoder(p)
    if modality == "ecg":
        return EcgEncoder(p, samples=p.ecg_hz * data.ecg_seconds)
    if modality == "clinical":
        return ClinicalEncoder(p)
    raise ValueError(f"unknown modality {modality!r}; allowed: {MODALITIES}")


class SiteModel(nn.Module):
    def __init__(self, modalities, p: SiteTrainingParams, data: DataParams, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # same seed everywhere: round 1 starts every site from one global init
        self.encoders = nn.ModuleDict({m: build_encoder(m, p, data) for m in MODALITIES if m in modalities})
        self.task_modality = {t.name: t.modality for t in catalogue_of(data).tasks.values() if t.role == "train"}
        self.heads = nn.ModuleDict({  # one per training task, in catalogue order (the RNG draws follow it)
            t: TaskHead(self.encoders[m].out_dim, p.head_hidden)
            for t, m in self.task_modality.items() if m in self.encoders
        })

    def forward(self, batch: dict, task: str) -> torch.Tensor:
        modality = self.task_modality[task]
        # The ECG encoder is given its tensor: Opacus computes its per-sample gradients from its inputs (tensors)
        tokens = self.encoders[modality](batch["ecg"] if modality == "ecg" else batch)
        return self.heads[task](tokens)


def global_model(p: SiteTrainingParams, data: DataParams, seed: int = 0) -> SiteModel:
    """The federation's model: every modality and every training head (what aggregation keeps)."""
    return SiteModel(MODALITIES, p, data, seed)


def load_subset(model: SiteModel, state: dict[str, torch.Tensor]) -> None:
    """Load the entries of `state` that this (possibly partial) model has."""
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
