"""TRL's GRPOTrainer on the default recipe's setting, for bench/vs_trl.py (runs in a venv that has TRL).

    /work/venvs/trl/bin/python bench/trl_grpo.py --steps 8 --out trl.json
    python bench/trl_grpo.py --gym --steps 8 --out trl_gym.json     # TRL + gym_plugin.trl (the 'trl' extra)

``--gym``: the same trainer and config, but the completions come from gym_plugin.trl.GymRollouts (the capitals
verifier server, the trainer's own module served in process by the embedded engine) and the reward is the
verifier's (gym_reward), instead of TRL's own generate() and ``capital_reward`` below.

The venv (CPU; torch first, any other torch spec pulls GBs of CUDA packages; ~2 min from the local wheels):

    python3.11 -m venv /work/venvs/trl && /work/venvs/trl/bin/pip install torch==2.13.0 \
        && /work/venvs/trl/bin/pip install trl==1.16.0 transformers==5.19.0

Setting (the same as ``python recipes/grpo.py`` with bench/vs_trl.py's overrides): SmolLM2-135M-Instruct fp32
on CPU from the converted folder, the capital-city prompts of gym_plugin.tasks, 8 prompts x 4 samples per step
(per_device_train_batch_size 32, num_generations 4), up to 48 new tokens at temperature 1.0 (top_p 1, top_k
off), lr 1e-5 constant, one optimizer step per batch, no KL (beta 0), group-std advantages, token-mean loss
(TRL's default "dapo" = ours). Everything else is TRL's default (e.g. gradient_checkpointing=True).
The reward is the capital verifier's check (``match: word``): 1 when an accepted name appears as a whole word.

Writes a JSON file: per step, wall seconds, seconds in generation+scoring (``_generate_and_score_completions``),
and the mean reward; this process's peak RSS is measured by the parent (os.wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def capital_reward(completions, accepted_answers, **_):
    """1.0 when any accepted name appears in the reply as a whole word or phrase, case-insensitive: the check of
    gym_plugin.servers.resources.capitals (match: word), which this venv cannot import (no omegaconf)."""
    rewards = []
    for completion, names in zip(completions, accepted_answers):
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        hit = any(re.search(r"(?<!\w)" + re.escape(n) + r"(?!\w)", text, flags=re.IGNORECASE) for n in names)
        rewards.append(1.0 if hit else 0.0)
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/gym_plugin/models/smollm2-135m-instruct"))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gym", action="store_true", help="rollouts through gym_plugin.trl.GymRollouts")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gym_plugin.tasks import task_rows  # pure: the prompts and answers, no server code

    rows = task_rows("capitals", "capitals_agent")
    gym_extra: dict = {}
    if args.gym:
        from gym_plugin.trl import GymRollouts, gym_dataset, gym_reward

        dataset = gym_dataset(rows)
        gym_extra["rollout_func"] = GymRollouts(os.path.join(ROOT, "examples/capitals_env.yaml"))
        reward_funcs = gym_reward
    else:
        dataset = Dataset.from_list([
            {"prompt": row["responses_create_params"]["input"], "accepted_answers": row["accepted_answers"]}
            for row in rows
        ])
        reward_funcs = capital_reward
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_out"),
        use_cpu=True, bf16=False, fp16=False, seed=0,
        per_device_train_batch_size=32, num_generations=4, gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=1e-5, lr_scheduler_type="constant", beta=0.0, num_iterations=1,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
    )

    class Timed(GRPOTrainer):
        """Records the seconds spent generating and scoring each batch."""

        generation_s: list[float] = []

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.generation_s.append(time.perf_counter() - started)
            return out

    steps: list[dict] = []

    class Recorder(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            steps.append({"step": state.global_step, "wall_s": time.perf_counter() - self.t0})

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "reward" in logs and steps:
                steps[-1]["reward_mean"] = float(logs["reward"])

    trainer = Timed(model=model, reward_funcs=reward_funcs, args=config, train_dataset=dataset,
                    processing_class=tokenizer, callbacks=[Recorder()], **gym_extra)
    try:
        trainer.train()
    finally:
        if "rollout_func" in gym_extra:
            gym_extra["rollout_func"].close()
    for row, gen in zip(steps, Timed.generation_s):
        row["collect_s"] = gen
        row["train_s"] = row["wall_s"] - gen
    with open(args.out, "w") as f:
        json.dump({"steps": steps, "trl_config": {k: getattr(config, k) for k in (
            "per_device_train_batch_size", "num_generations", "max_completion_length", "learning_rate", "beta",
            "loss_type", "scale_rewards", "gradient_checkpointing", "bf16")}}, f)


if __name__ == "__main__":
    main()
