"""MLflow tracking for fedkim: one parent run per federated round, nested runs per site and for the injection,
the model registry (`tracking.registered_model`) with aliases `challenger` / `champion`, and the promotion gate.

    connection.py   configure / resolve_uri: where the runs and the registry live; the shared tag names
    runs.py         round_run, log_site, injection_run (loss curve, evaluation, comparison with the champion)
    registry.py     register, find_version, champion_version, registry_show
    promotion.py    the promotion rule (`decide`, pure) and `promote`, which applies it to the registry
    serving.py      FedKIMPyfunc: the registered model as MLflow serves it
    round_log.py    log_sites, log_round: a whole round's record, as the Prefect flow and the DVC stage log it
"""

from fedkim.tracking.connection import (CHALLENGER, CHAMPION, COMPARED, DECISION, GIT_SHA, KIND, METRICS_TAG,
                                        PARAMS_HASH, PARENT, REASON, ROUND, ROUND_RUN_TAG, SITE, SUMMARY,
                                        TrackingError, configure, resolve_uri)
from fedkim.tracking.promotion import TOLERANCE, Figures, PromotionResult, compare, decide, figures, promote
from fedkim.tracking.registry import (champion_figures, champion_version, find_version, per_task, register,
                                      registered_name, registry_show, requirements)
from fedkim.tracking.round_log import (LoggedRound, log_report, log_round, log_sites, register_round,
                                       registry_outcome, tag_sites)
from fedkim.tracking.runs import (InjectionRun, current_git_sha, find_child_run, find_round_run, flatten_params,
                                  injection_run, log_site, numeric_items, plot_loss_curve, round_run)
from fedkim.tracking.serving import OPTIONAL_COLUMNS, FedKIMPyfunc, answer_frame, query_item, serving_signature

__all__ = [
    "CHALLENGER", "CHAMPION", "COMPARED", "DECISION", "GIT_SHA", "KIND", "METRICS_TAG", "OPTIONAL_COLUMNS",
    "PARAMS_HASH", "PARENT", "REASON", "ROUND", "ROUND_RUN_TAG", "SITE", "SUMMARY", "TOLERANCE", "FedKIMPyfunc",
    "Figures", "InjectionRun", "LoggedRound", "PromotionResult", "TrackingError", "answer_frame",
    "champion_figures", "champion_version", "compare", "configure", "current_git_sha", "decide", "figures",
    "find_child_run", "find_round_run", "find_version", "flatten_params", "injection_run", "log_report",
    "log_round", "log_site", "log_sites", "numeric_items", "per_task", "plot_loss_curve", "promote", "query_item",
    "register", "register_round", "registered_name", "registry_outcome", "registry_show", "requirements",
    "resolve_uri", "round_run", "serving_signature", "tag_sites",
]
