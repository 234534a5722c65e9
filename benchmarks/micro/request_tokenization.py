"""What tokenizing one request costs the server, by texts a request (issue 78 item 3).

The server's :class:`~earlyexit_kernels.integrations.server.tokenization.Tokenization` on a folder's
tokenizer, over requests of the lines of ``TEXTS`` (``truncate`` on): milliseconds a request, the
median of ``--rounds`` rounds of ``--requests`` requests, after a warm-up. Run it pinned to one
core, as the server runs::

    taskset -c 0 python benchmarks/micro/request_tokenization.py FOLDER TEXTS.txt --texts-per-request 1 32
"""

import argparse
import statistics
import time
from pathlib import Path

from transformers import AutoTokenizer

from earlyexit_kernels.integrations.server.tokenization import Tokenization


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument("--texts-per-request", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    tokenization = Tokenization(AutoTokenizer.from_pretrained(args.folder), args.max_length)
    for per in args.texts_per_request:
        requests = [[(texts[(i * per + k) % len(texts)], None) for k in range(per)] for i in range(args.requests)]
        for request in requests[:20]:
            tokenization.encode(request, True)
        rounds = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            for request in requests:
                tokenization.encode(request, True)
            rounds.append((time.perf_counter() - began) / len(requests))
        print(
            f"{per} texts a request: {1000 * statistics.median(rounds):.3f} ms a request "
            f"(median of {args.rounds} rounds of {args.requests})"
        )


if __name__ == "__main__":
    main()
