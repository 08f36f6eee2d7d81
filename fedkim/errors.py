"""Errors that mean "the input is unusable" (bad params, an unusable data directory, a generation that would
overwrite something, a stored object whose coordinator signature or round chain cannot be trusted): the CLI and
the DVC stages print them as one line naming the key or directory and exit 2, never with a traceback."""

from __future__ import annotations

import sys

# (module, class): looked up only once the module is loaded, so that catching them imports nothing heavy
_USAGE_ERRORS = (("fedkim.params_base", "ConfigError"), ("fedkim.data.synth.federation", "GenerationError"),
                 ("fedkim.data.siteformat", "SiteFormatError"), ("fedkim.federation.signing", "SignatureError"),
                 ("fedkim.round_chain", "LatestError"))
USAGE_EXIT = 2


def usage_error(exc: BaseException) -> str | None:
    """The one-line message of a usage error, or None when `exc` is something else (a bug, a failed check)."""
    kinds = tuple(getattr(sys.modules[m], name) for m, name in _USAGE_ERRORS if m in sys.modules)
    if not isinstance(exc, kinds):
        return None
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def run_stage(main) -> int:
    """Run a command's main(): a usage error becomes one line on stderr and exit status 2."""
    try:
        return main() or 0
    except Exception as exc:
        message = usage_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return USAGE_EXIT
