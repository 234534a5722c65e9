import sys

if sys.argv[1:2] == ["stream"]:  # python -m earlyexit_kernels.bench stream [--out DIR ...]: the stream benchmark
    from .stream import main as stream_main

    raise SystemExit(stream_main(sys.argv[2:]))

from .cli import main

raise SystemExit(main())
