"""Training heads: distillation data (recorded from vLLM), the objective, the loop, the
Ray launcher, reports."""
