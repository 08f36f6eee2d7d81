"""The benchmark tools' own logic (their figures are reported, not asserted)."""

import pytest

from benchmarks.injection_study import parse_arm, summary


def test_an_arm_may_change_the_injection_and_evaluation_but_not_site_training():
    assert parse_arm("shared:fedkim:inject.shared_experts=1,eval.max_per_task=40") == (
        "shared", "fedkim", {"inject.shared_experts": 1, "eval.max_per_task": 40})
    assert parse_arm("lora:fedplug_lora") == ("lora", "fedplug_lora", {})
    with pytest.raises(SystemExit, match="site.epochs"):
        parse_arm("long:fedkim:site.epochs=40")
    with pytest.raises(SystemExit, match="VARIANT"):
        parse_arm("x:no_such_variant")


def test_the_summary_counts_the_trials_in_which_the_first_arm_is_ahead():
    def trial(seed, f1, zs, auroc):
        return {"seed": seed, "train_mean_f1": f1, "zeroshot_mean": zs, "mean_auroc": auroc}

    runs = {"a": [trial(0, 0.7, 0.5, 0.8), trial(1, 0.6, 0.6, 0.7)],
            "b": [trial(0, 0.65, 0.55, 0.7), trial(1, 0.62, 0.5, 0.6)],
            "c": []}  # not run yet
    result = summary(runs)
    assert set(result) == {"a", "b"}
    assert result["a"]["train_mean_f1"] == 0.65 and result["b"]["zeroshot_mean"] == 0.525
    assert result["b"]["a_ahead"] == {"train_mean_f1": 1, "zeroshot_mean": 1, "mean_auroc": 2}


def test_the_profile_splits_a_step_into_matrix_products_gate_and_the_rest(tmp_path):
    import torch
    from torch.profiler import record_function

    from benchmarks.m3oe import profile_steps

    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def products():
        with record_function("gate"):
            torch.softmax(a, -1)
        for _ in range(4):
            a @ b

    def elementwise():
        for _ in range(4):
            a * b + a

    result = profile_steps({"products": products, "elementwise": elementwise}, tmp_path / "prof", False, lambda: None)
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["profile_elementwise.txt", "profile_products.txt"]
    assert "aten::mm" in (tmp_path / "prof" / "profile_products.txt").read_text()
    products_split, elementwise_split = result["products"], result["elementwise"]
    assert products_split["matmul_ms"] > 0 and elementwise_split["matmul_ms"] == 0
    assert products_split["gate_cpu_ms"] > 0 and elementwise_split["gate_cpu_ms"] == 0
    assert abs(products_split["self_ms"] - products_split["matmul_ms"] - products_split["other_ms"]) < 0.2
    assert elementwise_split["ops"] >= 8  # 4 x (mul, add)


def test_both_loop_references_compute_the_same_function_as_m3oe():
    """The speed comparison is only fair if the loops are M3OE computed another way: same outputs (dropout off)."""
    import copy

    import torch

    from benchmarks.m3oe import LoopMoELinear, to_loop
    from fedkim.central.foundation import load_foundation
    from fedkim.central.m3oe import DEFAULT_TARGETS, M3OEConfig, attach_m3oe
    from fedkim.central.model import reference_pairs
    from fedkim.data.catalogue import load_catalogue

    catalogue = load_catalogue()
    foundation = load_foundation("tiny")
    config = M3OEConfig(num_experts=4, rank=2, alpha=4.0, dropout=0.1, targets=DEFAULT_TARGETS)
    task = catalogue["covid"]
    ids = torch.randint(0, foundation.tokenizer.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    outputs = []
    for as_loop in (None, False, True):
        model = copy.deepcopy(foundation.model)
        torch.manual_seed(1)
        m3oe = attach_m3oe(model, config, foundation.tokenizer, reference=reference_pairs(catalogue, config.gate_norm))
        with torch.no_grad():
            for layer in m3oe.layers.values():
                layer.lora_B.normal_(0, 0.05)
        if as_loop is not None:
            to_loop(m3oe, as_loramoe=as_loop)
            loops = [m for m in model.modules() if isinstance(m, LoopMoELinear)]
            assert len(loops) == len(m3oe.layers) and all(m.as_loramoe is as_loop for m in loops)
        m3oe.eval()
        model.eval()
        with torch.no_grad():
            outputs.append(m3oe([task.task_description] * 3, [task.modality_description] * 3, input_ids=ids).logits)
    base = foundation.model(input_ids=ids).logits
    assert (outputs[0] - base).abs().max() > 1e-3  # the experts do change the output
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[0], atol=1e-5, rtol=1e-5)
