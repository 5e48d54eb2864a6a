"""The seed's "Full Integration Example" (Connect Gym to Your Training Loop), running on gym_plugin.

Only the imports changed (and the last line: a mistake such as a wrong model name prints one error block instead
of a traceback; GYM_PLUGIN_DEBUG=1 shows it): the seed builds `GymIntegration` itself on NeMo Gym's `RunHelper` and
`RolloutCollectionHelper`; gym_plugin ships that class (`gym_plugin.GymIntegration`, same constructor, same
`collect_rollouts` / `shutdown`). `load_training_prompts` and `prepare_gym_example` are the user's own code, as
in the seed; here they make arithmetic questions for the exact-match agent of `gym_env.yaml`.

    POLICY_BASE_URL=http://localhost:8000/v1 POLICY_MODEL_NAME=qwen3-4b-instruct python examples/connect_gym_to_training.py

No vLLM at hand? Serve a local model first (`gym-plugin embedded --port 8000`, SmolLM2 on CPU; then
POLICY_MODEL_NAME=smollm2) or the scripted fake (`gym-plugin fake-openai --port 8000 --reply 4`; any model name).
"""

import asyncio
import os
from pathlib import Path

from gym_plugin import GymIntegration  # the seed defines this class itself on top of NeMo Gym
from gym_plugin.errors import exit_on_user_error

HERE = Path(__file__).resolve().parent


def load_training_prompts() -> list[dict]:
    """Your data loading: here, small sums with their answers."""
    return [{"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)}
            for a, b in [(2, 2), (1, 3), (3, 4), (5, 2), (6, 1), (2, 7), (8, 1), (4, 5), (9, 9)]]


def prepare_gym_example(prompt: dict, tools: list[dict] | None = None) -> dict:
    """Convert a prompt to Gym's expected format (the seed's function, plus the answer the verifier checks)."""
    example = {
        "responses_create_params": {
            "input": [
                {"type": "message", "role": "user", "content": prompt["prompt"]}
            ],
            "model": "policy",  # Gym routes to your policy
        },
        "agent_ref": "exact_match_agent",
        "expected_answer": prompt["answer"],
    }

    if tools:
        example["responses_create_params"]["tools"] = tools

    return example


async def main():
    # 1. Initialize Gym
    gym = GymIntegration(
        model_name=os.environ.get("POLICY_MODEL_NAME", "qwen3-4b-instruct"),
        base_urls=[os.environ.get("POLICY_BASE_URL", "http://localhost:8000/v1")],
        config_path=HERE / "gym_env.yaml",
        head_server_port=int(os.environ.get("HEAD_SERVER_PORT", "8080")),
    )

    try:
        # 2. Prepare batch
        prompts = load_training_prompts()  # Your data loading
        batch = [prepare_gym_example(p) for p in prompts[:8]]

        # 3. Collect rollouts
        rollouts = []
        async for rollout in gym.collect_rollouts(batch):
            rollouts.append(rollout)
            print(f"Collected rollout with reward: {rollout['reward']}")

        # 4. Process for training
        print(f"Collected {len(rollouts)} rollouts")

    finally:
        gym.shutdown()


if __name__ == "__main__":
    exit_on_user_error(lambda: asyncio.run(main()))
