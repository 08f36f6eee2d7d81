"""DVC stage `generate`: write the generated members and server splits of params.yaml into data.root (provided
directories are only checked, never written)."""

import sys

from fedkim.config import load_params
from fedkim.data.synth.federation import generate_federation
from fedkim.errors import run_stage


def main() -> None:
    result = generate_federation(load_params())
    print(f"federation {result.params_hash}: {result.root} ({'cached' if result.cached else f'{result.seconds:.1f} s'})")


if __name__ == "__main__":
    sys.exit(run_stage(main))
