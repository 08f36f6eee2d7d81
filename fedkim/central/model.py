"""The central model: the frozen FM, the federation's modality encoders, projectors to the FM width, and M³OE.

Prompt (one task per batch; the reference code's conversation format):

    [BOS] ### Human: <tag> {modality tokens} </tag> {question}\\n### Assistant: {answer}\\n###

Modality tags are added to the vocabulary *before* experts are attached, their rows mean-initialised and frozen
like every other FM weight. The loss is the mean over answer tokens. Text-only samples carry no modality tokens.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from fedkim.central.foundation import Foundation
from fedkim.central.m3oe import M3OE, M3OEConfig, attach_m3oe
from fedkim.data.catalogue import Catalogue, Task, load_catalogue

TAGS = {"image": ("<image>", "</image>"), "ecg": ("<ecg>", "</ecg>"), "clinical": ("<clinical>", "</clinical>")}
HUMAN, ASSISTANT, END = "### Human: ", "\n### Assistant:", "\n###"


def reference_tasks(catalogue: Catalogue, gate_norm: str) -> tuple[str, ...]:
    """The catalogue tasks whose descriptions a reference norm places a description against: the training tasks
    (norm 'train') or all of them (norm 'catalogue')."""
    return catalogue.train if gate_norm == "train" else tuple(catalogue.tasks)


def reference_pairs(catalogue: Catalogue, gate_norm: str) -> list[tuple[str, str]]:
    """The (task, modality) descriptions of reference_tasks(gate_norm), for code that attaches M3OE itself."""
    return [GateMode().pair(catalogue[t]) for t in reference_tasks(catalogue, gate_norm)]


@dataclass
class GateMode:
    """Which descriptions feed the gate: both (FedKIM), or one of them attending to itself (ablations)."""

    use_task: bool = True
    use_modality: bool = True

    def pair(self, t: Task) -> tuple[str, str]:
        task_text = t.task_description if self.use_task else t.modality_description
        modality_text = t.modality_description if self.use_modality else t.task_description
        return task_text, modality_text


class _DropMeanResizingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "multivariate normal distribution" not in record.getMessage()


@contextlib.contextmanager
def _quiet_mean_resizing():
    """Without transformers' notice that added rows are drawn from the old embeddings' distribution: the tag rows
    are meant to be so (mean_resizing=True), and the notice means nothing to whoever runs a round."""
    logger, notice = logging.getLogger("transformers.modeling_utils"), _DropMeanResizingNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class CentralModel(nn.Module):
    def __init__(self, foundation: Foundation, encoders: nn.ModuleDict, m3oe_config: M3OEConfig | None,
                 *, catalogue: Catalogue | None = None, gate_mode: GateMode | None = None,
                 train_encoders: bool = True, clinical_hours: int | None = None, gate_reference: dict | None = None):
        """catalogue: the tasks the model answers (None: the shipped catalogue; `use_catalogue` swaps in one with
        more zero-shot tasks). clinical_hours: the central model reads the most recent this-many hours of a longer ICU series (the
        window it learned on), None: every hour. gate_reference: the descriptions the gate was trained against
        ({"reference": [[task, modality], ...], "task_vocab": [...], "modality_vocab": [...]}, as
        `gate_reference` returns them and a bundle stores them); None: from the catalogue."""
        super().__init__()
        catalogue = self.catalogue = catalogue or load_catalogue()
        self.clinical_hours = clinical_hours
        self.fm = foundation.model
        self.tokenizer = foundation.tokenizer
        self._add_tags()
        self.fm.requires_grad_(False)  # frozen, the new tag rows included
        self.encoders = copy.deepcopy(encoders)
        self.encoders.requires_grad_(train_encoders)
        width = self.fm.config.hidden_size
        self.projectors = nn.ModuleDict({m: nn.Linear(e.out_dim, width) for m, e in self.encoders.items()})
        self.gate_mode = gate_mode or GateMode()
        self.m3oe: M3OE | None = None
        if m3oe_config is not None:
            # what the gate sees, for each task of the norm's reference (see gates.XAttnGate): fixed when the
            # model is built, so a later catalogue with more tasks leaves the known tasks' routing as trained
            stored = gate_reference or {
                "reference": [self.gate_mode.pair(catalogue[t])
                              for t in reference_tasks(catalogue, m3oe_config.gate_norm)],
                "task_vocab": [t.task_description for t in catalogue.tasks.values()],
                "modality_vocab": list(catalogue.modalities.values())}
            self.m3oe = attach_m3oe(self.fm, m3oe_config, self.tokenizer,
                                    reference=[tuple(p) for p in stored["reference"]],
                                    task_vocab=stored["task_vocab"], modality_vocab=stored["modality_vocab"])
        self._text_cache: dict[str, list[int]] = {}

    def gate_reference(self) -> dict | None:
        """The descriptions the gate routes against (see __init__), to store beside the weights."""
        if self.m3oe is None:
            return None
        return {"reference": [list(p) for p in self.m3oe.reference], "task_vocab": list(self.m3oe.task_vocab),
                "modality_vocab": list(self.m3oe.modality_vocab)}

    def use_catalogue(self, catalogue: Catalogue) -> None:
        """Answer the tasks of another catalogue (e.g. one with new zero-shot tasks); the gate keeps the reference
        descriptions it was trained against."""
        self.catalogue = catalogue

    def _add_tags(self) -> None:
        new = [t for pair in TAGS.values() for t in pair if t not in self.tokenizer.get_vocab()]
        if new:
            self.tokenizer.add_special_tokens({"additional_special_tokens": new})
            # mean_resizing samples the new rows from the global RNG: seed it privately, so every process that
            # rebuilds the model (a DVC stage, a Prefect worker, a bundle load) gets the very same tag rows the
            # experts were trained with, and the caller's RNG stream is left as it was.
            with torch.random.fork_rng(devices=[]), _quiet_mean_resizing():
                torch.manual_seed(0)
                self.fm.resize_token_embeddings(len(self.tokenizer), mean_resizing=True)

    # ------------------------------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        # self.parameters() already holds the experts (inside the FM) and the gate (self.m3oe), once each
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: encoders, projectors and M³OE (the FM is rebuilt from its source)."""
        state = {f"encoders.{k}": v for k, v in self.encoders.state_dict().items()}
        state |= {f"projectors.{k}": v for k, v in self.projectors.state_dict().items()}
        if self.m3oe is not None:
            state |= {f"m3oe.{k}": v for k, v in self.m3oe.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in (("encoders.", self.encoders), ("projectors.", self.projectors), ("m3oe.", self.m3oe)):
            if module is not None:
                part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                module.load_state_dict(part)

    def load_encoders(self, site_state: dict[str, torch.Tensor]) -> None:
        """Inject the federation's aggregated encoders (keys encoders.<modality>.* of the site model)."""
        own = self.encoders.state_dict()
        update = {k[len("encoders."):]: v for k, v in site_state.items()
                  if k.startswith("encoders.") and k[len("encoders."):] in own}
        self.encoders.load_state_dict({**own, **update})

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {f"encoders.{k}": v.detach().cpu().clone() for k, v in self.encoders.state_dict().items()}

    # --------------------------------------------------------------------------------------------- inputs
    def token_ids(self, text: str) -> list[int]:
        """The tokenizer's ids of `text` (no special tokens), cached: prompts repeat the same few strings."""
        if text not in self._text_cache:
            self._text_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._text_cache[text]

    def _modality_tokens(self, batch: dict, task: str) -> tuple[str | None, torch.Tensor | None]:
        for modality in ("image", "ecg", "clinical"):
            if modality in self.catalogue[task].inputs:
                if modality == "clinical":
                    batch = self.recent_hours(batch)
                return modality, self.projectors[modality](self.encoders[modality](batch))
        return None, None

    def recent_hours(self, batch: dict) -> dict:
        """An ICU series longer than the window the model learned on is read as its most recent window of that
        length (sepsis's 48 h as hours 24-47). Read whole, the FM met twice the tokens it was trained on and its
        readout did not transfer: on a dev federation, sepsis AUROC 0.50-0.61 whole against 0.64-0.69 recent."""
        hours = self.clinical_hours
        if hours is None or batch["clinical"].shape[1] <= hours:
            return batch
        return batch | {key: batch[key][:, -hours:] for key in ("clinical", "clinical_mask")}

    def build(self, batch: dict, task: str, answers: list[str] | None) -> dict:
        """inputs_embeds, attention_mask and labels (answer tokens only) for one single-task batch."""
        embed = self.fm.get_input_embeddings()
        device = embed.weight.device
        modality, tokens = self._modality_tokens(batch, task)
        questions = batch.get("question") or [self.catalogue[task].question] * _batch_size(batch)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        rows, labels = [], []
        for i, question in enumerate(questions):
            open_tag, close_tag = TAGS[modality] if modality else ("", "")
            head = torch.tensor(bos + self.token_ids(HUMAN + open_tag), device=device)
            tail_ids = self.token_ids(close_tag + " " + question + ASSISTANT)
            answer_ids = self.token_ids(" " + answers[i] + END) if answers is not None else []
            tail = torch.tensor(tail_ids + answer_ids, dtype=torch.long, device=device)
            parts = [embed(head)]
            if tokens is not None:
                parts.append(tokens[i].to(embed.weight.dtype))
            parts.append(embed(tail))
            rows.append(torch.cat(parts))
            n_prompt = len(head) + (0 if tokens is None else tokens.shape[1]) + len(tail_ids)
            label = torch.full((n_prompt + len(answer_ids),), -100, dtype=torch.long, device=device)
            label[n_prompt:] = torch.tensor(answer_ids, dtype=torch.long, device=device)
            labels.append(label)
        return _left_pad(rows, labels)

    def set_gate(self, task: str, n: int) -> torch.Tensor | None:
        if self.m3oe is None:
            return None
        task_text, modality_text = self.gate_mode.pair(self.catalogue[task])
        return self.m3oe.set_gate([task_text] * n, [modality_text] * n)

    def _forward(self, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits that predict the labelled positions, and those labels, both (batch, K).

        Answers sit at the end (left padding), so the LM head runs on the last K positions only: with a 49k
        vocabulary it would otherwise cost more than the transformer itself."""
        labelled = (labels != -100)
        first = int(labelled.float().argmax(-1)[labelled.any(-1)].min()) if labelled.any() else labels.shape[1] - 1
        keep = labels.shape[1] - first + 1
        position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
        logits = self.fm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                         position_ids=position_ids, logits_to_keep=keep).logits
        return logits[:, :-1].float(), labels[:, labels.shape[1] - keep + 1:]

    # ----------------------------------------------------------------------------------------------- loss
    def loss(self, batch: dict, task: str, answers: list[str]) -> torch.Tensor:
        inputs = self.build(batch, task, answers)
        self.set_gate(task, len(answers))
        shift_logits, shift_labels = self._forward(inputs, inputs["labels"])
        loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                           ignore_index=-100)  # mean over answer tokens
        if self.m3oe is not None and self.m3oe.config.balance_weight > 0:
            loss = loss + self.m3oe.config.balance_weight * self.balance_loss()
        return loss

    def balance_loss(self) -> torch.Tensor:
        """The gate's load-balancing loss: over the last batch, or (scope 'tasks') over every training task's pair."""
        if self.m3oe.config.balance_scope == "batch":
            return self.m3oe.aux_loss
        return self.m3oe.pairs_balance([self.gate_mode.pair(self.catalogue[name]) for name in self.catalogue.train])

    # ------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def option_logprobs(self, batch: dict, task: str, options: list[list[str]]) -> torch.Tensor:
        """(batch, max options) summed log-probability of each option's tokens after the prompt; -inf pads rows
        with fewer options."""
        first_tokens = [[self.token_ids(" " + o) for o in row] for row in options]
        if all(len(ids) == 1 for row in first_tokens for ids in row):
            return self._single_token_logprobs(batch, task, first_tokens)
        pairs = [(i, j) for i, row in enumerate(options) for j in range(len(row))]
        flat_batch = _take(batch, [i for i, _ in pairs])
        flat_answers = [options[i][j] for i, j in pairs]
        inputs = self.build(flat_batch, task, flat_answers)
        labels = inputs["labels"].clone()
        for row, answer in enumerate(flat_answers):  # score the option's tokens, not the end marker after it
            positions = (labels[row] != -100).nonzero().flatten()
            keep = len(self.token_ids(" " + answer))
            labels[row, positions[keep:]] = -100
        self.set_gate(task, len(pairs))
        logits, target = self._forward(inputs, labels)
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
        scores = torch.full((len(options), max(len(r) for r in options)), float("-inf"))
        for (i, j), value in zip(pairs, picked.sum(-1).cpu()):
            scores[i, j] = value
        return scores

    def _single_token_logprobs(self, batch: dict, task: str, token_ids: list[list[list[int]]]) -> torch.Tensor:
        """One forward per sample when every option is one token: read the next-token distribution after the
        prompt (equal to the multi-pass score, at a fraction of the cost)."""
        inputs = self.build(batch, task, None)
        self.set_gate(task, len(token_ids))
        position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.fm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                         position_ids=position_ids, logits_to_keep=1).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        scores = torch.full((len(token_ids), max(len(r) for r in token_ids)), float("-inf"))
        for i, row in enumerate(token_ids):
            for j, ids in enumerate(row):
                scores[i, j] = logp[i, ids[0]]
        return scores

    @torch.no_grad()
    def generate(self, batch: dict, task: str, max_new_tokens: int = 4) -> list[str]:
        """Greedy decoding of a free-text answer (a secondary report; scoring uses option_logprobs)."""
        inputs = self.build(batch, task, None)
        self.set_gate(task, inputs["inputs_embeds"].shape[0])
        out = self.fm.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                               max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(row, skip_special_tokens=True).split("###")[0].strip() for row in out]


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, (torch.Tensor, list)):
            return len(value)
    raise ValueError("empty batch")


def _take(batch: dict, rows: list[int]) -> dict:
    """The batch's samples at `rows` (repeats allowed), tensors and lists alike."""
    index = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.index_select(0, index.to(value.device))
        elif isinstance(value, list):
            out[key] = [value[r] for r in rows]
        else:
            out[key] = value
    return out


def _left_pad(rows: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
    # Left padding keeps the prompt end aligned for generate(); loss and scoring use the attention mask either way.
    width = max(r.shape[0] for r in rows)
    dim = rows[0].shape[1]
    embeds = rows[0].new_zeros((len(rows), width, dim))
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    label = torch.full((len(rows), width), -100, dtype=torch.long, device=rows[0].device)
    for i, (r, l) in enumerate(zip(rows, labels)):
        embeds[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
        label[i, width - l.shape[0]:] = l
    return {"inputs_embeds": embeds, "attention_mask": mask, "labels": label}
