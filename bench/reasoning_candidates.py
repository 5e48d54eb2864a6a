"""Start reward of reasoning-gym tasks under the embedded policy: which task can GRPO learn from on CPU?

For each candidate (a dataset or mix, its generator keywords, an answer format), collect ``--prompts`` held-out
(eval split) rows x ``--samples`` rollouts with the embedded SmolLM2-135M-Instruct at temperature 1.0 through the
reasoning_gym resource server, and print one JSON line: mean reward, share of rollouts with a parsable answer,
mean generated tokens, seconds (``--temperature``: the sampling temperature, 1.0 by default). A task GRPO can learn from starts between ~0.1 and ~0.5 (groups with mixed
rewards) while the replies still hold a chain of thought (>= 64 generated tokens on average).

  flock /tmp/heavy.lock python bench/reasoning_candidates.py --max-output-tokens 256 \
      --candidate '{"dataset": "leg_counting", "dataset_config": {"min_animals": 1, "max_animals": 2}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gym_plugin.integration import GymIntegration  # noqa: E402
from gym_plugin.process import reward_metrics  # noqa: E402
from gym_plugin.reasoning_tasks import generate_rows  # noqa: E402
from gym_plugin.servers.embedded import EmbeddedPolicyConfig, EmbeddedPolicyServer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", action="append", default=[],
                   help='JSON: {"dataset": name or mix list, "dataset_config": {...}, "answer_format": ..., '
                        '"instruction": ..., "train_size": ...}')
    p.add_argument("--candidate-file", default=None, help="a JSONL file of candidates (one per line)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default=None, help="also write every record here (JSONL)")
    args = p.parse_args()
    if args.candidate_file:
        args.candidate += [line for line in open(args.candidate_file) if line.strip()]
    if not args.candidate:
        p.error("give --candidate or --candidate-file")
    config = {
        "reasoning": {"resources_servers": {"reasoning_gym": {}}},
        "reasoning_agent": {"responses_api_agents": {"simple_agent": {
            "resources_server": {"type": "resources_servers", "name": "reasoning"},
            "model_server": {"type": "responses_api_models", "name": "policy_model"}, "max_turns": 1}}},
        "collector": {"concurrency": 64},
    }
    policy = EmbeddedPolicyServer(EmbeddedPolicyConfig(model=args.model, served_model_name=args.model, port=0,
                                                       max_batch_size=64))
    gym = GymIntegration(args.model, None, config, head_server_port=0, progress_every_s=0, extra_servers=[policy])
    out = open(args.out, "w") if args.out else None
    try:
        for raw in args.candidate:
            cand = json.loads(raw)
            rows = generate_rows(cand["dataset"], dataset_config=cand.get("dataset_config"), size=args.prompts,
                                 seed=0, split="eval", train_size=cand.get("train_size", 256),
                                 answer_format=cand.get("answer_format", "answer_tag"), instruction=cand.get("instruction"),
                                 agent_name="reasoning_agent")
            for row in rows:
                row["responses_create_params"].update(temperature=cand.get("temperature", args.temperature),
                                                     max_output_tokens=args.max_output_tokens)
            t0 = time.perf_counter()
            records = gym.collect(rows, repeats=args.samples)
            seconds = time.perf_counter() - t0
            m = reward_metrics(records)
            ok = [r for r in records if "reward" in r]
            parsed = sum(r.get("extracted_answer") is not None for r in ok) / max(1, len(ok))
            print(json.dumps({**cand, "max_output_tokens": args.max_output_tokens, "temperature": args.temperature,
                              "reward_mean": round(m.get("rollout/reward_mean", float("nan")), 4),
                              "accuracy": round(m.get("rollout/accuracy", float("nan")), 4),
                              "answer_parsed": round(parsed, 4),
                              "gen_tokens_mean": round(m.get("rollout/gen_tokens_mean", float("nan")), 1),
                              "rollouts": len(records), "failed": int(m["rollout/num_failed"]),
                              "seconds": round(seconds, 1)}), flush=True)
            if out is not None:
                for r in records:
                    out.write(json.dumps(r) + "\n")
    finally:
        gym.shutdown()
        if out is not None:
            out.close()


if __name__ == "__main__":
    main()
