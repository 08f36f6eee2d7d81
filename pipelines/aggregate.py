"""DVC stage `aggregate`: screen the sites' knowledge packages, check the quorum and aggregate them.

Reads <store>/rounds/<round>/{global,sites}/; writes <store>/rounds/<round>/aggregate/ (encoders.safetensors +
aggregate.json with the accepted and rejected sites). Fails when fewer than federation.quorum packages pass.
"""

import sys

from fedkim.errors import run_stage
from fedkim.rounds import QuorumError, aggregate_step
from pipelines.common import parser, setup


def main(argv: list[str] | None = None) -> int:
    params, store, round_id = setup(parser(__doc__).parse_args(argv))
    try:
        outcome = aggregate_step(params, store, round_id, params.member_ids())
    except QuorumError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"round {round_id}: {outcome.strategy} over {outcome.accepted}; rejected {outcome.rejected or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
