"""`vllm bench serve --goodput` against the saber sidecar, beside saber's own bench, on one cell.

    python bench/scripts/peer_vllm_bench.py --trace code --count 200 --rate 4 --policy saber
    python bench/scripts/peer_vllm_bench.py --engine-url http://127.0.0.1:8000 ...   # e.g. a real vLLM

See saber_bench/peer.py for what is compared and how.
"""

import sys

from saber_bench.peer import main

if __name__ == "__main__":
    sys.exit(main())
