import sys

if sys.argv[1:2] == ["stream"]:  # python -m earlyexit_kernels.bench stream [--out DIR ...]: the stream benchmark
    from earlyexit_kernels.bench.stream import main as stream_main

    raise SystemExit(stream_main(sys.argv[2:]))

from earlyexit_kernels.bench.cli import main

raise SystemExit(main())
