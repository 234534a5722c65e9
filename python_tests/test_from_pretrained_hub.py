"""``eek.from_pretrained``: a plain Hugging Face folder in one call, a Hub id through the Hugging Face cache, and
``eek.policy_of`` / ``eek.backend_of`` on what it returns. No network: the Hub cache is built in ``tmp_path``."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_batch, tiny_model
from model_comparison import assert_same_function

import earlyexit_kernels as eek

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(hub_cache, repo_id, model):
    """Save ``model`` where the Hugging Face cache keeps ``repo_id`` at ``main`` (``models--org--name``)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def test_a_plain_checkpoint_is_patched_in_one_call(tmp_path):
    plain = tiny_model("bert")
    plain.save_pretrained(tmp_path / "plain")
    model = eek.from_pretrained(tmp_path / "plain", eek.Entropy(0.3), backend="torch", attn_implementation="eager")
    assert eek.is_patched(model) and not model.training
    assert eek.policy_of(model) == eek.Entropy(0.3) and eek.backend_of(model) == "torch"
    ids, mask, _ = tiny_batch(4, 9)
    with torch.no_grad():
        full = plain(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    # the last layer is the model's own classifier on the plain model's weights: its function, to
    # rounding (two model objects; model_comparison.py)
    weights = model.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(weights[name], value), name
    assert_same_function(out.all_logits[-1], full)
    with pytest.raises(ValueError, match="pass the policy"):
        eek.from_pretrained(tmp_path / "plain")


def test_policy_of_and_backend_of_follow_patch_and_unpatch():
    model = eek.patch(tiny_model("bert"), eek.Patience(2), backend="torch")
    assert eek.policy_of(model) == eek.Patience(2) and eek.backend_of(model) == "torch"
    eek.patch(model, eek.Entropy(0.5))
    assert eek.policy_of(model) == eek.Entropy(0.5) and eek.backend_of(model) == "auto"
    eek.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        eek.policy_of(model)
    with pytest.raises(ValueError, match="not patched"):
        eek.backend_of(model)


def test_a_hub_id_in_the_cache_keeps_its_heads_and_policy(tmp_path):
    """With ``cache_dir`` and ``local_files_only`` (in process) the exit files come from the cached snapshot."""
    model = eek.patch(tiny_model("bert"), eek.Voting(2), backend="torch")
    with torch.no_grad():
        for p in model.early_exit_heads.parameters():
            p.add_(0.1)  # heads that differ from fresh ones
    snapshot = _cache_repo(tmp_path, "org/eek-model", model)
    assert (snapshot / "early_exit_config.json").is_file()
    loaded = eek.from_pretrained("org/eek-model", cache_dir=str(tmp_path), local_files_only=True)
    assert eek.policy_of(loaded) == eek.Voting(2) and eek.backend_of(loaded) == "torch"
    for (name, a), (_, b) in zip(
        model.early_exit_heads.state_dict().items(), loaded.early_exit_heads.state_dict().items()
    ):
        assert torch.equal(a, b), name


SCRIPT = """
import json, sys
import earlyexit_kernels as eek
model = eek.from_pretrained("org/eek-model")
plain = eek.from_pretrained("org/plain", eek.Entropy(0.25))
try:
    eek.from_pretrained("org/plain")
    refused = None
except ValueError as error:
    refused = str(error)
weight = model.early_exit_heads.classifiers[0].weight.sum().item()
print(json.dumps({"policy": repr(eek.policy_of(model)), "plain": repr(eek.policy_of(plain)), "refused": refused,
                  "weight": weight}))
"""


def test_a_hub_id_offline_through_hf_home(tmp_path):
    """``HF_HOME`` and ``HF_HUB_OFFLINE=1`` as a user sets them (read when huggingface_hub is imported: a subprocess)."""
    model = eek.patch(tiny_model("bert"), eek.QExit(q=0.4), backend="torch")
    with torch.no_grad():
        model.early_exit_heads.classifiers[0].weight.add_(0.5)
    _cache_repo(tmp_path / "hub", "org/eek-model", model)
    _cache_repo(tmp_path / "hub", "org/plain", tiny_model("bert"))
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["policy"] == "QExit(q=0.4)"  # the saved policy, not a fresh patch
    assert answer["weight"] == pytest.approx(model.early_exit_heads.classifiers[0].weight.sum().item(), abs=1e-5)
    assert answer["plain"] == "Entropy(0.25)"
    assert "pass the policy" in answer["refused"]
