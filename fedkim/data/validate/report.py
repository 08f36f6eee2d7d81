"""What the gate reports: the rule vocabulary and what each rule does to a site, the findings and the report,
and the summary of a report that leaves the site (never its examples, sample ids or values).
The rule vocabulary and each rule's action are in fedkim.gate_rules (params validation reads them too)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from fedkim.gate_rules import ACTIONS, RULES, SAMPLE_RULES, Action, action_of, allowed_actions, check_actions

__all__ = ["ACTIONS", "RULES", "SAMPLE_RULES", "REPORT_FILE", "Action", "Finding", "ValidationReport",
           "action_of", "allowed_actions", "check_actions", "gate_reason", "gate_summary"]

REPORT_FILE = "validation.json"

class Finding(BaseModel):
    rule: str
    action: Action = "block"
    severity: Literal["error"] = "error"
    file: str | None = None
    column: str | None = None
    message: str
    count: int = 1
    examples: list[str] = Field(default_factory=list)
    samples: list[str] = Field(default_factory=list, description="every sample id the finding names (quarantine)")

    def line(self) -> str:
        where = ", ".join(p for p in (self.file, f"column {self.column}" if self.column else None) if p)
        text = f"  {self.rule:<28} {where + ': ' if where else ''}{self.message}: {self.count} found"
        if self.action == "quarantine":
            text += f", {len(self.samples)} sample(s) quarantined"
        return text + ("; e.g. " + "; ".join(self.examples[:3]) if self.examples else "")


class ValidationReport(BaseModel):
    site_dir: str
    site_id: str | None = None
    success: bool
    findings: list[Finding] = Field(default_factory=list)
    quarantine: dict[str, list[str]] = Field(default_factory=dict, description="sample id -> the rules it failed")
    stats: dict = Field(default_factory=dict)
    docs_path: str | None = None

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "block"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "warn"]

    @property
    def quarantined(self) -> list[str]:
        """The sample ids left out of training and evaluation (the site's data is never changed)."""
        return sorted(self.quarantine)

    def summary(self) -> str:
        name = self.site_id or "(unknown site)"
        s = self.stats
        scope = (f"{s.get('samples', 0)} samples, {s.get('files_checked', 0)} files, "
                 f"{s.get('expectations', 0)} expectations, {s.get('seconds', 0.0):.1f} s")
        kept = f"; {len(self.quarantine)} sample(s) quarantined" if self.quarantine else ""
        head = (f"PASS {name} ({self.site_dir}): {scope}{kept}" if self.success
                else f"FAIL {name} ({self.site_dir}): {len(self.blocking)} blocking finding(s); {scope}{kept}")
        order = {"block": 0, "quarantine": 1, "warn": 2}
        lines = [head, *(f.line() for f in sorted(self.findings, key=lambda f: order[f.action]))]
        if self.docs_path:
            lines.append(f"  data docs: {self.docs_path}")
        return "\n".join(lines)


def gate_summary(report: ValidationReport) -> dict:
    """What the central side may see of a gate report: rule ids and counts only (each finding's rule, action and
    count; the quarantined samples per rule; the samples checked, in all and per modality). File names, columns,
    messages, examples and sample ids can carry patient identifiers (a hospital's export names files after
    patients): they stay at the site, in its validation.json and its own console."""
    findings = [{"rule": f.rule, "action": f.action, "count": f.count} for f in report.findings]
    per_rule: dict[str, int] = {}
    for rules in report.quarantine.values():
        for rule in rules:
            per_rule[rule] = per_rule.get(rule, 0) + 1
    shared = ("samples", "modalities", "files_checked", "expectations", "seconds")  # counts only
    stats = {k: v for k, v in report.stats.items() if k in shared}
    return {"site_id": report.site_id, "success": report.success, "findings": findings,
            "quarantined": {"samples": len(report.quarantine), "per_rule": dict(sorted(per_rule.items()))},
            "stats": stats}


def gate_reason(summary: dict) -> str:
    """One line naming the blocking rules, their counts and what each checks, for the round summary and logs."""
    blocking = [f for f in summary["findings"] if f.get("action", "block") == "block"]
    parts = [f"{f['rule']} ({f.get('count', 1)} found; checks that {RULES.get(f['rule'], 'an unknown rule holds')})"
             for f in blocking[:4]]
    more = len(blocking) - len(parts)
    return (f"data gate failed, {len(blocking)} blocking finding(s): " + "; ".join(parts)
            + (f"; and {more} more" if more > 0 else ""))
