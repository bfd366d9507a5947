"""uniap-megatron inside other tools: the Hydra callback behind ``+auto_parallel=uniap``."""
