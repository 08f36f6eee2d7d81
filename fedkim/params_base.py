"""What every params section is built from: the error a bad params file raises and the strict base model (unknown
keys are errors, values are frozen), and the messages that name a bad key. fedkim.config re-exports them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

Modality = Literal["image", "ecg", "clinical"]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------ error messages
def format_validation_error(path: Path, exc: ValidationError, root: type[BaseModel]) -> str:
    """One line per invalid setting of the params file `path` (whose model is `root`), naming the key."""
    lines = [f"{path}: {exc.error_count()} invalid setting(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, err["loc"][:-1])
            lines.append(f"  - {loc}: unknown key; allowed here: {', '.join(allowed)}")
        elif err["type"] == "value_error" and not err["loc"]:  # a rule across sections names its own keys
            lines.append(f"  - {err['msg'].removeprefix('Value error, ')}")
        elif err["type"] == "literal_error":
            lines.append(f"  - {loc}: {err['input']!r} is not allowed; {err['msg'].lower()}")
        else:
            lines.append(f"  - {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the model tree along `loc` (skipping list indices) and list the field names found there."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            break
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
