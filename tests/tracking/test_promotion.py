"""The promotion rule on its own: `decide` and the figures it compares, without MLflow."""

import math

import pytest

from fedkim.data.catalogue import load_catalogue
from fedkim.tracking.promotion import MAX_AUROC_DROP, TOLERANCE, Figures, compare, decide, figures

TRAIN_TASKS = load_catalogue().train  # the shipped catalogue's

TASKS = ("lung_opacity", "covid")


def test_the_first_version_becomes_champion():
    promoted, reason = decide(Figures(0.4, 0.5), None, 1, None, TASKS)
    assert promoted and reason == ("no champion yet: v1 becomes champion with mean primary 0.4000, mean AUROC 0.5000 "
                                   "over 2 training task(s)")


def test_a_better_mean_primary_is_promoted_when_auroc_holds():
    promoted, reason = decide(Figures(0.7, 0.89), Figures(0.6, 0.9), 3, 1, TASKS)
    assert promoted and "v3 mean primary 0.7000" in reason and "beats champion v1 (mean primary 0.6000" in reason
    assert f"mean AUROC no more than {MAX_AUROC_DROP} lower" in reason


def test_a_better_mean_primary_with_a_worse_auroc_is_kept():
    promoted, reason = decide(Figures(0.7, 0.1), Figures(0.6, 0.9), 3, 1, TASKS)
    assert not promoted and "mean AUROC drops by 0.8000" in reason and reason.endswith("champion stays v1")
    edge = 0.9 - MAX_AUROC_DROP  # a drop of exactly the tolerance still promotes
    assert decide(Figures(0.7, edge), Figures(0.6, 0.9), 3, 1, TASKS)[0]
    assert not decide(Figures(0.7, edge - 0.001), Figures(0.6, 0.9), 3, 1, TASKS)[0]
    assert not decide(Figures(0.7, math.nan), Figures(0.6, 0.9), 3, 1, TASKS)[0]  # no AUROC: no evidence it held


def test_a_champion_whose_figures_are_on_another_split_is_named_so():
    promoted, reason = decide(Figures(0.7, 0.8), Figures(0.6, 0.7), 2, 1, TASKS, "validation", "test")
    assert promoted and reason.endswith("on the validation split (champion v1's figures are on the test split)")
    same = decide(Figures(0.7, 0.8), Figures(0.6, 0.7), 2, 1, TASKS, "validation", "validation")[1]
    assert "figures are on" not in same


def test_a_worse_mean_primary_is_kept_whatever_its_auroc():
    promoted, reason = decide(Figures(0.5, 0.99), Figures(0.6, 0.7), 2, 1, TASKS)
    assert not promoted and "does not beat champion v1" in reason and reason.endswith("champion stays v1")


def test_a_primary_within_the_tolerance_is_a_tie_decided_by_auroc():
    above = 0.6 + TOLERANCE / 2  # higher, but not by more than the tolerance
    assert not decide(Figures(above, 0.7), Figures(0.6, 0.7), 4, 3, TASKS)[0]
    promoted, reason = decide(Figures(above, 0.8), Figures(0.6, 0.7), 4, 3, TASKS)
    assert promoted and "wins the tie-break on mean AUROC 0.8000 > 0.7000" in reason
    assert decide(Figures(0.6 + 2 * TOLERANCE, 0.69), Figures(0.6, 0.7), 4, 3, TASKS)[0]  # beyond it: a win


def test_the_auroc_tie_break_also_needs_more_than_the_tolerance():
    assert not decide(Figures(0.6, 0.7 + TOLERANCE / 2), Figures(0.6, 0.7), 4, 3, TASKS)[0]
    assert not decide(Figures(0.6, math.nan), Figures(0.6, 0.7), 4, 3, TASKS)[0]
    assert decide(Figures(0.6, 0.5), Figures(0.6, math.nan), 4, 3, TASKS)[0]  # a champion without AUROC loses it


def test_no_finite_primary_is_never_promoted_even_without_a_champion():
    promoted, reason = decide(Figures(math.nan, math.nan, ("covid",)), None, 4, None, TRAIN_TASKS)
    assert not promoted and "(covid not evaluated); champion unchanged" in reason


def test_a_champion_without_a_finite_primary_loses_to_any_finite_one():
    assert decide(Figures(0.01, math.nan), Figures(math.nan, math.nan), 2, 1, TASKS)[0]


def test_equal_primaries_are_decided_by_auroc_and_equal_figures_keep_the_champion():
    tie = decide(Figures(0.6, 0.8), Figures(0.6, 0.7), 4, 3, TRAIN_TASKS)
    assert tie[0] and "tie-break on mean AUROC 0.8000 > 0.7000" in tie[1]
    kept = decide(Figures(0.6, 0.7), Figures(0.6, 0.7), 4, 3, TRAIN_TASKS)
    assert not kept[0] and kept[1].endswith("champion stays v3")


def test_figures_average_the_evaluated_tasks_and_name_the_missing_ones():
    table = {"lung_opacity": {"primary": 0.5, "auroc": 0.6}, "ecg_abnormal": {"primary": 0.9}}
    score = figures(table, ("lung_opacity", "ecg_abnormal", "covid"))
    assert (score.primary, score.auroc, score.missing) == (pytest.approx(0.7), 0.6, ("covid",))
    assert math.isnan(figures({}, TASKS).primary) and figures({}, TASKS).missing == TASKS


def test_compare_gives_deltas_against_the_champion():
    metrics = {"tasks": {"lung_opacity": {"primary": 0.7, "auroc": 0.8, "f1": 0.7}, "covid": {"primary": 0.5}}}
    alone = compare(metrics, None, TASKS)
    assert alone["champion"] is None and alone["delta"] == {} and alone["challenger"]["primary"] == pytest.approx(0.6)
    both = compare(metrics, {"lung_opacity": {"primary": 0.6, "auroc": 0.9}, "covid": {"primary": 0.5}}, TASKS)
    assert both["delta"]["lung_opacity"] == {"primary": pytest.approx(0.1), "auroc": pytest.approx(-0.1)}
    assert both["delta"]["score"] == {"primary": pytest.approx(0.05), "auroc": pytest.approx(-0.1)}
