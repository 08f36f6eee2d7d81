"""The task catalogue: the tasks fedkim trains on and answers, read from a YAML file (`data.catalogue`; default
the shipped fedkim/data/tasks.yaml, FedKIM's 12 tasks as offline analogues).

Training tasks appear in site, public and test data; zero-shot tasks only in the test split, with their own task
and modality descriptions so that the M3OE gate meets combinations it never trained on. A new zero-shot task is
a new entry in a catalogue file and samples in a test folder: no code and no retraining.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedkim.config import ConfigError

Role = Literal["train", "zero_shot"]
Kind = Literal["binary", "choice"]

SHIPPED = Path(__file__).resolve().parent / "tasks.yaml"
INPUT_KINDS = ("image", "ecg", "clinical", "text")  # the index's <kind>_path columns
SITE_MODALITIES = ("image", "ecg", "clinical")  # what a hospital holds and trains an encoder on
PER_SAMPLE = "(per sample)"  # the question of a task whose samples bring their own


class CatalogueError(ConfigError):
    """A catalogue file that cannot be used; the message names the file, the task and the field."""


def modality_inputs(modality: str) -> tuple[str, ...]:
    """The inputs a modality string carries ('image+text' -> ('image', 'text')): index columns <input>_path."""
    return tuple(modality.split("+"))


@dataclass(frozen=True)
class Task:
    name: str
    modality: str
    role: Role
    kind: Kind
    answers: tuple[str, ...]
    task_description: str
    question: str  # PER_SAMPLE when every sample brings its own
    original: str  # the data set this task stands in for
    modality_description: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return modality_inputs(self.modality)


# --------------------------------------------------------------------------------------------- file schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskEntry(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]{0,63}$")
    modality: str = Field(pattern=r"^[a-z]+(\+[a-z]+)*$")
    role: Role
    kind: Kind
    answers: list[str] = Field(min_length=2)
    task_description: str = Field(min_length=1)
    question: str | None = Field(None, min_length=1, description="the task's question")
    questions: Literal["per_task", "per_sample"] = Field(
        "per_task", description="per_sample: each sample brings its question (text_path); no `question`")
    original: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "TaskEntry":
        unknown = [i for i in modality_inputs(self.modality) if i not in INPUT_KINDS]
        if unknown:
            raise ValueError(f"modality {self.modality!r}: unknown input(s) {unknown}; inputs are "
                             f"{list(INPUT_KINDS)}, joined by '+'")
        if self.questions == "per_sample" and self.question is not None:
            raise ValueError("give `question` or `questions: per_sample`, not both")
        if self.questions == "per_task" and self.question is None:
            raise ValueError("`question` missing (or `questions: per_sample` when samples bring their own)")
        if self.questions == "per_sample" and "text" not in modality_inputs(self.modality):
            raise ValueError(f"questions: per_sample needs a modality with text, got {self.modality!r}")
        if len(set(self.answers)) != len(self.answers):
            raise ValueError(f"answers: duplicates in {self.answers}")
        if self.kind == "binary" and len(self.answers) != 2:
            raise ValueError(f"answers: a binary task has two answers (negative, positive), got {self.answers}")
        if self.role == "train" and self.modality not in SITE_MODALITIES:
            raise ValueError(f"modality: a training task has one site modality {list(SITE_MODALITIES)}, "
                             f"got {self.modality!r}")
        if self.role == "train" and self.kind != "binary":
            raise ValueError("kind: a training task is binary (site heads predict one logit)")
        return self


# ------------------------------------------------------------------------------------------------ catalogue
class Catalogue:
    """The tasks of one catalogue file, in file order (site heads, generator draws and reports follow it)."""

    def __init__(self, tasks: dict[str, Task], modalities: dict[str, str], *, source: str, digest: str):
        self.tasks, self.modalities, self.source, self.digest = dict(tasks), dict(modalities), source, digest
        self.train = tuple(n for n, t in self.tasks.items() if t.role == "train")
        self.zero_shot = tuple(n for n, t in self.tasks.items() if t.role == "zero_shot")

    def __contains__(self, name: object) -> bool:
        return name in self.tasks

    def __getitem__(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise KeyError(f"task {name!r} is not in the catalogue {self.source}; known: "
                           f"{', '.join(self.tasks)}") from None

    def __repr__(self) -> str:
        return f"Catalogue({self.source}, {len(self.tasks)} tasks, digest {self.digest[:12]})"

    def for_modality(self, modality: str) -> list[Task]:
        """Training tasks whose (single) modality is `modality`: what a site holding it can train."""
        return [self.tasks[n] for n in self.train if self.tasks[n].modality == modality]

    def modality_description(self, modality: str) -> str:
        if modality not in self.modalities:
            raise KeyError(f"modality {modality!r} has no description in {self.source}; described: "
                           f"{', '.join(self.modalities)}")
        return self.modalities[modality]

    @staticmethod
    def inputs(modality: str) -> tuple[str, ...]:
        return modality_inputs(modality)

    def check_sites(self, members) -> None:
        """Every training task needs a member that holds its modality: raise ConfigError naming the ones none
        holds. `members`: the federation's members (federation.members), each with its modalities."""
        held = {m for s in members for m in s.modalities}
        missing = sorted({self.tasks[t].modality for t in self.train} - held)
        if missing:
            raise ConfigError(f"federation.members: no member holds modality {missing}; every training task needs "
                              f"one ({', '.join(t for t in self.train if self.tasks[t].modality in missing)})")

    def with_task(self, task: Task) -> "Catalogue":
        """This catalogue and one more zero-shot task (a served query that brings its own descriptions)."""
        if task.name in self.tasks:
            raise CatalogueError(f"{self.source}: task {task.name!r} is already in the catalogue")
        digest = hashlib.sha256((self.digest + repr(task)).encode()).hexdigest()
        return Catalogue({**self.tasks, task.name: task}, self.modalities, source=f"{self.source} + query",
                         digest=digest)


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """The catalogue in a YAML file (None: the shipped one), validated; cached by path and content digest."""
    path = Path(path) if path is not None else SHIPPED
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CatalogueError(f"{path}: task catalogue not readable ({exc.strerror or exc})") from None
    key = (str(path.resolve()), hashlib.sha256(raw).hexdigest())
    if key not in _CACHE:
        _CACHE[key] = parse_catalogue(raw, source=path.name, digest=key[1])
    return _CACHE[key]


_CACHE: dict[tuple[str, str], Catalogue] = {}


def catalogue_of(data) -> Catalogue:
    """The catalogue params select (data.catalogue; None: the shipped one). `data`: params' DataParams."""
    return load_catalogue(data.catalogue)


def parse_catalogue(raw: bytes | str, *, source: str, digest: str | None = None) -> Catalogue:
    """Validate a catalogue file's text; every error names `source` (the file), the task and the field."""
    digest = digest or hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"modalities", "tasks"}:
        extra = sorted(set(doc) - {"modalities", "tasks"}) if isinstance(doc, dict) else []
        raise CatalogueError(f"{source}: top level must be a mapping with `modalities` and `tasks`"
                             + (f"; unknown key(s) {extra}" if extra else ""))
    modalities, entries = doc.get("modalities"), doc.get("tasks")
    if not isinstance(modalities, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in modalities.items()):
        raise CatalogueError(f"{source}: modalities: a mapping of modality string -> description")
    if not isinstance(entries, list) or not entries:
        raise CatalogueError(f"{source}: tasks: a list of task entries, none given")
    tasks: dict[str, Task] = {}
    for i, entry in enumerate(entries):
        label = f"task {entry['name']!r}" if isinstance(entry, dict) and "name" in entry else f"task #{i + 1}"
        if not isinstance(entry, dict):
            raise CatalogueError(f"{source}: {label}: an entry is a mapping of fields")
        try:
            e = TaskEntry.model_validate(entry)
        except ValidationError as exc:
            raise CatalogueError(f"{source}: {label}: " + _describe(exc)) from None
        if e.name in tasks:
            raise CatalogueError(f"{source}: {label}: name: duplicate task name")
        if e.modality not in modalities:
            raise CatalogueError(f"{source}: {label}: modality: {e.modality!r} has no description under "
                                 f"`modalities` (described: {', '.join(modalities)})")
        tasks[e.name] = Task(e.name, e.modality, e.role, e.kind, tuple(e.answers), e.task_description,
                             e.question if e.question is not None else PER_SAMPLE, e.original, modalities[e.modality])
    catalogue = Catalogue(tasks, modalities, source=source, digest=digest)
    if not catalogue.train:
        raise CatalogueError(f"{source}: tasks: no training task (role: train); the federation trains on them")
    return catalogue


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown field; allowed: {', '.join(TaskEntry.model_fields)}"
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


def query_task(catalogue: Catalogue, name: str, modality: str, task_description: str, question: str,
               answers: list[str], modality_description: str | None = None) -> Task:
    """A zero-shot task that a query describes itself (served model): validated like a catalogue entry."""
    entry = {"name": name, "modality": modality, "role": "zero_shot", "kind": "choice",
             "answers": list(answers), "task_description": task_description, "question": question}
    try:
        e = TaskEntry.model_validate(entry)
    except ValidationError as exc:
        raise CatalogueError(f"query task {name!r}: " + _describe(exc)) from None
    description = modality_description or catalogue.modalities.get(modality)
    if not description:
        raise CatalogueError(f"query task {name!r}: modality {modality!r} has no description in "
                             f"{catalogue.source}; give modality_description")
    # scored like a question: the best option wins (the served model reports every option's score)
    return Task(e.name, e.modality, "zero_shot", "choice", tuple(e.answers), e.task_description, e.question, "",
                description)
