"""Model helpers: one batch of a task, and a central model that stands in for an injected one."""

from __future__ import annotations

import torch

from fedkim.central.variants import VARIANTS, build_central
from fedkim.data.batches import task_loader


def batch_of(params, task: str, site: str = "public", split: str = "public", n: int = 4) -> dict:
    """The first n samples of `task` in a site's split, unshuffled."""
    loader = task_loader(params.data.root / site, task, split, params.site.model_copy(update={"batch_size": n}),
                         params.data, shuffle=False, seed=0)
    return next(iter(loader))


def trained_model(params, variant: str = "fedkim", seed: int = 0):
    """A model whose every trainable tensor and tag row differs from a fresh build (stands in for injection)."""
    model = build_central(params, VARIANTS[variant])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        tags = [model.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "</image>", "<ecg>", "</ecg>")]
        model.fm.get_input_embeddings().weight[tags] += 0.1
    return model.eval()
