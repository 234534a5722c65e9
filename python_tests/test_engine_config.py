"""The continuous engine's limits as one object: built once, checked once, the same engine as keywords give."""

import pytest
import torch
from conftest import tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.engine.stream.engine_config import EngineConfig


def _finished(engine, sequences):
    for key, ids in enumerate(sequences):
        engine.submit(key, ids)
    out = {}
    while len(out) < len(sequences):
        for done in engine.step():
            out[done.key] = (done.exit_layer, done.logits)
    return out


def test_a_config_and_the_same_keywords_run_the_same_engine():
    model = eek.patch(tiny_model("bert", num_layers=3), eek.Patience(1))
    limits = dict(max_batch_size=4, max_in_flight=8, admission="length", max_age=None)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(5, 90, (int(n),), generator=generator) for n in torch.randint(3, 20, (11,))]
    by_keywords = _finished(ContinuousEngine(model, **limits), sequences)
    by_config = _finished(ContinuousEngine(model, EngineConfig(**limits)), sequences)
    assert by_keywords.keys() == by_config.keys()
    for key, (layer, logits) in by_keywords.items():
        assert by_config[key][0] == layer
        assert torch.equal(by_config[key][1], logits)


def test_a_config_or_keywords_not_both_and_no_unknown_limit():
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))
    with pytest.raises(TypeError, match="not both"):
        ContinuousEngine(model, EngineConfig(max_batch_size=4), max_batch_size=8)
    with pytest.raises(TypeError, match="unknown engine limit.*max_batch_sise.*the limits are"):
        ContinuousEngine(model, max_batch_sise=4)
    with pytest.raises(TypeError, match="must be an EngineConfig"):
        ContinuousEngine(model, {"max_batch_size": 4})


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1 or None, got 0"),
        ({"max_batch_size": True}, "max_batch_size must be an integer >= 1 or None, got True"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1 or None"),
        ({"max_length": -3}, "max_length must be an integer >= 1 or None"),
        ({"length_step": 2.5}, "length_step must be an integer >= 1 or None"),
        ({"max_wait": 0}, "max_wait must be an integer >= 1 or None"),
        ({"compile": "yes"}, "compile must be True, False or a dict"),
        ({"admission": "lifo"}, "admission must be 'fifo' or 'length', got 'lifo'"),
        ({"call_cost": -1.0}, "call_cost must be a number >= 0"),
        ({"packed": "yes"}, "packed must be None"),
        ({"max_age": -1}, "max_age must be 'auto'"),
    ],
)
def test_bad_limits_are_refused_where_the_config_is_built(limits, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**limits)
    with pytest.raises(ValueError, match=message):
        EngineConfig().replace(**limits)


def test_the_limits_that_need_the_model_are_checked_by_the_engine():
    model = eek.patch(tiny_model("bert", num_layers=2), eek.Patience(1))  # 64 positions
    with pytest.raises(ValueError, match=r"max_length must be an integer in 1\.\.64"):
        ContinuousEngine(model, EngineConfig(max_length=65))


def test_the_server_s_settings_check_the_engine_s_limits_before_a_model_is_loaded():
    from earlyexit_kernels.integrations.server.serve_settings import ServeSettings

    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1 or None"):
        ServeSettings.from_options(max_tokens=0)
    with pytest.raises(ValueError, match="call_cost must be a number >= 0"):
        ServeSettings.from_options(call_cost=-1)  # eek serve --call-cost
    config = ServeSettings.from_options(max_batch_size=8, max_age=None).engine
    assert config == EngineConfig(max_batch_size=8, admission="fifo", max_age=None)
    assert ServeSettings.from_options(call_cost=12.5).engine.call_cost == 12.5
    # a server serves strictly oldest first where no age is given; the engine alone keeps "auto"
    assert ServeSettings.from_options().engine.max_age == ServeSettings().engine.max_age == 0
    assert EngineConfig().max_age == "auto"
