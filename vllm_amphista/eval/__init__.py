"""Measurement: tau and acceptance, one engine setup, the serve bench, vLLM acceptance,
the reference decoder's tree evaluation."""
