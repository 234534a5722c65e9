"""Early exit on Ray Data, under its public name; the implementation is
:mod:`earlyexit_kernels.integrations.ray_data`.

    from earlyexit_kernels.ray import EarlyExitClassifier
    ds = ds.map_batches(EarlyExitClassifier, fn_constructor_kwargs={"model": path, "text_column": "text"},
                        concurrency=2, batch_format="pandas")
"""

from earlyexit_kernels.integrations.ray_data import (
    AUDIT_COLUMN,
    OUTPUT_COLUMNS,
    ClassifierSettings,
    EarlyExitClassifier,
    classify_files,
    input_files,
    read_dataset,
)

__all__ = [
    "ClassifierSettings",
    "EarlyExitClassifier",
    "classify_files",
    "input_files",
    "read_dataset",
    "AUDIT_COLUMN",
    "OUTPUT_COLUMNS",
]
