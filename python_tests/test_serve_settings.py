"""A server's settings, made once: ``ServeSettings`` groups the engine's limits, the HTTP limits and the audit,
checks each where it is made, and reads an ``eek fit`` folder once for what the folder decides (the audit's
budget and confidence where none is given, what ``/info`` says the threshold promises)."""

import gc

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")

from test_recertify_serving import certified_folder  # noqa: E402

from earlyexit_kernels.engine.stream.engine_config import EngineConfig  # noqa: E402
from earlyexit_kernels.integrations.recertify_choice import Recertify  # noqa: E402
from earlyexit_kernels.integrations.server.serve_settings import AuditConfig, HttpLimits, ServeSettings  # noqa: E402


def test_create_app_s_options_land_in_their_groups():
    settings = ServeSettings.from_options(
        model_id="m", max_batch_size=8, max_queue=32, api_key="k", audit_fraction=0.5, audit_budget=0.02
    )
    assert settings.engine == EngineConfig(max_batch_size=8, admission="fifo", max_age=0)  # a server: oldest first
    assert settings.http == HttpLimits(max_queue=32, max_client_batch_size=32, api_key="k")
    assert settings.audit == AuditConfig(0.5, budget=0.02)
    assert settings.model_id == "m"
    assert ServeSettings.from_options().audit is None  # no fraction, no audit


def test_a_setting_out_of_bounds_or_unknown_is_refused_when_made():
    with pytest.raises(ValueError, match="max_queue must be an integer >= 1"):
        ServeSettings.from_options(max_queue=0)
    with pytest.raises(ValueError, match="max_client_batch_size must be an integer >= 1"):
        ServeSettings.from_options(max_client_batch_size=0)
    with pytest.raises(ValueError, match="the audit budget must be a fraction"):
        ServeSettings.from_options(audit_fraction=0.1, audit_budget=1.5)
    with pytest.raises(ValueError, match="the audit confidence must be a probability"):
        ServeSettings.from_options(audit_fraction=0.1, audit_confidence=1.0)
    with pytest.raises(ValueError, match="re-certification reads the audit"):
        ServeSettings.from_options(recertify=True)
    with pytest.raises(ValueError, match="recertify must be an OnlineCertificate, None, True or False"):
        ServeSettings.from_options(recertify="yes")
    # None, True and False are held as the Recertify of that value, one type whichever way it came
    assert ServeSettings.from_options().recertify is Recertify.AUTO
    assert ServeSettings.from_options(recertify=False).recertify is Recertify.OFF
    assert ServeSettings.from_options(audit_fraction=0.5, recertify=True).recertify is Recertify.ON
    assert ServeSettings.from_options(audit_fraction=0.5, recertify=Recertify.ON).recertify is Recertify.ON
    with pytest.raises(ValueError, match="the audit record holds what re-certification replays"):
        ServeSettings.from_options(audit_fraction=0.5, audit_record="r.pt")  # no folder, no re-certification
    with pytest.raises(TypeError, match="unknown server option.*max_batch"):
        ServeSettings.from_options(max_batch=8)
    with pytest.raises(ValueError, match="admission='fifo'"):
        ServeSettings(engine=EngineConfig(admission="length"))


def test_a_folder_gives_the_audit_what_the_user_did_not(saved_classifier, tmp_path):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=1)  # disagreement <= 10% at 90%
    settings = ServeSettings.from_folder(folder, audit_fraction=0.2)
    assert (settings.audit.budget, settings.audit.confidence) == (0.1, 0.9)
    assert settings.audit.source.startswith("from the certificate of")
    assert settings.certificate["budget"] == 0.1  # what /info says the served threshold promises

    given = ServeSettings.from_folder(folder, audit_fraction=0.2, audit_budget=0.05)
    assert (given.audit.budget, given.audit.confidence) == (0.05, 0.9)
    assert given.audit.source.startswith("budget as given")


def test_a_threshold_of_the_user_s_own_holds_no_certificate(saved_classifier, tmp_path):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=1)
    assert ServeSettings.from_folder(folder, policy="Entropy(0.5)").certificate is None


def test_a_certificate_made_at_start_up_replaces_the_saved_one(saved_classifier, tmp_path):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=1)
    made = {"budget": 0.03, "confidence": 0.95, "risk": "disagreement", "rows": 400, "target": "agreement"}
    settings = ServeSettings.from_folder(folder, certificate=made, where="--calibration rows.csv", audit_fraction=0.2)
    assert settings.certificate is made
    assert (settings.audit.budget, settings.audit.confidence) == (0.03, 0.95)
    assert "--calibration rows.csv" in settings.audit.source


def test_a_folder_certified_on_accuracy_lost_watches_labels_not_disagreement(saved_classifier, tmp_path):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=1, target_risk="accuracy")
    settings = ServeSettings.from_folder(folder, audit_fraction=0.2)
    assert settings.audit.budget is None and settings.audit.accuracy_budget == 0.1
    assert settings.audit.source.startswith("no disagreement budget")


def test_a_threshold_of_the_user_s_own_is_not_re_certified(saved_classifier, tmp_path):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=1)
    assert ServeSettings.from_folder(folder, policy="Entropy(0.5)", audit_fraction=0.5).recertify is Recertify.OFF
    made = {"budget": 0.03, "confidence": 0.95, "risk": "disagreement", "rows": 400, "target": "agreement"}
    assert ServeSettings.from_folder(folder, certificate=made, audit_fraction=0.5).recertify is Recertify.OFF
    with pytest.raises(ValueError, match="moves the folder's certified threshold"):
        ServeSettings.from_folder(folder, policy="Entropy(0.5)", audit_fraction=0.5, recertify=True)


def test_the_serving_state_builds_the_online_certificate_from_the_folder(saved_classifier, tmp_path):
    import earlyexit_kernels as eek
    from earlyexit_kernels.integrations.server import create_app
    from earlyexit_kernels.integrations.server.serving_state import ServingState

    folder = certified_folder(saved_classifier, tmp_path / "folder", start=1)  # bounds disagreement: on by default
    model = eek.from_pretrained(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    state = ServingState(model, tokenizer, ServeSettings.from_folder(folder, audit_fraction=0.5))
    assert state.certificate is not None and state.recertify_said.startswith("on: from")
    off = ServingState(model, tokenizer, ServeSettings.from_folder(folder, audit_fraction=0.5, recertify=False))
    assert off.certificate is None and off.recertify_said == "off (--no-recertify)"
    no_audit = ServingState(model, tokenizer, ServeSettings.from_folder(folder))
    assert no_audit.certificate is None and no_audit.recertify_said.startswith("off: no audit runs")
    accuracy = certified_folder(saved_classifier, tmp_path / "accuracy", start=1, target_risk="accuracy")
    record = ServeSettings.from_folder(accuracy, audit_fraction=0.5, audit_record=str(tmp_path / "r.pt"))
    with pytest.raises(
        ValueError, match=r"the audit record \(--audit-record\) holds .*, and it is off: its certificate"
    ):
        create_app(model, tokenizer, record)  # off by default on such a folder: nothing to record


def test_eek_serve_says_its_audit_and_re_certification_once_and_serves_them(
    saved_classifier, tmp_path, monkeypatch, capsys
):
    """The command line makes its settings from the folder (the audit's line before the model loads) and the
    serving state decides re-certification on the model served (its line once the app is made)."""
    import uvicorn

    from earlyexit_kernels.integrations.cli import main

    folder = certified_folder(saved_classifier, tmp_path / "folder", start=1)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app))
    assert main(["serve", folder, "--audit-fraction", "0.5", "--memory-trim", "off"]) == 0
    err = capsys.readouterr().err
    assert "audit: 0.5 of the sequences also run by the full model; budget 10%, confidence 90% (from the" in err
    assert err.index("audit: 0.5") < err.index("re-certification: on: from")
    state = served["app"].state.eek
    assert state.certificate is not None and state.settings.folder == folder
    assert state.info()["certificate"]["budget"] == 0.1
    # the app asks its start-up to freeze the heap (a process that only serves); never made, nothing is frozen
    assert served["app"].state.freeze_heap is True and gc.get_freeze_count() == 0

    assert main(["serve", folder, "--audit-fraction", "0.5", "--memory-trim", "off", "--policy", "Entropy(0.5)"]) == 0
    assert "re-certification: off (--no-recertify)" in capsys.readouterr().err
    assert served["app"].state.eek.certificate is None and served["app"].state.eek.info()["certificate"] is None
