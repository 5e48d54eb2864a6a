"""TRL's GRPOTrainer on a Gym environment through gym_plugin.trl (``pip install -e ".[trl]"``).

The rollouts come from the Gym servers (agent, verifier) started in this process; the policy is the trainer's own
model, served in process by gym_plugin's embedded engine on the very weights the optimizer updates (no copy, no
sync). The reward is the verifier's. Everything else is TRL's: GRPOConfig, the loss, the logs.

    python examples/trl_grpo.py                          # SmolLM2-135M-Instruct, capital-city task, CPU
    python examples/trl_grpo.py --model tiny --steps 2   # seconds: the tiny random model, letters task
    accelerate launch --multi_gpu --num_processes 2 examples/trl_grpo.py --model tiny   # 2 ranks (CPU: gloo)
"""

import argparse
import os
from pathlib import Path

from trl import GRPOConfig, GRPOTrainer

from gym_plugin.models import load_policy_model
from gym_plugin.tasks import capital_rows, letter_rows
from gym_plugin.trl import GymRollouts, gym_dataset, gym_reward

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL 1.16 calls rollout_func experimental


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local Hugging Face folder")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/trl_grpo")
    args = parser.parse_args()

    model, tokenizer = load_policy_model(args.model)
    tiny = args.model == "tiny"
    rows, env = (letter_rows(), HERE / "letters_env.yaml") if tiny else (capital_rows(), HERE / "capitals_env.yaml")

    rollouts = GymRollouts(env)                        # the Gym config: a YAML path (or mappings), as GymIntegration
    trainer = GRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=[gym_reward], train_dataset=gym_dataset(rows),
        rollout_func=rollouts,
        args=GRPOConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=32,
                        num_generations=4, max_completion_length=48, temperature=1.0,
                        learning_rate=1e-3 if tiny else 1e-5, beta=0.0, logging_steps=1, save_strategy="no",
                        report_to=[], bf16=False, gradient_checkpointing=False),
    )
    try:
        trainer.train()
    finally:
        rollouts.close()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if trainer.accelerator.is_main_process:
        print(f"reward by step: {[round(r, 3) for r in rewards]}")


if __name__ == "__main__":
    main()
