"""DVC stage `generate`: write the offline federation described by params.yaml `data` into data.root."""

from fedkim.config import load_params
from fedkim.data.synth.federation import generate_federation


def main() -> None:
    result = generate_federation(load_params().data)
    print(f"federation {result.params_hash}: {result.root} ({'cached' if result.cached else f'{result.seconds:.1f} s'})")


if __name__ == "__main__":
    main()
