"""DVC stage `start_round`: publish the round's global model (the initial model) in the round's store.

Out: <store>/rounds/<round>/global/. A DVC round never chains from a previous round (see pipelines.common), so a
store whose rounds/LATEST.json names a completed (Prefect) round is refused. LATEST is read as the flow reads it
(fedkim.round_chain, with the coordinator's signature when federation.signatures is required): one that cannot be
trusted is refused with the reason, naming the key.
"""

import sys

from fedkim.errors import run_stage
from fedkim.federation.signing import SignatureError
from fedkim.round_chain import LatestError
from fedkim.rounds import LATEST_KEY, latest_round, start_round
from pipelines.common import parser, setup


def main(argv: list[str] | None = None) -> int:
    params, store, round_id = setup(parser(__doc__).parse_args(argv))
    try:
        previous = latest_round(store, params)
    except (LatestError, SignatureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if previous is not None:
        print(f"{store.uri(LATEST_KEY)} exists and names completed round {previous}: this store holds chained "
              f"(Prefect) rounds, and a DVC round would start from their weights instead of the initial model; give "
              f"the DVC round a store of its own", file=sys.stderr)
        return 1
    key = start_round(params, store, round_id)
    print(f"round {round_id}: global model {store.uri(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
