"""Resource servers (tools + verifiers): exact_match, math_verify, calculator, capitals, code_exec, reasoning_gym. See `base.ResourceServer`."""
