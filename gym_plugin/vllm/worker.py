"""gym_plugin's vLLM worker extension: reload weights from disk, with the CPU tied-LM-head fix.

Give it to the vLLM server with ``--worker-extension-cls gym_plugin.vllm.worker.GymPluginWorkerExtension``
(``gym-plugin vllm-args`` prints the whole command); vLLM mixes the class into every inference worker, so its
methods can be called through the dev-mode route ``POST /collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``):

    POST /collective_rpc {"method": "gym_plugin_reload_weights", "kwargs": {"weights_path": "<folder>"}}
        -> {"results": [{"weights_path", "repacked_lm_heads", "seconds"}, ...]}   (one per worker)
    POST /collective_rpc {"method": "gym_plugin_extension_info"} -> {"results": [{"extension", "version"}]}

Why an extension and not vLLM's own ``reload_weights``: on vLLM's CPU build a linear layer's weight is also
kept pre-packed for the CPU GEMM kernel (``layer.cpu_linear``). A tied LM head shares its weight with the
embedding, so a reload from a checkpoint that has no separate ``lm_head.weight`` loads the new embedding but the
head keeps its old packed copy (vLLM logs ``ParallelLMHead: Failed to load weights``): samples then come from the
new body with the old head. After the reload, every ``ParallelLMHead`` that has a packed copy is re-packed from
its (tied, now new) weight with vLLM's own ``dispatch_cpu_unquantized_gemm``. On GPU there is no packed copy and
nothing is re-packed.

This module is imported inside vLLM's worker processes: it imports only the standard library at module level
(vLLM and torch are already loaded there) and has no gym_plugin dependencies.
"""

from __future__ import annotations

import time

EXTENSION_QUALNAME = "gym_plugin.vllm.worker.GymPluginWorkerExtension"
"""The value of vLLM's ``--worker-extension-cls`` for this extension."""
EXTENSION_VERSION = 1
"""Bumped when the RPC methods or their results change (the trainer checks it at construction)."""


class GymPluginWorkerExtension:
    """Mixed into vLLM's worker class by ``--worker-extension-cls``; ``self`` is the vLLM worker.

    Method names start with ``gym_plugin_`` so they never collide with the worker's own attributes (vLLM
    refuses an extension that shadows one).
    """

    def gym_plugin_extension_info(self) -> dict:
        """What the trainer's construction-time check asks: is the extension loaded, which version."""
        return {"extension": EXTENSION_QUALNAME, "version": EXTENSION_VERSION}

    def gym_plugin_reload_weights(self, weights_path: str) -> dict:
        """Reload every weight from the safetensors files in ``weights_path`` (HF checkpoint names), then re-pack
        tied LM heads on CPU. Runs in every worker (tensor/pipeline-parallel ranks load their own shards)."""
        t0 = time.perf_counter()
        self.reload_weights(weights_path=str(weights_path), is_checkpoint_format=True)  # vLLM's Worker method
        repacked = _repack_cpu_lm_heads(self.get_model())
        return {"weights_path": str(weights_path), "repacked_lm_heads": repacked,
                "seconds": round(time.perf_counter() - t0, 4)}


def _repack_cpu_lm_heads(model) -> list[str]:
    """Re-pack the CPU GEMM copy of each ``ParallelLMHead`` from its current weight; returns the module names."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    repacked = []
    for name, module in model.named_modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            repacked.append(name)
    return repacked
