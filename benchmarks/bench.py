"""vanilla vs Amphista vs Medusa served by vLLM: `python -m benchmarks.bench` is
`vllm-amphista bench` (vllm_amphista/eval/bench.py has the method and the flags)."""

import argparse
import sys

from vllm_amphista.eval import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
