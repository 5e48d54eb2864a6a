"""Run under NeMo Gym 0.7.0's venv (not ours): NeMo Gym's own ``compute_aggregate_metrics`` on the rollouts of a
run, grouped by environment server and stripped as its collector strips them before ``/aggregate_metrics``.

    python nemo_gym_aggregate.py ROLLOUTS.jsonl OUT.json

Writes ``{environment server: AggregateMetrics}`` as JSON.
"""

import json
import sys
import warnings


def main(rollouts: str, out: str) -> int:
    warnings.simplefilter("ignore")
    from nemo_gym.reward_profile import compute_aggregate_metrics

    groups: dict = {}
    for line in open(rollouts):
        record = json.loads(line)
        stripped = {k: v for k, v in record.items() if k not in ("response", "responses_create_params")}
        usage = (record.get("response") or {}).get("usage")
        if usage is not None:
            stripped["response"] = {"usage": usage}
        groups.setdefault(record["_ng_environment_server"], []).append(stripped)
    result = {name: compute_aggregate_metrics(records).model_dump() for name, records in groups.items()}
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
