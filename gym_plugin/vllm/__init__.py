"""vLLM as the policy server: the server command gym_plugin needs (`launch`: ``gym-plugin vllm-args``, start and
stop), and the worker extension that runs inside vLLM (`worker`: reload weights from disk). The trainer's side of
the weight syncs is `gym_plugin.weight_sync.vllm`.

Importing this package imports nothing from vLLM (vLLM imports `gym_plugin.vllm.worker` in its workers).
"""
