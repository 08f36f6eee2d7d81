"""M3OE on the tiny FM: identity at init, frozen base, gate invariants, exact equivalences with peft LoRA."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedkim.central.foundation import load_foundation
from fedkim.central.m3oe import M3OEConfig, M3OELinear, attach_m3oe, merge
from fedkim.central.model import reference_pairs
from fedkim.data.catalogue import load_catalogue

CATALOGUE = load_catalogue()  # the shipped catalogue
TASKS = CATALOGUE.tasks

# the descriptions an id gate can route: the catalogue's
VOCAB = {"task_vocab": [t.task_description for t in TASKS.values()],
         "modality_vocab": list(CATALOGUE.modalities.values())}

PAIRS = [(t.task_description, t.modality_description) for t in TASKS.values()]


@pytest.fixture
def fm():
    return load_foundation("tiny")


def batch(fm, n=3, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, fm.tokenizer.vocab_size, (n, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pairs(n, offset=0):
    chosen = [PAIRS[(offset + i) % len(PAIRS)] for i in range(n)]
    return [p[0] for p in chosen], [p[1] for p in chosen]


def perturb_b(m3oe, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m3oe.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def attach(fm, **kw):
    kw = {"num_experts": 4, "rank": 2, **kw}
    torch.manual_seed(kw.pop("seed", 0))
    config = M3OEConfig(**kw)
    return attach_m3oe(fm.model, config, fm.tokenizer, reference=reference_pairs(CATALOGUE, config.gate_norm), **VOCAB)


def test_identity_at_init_and_targets(fm):
    inputs = batch(fm)
    with torch.no_grad():
        before = fm.model(**inputs).logits
    m3oe = attach(fm)
    assert len(m3oe.layers) == 2 * 7 and all(isinstance(layer, M3OELinear) for layer in m3oe.layers.values())
    with torch.no_grad():
        after = m3oe(*pairs(3), **inputs).logits
    assert torch.equal(before, after)


def test_one_step_trains_only_m3oe_and_keeps_the_base_bit_identical(fm):
    m3oe = attach(fm, lm_head=True)
    perturb_b(m3oe)  # with B = 0 the gradients of A and of the gate would be exactly zero
    m3oe.train()
    base = {n: p.detach().clone() for n, p in fm.model.named_parameters() if ".experts." not in n}
    expert_before = [p.detach().clone() for p in m3oe.trainable_parameters()]
    inputs = batch(fm, n=4)
    opt = torch.optim.AdamW(m3oe.trainable_parameters(), lr=1e-2)
    loss = m3oe(*pairs(4), **inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    for name, p in fm.model.named_parameters():
        if ".experts." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m3oe.gate.parameters())
    opt.step()
    for name, p in fm.model.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, base[name]), name
    assert all(not torch.equal(a, b) for a, b in zip(expert_before, m3oe.trainable_parameters()))


def test_gate_is_a_distribution_that_differs_across_pairs(fm):
    m3oe = attach(fm)
    tasks, modalities = zip(*PAIRS)
    g = m3oe.gate_weights(tasks, modalities)
    assert g.shape == (len(PAIRS), 4)
    assert torch.allclose(g.sum(-1), torch.ones(len(PAIRS)), atol=1e-6) and (g >= 0).all()
    assert torch.cdist(g, g).add(torch.eye(len(PAIRS))).min() > 1e-4  # every pair routes differently
    # Same task, another modality description. The modality acts only through the attention pattern, which is
    # near-uniform at init (scores ~ 1e-2, and the tiny FM's embeddings are small), so sharpen the projections as
    # training would.
    with torch.no_grad():
        for w in (m3oe.gate.w_q, m3oe.gate.w_k, m3oe.gate.w_v):
            w.weight.mul_(100.0)
    g0, g2 = m3oe.gate_weights([tasks[0]] * 2, [modalities[0], modalities[2]])
    assert (g0 - g2).abs().max() > 1e-3


def test_gate_norms_break_the_uniform_start_without_adding_parameters():
    """A pretrained-scale embedding table (small values) gives near-uniform logits (`none`); `layer` fixes the scale
    but every task starts with the same routing; `catalogue` and `train` give each description its own routing.
    None adds a parameter or a state-dict key."""
    from fedkim.central.evaluate import gate_distance

    spreads, distances, keys = {}, {}, {}
    for norm in ("none", "layer", "catalogue", "train"):
        fm = load_foundation("tiny")
        m3oe = attach(fm, gate_norm=norm)
        tasks, modalities = zip(*PAIRS)
        g = m3oe.gate_weights(tasks, modalities)
        assert torch.allclose(g.sum(-1), torch.ones(len(PAIRS)), atol=1e-5)
        spreads[norm] = float((g - 1 / g.shape[1]).abs().max())
        distances[norm] = gate_distance({t: row.tolist() for t, row in zip(tasks, g)})
        keys[norm] = sorted(m3oe.gate.state_dict())
    assert spreads["layer"] > 4 * spreads["none"] and spreads["catalogue"] > 4 * spreads["none"]
    assert spreads["train"] > 4 * spreads["none"]
    for norm in ("catalogue", "train"):
        assert distances[norm] > 2 * distances["layer"] and distances[norm] > 10 * distances["none"]
    assert keys["none"] == keys["layer"] == keys["catalogue"] == keys["train"]
    with pytest.raises(ValueError, match="gate_norm must be one of"):
        M3OEConfig(gate_norm="batch")


@pytest.mark.parametrize("norm", ["catalogue", "train"])
def test_reference_norms_follow_the_reference_and_stay_differentiable(fm, norm):
    m3oe = attach(fm, gate_norm=norm)
    task, modality = PAIRS[0]
    before = m3oe.gate_weights(task, modality)
    m3oe.reference = PAIRS[:6]  # another reference set places the same description elsewhere
    assert not torch.allclose(before, m3oe.gate_weights(task, modality), atol=1e-4)
    m3oe.train()
    m3oe.compute_gate([task] * 2, [modality] * 2)[:, 0].sum().backward()
    assert m3oe.gate.w_q.weight.grad is not None and m3oe.gate.out.weight.grad.abs().sum() > 0


def test_train_norm_routes_independently_of_the_tasks_never_trained_on(monkeypatch):
    """With norm 'train' the reference is the training pairs only: rewording a zero-shot task's description (or
    adding one) changes neither a training task's routing nor, therefore, what training does. The catalogue norm
    standardises against every description, so the same rewording moves the training tasks' gates."""
    from dataclasses import replace

    TRAIN_TASKS, ZERO_SHOT_TASKS = CATALOGUE.train, CATALOGUE.zero_shot

    train = [(TASKS[n].task_description, TASKS[n].modality_description) for n in TRAIN_TASKS]
    zero_shot = ZERO_SHOT_TASKS[0]
    # shorter, in the tiny FM's words (a reordering alone would not do: the gate's attention pool ignores order)
    reworded = " ".join(TASKS[zero_shot].task_description.split()[4:])

    def gates(norm):
        fm = load_foundation("tiny")  # built before the rewording: the same vocabulary and weights every time
        m3oe = attach(fm, gate_norm=norm)
        before = m3oe.gate_weights(*zip(*train))
        with monkeypatch.context() as patch:
            patch.setitem(TASKS, zero_shot, replace(TASKS[zero_shot], task_description=reworded))
            after = attach(load_foundation("tiny"), gate_norm=norm).gate_weights(*zip(*train))
        return m3oe, before, after

    m3oe, before, after = gates("train")
    assert m3oe.reference == train
    assert torch.equal(before, after)
    zero_shot_gate = m3oe.gate_weights(reworded, TASKS[zero_shot].modality_description)
    assert torch.isfinite(zero_shot_gate).all() and torch.allclose(zero_shot_gate.sum(), torch.tensor(1.0))
    _, before, after = gates("catalogue")
    assert not torch.allclose(before, after, atol=1e-4)


def test_padding_does_not_change_the_gate(fm):
    m3oe = attach(fm)
    m3oe.eval()
    task, modality = PAIRS[0]
    tok = fm.tokenizer
    reference = (*m3oe.encode([t for t, _ in m3oe.reference]), *m3oe.encode([m for _, m in m3oe.reference]))
    weights = []
    for extra in (0, 5, 17):
        t = tok([task], add_special_tokens=False, padding="max_length", max_length=len(tok(task)["input_ids"]) + extra,
                return_tensors="pt")
        m = tok([modality], add_special_tokens=False, padding="max_length",
                max_length=len(tok(modality)["input_ids"]) + extra + 3, return_tensors="pt")
        weights.append(m3oe.gate(t["input_ids"], t["attention_mask"], m["input_ids"], m["attention_mask"], reference))
    assert all(torch.allclose(weights[0], w, atol=1e-6) for w in weights[1:])
    # and inside a batch, next to longer descriptions
    longest = max(PAIRS, key=lambda p: len(p[0]) + len(p[1]))
    mixed = m3oe.gate_weights([task, longest[0]], [modality, longest[1]])
    assert torch.allclose(mixed[0], weights[0][0], atol=1e-6)
    with pytest.raises(ValueError, match="needs the reference"):
        m3oe.gate(t["input_ids"], t["attention_mask"], m["input_ids"], m["attention_mask"])


def test_top_k_keeps_k_experts(fm):
    m3oe = attach(fm, top_k=2)
    g = m3oe.gate_weights(*pairs(6))
    assert ((g > 0).sum(-1) == 2).all()
    assert torch.allclose(g.sum(-1), torch.ones(6), atol=1e-6)


def test_balance_loss_is_exposed(fm):
    m3oe = attach(fm, balance_weight=0.5)
    g = m3oe.set_gate(*pairs(4))
    assert m3oe.aux_loss.requires_grad and m3oe.aux_loss > 0  # unweighted: the trainer multiplies by 0.5
    load = g.mean(0)
    assert torch.allclose(m3oe.aux_loss, load.var(unbiased=False) / load.mean() ** 2)
    m3oe.set_gate_weights(torch.full((4, 4), 0.25))
    assert m3oe.gate.balance(torch.full((4, 4), 0.25)) == 0


def test_balance_over_task_pairs_spreads_the_tasks_over_the_experts(fm):
    m3oe = attach(fm, num_experts=6, balance_scope="tasks")
    four = list(zip(*pairs(4)))
    load = m3oe.compute_gate(*pairs(4)).mean(0)
    assert torch.allclose(m3oe.pairs_balance(four), load.var(unbiased=False) / load.mean() ** 2)
    # one single-task batch: the per-batch loss sees only that task's gate, the pairs loss all four
    m3oe.set_gate(*pairs(1))
    assert not torch.allclose(m3oe.aux_loss, m3oe.pairs_balance(four))
    m3oe.gate.eval()  # no attention dropout: a deterministic descent
    with torch.no_grad():
        m3oe.gate.out.bias[0] = 4.0  # every task collapsed onto expert 0
    optimizer = torch.optim.Adam(m3oe.gate.parameters(), lr=0.01)
    start = float(m3oe.pairs_balance(four))
    for _ in range(30):
        optimizer.zero_grad()
        m3oe.pairs_balance(four).backward()
        optimizer.step()
    assert float(m3oe.pairs_balance(four)) < 0.5 * start
    with pytest.raises(ValueError, match="balance_scope"):
        M3OEConfig(balance_scope="sites")


def test_einsum_path_equals_a_loop_over_experts(fm):
    m3oe = attach(fm, num_experts=5, rank=3)
    perturb_b(m3oe)
    layer = m3oe.layers["model.layers.0.mlp.up_proj"]
    layer.eval()
    x = torch.randn(3, 6, layer.base.in_features)
    g = torch.rand(3, 5).softmax(-1)
    m3oe.set_gate_weights(g)
    expected = layer.base(x)
    for b in range(3):
        for p in range(5):
            expected[b] += g[b, p] * layer.scaling * (x[b] @ layer.lora_A[p].T @ layer.lora_B[p].T)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_single_gate_equals_a_plain_peft_lora(fm):
    reference = copy.deepcopy(fm.model)
    m3oe = attach(fm, gate="single", num_experts=1, rank=4, alpha=8.0)
    perturb_b(m3oe)
    m3oe.eval()
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=list(m3oe.config.targets)))
    peft_model.eval()
    with torch.no_grad():
        for name, layer in m3oe.layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A[0])
            target.lora_B["default"].weight.copy_(layer.lora_B[0])
        inputs = batch(fm)
        ours = m3oe(*pairs(3), **inputs).logits
        theirs = peft_model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"lm_head": True, "top_k": 2, "scale_one": True}, {"shared_experts": 2}])
def test_merge_exports_a_peft_adapter_with_the_same_outputs(fm, tmp_path, kw):
    clean = copy.deepcopy(fm.model)
    m3oe = attach(fm, **kw)
    perturb_b(m3oe)
    m3oe.eval()
    task, modality = PAIRS[2]
    folder = merge(m3oe, task, modality, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    inputs = batch(fm, n=4, length=9, seed=3)
    with torch.no_grad():
        base = clean(**inputs).logits
        loaded = PeftModel.from_pretrained(clean, folder).eval()
        ours = m3oe([task] * 4, [modality] * 4, **inputs).logits
        theirs = loaded(**inputs).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-4)
    if not kw.get("lm_head"):  # merging into a tied lm_head would also change the input embeddings (peft #2777)
        with torch.no_grad():
            merged = loaded.merge_and_unload()(**inputs).logits
        assert torch.allclose(ours, merged, atol=1e-4)


def test_scale_one_sets_scaling_to_one(fm):
    assert M3OEConfig(rank=8, alpha=32).scaling == 4.0 and M3OEConfig(alpha=32, scale_one=True).scaling == 1.0
    deltas = {}
    for scale_one in (False, True):
        tiny = load_foundation("tiny")
        m3oe = attach(tiny, scale_one=scale_one, alpha=6.0, rank=2)
        assert all(layer.scaling == (1.0 if scale_one else 3.0) for layer in m3oe.layers.values())
        perturb_b(m3oe)
        m3oe.eval()
        layer = m3oe.layers["model.layers.1.self_attn.o_proj"]
        m3oe.set_gate(*pairs(2))
        x = torch.randn(2, 5, layer.base.in_features, generator=torch.Generator().manual_seed(0))
        deltas[scale_one] = layer(x) - layer.base(x)
    assert torch.allclose(deltas[False], 3.0 * deltas[True], atol=1e-6)


def test_state_dict_holds_only_m3oe_and_round_trips(fm):
    m3oe = attach(fm, gate="id")
    perturb_b(m3oe)
    m3oe.eval()
    state = m3oe.state_dict()
    assert all(k.startswith(("gate.", "experts.")) for k in state)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in m3oe.trainable_parameters())
    inputs = batch(fm)
    with torch.no_grad():
        ours = m3oe(*pairs(3), **inputs).logits

    other_fm = load_foundation("tiny")
    other = attach(other_fm, gate="id", seed=7)
    other.load_state_dict(state)
    other.eval()
    with torch.no_grad():
        assert torch.equal(ours, other(*pairs(3), **inputs).logits)


def test_id_gate_and_errors(fm):
    m3oe = attach(fm, gate="id")
    g = m3oe.gate_weights(*pairs(4))
    assert torch.allclose(g.sum(-1), torch.ones(4), atol=1e-6) and not torch.allclose(g[0], g[1])
    with pytest.raises(KeyError, match="no task id"):
        m3oe.gate_weights(["an unknown task"], [PAIRS[0][1]])
    m3oe.clear_gate()
    with pytest.raises(RuntimeError, match="gate not set"):
        fm.model(**batch(fm))
    with pytest.raises(ValueError, match="num_experts=1"):
        M3OEConfig(gate="single", num_experts=4)


def test_shared_experts_are_always_on_and_outside_the_gate(fm):
    m3oe = attach(fm, shared_experts=1)
    layer = m3oe.layers["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.shape[0] == 5 and layer.lora_B.shape[0] == 5  # 4 routed + 1 shared
    weights = m3oe.set_gate(*pairs(3))
    assert weights.shape == (3, 4) and torch.allclose(weights.sum(-1), torch.ones(3))  # the gate routes 4
    assert m3oe.state.per_rank.shape == (3, 5 * 2) and (m3oe.state.per_rank[:, 8:] == 1).all()
    m3oe.eval()
    x = torch.randn(1, 6, layer.base.in_features, generator=torch.Generator().manual_seed(0)).repeat(3, 1, 1)
    assert torch.equal(layer(x), layer.base(x))  # B = 0 at init: still the base model
    with torch.no_grad():
        layer.lora_B[4].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # only the shared expert
        m3oe.set_gate_weights(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0.25] * 4]))
        delta = layer(x) - layer.base(x)
    # the shared expert's contribution does not depend on the routed gate
    assert delta.abs().max() > 1e-3 and torch.allclose(delta[0], delta[1], atol=1e-6)
    assert torch.allclose(delta[0], delta[2], atol=1e-6)
    with pytest.raises(ValueError, match="shared_experts"):
        M3OEConfig(num_experts=1, gate="single", shared_experts=1)
