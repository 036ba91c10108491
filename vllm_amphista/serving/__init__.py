"""Serving inside vLLM: the plugin hook, every vLLM patch, spec-config translation, the
proposer and its draft sampling, the `vllm` command."""
