"""One rank of the 2-process run of tests/peers/trl/test_accelerate.py (``accelerate launch --num_processes 2``):
TRL's GRPOTrainer with GymRollouts on the tiny model, the letters env, each rank serving its own DDP replica in
process. Writes ``<out>/rank<k>.json``: the prompts this rank's rollout_func got, the rewards it returned, TRL's
logs (rank 0's are the ones TRL prints) and a digest of the final parameters."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gym_plugin.models.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from gym_plugin.tasks import letter_rows  # noqa: E402
from gym_plugin.trl import GymRollouts, gym_dataset, gym_reward  # noqa: E402


def main(out_dir: str) -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)  # same seed on every rank: the same initial weights
    inner = GymRollouts(ROOT / "examples/letters_env.yaml")
    seen: list[dict] = []

    def rollout_func(prompts, trainer):
        out = inner(prompts, trainer)
        seen.append({"prompts": [json.loads(p)["task_id"] for p in prompts], "rewards": out["gym_reward"],
                     "served_is_trainer_module": inner.policy_server.model is trainer.accelerator.unwrap_model(
                         trainer.model)})
        return out

    args = GRPOConfig(output_dir=str(Path(out_dir) / "trl_out"), use_cpu=True, bf16=False, seed=0,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                      logging_steps=1, save_strategy="no", report_to=[], learning_rate=1e-2,
                      lr_scheduler_type="constant", gradient_checkpointing=False, beta=0.0, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[gym_reward], args=args, train_dataset=gym_dataset(letter_rows()),
                          processing_class=tok, rollout_func=rollout_func)
    try:
        trainer.train()
    finally:
        inner.close()
    digest = hashlib.sha256()
    for name, p in sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict().items()):
        digest.update(name.encode() + p.detach().to(torch.float32).numpy().tobytes())
    rank = trainer.accelerator.process_index
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": trainer.accelerator.num_processes, "collections": seen,
        "logs": trainer.state.log_history, "params_sha256": digest.hexdigest()}))


if __name__ == "__main__":
    main(sys.argv[1])
