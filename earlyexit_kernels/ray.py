"""Early exit on Ray Data, under its public name; the implementation is
:mod:`earlyexit_kernels.integrations.ray_data`.

    from earlyexit_kernels.ray import EarlyExitClassifier
    ds = ds.map_batches(EarlyExitClassifier, fn_constructor_kwargs={"model": path, "text_column": "text"},
                        concurrency=2, batch_format="pandas")
"""

from earlyexit_kernels.integrations.ray_data import *  # noqa: F403 - its public names (its __all__), here
from earlyexit_kernels.integrations.ray_data import __all__  # noqa: F401
