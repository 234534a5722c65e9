"""``eek`` with every request's body parsed and its texts tokenized on worker threads, as the server did
before small requests stayed on the event loop (``tokenization.INLINE_CHARS``,
``routes.handling.INLINE_BODY_BYTES``): the "before" of that change, a setting's own launcher in
``request_latency_parts.py`` (alternating with the server as it is)::

    python benchmarks/profiles/request_latency_parts.py FOLDER TEXTS.txt --concurrency 8 32 --setting \\
        "inline:--dtype int8" "threads:--dtype int8|benchmarks/profiles/threaded_requests_launcher.py"
"""

import runpy
import sys

from earlyexit_kernels.integrations.server import tokenization
from earlyexit_kernels.integrations.server.routes import handling

tokenization.INLINE_CHARS = -1  # no request's texts are few enough
handling.INLINE_BODY_BYTES = -1
sys.argv = ["earlyexit_kernels", *sys.argv[1:]]
runpy.run_module("earlyexit_kernels", run_name="__main__", alter_sys=True)
