"""uniap-megatron: UniAP automatic parallelism planning for Megatron-LM and NeMo."""

__version__ = "0.1.0"
