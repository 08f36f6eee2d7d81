"""The data card beside a bundle's model card: which data made the model and what the data gate said of it.

    record = data_record(params, outcomes, fingerprints)   # JSON: data_card.json
    text = data_card(record)                                # DATA_CARD.md

`outcomes`: what the round knows of each member and server split (fedkim.rounds.SiteOutcome: id, status, data
fingerprint, sample counts per task, the gate's summary without values). Nothing here reads a site's data: the
card holds what the round already logged (fedkim.tracking.round_log), so no value or sample id leaves a site.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedkim.config import Params
from fedkim.data.catalogue import catalogue_of
from fedkim.members import SERVER_SPLITS


def data_record(params: Params, outcomes: Iterable = (), fingerprints: dict[str, str] | None = None) -> dict:
    """The card's content: sites (status, fingerprint, samples per task, gate), server splits (gate), tasks."""
    catalogue = catalogue_of(params.data)
    sites, splits = {}, {}
    for outcome in outcomes:
        entry = {"status": outcome.status, "fingerprint": outcome.data_fingerprint or None,
                 "samples_per_task": dict(outcome.sample_counts or {}), "gate": gate_entry(outcome.validation)}
        (splits if outcome.site_id in SERVER_SPLITS else sites)[outcome.site_id] = entry
    for site, fingerprint in (fingerprints or {}).items():  # contributors the outcomes did not describe
        sites.setdefault(site, {"status": "contributed", "fingerprint": fingerprint or None, "samples_per_task": {},
                                "gate": None})
    return {"sites": dict(sorted(sites.items())), "splits": splits,
            "tasks": {"catalogue": str(catalogue.source), "digest": catalogue.digest, "train": list(catalogue.train),
                      "zero_shot": list(catalogue.zero_shot)},
            "data": {"generated": [m.id for m in params.federation.members if m.data == "generated"],
                     "provided": [m.id for m in params.federation.members if m.data == "provided"]}}


def gate_entry(summary: dict | None) -> dict | None:
    """A gate summary (fedkim.data.validate.gate_summary) as the card shows it: pass/fail, the rules that blocked,
    the rules that warned, and the quarantined samples per rule."""
    if not summary or "findings" not in summary:
        return None
    findings = summary.get("findings") or []
    quarantined = summary.get("quarantined") or {}
    return {"success": bool(summary.get("success")),
            "blocking": sorted({f["rule"] for f in findings if f.get("action", "block") == "block"}),
            "warnings": sorted({f["rule"] for f in findings if f.get("action") == "warn"}),
            "quarantined": int(quarantined.get("samples", 0)),
            "quarantined_per_rule": dict(quarantined.get("per_rule") or {})}


def data_card(record: dict) -> str:
    """DATA_CARD.md from `data_record`'s content."""
    lines = ["# Data card", "",
             "What the model was trained, injected and evaluated on, as the round recorded it (no values, no sample "
             "ids).", "", "## Sites", "",
             "| site | status | data fingerprint | samples per task | gate | blocking rules | quarantined |",
             "|---|---|---|---|---|---|---|"]
    for site, entry in record["sites"].items():
        lines.append(_row(site, entry))
    if not record["sites"]:
        lines.append("| – | not recorded | | | | | |")
    lines += ["", "## Server splits", "", "| split | gate | blocking rules | warnings | quarantined |",
              "|---|---|---|---|---|"]
    for split, entry in record["splits"].items():
        gate = entry["gate"] or {}
        lines.append(f"| {split} | {_verdict(entry['gate'])} | {', '.join(gate.get('blocking', [])) or '–'} | "
                     f"{', '.join(gate.get('warnings', [])) or '–'} | {gate.get('quarantined', '–')} |")
    if not record["splits"]:
        lines.append("| – | not recorded | | | |")
    tasks = record["tasks"]
    lines += ["", "## Tasks", "", f"- Catalogue: `{tasks['catalogue']}` (sha256 `{tasks['digest']}`)",
              f"- Training tasks: {', '.join(tasks['train'])}",
              f"- Zero-shot tasks (never trained on): {', '.join(tasks['zero_shot']) or 'none'}", "",
              "## Provenance", "",
              f"- Generated (synthetic) members: {', '.join(record['data']['generated']) or 'none'}",
              f"- Provided members: {', '.join(record['data']['provided']) or 'none'}", ""]
    return "\n".join(lines)


def _row(site: str, entry: dict) -> str:
    counts = "; ".join(f"{task} {sum(n.values()) if isinstance(n, dict) else n}"
                       for task, n in sorted(entry["samples_per_task"].items())) or "–"
    gate = entry["gate"] or {}
    quarantined = gate.get("quarantined", "–")
    return (f"| {site} | {entry['status']} | `{(entry['fingerprint'] or '–')[:16]}` | {counts} | "
            f"{_verdict(entry['gate'])} | {', '.join(gate.get('blocking', [])) or '–'} | {quarantined} |")


def _verdict(gate: dict | None) -> str:
    return "not recorded" if gate is None else "pass" if gate["success"] else "fail"
