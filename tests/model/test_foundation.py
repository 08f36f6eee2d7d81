"""The foundation model loads offline, frozen, from the GGUF shipped in a PyPI package (cached as safetensors)."""

import json

import pytest
import torch

from fedkim.central.foundation import FoundationError, _check_cache, load_foundation, smollm2_gguf_path


def test_tiny_foundation_is_frozen_and_tokenises_the_catalogue():
    fm = load_foundation("tiny")
    assert not any(p.requires_grad for p in fm.model.parameters())
    ids = fm.tokenizer("Is this ECG abnormal ?").input_ids
    assert fm.tokenizer.unk_token_id not in ids
    assert fm.model(torch.tensor([ids])).logits.shape[-1] == len(fm.tokenizer)


def test_smollm2_from_the_package_file_is_frozen_and_speaks(tmp_path_factory):
    assert smollm2_gguf_path().stat().st_size > 50_000_000
    fm = load_foundation("smollm2")
    assert type(fm.model).__name__ == "LlamaForCausalLM" and fm.width == 576
    assert sum(p.numel() for p in fm.model.parameters()) > 100_000_000
    assert not any(p.requires_grad for p in fm.model.parameters())
    ids = fm.tokenizer("The capital of France is", return_tensors="pt")
    out = fm.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in fm.tokenizer.decode(out[0])


def test_a_tampered_cache_is_refused(tmp_path):
    fm = load_foundation("tiny")
    fm.model.save_pretrained(tmp_path)
    (tmp_path / "fedkim_cache.json").write_text(json.dumps({"weights": {"model.safetensors": "0" * 64}}))
    with pytest.raises(FoundationError, match="sha256 differs"):
        _check_cache(tmp_path)


def test_a_local_directory_must_be_a_model(tmp_path):
    with pytest.raises(FoundationError, match="no config.json"):
        load_foundation(str(tmp_path))


def test_modality_tags_get_the_same_embedding_rows_in_every_process():
    """SmolLM2 lacks the tag tokens, so they are added with fresh rows: every rebuild (a DVC stage, a worker, a
    bundle load) must get the rows the experts were trained with, whatever the caller's RNG state."""
    import torch
    from torch import nn

    from fedkim.central.model import TAGS, CentralModel

    rows = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = CentralModel(load_foundation("smollm2"), nn.ModuleDict(), None)
        ids = [model.tokenizer.convert_tokens_to_ids(t) for pair in TAGS.values() for t in pair]
        rows.append(model.fm.get_input_embeddings().weight[ids].detach().clone())
    assert torch.equal(rows[0], rows[1])
