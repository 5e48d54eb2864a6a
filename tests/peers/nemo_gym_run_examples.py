"""Run under NeMo Gym 0.7.0's venv (not ours): NeMo Gym's ``RolloutCollectionHelper.run_examples`` against a head
server, as a NeMo Gym user calls it from Python.

    python nemo_gym_run_examples.py HEAD_HOST HEAD_PORT ROWS.jsonl OUT.jsonl

Writes one ``{"row": ..., "result": ...}`` line per finished row (completion order). Exit 0 when every row came back.
"""

import asyncio
import json
import sys


async def main(host: str, port: int, rows_path: str, out_path: str) -> int:
    from nemo_gym.rollout_collection import RolloutCollectionHelper
    from nemo_gym.server_utils import BaseServerConfig

    rows = [json.loads(line) for line in open(rows_path) if line.strip()]
    helper = RolloutCollectionHelper()
    done = 0
    with open(out_path, "w") as out:
        for future in helper.run_examples(rows, head_server_config=BaseServerConfig(host=host, port=port)):
            row, result = await future
            out.write(json.dumps({"row": row, "result": result}) + "\n")
            done += 1
    print(f"run_examples: {done}/{len(rows)} rows", flush=True)
    return 0 if done == len(rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])))
