"""The Great Expectations gate: a site's data must pass it before it trains.

Every check is a GX 1.x expectation over a pandas frame, one suite per frame:

    index              the index itself: schema, allowed values, labels, answers, required paths
    image, ecg         one row per referenced file, with facts read here by fedkim.data.formats (exists,
                       decodes, size, bit depth, leads, sampling rate, duration, amplitude, flat leads)
    clinical_files     one row per clinical Parquet file; clinical_values: their long rows (variable, unit,
                       hour, physiological limits after unit conversion); clinical_samples: each sample on the
                       grid the model reads (no measurement at all, recorded variables outside the window)
    static_file        clinical/static.parquet when present; static_values: its covariates
    text_files         one row per question file; text_samples: each sample's question is there
    counts_site, counts  samples in the site and per (binary task, split, label), after the quarantine
    manifest           site.yaml against the directory: fingerprint, modalities; manifest_counts: counts

A failed expectation becomes a Finding named by a stable rule id (fedkim.gate_rules.RULES) with the rule's
action: block (the site fails), quarantine (the samples it names are left out of training and evaluation) or
warn. A missing or damaged site.yaml or index.parquet is a finding too, never an exception, and the checks that
need it are skipped. Validation only reads the site; validation.json and the GX data docs go to the reports
folder (<site>/reports/ unless the caller names another).

Modules: report (Finding, ValidationReport, the summary that leaves the site), engine (rules, tables, the GX
runner, data docs), tables (index, counts, site.yaml), files (image, ECG, text), clinical (ICU rows, static
covariates), gate (validate_site).
"""

from __future__ import annotations

from importlib import import_module

from fedkim.data.validate.report import (REPORT_FILE, RULES, Finding, ValidationReport, gate_reason,
                                         gate_summary)

# Importing Great Expectations takes seconds: validate_site loads it on first use, so that reading a report
# or a gate summary (the flows do) does not.
_NEEDS_GX = {"validate_site": "fedkim.data.validate.gate"}

__all__ = ["REPORT_FILE", "RULES", "Finding", "ValidationReport", "gate_reason", "gate_summary",
           "validate_site"]


def __getattr__(name: str):
    if name in _NEEDS_GX:
        value = globals()[name] = getattr(import_module(_NEEDS_GX[name]), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
