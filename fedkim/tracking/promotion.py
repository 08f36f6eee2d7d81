"""The promotion gate: does a newly registered version take `champion` from the current one?

Rule (`decide`, a pure function): the score is the mean primary figure (F1 for the yes/no tasks) over the training
tasks on the split promotion decides on (the server's `validation` split; `test` only for a federation without
one, and the reason says which). The test split's figures are reported, never decided on. The challenger takes
`champion` when there is no champion, or when its score beats the champion's by more than TOLERANCE (1e-6) while
its mean AUROC over the same tasks drops by no more than MAX_AUROC_DROP (0.02: a higher F1 bought with a worse
ranking of the cases is not an improvement), or when the scores tie within TOLERANCE and its mean AUROC is higher
by more than TOLERANCE. Otherwise the champion stays, and the reason says which figure held it back. `promote` applies the rule to the
registry: a version's decision is recorded once, in its tags; asking again returns the recorded decision (a re-run
round does not re-judge).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedkim.tracking.connection import CHAMPION, COMPARED, DECISION, REASON, ROUND_RUN_TAG, SPLIT_TAG, client
from fedkim.tracking.registry import champion_figures, champion_version, per_task, registered_name

TOLERANCE = 1e-6
MAX_AUROC_DROP = 0.02


@dataclass(frozen=True)
class Figures:
    """The promotion score of one model: mean primary figure and mean AUROC over the compared tasks."""

    primary: float
    auroc: float
    missing: tuple[str, ...] = ()

    def text(self) -> str:
        return f"mean primary {self.primary:.4f}, mean AUROC {self.auroc:.4f}"


def figures(table: dict[str, dict[str, float]], tasks: tuple[str, ...]) -> Figures:
    """The score of a per-task table ({task: {primary, auroc}}): means over those of `tasks` it holds."""
    def mean(key: str) -> float:
        values = [table[t][key] for t in tasks if t in table and math.isfinite(table[t].get(key, math.nan))]
        return sum(values) / len(values) if values else math.nan

    return Figures(mean("primary"), mean("auroc"), tuple(t for t in tasks if t not in table))


def compare(metrics: dict, champion: dict[str, dict[str, float]] | None, tasks: tuple[str, ...]) -> dict:
    """Both scores and the deltas (challenger − champion) per task and for the score; champion None: no deltas."""
    mine = per_task(metrics)
    out: dict = {"tasks": list(tasks), "challenger": asdict(figures(mine, tasks)), "champion": None, "delta": {}}
    if champion is None:
        return out
    theirs = figures(champion, tasks)
    out["champion"] = asdict(theirs)
    delta = {t: {k: mine[t][k] - champion[t][k] for k in mine[t] if k in champion[t]
                 and math.isfinite(mine[t][k] - champion[t][k])} for t in mine if t in champion}
    ours = figures(mine, tasks)
    delta["score"] = {k: v for k, v in {"primary": ours.primary - theirs.primary,
                                        "auroc": ours.auroc - theirs.auroc}.items() if math.isfinite(v)}
    out["delta"] = delta
    return out


@dataclass(frozen=True)
class PromotionResult:
    decision: str  # "promoted" | "kept"
    version: int
    champion: int  # the champion version after the decision
    previous_champion: int | None
    reason: str


def training_tasks(metrics: dict) -> tuple[str, ...]:
    """The tasks `evaluate()` recorded with role train (those of the catalogue it evaluated on)."""
    return tuple(t for t, m in metrics.get("tasks", {}).items() if m.get("role") == "train")


def promote(version, metrics: dict, *, tasks: tuple[str, ...] | None = None,
            name: str | None = None, split: str | None = None) -> PromotionResult:
    """Move `champion` to `version` when it beats the current champion (rule in the module docstring); tag the
    version with the decision and a reason that quotes the figures. metrics: `evaluate()` on the deciding split
    (`split`, named in the reason and in the tag fedkim.promotion.split). tasks: the training tasks of the catalogue
    in force (None: those the metrics record as training tasks)."""
    tasks = training_tasks(metrics) if tasks is None else tasks
    registry = client()
    name = version.name if getattr(version, "name", None) else registered_name(name)
    version = registry.get_model_version(name, str(version.version))
    current = champion_version(name)
    recorded = version.tags.get(DECISION)
    if recorded in ("promoted", "kept"):  # decided before: a re-run round keeps the first judgement
        return PromotionResult(recorded, int(version.version), int(current.version) if current else 0,
                               _int(version.tags.get(COMPARED)), version.tags.get(REASON, ""))
    if current is not None and current.version == version.version:
        return _record(registry, version, "promoted", version, None, "already the champion")
    mine = figures(per_task(metrics), tasks)
    theirs = figures(champion_figures(current), tasks) if current is not None else None
    promoted, reason = decide(mine, theirs, int(version.version), int(current.version) if current else None, tasks,
                              split, current.tags.get(SPLIT_TAG, "test") if current is not None else None)
    if promoted:
        registry.set_registered_model_alias(name, CHAMPION, version.version)
    if split:
        registry.set_model_version_tag(version.name, version.version, SPLIT_TAG, split)
    return _record(registry, version, "promoted" if promoted else "kept", version if promoted else current, current,
                   reason)


def decide(mine: Figures, theirs: Figures | None, version: int, champion: int | None,
           tasks: tuple[str, ...], split: str | None = None, champion_split: str | None = None) -> tuple[bool, str]:
    """(promote?, reason) for challenger v`version` scoring `mine` against champion v`champion` scoring `theirs`
    (None: there is no champion) on `split` (the champion's figures: on `champion_split`, when that differs).
    Pure: the rule of the module docstring, nothing read or written."""
    over = f"over {len(tasks)} training task(s)" + (f" on the {split} split" if split else "")
    if mine.missing:  # the figures average the tasks that were evaluated; say which were not
        over += f" ({', '.join(mine.missing)} not evaluated)"
    if theirs is not None and split and champion_split and champion_split != split:  # an older champion's figures
        over += f" (champion v{champion}'s figures are on the {champion_split} split)"
    if not math.isfinite(mine.primary):
        return False, f"v{version} has no finite primary figure {over}; champion unchanged"
    if theirs is None:
        return True, f"no champion yet: v{version} becomes champion with {mine.text()} {over}"
    champion_primary = theirs.primary if math.isfinite(theirs.primary) else -math.inf
    champion_auroc = theirs.auroc if math.isfinite(theirs.auroc) else -math.inf
    if mine.primary > champion_primary + TOLERANCE:
        drop = champion_auroc - (mine.auroc if math.isfinite(mine.auroc) else -math.inf)
        if drop > MAX_AUROC_DROP + TOLERANCE:
            return False, (f"v{version} {mine.text()} beats champion v{champion} ({theirs.text()}) on mean primary "
                           f"but its mean AUROC drops by {drop:.4f} (more than {MAX_AUROC_DROP}) {over}; "
                           f"champion stays v{champion}")
        return True, (f"v{version} {mine.text()} beats champion v{champion} ({theirs.text()}) on mean primary "
                      f"with mean AUROC no more than {MAX_AUROC_DROP} lower {over}")
    tie = abs(mine.primary - champion_primary) <= TOLERANCE
    if tie and math.isfinite(mine.auroc) and mine.auroc > champion_auroc + TOLERANCE:
        return True, (f"v{version} ties champion v{champion} on mean primary {mine.primary:.4f} and wins the "
                      f"tie-break on mean AUROC {mine.auroc:.4f} > {theirs.auroc:.4f} {over}")
    return False, (f"v{version} {mine.text()} does not beat champion v{champion} ({theirs.text()}) {over}; "
                   f"champion stays v{champion}")


def _record(registry, version, decision: str, champion, previous, reason: str) -> PromotionResult:
    compared = str(previous.version) if previous is not None else "none"
    for key, value in {DECISION: decision, REASON: reason, COMPARED: compared}.items():
        registry.set_model_version_tag(version.name, version.version, key, value)
    round_run_id = version.tags.get(ROUND_RUN_TAG)
    if round_run_id:  # lineage on the round run as well: what this round produced and what happened to it
        registry.set_tag(round_run_id, "fedkim.registered_version", str(version.version))
        registry.set_tag(round_run_id, DECISION, decision)
    return PromotionResult(decision, int(version.version), int(champion.version) if champion else 0,
                           int(previous.version) if previous is not None else None, reason)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
