"""DVC stage `start_round`: publish the round's global model (the initial model) in the round's store.

Out: <store>/rounds/<round>/global/. A DVC round never chains from a previous round (see pipelines.common), so a
store that holds a chained round's marker (rounds/LATEST.json, written by the Prefect flow) is refused.
"""

import sys

from fedkim.errors import run_stage
from fedkim.rounds import LATEST_KEY, start_round
from pipelines.common import parser, setup


def main(argv: list[str] | None = None) -> int:
    params, store, round_id = setup(parser(__doc__).parse_args(argv))
    if store.exists(LATEST_KEY):
        print(f"{store.uri(LATEST_KEY)} exists: this store holds chained (Prefect) rounds, and a DVC round would "
              f"start from their weights instead of the initial model; give the DVC round a store of its own",
              file=sys.stderr)
        return 1
    key = start_round(params, store, round_id)
    print(f"round {round_id}: global model {store.uri(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
