"""Resource servers (tools + verifiers): exact_match, math_verify, calculator. See `base.ResourceServer`."""
