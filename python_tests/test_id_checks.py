"""The token ids' range check every stream submission makes (engine/step/inputs.py): one pass over the ids read as
unsigned, refusing exactly what the two-sided check refuses, in its words."""

import numpy as np
import pytest

from earlyexit_kernels.engine.step.inputs import check_id_range, check_ids

VOCAB = 100


@pytest.mark.parametrize(
    "ids",
    [[0, 5, 99], [99], [0], [-1, 5], [5, 100], [2**62, 3], [-(2**63), 0], [50, 7, -3, 101]],
)
def test_one_pass_refuses_what_the_range_check_refuses_in_its_words(ids):
    array = np.asarray(ids, dtype=np.int64)
    try:
        check_id_range(int(array.min()), int(array.max()), VOCAB)
    except ValueError as expected:
        with pytest.raises(ValueError) as raised:
            check_ids(array, VOCAB)
        assert str(raised.value) == str(expected)
        assert f"got values in {array.min()}..{array.max()}" in str(raised.value)
    else:
        check_ids(array, VOCAB)


def test_a_strided_view_is_read_as_its_own_ids():
    """A submission may be a view of a larger array (a column of a tokenized batch): only its own ids count."""
    block = np.array([[1, 500], [2, 500], [3, 500]], dtype=np.int64)
    check_ids(block[:, 0], VOCAB)
    with pytest.raises(ValueError, match=r"got values in 500\.\.500"):
        check_ids(block[:, 1], VOCAB)
