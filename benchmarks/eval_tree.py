"""Chain vs tree speculation in the reference decoder: `python -m benchmarks.eval_tree` is
`vllm-amphista eval-tree` (vllm_amphista/eval/eval_tree.py has the method and flags)."""

import argparse
import sys

from vllm_amphista.eval import eval_tree

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=eval_tree.__doc__.splitlines()[0])
    eval_tree.add_arguments(parser)
    sys.exit(eval_tree.main(parser.parse_args()))
