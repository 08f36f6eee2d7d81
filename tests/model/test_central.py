"""The central model, injection and evaluation on the tiny FM, and a small end-to-end federation."""

import json
import logging
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fedkim.central.evaluate import evaluate, gate_distance
from fedkim.central.inject import inject, warmup_decay
from fedkim.data.catalogue import load_catalogue
from fedkim.central.variants import VARIANTS, build_central
from fedkim.experiment import run_experiment, run_variant
from tests.helpers import TINY, small_params_dict, write_params
from tests.helpers.models import batch_of

CATALOGUE = load_catalogue()  # the shipped catalogue
TASKS, TRAIN_TASKS = CATALOGUE.tasks, CATALOGUE.train


def fm_weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.fm.state_dict().items()
            if "lora_" not in k and "experts" not in k}


def test_tags_are_in_the_vocabulary_and_the_fm_is_frozen(params):
    model = build_central(params, VARIANTS["fedkim"])
    vocab = model.tokenizer.get_vocab()
    assert all(t in vocab for t in ("<image>", "</image>", "<ecg>", "</ecg>", "<clinical>", "</clinical>"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoders.", "projectors.", "m3oe.")) or "lora_" in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.fm.named_parameters() if "lora_" not in n)


def test_loss_covers_only_the_answer_tokens(params):
    model = build_central(params, VARIANTS["fedkim"])
    batch = batch_of(params, "ecg_abnormal")
    inputs = model.build(batch, "ecg_abnormal", batch["answer"])
    answer_tokens = [len(model.token_ids(" " + a + "\n###")) for a in batch["answer"]]
    assert (inputs["labels"] != -100).sum(-1).tolist() == answer_tokens
    n_tokens = inputs["attention_mask"].sum(-1)
    assert (n_tokens >= 12).all()  # 12 ECG lead tokens are part of every prompt


def test_injection_trains_only_what_it_should_and_is_deterministic(params, tmp_path):
    # bit-for-bit repeatability is what the CPU path promises (CUDA kernels may reorder sums)
    params = params.model_copy(update={"inject": params.inject.model_copy(update={"device": "cpu"})})
    model = build_central(params, VARIANTS["fedkim"])
    before = fm_weights(model)
    encoders_before = {k: v.clone() for k, v in model.encoder_state().items()}
    first = inject(model, params.data.root / "public", params.inject, params.site, params.data, round_id="1",
                   checkpoint_dir=tmp_path / "a")
    after = fm_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the FM is bit-identical
    assert any(not torch.equal(v, model.encoder_state()[k]) for k, v in encoders_before.items())
    assert len(first.losses) > 4 and all(math.isfinite(x) for x in first.losses)
    again = build_central(params, VARIANTS["fedkim"])
    second = inject(again, params.data.root / "public", params.inject, params.site, params.data, round_id="1",
                    checkpoint_dir=tmp_path / "b")
    assert first.losses == second.losses
    resumed = build_central(params, VARIANTS["fedkim"])
    third = inject(resumed, params.data.root / "public", params.inject, params.site, params.data, round_id="1",
                   checkpoint_dir=tmp_path / "a")
    assert third.resumed and third.losses == first.losses
    state, resumed_state = model.trainable_state(), resumed.trainable_state()
    assert all(torch.equal(state[k], resumed_state[k]) for k in state)


def test_injection_learns_the_public_answers(params):
    model = build_central(params, VARIANTS["fedkim"])
    p = params.inject.model_copy(update={"epochs": 4, "lr": 3e-3})
    result = inject(model, params.data.root / "public", p, params.site, params.data)
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first - 0.5


def test_injection_and_evaluation_log_their_progress(params, caplog):
    caplog.set_level(logging.INFO, logger="fedkim")
    model = build_central(params, VARIANTS["fedkim"])
    p = params.inject.model_copy(update={"epochs": 1})
    result = inject(model, params.data.root / "public", p, params.site, params.data, round_id="7")
    lines = [r.getMessage() for r in caplog.records if r.name == "fedkim.central.inject"]
    steps = len(result.losses)
    assert len(lines) >= 2 and lines[0].startswith("round 7 injection: ") and "ETA" in lines[0]
    assert lines[-1].startswith(f"round 7 injection: {steps}/{steps} (100%) done in ")
    assert lines[-1].endswith(f"{result.tasks[-1]} loss {result.losses[-1]:.3f}")
    evaluate(model, params.data.root / "test", params.eval, params.site, params.data, tasks=("covid", "cxr_vqa"),
             public_dir=params.data.root / "public")
    lines = [r.getMessage() for r in caplog.records if r.name == "fedkim.central.evaluate"]
    assert lines[0].startswith("evaluation: 1/2 (50%) covid F1 ")
    assert lines[1].startswith("evaluation: 2/2 (100%) done in ") and " cxr_vqa accuracy " in lines[1]


def test_warmup_then_linear_decay():
    f = warmup_decay(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == pytest.approx(50 / 90) and f(99) == pytest.approx(1 / 90)


def test_scoring_handles_ragged_options_and_evaluation_covers_every_task(params):
    model = build_central(params, VARIANTS["fedkim"])
    batch = batch_of(params, "cxr_vqa", site="test", split="test", n=6)
    scores = model.option_logprobs(batch, "cxr_vqa", batch["options"])
    for row, options in zip(scores, batch["options"]):
        assert torch.isfinite(row[: len(options)]).all() and torch.isinf(row[len(options):]).all()
    metrics = evaluate(model, params.data.root / "test", params.eval, params.site, params.data,
                       public_dir=params.data.root / "public")
    assert set(metrics["tasks"]) == set(TASKS)
    for task, m in metrics["tasks"].items():
        assert m["n"] == 6 and 0.0 <= m["primary"] <= 1.0
        if TASKS[task].kind == "binary":
            assert {"accuracy", "f1", "auroc", "mcc", "f1_uncalibrated", "threshold", "positive_rate"} <= set(m)
    assert 0 <= metrics["train_mean_f1"] <= 1 and 0 <= metrics["zeroshot_mean"] <= 1


def test_yes_no_threshold_is_the_median_over_unlabelled_public_inputs_of_the_modality(params):
    from fedkim.central.evaluate import calibrate_threshold, calibration_inputs, evaluate_task, yes_no_scores
    from fedkim.data.batches import task_dataset

    model = build_central(params, VARIANTS["fedkim"])
    public = params.data.root / "public"
    # A zero-shot image task has no public samples of its own: its threshold comes from public radiographs.
    inputs = calibration_inputs(public, "atelectasis", params.site, params.data, limit=8)
    assert len(inputs) == 8 and {inputs[i]["task"] for i in range(len(inputs))} == {"lung_opacity", "covid"}
    threshold = calibrate_threshold(model, public, "atelectasis", params.eval, params.site, params.data, "cpu")
    scores = yes_no_scores(model, calibration_inputs(public, "atelectasis", params.site, params.data,
                                                     params.eval.calibration_samples), "atelectasis", 4, "cpu")
    assert sum(s > threshold for s in scores) == pytest.approx(len(scores) / 2, abs=1)  # half above, half below

    test = task_dataset(params.data.root / "test", "atelectasis", "test", params.site, params.data, limit=6)
    never = evaluate_task(model, test, "atelectasis", params.eval, "cpu", threshold=math.inf)
    always = evaluate_task(model, test, "atelectasis", params.eval, "cpu", threshold=-math.inf)
    assert never["positive_rate"] == 0.0 and never["f1"] == 0.0 and always["positive_rate"] == 1.0
    assert never["auroc"] == always["auroc"]  # the ranking does not depend on the threshold


def test_question_options_are_scored_relative_to_their_label_free_prior(params):
    from fedkim.central.evaluate import calibration_inputs, evaluate_task, option_priors
    from fedkim.data.batches import task_dataset

    model = build_central(params, VARIANTS["fedkim"])
    public, test_dir = params.data.root / "public", params.data.root / "test"
    by_label = params.eval.model_copy(update={"choice_scoring": "label"})  # medical_qa's letters, as asked
    # Questions about a radiograph are calibrated on public radiographs; text-only questions on "N/A".
    radiographs = calibration_inputs(public, "cxr_vqa", params.site, params.data, 8)
    assert len(radiographs) == 8 and {radiographs[i]["task"] for i in range(8)} == {"lung_opacity", "covid"}
    assert calibration_inputs(public, "medical_qa", params.site, params.data, 8) is None
    for task in ("cxr_vqa", "medical_qa", "ecg_noise_qa"):
        test = task_dataset(test_dir, task, "test", params.site, params.data, limit=8)
        asked = {(test.question_at(i)["question"], tuple(test.question_at(i)["options"])) for i in range(len(test))}
        priors = option_priors(model, public, test, task, by_label, params.site, params.data, "cpu")
        assert set(priors) == asked  # one prior per distinct question, from its text only
        assert all(len(prior) == len(options) and torch.isfinite(prior).all() for (_, options), prior in priors.items())
        result = evaluate_task(model, test, task, by_label, "cpu", priors=priors)
        offered = [len(test.question_at(i)["options"]) for i in range(len(test))]
        assert result["calibrated"] and result["chance"] == pytest.approx(sum(1 / n for n in offered) / len(offered))
        # A prior that penalises every option but the second makes the second the answer to every question.
        rigged = {key: torch.tensor([0.0, -1e6] + [0.0] * (len(key[1]) - 2)) for key in priors}
        forced = evaluate_task(model, test, task, by_label, "cpu", priors=rigged)
        second = [test.question_at(i)["options"][1] == test[i]["answer"] for i in range(len(test))]
        assert forced["accuracy"] == pytest.approx(sum(second) / len(second))
        # The breakdowns: every pick is some form's second option, and the per-form figures add up to the whole.
        seconds = {test.question_at(i)["options"][1] for i in range(len(test))}
        assert {pick for row in forced["confusion"].values() for pick in row} == seconds
        assert sum(n for row in forced["confusion"].values() for n in row.values()) == len(test)
        forms = forced["by_options"]
        assert {tuple(f.split("/")) for f in forms} == {tuple(test.question_at(i)["options"]) for i in range(len(test))}
        assert sum(f["n"] for f in forms.values()) == len(test)
        assert sum(f["n"] * f["accuracy"] for f in forms.values()) / len(test) == pytest.approx(forced["accuracy"])
        assert all(f["chance"] == 1 / len(name.split("/")) <= f["majority"] for name, f in forms.items())
        plain = evaluate_task(model, test, task, by_label, "cpu")
        assert not plain["calibrated"] and plain["accuracy"] == plain["accuracy_uncalibrated"] \
            == forced["accuracy_uncalibrated"]


def test_lettered_choices_are_scored_on_their_texts_after_the_question_stem(params):
    from fedkim.central.evaluate import choice_text_logprobs, evaluate_task, option_priors, question_stem
    from fedkim.data.batches import task_dataset

    assert question_stem("Which? A. x y B. z", ["A", "B"], ["x y", "z"]) == "Which?"
    assert question_stem("Which one?", ["A", "B"], ["x", "z"]) == "Which one?"  # options not listed: unchanged
    model = build_central(params, VARIANTS["fedkim"])
    test = task_dataset(params.data.root / "test", "medical_qa", "test", params.site, params.data, limit=6)
    records = [test.question_at(i) for i in range(len(test))]
    assert all(r["choices"] for r in records) and test[0]["choices"] == [records[0]["choices"][o] for o in "ABCD"]

    # A text's score does not depend on its letter or place in the list: reverse the choices, relabel, re-list.
    def asked(reverse: bool) -> dict:
        batch = {"question": [], "options": [], "choices": [], "answer": []}
        for r in records:
            texts = [r["choices"][o] for o in r["options"]][::-1 if reverse else 1]
            stem = question_stem(r["question"], r["options"], [r["choices"][o] for o in r["options"]])
            batch["question"].append(stem + " " + " ".join(f"{o}. {t}" for o, t in zip(r["options"], texts)))
            batch["options"].append(list(r["options"]))
            batch["choices"].append(texts)
            batch["answer"].append(r["options"][0])
        return batch

    forward, backward = (asked(flag) for flag in (False, True))
    scores = choice_text_logprobs(model, forward, "medical_qa", forward["question"], forward["options"])
    flipped = choice_text_logprobs(model, backward, "medical_qa", backward["question"], backward["options"])
    assert torch.allclose(scores, flipped.flip(-1), atol=1e-4) and torch.isfinite(scores).all()
    # Mean per token: a text's score is its summed log-probability over its token count.
    stems = [question_stem(q, o, c) for q, o, c in zip(forward["question"], forward["options"], forward["choices"])]
    summed = model.option_logprobs({**forward, "question": stems}, "medical_qa", forward["choices"])
    lengths = torch.tensor([[len(model.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in row]
                            for row in forward["choices"]], dtype=summed.dtype)
    assert torch.allclose(scores, summed / lengths) and (lengths > 1).any()

    # Through evaluate_task: the texts' best is the answer; no content-free prior is applied to text scoring.
    result = evaluate_task(model, test, "medical_qa", params.eval, "cpu")
    best = [r["options"][int(row.argmax())] for r, row in zip(records, choice_text_logprobs(
        model, {"question": [r["question"] for r in records], "options": [r["options"] for r in records],
                "choices": [test[i]["choices"] for i in range(len(test))], "answer": ["A"] * len(records)},
        "medical_qa", [r["question"] for r in records], [r["options"] for r in records]))]
    truth = [test[i]["answer"] for i in range(len(test))]
    assert result["choice_scoring"] == "text"
    assert result["accuracy"] == pytest.approx(sum(a == b for a, b in zip(best, truth)) / len(truth))
    assert option_priors(model, params.data.root / "public", test, "medical_qa", params.eval, params.site,
                         params.data, "cpu") == {}
    label = evaluate_task(model, test, "medical_qa", params.eval.model_copy(update={"choice_scoring": "label"}), "cpu")
    assert label["choice_scoring"] == "label"


def test_the_model_reads_a_long_icu_series_as_its_most_recent_training_window(params):
    from fedkim.data.batches import task_dataset
    from fedkim.data.loaders import collate

    hours = params.data.icu_hours
    sepsis = task_dataset(params.data.root / "test", "sepsis", "test", params.site, params.data, limit=4)
    batch = collate([sepsis[i] for i in range(len(sepsis))])
    assert batch["clinical"].shape[1] == 2 * hours  # sepsis observes twice the mortality window
    recent, whole = (build_central(params.model_copy(update={"inject": params.inject.model_copy(
        update={"icu_window": w})}), VARIANTS["fedkim"]).eval() for w in ("recent", "full"))
    assert recent.clinical_hours == hours and whole.clinical_hours is None
    early = batch | {"clinical": batch["clinical"].clone()}
    early["clinical"][:, :hours] += 3.0  # change only the hours before the most recent window
    last = batch | {"clinical": batch["clinical"][:, hours:], "clinical_mask": batch["clinical_mask"][:, hours:]}
    with torch.no_grad():
        scores = {name: recent.option_logprobs(b, "sepsis", [["Yes", "No"]] * 4) for name, b in
                  (("batch", batch), ("early", early), ("last", last))}
        assert torch.equal(scores["batch"], scores["early"]) and torch.allclose(scores["batch"], scores["last"])
        assert not torch.allclose(whole.option_logprobs(batch, "sepsis", [["Yes", "No"]] * 4),
                                  whole.option_logprobs(early, "sepsis", [["Yes", "No"]] * 4))
        mortality = collate([task_dataset(params.data.root / "test", "mortality", "test", params.site,
                                          params.data, limit=2)[i] for i in range(2)])
        assert torch.equal(recent.recent_hours(mortality)["clinical"], mortality["clinical"])  # short: untouched


def test_yes_no_threshold_needs_public_inputs_of_the_form_read_else_its_own(params):
    from fedkim.central.evaluate import calibration_inputs, input_form

    public, hours = params.data.root / "public", params.data.icu_hours
    # Read whole, sepsis's 48 ICU hours are not the public split's 24-hour stays; read recent, they are.
    assert input_form("sepsis", params.data) != input_form("mortality", params.data)
    assert input_form("sepsis", params.data, hours) == input_form("mortality", params.data, hours)
    assert calibration_inputs(public, "sepsis", params.site, params.data, 8) is None
    assert len(calibration_inputs(public, "sepsis", params.site, params.data, 8, read_hours=hours)) == 8
    assert len(calibration_inputs(public, "ectopic_beats", params.site, params.data, 8)) == 8
    tasks = ("sepsis", "atelectasis", "mortality")
    recent = evaluate(build_central(params, VARIANTS["fedkim"]), params.data.root / "test", params.eval,
                      params.site, params.data, tasks=tasks, public_dir=public)["tasks"]
    assert {t: recent[t]["calibration_source"] for t in tasks} == dict.fromkeys(tasks, "public")
    full = params.model_copy(update={"inject": params.inject.model_copy(update={"icu_window": "full"})})
    model = build_central(full, VARIANTS["fedkim"])
    metrics = evaluate(model, params.data.root / "test", params.eval, params.site, params.data, tasks=tasks,
                       public_dir=public)
    sepsis = metrics["tasks"]["sepsis"]
    assert sepsis["calibration_source"] == "own_inputs" and sepsis["n"] == 6
    assert sepsis["positive_rate"] == pytest.approx(0.5, abs=1 / 6)  # its own median: half above it
    assert metrics["tasks"]["atelectasis"]["calibration_source"] == "public"
    assert metrics["tasks"]["mortality"]["calibration_source"] == "public"
    raw = evaluate(model, params.data.root / "test", params.eval.model_copy(update={"calibration": "none"}),
                   params.site, params.data, tasks=("sepsis",), public_dir=public)["tasks"]["sepsis"]
    assert raw["calibration_source"] == "none" and raw["threshold"] == 0.0


def test_gate_distance_measures_how_differently_tasks_route():
    assert gate_distance({"a": [0.5, 0.5], "b": [0.5, 0.5]}) == 0
    assert gate_distance({"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 0.0]}) == pytest.approx(2 / 3)
    assert math.isnan(gate_distance({"a": [1.0], "b": [1.0]})) and math.isnan(gate_distance({}))


def test_gate_ablations_change_the_gate_inputs(params):
    full, no_task = build_central(params, VARIANTS["fedkim"]), build_central(params, VARIANTS["no_task_desc"])
    t = TASKS["mortality"]
    assert full.gate_mode.pair(t) == (t.task_description, t.modality_description)
    assert no_task.gate_mode.pair(t) == (t.modality_description, t.modality_description)


def test_task_scope_balance_enters_the_injection_loss(params):
    scoped = params.model_copy(update={"inject": params.inject.model_copy(
        update={"balance_weight": 0.5, "balance_scope": "tasks"})})
    model = build_central(scoped, VARIANTS["fedkim"])
    model.m3oe.gate.eval()  # no attention dropout: the same gate in both calls
    batch = batch_of(scoped, "covid")
    with torch.no_grad():
        total = model.loss(batch, "covid", batch["answer"])
        balance = model.m3oe.pairs_balance([model.gate_mode.pair(TASKS[t]) for t in TRAIN_TASKS])
        model.m3oe.config.balance_weight = 0.0
        plain = model.loss(batch, "covid", batch["answer"])
    assert balance > 0 and torch.allclose(total, plain + 0.5 * balance)
    assert not torch.allclose(balance, model.m3oe.aux_loss)  # not the single-task batch's own load


@pytest.mark.slow
def test_two_sites_two_rounds_end_to_end(params, tmp_path):
    keep = ("site-a", "site-b")
    two = params.model_copy(update={
        "data": params.data.model_copy(update={"sites": {k: v for k, v in params.data.sites.items() if k in keep}}),
        "federation": params.federation.model_copy(update={
            "rounds": 2, "members": [m for m in params.federation.members if m.id in keep]}),
    })
    result = run_variant(two, "fedkim", tmp_path)
    assert [r.round_id for r in result.rounds] == ["1", "2"]
    assert all(set(r.sites) == {"site-a", "site-b"} and not r.rejected for r in result.rounds)
    assert (tmp_path / "fedkim" / "rounds" / "2" / "sites" / "site-b" / "manifest.json").is_file()
    assert (tmp_path / "fedkim" / "metrics.json").is_file() and len(result.metrics["tasks"]) == 12
    gate = result.metrics["gate"]  # logged per (task, modality), one row per task, rows sum to 1
    assert set(gate) == set(TASKS) and all(abs(sum(row) - 1) < 1e-4 for row in gate.values())
    assert (tmp_path / "fedkim" / "gate_heatmap.png").stat().st_size > 1000


@pytest.mark.slow
def test_experiment_writes_the_comparison_and_combined_runs_equal_it(params, tmp_path):
    from fedkim.experiment import combine_experiments

    together = run_experiment(params, tmp_path / "together", variants=["fedplug", "no_injection"])
    assert set(together) == {"fedplug", "no_injection"}
    text = (tmp_path / "together" / "comparison.md").read_text()
    assert "| fedplug |" in text and "| no_injection |" in text and "±" not in text
    with pytest.raises(ValueError, match="unknown variant"):
        run_experiment(params, tmp_path, variants=["nope"])

    # The same variants run apart, then combined: the very same comparison, the timings aside.
    run_experiment(params, tmp_path / "a", variants=["no_injection"])
    run_experiment(params, tmp_path / "b", variants=["fedplug"])
    combined = combine_experiments(tmp_path / "c", [tmp_path / "a", tmp_path / "b"])
    assert list(combined) == ["no_injection", "fedplug"]  # the variants' usual order, whatever the sources'
    for name, row in together.items():  # deterministic on CPU: same trials, same figures
        for key in ("train_mean_f1", "zeroshot_mean", "mean_auroc", "tasks"):
            assert combined[name][key] == row[key]
        source = tmp_path / ("b" if name == "fedplug" else "a") / name / "metrics.json"
        assert (tmp_path / "c" / name / "metrics.json").read_bytes() == source.read_bytes()
    saved = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert saved["combined_from"] == [str(tmp_path / "a"), str(tmp_path / "b")] and saved["seeds"] == 1
    assert "Trials combined from" in (tmp_path / "c" / "comparison.md").read_text()

    with pytest.raises(FileExistsError, match="combine into a new folder"):
        combine_experiments(tmp_path / "c", [tmp_path / "a"])
    assert json.loads((tmp_path / "c" / "comparison.json").read_text()) == saved  # left as it was
    with pytest.raises(ValueError, match="no_injection seed 0 is also in"):
        combine_experiments(tmp_path / "d", [tmp_path / "a", tmp_path / "together"])
    # An edited copy of a finished run stands for a run with another setting or other seeds.
    shutil.copytree(tmp_path / "b", tmp_path / "fewer")
    edit_json(tmp_path / "fewer" / "comparison.json", max_per_task=3)
    with pytest.raises(ValueError, match="max_per_task is 3"):
        combine_experiments(tmp_path / "e", [tmp_path / "a", tmp_path / "fewer"])
    (tmp_path / "later" / "seed-1").mkdir(parents=True)
    shutil.copytree(tmp_path / "b" / "fedplug", tmp_path / "later" / "seed-1" / "fedplug")
    shutil.copy(tmp_path / "b" / "comparison.json", tmp_path / "later")
    edit_json(tmp_path / "later" / "comparison.json", first_seed=1)
    with pytest.raises(ValueError, match=r"fedplug has seeds \[0, 1\], but every variant needs the same"):
        combine_experiments(tmp_path / "f", [tmp_path / "a", tmp_path / "b", tmp_path / "later"])
    with pytest.raises(FileNotFoundError, match="no comparison.json"):
        combine_experiments(tmp_path / "g", [tmp_path / "a", tmp_path / "nothing"])
    # Taking only some variants of a source: fedplug from `together`, no_injection from `a`.
    picked = combine_experiments(tmp_path / "h", [(tmp_path / "together", ["fedplug"]), tmp_path / "a"])
    assert {n: r["tasks"] for n, r in picked.items()} == {n: r["tasks"] for n, r in combined.items()}
    assert json.loads((tmp_path / "h" / "comparison.json").read_text())["combined_from"][0].endswith("(fedplug)")
    with pytest.raises(ValueError, match="has no variant"):
        combine_experiments(tmp_path / "i", [(tmp_path / "a", ["fedkim"])])


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.slow
def test_experiment_over_seeds_reports_means_spread_and_wins(params, tmp_path):
    from safetensors.torch import load_file

    comparison = run_experiment(params, tmp_path, variants=["fedkim", "fedplug"], seeds=2)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["seeds"] == 2 and set(saved["fedkim_wins"]) == {"fedplug"}
    for name, row in comparison.items():
        trials = row["trials"]
        assert [t["seed"] for t in trials] == [0, 1]
        for key in ("train_mean_f1", "zeroshot_mean", "mean_auroc"):  # the reported figure is the trials' mean
            assert row[key] == pytest.approx(sum(t[key] for t in trials) / 2)
            assert row[f"{key}_std"] == pytest.approx(abs(trials[0][key] - trials[1][key]) / math.sqrt(2))
        assert (tmp_path / "seed-0" / name / "metrics.json").is_file()
        assert (tmp_path / "seed-1" / name / "metrics.json").is_file()
    # A second seed is a different training run on the same data: site-a's package differs between the trials.
    first, second = (load_file(next((tmp_path / f"seed-{s}" / "fedkim" / "rounds" / "1" / "sites" / "site-a")
                                    .glob("*.safetensors"))) for s in (0, 1))
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    wins = saved["fedkim_wins"]["fedplug"]
    fedkim, fedplug = comparison["fedkim"]["trials"], comparison["fedplug"]["trials"]
    assert wins["mean_auroc"] == sum(a["mean_auroc"] > b["mean_auroc"] for a, b in zip(fedkim, fedplug))
    text = (tmp_path / "comparison.md").read_text()
    assert "over 2 seeds" in text and "±" in text and "Trials (of 2)" in text
    assert 0 < comparison["fedkim"]["gate_distance"] <= 1 and math.isnan(comparison["fedplug"]["gate_distance"])
    assert f"fedkim {comparison['fedkim']['gate_distance']:.3f}" in text
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        run_experiment(params, tmp_path, variants=["fedplug"], seeds=0)

    # A later run can add trials: trial 1 alone (first_seed=1) is the 2-seed run's trial 1, figure for figure.
    later = run_experiment(params, tmp_path / "later", variants=["fedplug"], first_seed=1)
    assert [t["seed"] for t in later["fedplug"]["trials"]] == [1]
    assert json.loads((tmp_path / "later" / "seed-1" / "fedplug" / "metrics.json").read_text())["tasks"] == \
        json.loads((tmp_path / "seed-1" / "fedplug" / "metrics.json").read_text())["tasks"]
    assert not (tmp_path / "later" / "fedplug").exists()  # trials other than a lone 0 keep their seed folder
    saved_later = json.loads((tmp_path / "later" / "comparison.json").read_text())
    assert saved_later["first_seed"] == 1 and saved_later["seeds"] == 1
    assert "seed 1)" in (tmp_path / "later" / "comparison.md").read_text()

    # Rescoring reloads each trial's trained model: with the same settings every figure comes back identical.
    from fedkim.experiment import rescore_experiment

    stored = {(s, n): json.loads((tmp_path / f"seed-{s}" / n / "metrics.json").read_text())
              for s in (0, 1) for n in comparison}
    again = rescore_experiment(params, tmp_path)
    for (s, n), before in stored.items():
        after = json.loads((tmp_path / f"seed-{s}" / n / "metrics.json").read_text())
        assert after["tasks"] == before["tasks"] and after["zeroshot_mean"] == pytest.approx(before["zeroshot_mean"])
        assert again[n]["trials"][s]["seconds"] == comparison[n]["trials"][s]["seconds"]  # training time kept
    # Another protocol for one task: only that task's figures change, and the comparison follows.
    by_label = params.model_copy(update={"eval": params.eval.model_copy(update={"choice_scoring": "label"})})
    relabelled = rescore_experiment(by_label, tmp_path, tasks=("medical_qa",))
    for (s, n), before in stored.items():
        after = json.loads((tmp_path / f"seed-{s}" / n / "metrics.json").read_text())
        assert after["tasks"]["medical_qa"]["choice_scoring"] == "label"
        assert before["tasks"]["medical_qa"]["choice_scoring"] == "text"
        assert {t: m for t, m in after["tasks"].items() if t != "medical_qa"} == \
            {t: m for t, m in before["tasks"].items() if t != "medical_qa"}
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["rescored"]["tasks"] == ["medical_qa"] and saved["seeds"] == 2
    assert list(saved["variants"]["fedkim"]["tasks"]) == list(TASKS)  # catalogue order, as the run wrote it
    assert saved["variants"]["fedkim"]["zeroshot_mean"] == pytest.approx(relabelled["fedkim"]["zeroshot_mean"])
    with pytest.raises(FileNotFoundError, match="no comparison to rescore"):
        rescore_experiment(params, tmp_path / "seed-0" / "fedkim")
    # The later run rescores from its own seed folder, its trial keeping seed 1.
    assert rescore_experiment(params, tmp_path / "later")["fedplug"]["trials"][0]["seed"] == 1


def test_single_token_fast_path_equals_the_full_scoring(params):
    """Yes/No are one token each: the one-pass score must equal the general one-sequence-per-option score."""
    model = build_central(params, VARIANTS["fedkim"])
    batch = batch_of(params, "ecg_abnormal", n=4)
    options = [["No", "Yes"]] * 4
    assert all(len(model.token_ids(" " + o)) == 1 for o in options[0])
    fast = model.option_logprobs(batch, "ecg_abnormal", options)
    assert torch.allclose(fast, _general_scores(model, batch, "ecg_abnormal", options), atol=1e-4)


def _general_scores(model, batch, task, options):
    from fedkim.central.model import _take

    pairs = [(i, j) for i, row in enumerate(options) for j in range(len(row))]
    flat = _take(batch, [i for i, _ in pairs])
    answers = [options[i][j] for i, j in pairs]
    inputs = model.build(flat, task, answers)
    labels = inputs["labels"].clone()
    for row, answer in enumerate(answers):
        positions = (labels[row] != -100).nonzero().flatten()
        labels[row, positions[len(model.token_ids(" " + answer)):]] = -100
    model.set_gate(task, len(pairs))
    with torch.no_grad():
        logits, target = model._forward(inputs, labels)
    picked = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    scores = (picked * (target != -100)).sum(-1).view(len(options), -1)
    return scores


CRASHING_INJECTION = """
import sys
from fedkim.central.inject import inject
from fedkim.central.variants import VARIANTS, build_central
from fedkim.config import load_params
params = load_params(sys.argv[1])
model = build_central(params, VARIANTS["fedkim"])
inject(model, params.data.root / "public", params.inject, params.site, params.data, round_id="1",
       checkpoint_dir=sys.argv[2])
"""


@pytest.mark.slow
def test_a_crash_mid_injection_resumes_from_the_last_step_checkpoint_with_the_same_result(small_federation,
                                                                                          tmp_path):
    """The injection runs in its own process, killed (SIGKILL) once a step checkpoint exists; the rerun resumes
    there and ends with the weights and loss curve of an uninterrupted run."""
    params = write_params(tmp_path, small_params_dict(small_federation.root, **TINY, **{
        "inject.device": "cpu", "inject.epochs": 20, "inject.checkpoint_every": 3}))
    folder = tmp_path / "crashed"
    steps_file = folder / "inject-1.steps.pt"
    process = subprocess.Popen([sys.executable, "-c", CRASHING_INJECTION, str(tmp_path / "params.yaml"), str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not steps_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert steps_file.exists() and not (folder / "inject-1.pt").exists(), "the injection was not caught mid-way"
    done = torch.load(steps_file, weights_only=False)["step"]

    whole = build_central(params, VARIANTS["fedkim"])
    expected = inject(whole, params.data.root / "public", params.inject, params.site, params.data, round_id="1",
                      checkpoint_dir=tmp_path / "whole")
    assert 0 < done < len(expected.losses)
    resumed = build_central(params, VARIANTS["fedkim"])
    result = inject(resumed, params.data.root / "public", params.inject, params.site, params.data, round_id="1",
                    checkpoint_dir=folder)
    assert result.resumed and result.losses == expected.losses and result.tasks == expected.tasks
    state, again = whole.trainable_state(), resumed.trainable_state()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert (folder / "inject-1.pt").exists() and not steps_file.exists()  # the finished checkpoint replaces it
