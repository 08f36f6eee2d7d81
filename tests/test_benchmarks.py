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
