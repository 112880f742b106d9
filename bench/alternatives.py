"""Benchmark: sealift against the real alternatives on the lab testbed (issue 6).

A thin wrapper of `sealift bench` (src/sealift/bench/), for symmetry with the other scripts here:

    .venv/bin/python bench/alternatives.py --quick --json      # CI-sized: one run per transport
    .venv/bin/python bench/alternatives.py --sizes 1G --workloads moderate --runs 3

See `sealift bench --help` and docs/benchmarks.md ("Against the alternatives").
"""

from __future__ import annotations

import sys

from sealift.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
