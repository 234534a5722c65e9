"""A settings object, or its fields given as keywords: the one way an entry point turns either into the object.

:func:`~earlyexit_kernels.training.calibration.calibrate` (a ``Goal``),
:func:`~earlyexit_kernels.training.train.train_exit_heads` (a ``TrainSettings``),
:func:`~earlyexit_kernels.integrations.folder_calibration.calibrate_folder` and the Ray Data classifier take
their settings as one object, checked once where it is made; the object's fields stay accepted as keywords,
not beside it.
"""

from __future__ import annotations

import dataclasses

__all__ = ["settings_of"]


def settings_of(kind: type, given, fields: dict, *, who: str, what: str):
    """``given`` (an instance of the dataclass ``kind``), or the ``kind`` made of ``fields`` (its keywords); a
    ``TypeError`` naming what to give where both come, where ``given`` is not a ``kind``, or where a keyword is
    none of its fields. ``who``: the entry point, ``what``: its parameter's name, as the messages say them."""
    if given is not None and fields:
        raise TypeError(
            f"{who} takes its {what} once: {what}= or its fields as keywords ({', '.join(sorted(fields))}), "
            f"not both; put them in the {kind.__name__} (dataclasses.replace({what}, ...))"
        )
    if given is not None:
        if not isinstance(given, kind):
            where = kind.__module__.removeprefix("earlyexit_kernels.")
            raise TypeError(f"{what} must be a {where}.{kind.__name__}, got {type(given).__name__}")
        return given
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(
            f"{who} got unexpected keyword(s) {', '.join(unknown)}: its {what}'s fields are {', '.join(sorted(known))}"
        )
    return kind(**fields)
