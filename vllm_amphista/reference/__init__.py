"""A reference speculative decoder on transformers (trees and chains), for checks and
ablations outside vLLM."""
