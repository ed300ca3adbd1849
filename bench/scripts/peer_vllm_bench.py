"""`vllm bench serve --goodput` against the saber sidecar, beside saber's own bench, on the same cells.

    python bench/scripts/peer_vllm_bench.py --trace code --count 200 --rate 4 --policy saber   # emulator
    python bench/scripts/peer_vllm_bench.py --engine vllm --count 150 --loads 0.6,2 --repeats 3  # real vLLM (CPU)
    python bench/scripts/peer_vllm_bench.py --engine-url http://127.0.0.1:8000 ...              # an engine already up

--loads are multiples of the engine's capacity on the window, measured live first; --repeats runs
each client that many times per cell, interleaved, each behind a fresh sidecar. Writes peer.json,
runs.csv and report.md under --out. See saber_bench/peer.py for what is compared and how.
"""

import sys

from saber_bench.peer import main

if __name__ == "__main__":
    sys.exit(main())
