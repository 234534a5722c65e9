"""A patched model and its tokenizer from a folder, as the command line, the server and Ray load them.

The folder is a ``save_pretrained`` folder of a patched model (policy and heads
included) or a plain Hugging Face classifier with a policy given as text
(``"Entropy(0.3)"``), or a Hugging Face Hub id found in the Hub's local cache
(:func:`resolve_model`); the tokenizer is read from the same folder. Whatever is wrong
with it is a :class:`ModelFolderError` whose message says what to change.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.patching.fit_record import FILE as FIT_FILE
from earlyexit_kernels.patching.fit_record import SAVED, FitRecord  # SAVED: audit_settings' default

__all__ = [
    "ModelFolderError",
    "accuracy_audit_budget",
    "audit_settings",
    "fit_certificate",
    "load_classifier",
    "load_model",
    "resolve_model",
    "usable_certificate",
]


class ModelFolderError(ValueError):
    """The model folder cannot be used; the message says what to change."""


def _looks_like_hub_id(path: str) -> bool:
    """``name`` or ``org/name`` in the Hub's characters (not a path: no ``./``, ``~``, ``..``, backslash)."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", path)) and ".." not in path


def resolve_model(path: str) -> str:
    """The local folder of MODEL: ``path`` itself where it is a folder, else the snapshot of the Hugging Face
    Hub id ``path`` in the Hub's local cache (``HF_HOME``, ``HF_HUB_CACHE``), as ``pipeline``, TEI and
    Infinity find a model; fetched from the Hub where it is not cached and ``HF_HUB_OFFLINE`` is not set."""
    if Path(path).is_dir():
        return str(path)
    if not _looks_like_hub_id(str(path)):
        raise ModelFolderError(f"MODEL {path} is not a folder; give one written by save_pretrained, or a Hub id")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    except ImportError:
        raise ModelFolderError(
            f"MODEL {path} is not a folder (and huggingface_hub, to read a Hub id, is missing)"
        ) from None
    try:
        return snapshot_download(str(path), local_files_only=True)
    except Exception as cached_error:  # noqa: BLE001 - not in the cache: say where it was looked for
        if HF_HUB_OFFLINE:
            raise ModelFolderError(
                f"MODEL {path} is neither a folder nor a Hub id in the Hugging Face cache ({HF_HUB_CACHE}), and "
                f"HF_HUB_OFFLINE is set: download it first (huggingface-cli download {path}) or give a folder"
            ) from None
        try:
            return snapshot_download(str(path))
        except Exception as error:  # noqa: BLE001 - any failure to fetch is the user's to fix
            raise ModelFolderError(
                f"MODEL {path} is neither a folder nor a Hub id in the Hugging Face cache ({HF_HUB_CACHE}), and "
                f"fetching it failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}; "
                f"cache: {type(cached_error).__name__})"
            ) from None


def load_model(
    path: str,
    policy_text: str | None = None,
    backend: str | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    certified_here: bool = False,
):
    """A patched model and its tokenizer from ``path``; ``ModelFolderError`` saying what is wrong otherwise.

    ``dtype`` / ``device``: the base it runs on (:func:`earlyexit_kernels.engine.layers.precision.to_base`;
    None: as saved, on the CPU). On another base than the folder's certificate's, one warning says how
    to certify it there, or, without ``dtype``, that the base certified on is not the one run; unless
    ``certified_here`` (the caller certifies it, as ``eek serve --calibration`` and ``eek calibrate``, or
    loads it for another use, as a reference) or ``policy_text`` is given (the folder's certificate does not
    cover another policy on any base)."""
    from transformers import AutoTokenizer

    from earlyexit_kernels.methods.policy_spec import parse_policy
    from earlyexit_kernels.models import SUPPORTED_MODELS
    from earlyexit_kernels.patching.exit_files import CONFIG_FILE
    from earlyexit_kernels.patching.loading import from_pretrained

    folder = Path(resolve_model(path))
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"MODEL {path} has no config.json: it is not a Hugging Face model folder")
    try:
        policy = parse_policy(policy_text) if policy_text is not None else None
    except ValueError as error:
        raise ModelFolderError(f"--policy: {error}") from None
    architectures = _architectures(folder / "config.json")
    if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ModelFolderError(
            f"MODEL {path} holds a {', '.join(architectures)}, not a sequence classifier; give a "
            f"*ForSequenceClassification model of a supported family (eek.SUPPORTED_MODELS: "
            f"{', '.join(SUPPORTED_MODELS.families().values())})"
        )
    if policy is None and not (folder / CONFIG_FILE).is_file():
        raise ModelFolderError(
            f"MODEL {path} is a plain Hugging Face model: pass --policy, e.g. --policy 'Entropy(0.3)'"
        )
    try:
        model = from_pretrained(str(folder), policy, backend=backend)
    except TypeError as error:
        raise ModelFolderError(f"MODEL {path} is not a supported classifier: {error}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelFolderError(f"cannot load MODEL {path}: {error}") from None
    # Without tokenizer files, AutoTokenizer builds a tokenizer of special tokens only, silently.
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES) and not any(folder.glob("*.model")):
        raise ModelFolderError(
            f"MODEL {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            f"save the model's tokenizer there with tokenizer.save_pretrained({path!r})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise ModelFolderError(
            f"MODEL {path} has no usable tokenizer ({error}); save one there with tokenizer.save_pretrained"
        ) from None
    if len(tokenizer) > model.config.vocab_size:
        raise ModelFolderError(
            f"the tokenizer in MODEL {path} has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{model.config.vocab_size}: it is not this model's tokenizer"
        )
    if dtype is not None or device is not None:
        try:
            to_folder_base(folder, model, dtype, "cpu" if device is None else device)
        except ValueError as error:
            raise ModelFolderError(str(error)) from None
    if not certified_here and policy is None:
        _warn_uncertified_base(path, folder, dtype)
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def _architectures(config_path: Path) -> list[str]:
    import json

    try:
        architectures = json.loads(config_path.read_text()).get("architectures")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelFolderError(f"{config_path} is not a readable model configuration ({error})") from None
    return [name for name in architectures or () if isinstance(name, str)]


def to_folder_base(folder: str | Path, model, dtype: str | None, device):
    """:func:`earlyexit_kernels.engine.layers.precision.to_base` for ``folder``'s model: int8 with the recipe its
    int8 certificate holds for (:func:`int8_recipe_of`)."""
    from earlyexit_kernels.engine.layers.precision import runnable_int8_recipe, to_base

    recipe = int8_recipe_of(folder, model) if dtype == "int8" else "auto"
    if recipe != "auto":
        runs, why = runnable_int8_recipe(recipe)
        if why is not None:  # a server still starts, on the next runtime, and says why and what it costs
            warnings.warn(
                f"MODEL {folder}'s int8 certificate was made on the {recipe} recipe, whose runtime is missing here "
                f"({why}): it runs on {runs} instead, whose layers compute other values, which the certificate does "
                f"not cover. Install the missing runtime to run what was certified, or certify this form on a copy "
                f"of the folder: eek calibrate COPY ROWS --dtype int8",
                UserWarning,
                stacklevel=3,
            )
            recipe = runs
    # static int8 layers were set on the fit's training rows and saved in the folder: they run from there
    return to_base(model, dtype, device, int8_recipe=recipe, saved=folder)


#: the file of a folder certified on int8 that names the int8 recipe the certificate holds for
def int8_recipe_of(folder: str | Path, model) -> str:
    """The int8 recipe to run ``folder``'s model with: the one its int8 certificate recorded
    (``int8_recipe`` in ``eek_fit.json``, written by ``eek calibrate --dtype int8``); for a folder
    certified on int8 before recipes were recorded, the recipe every int8 base ran then; else
    ``"auto"`` (the family's)."""
    from earlyexit_kernels.engine.layers.precision import INT8_RECIPES, legacy_int8_recipe

    record = FitRecord.read(str(folder))
    recorded = None if record is None else record.int8_recipe
    if recorded in INT8_RECIPES:
        return recorded
    return legacy_int8_recipe(model) if certified_base(str(folder)) == "int8" else "auto"


def family_int8_recipe(folder: str | Path) -> str:
    """The int8 recipe ``to_base`` gives ``folder``'s family (:func:`earlyexit_kernels.engine.layers.precision.int8_recipe`),
    read from its config alone."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from earlyexit_kernels.engine.layers.precision import int8_recipe

    return int8_recipe(SimpleNamespace(config=AutoConfig.from_pretrained(str(folder))))


def certified_base(path: str) -> str | None:
    """The base the threshold in ``path/eek_fit.json`` was certified on: ``float32``, ``bfloat16`` or
    ``int8`` (what ``eek calibrate --dtype`` recorded; ``eek fit`` certifies on the saved float32
    model), or None where nothing is certified."""
    return _certified_base(FitRecord.read(path))


def _certified_base(record: FitRecord | None) -> str | None:
    if record is None or usable_certificate(record.certificate, record.target) is None:
        return None
    base = record.base
    return base if base in ("float32", "bfloat16", "int8") else "float32"  # "as saved": eek fit's float32


def _warn_uncertified_base(path: str, folder: Path, dtype: str | None) -> None:
    """One warning where ``dtype`` is another base than the one the folder's threshold was certified on:
    its layers then compute other values, which the certificate does not cover. On int8 the base is
    also the class of CPU it was certified on (:mod:`earlyexit_kernels.engine.layers.int8_isa`), where recorded."""
    record = FitRecord.read(str(folder))
    base = _certified_base(record)
    if base is None:
        return
    if dtype == base:
        if base == "int8":
            _warn_other_int8_isa(path, record.int8_isa)
        return
    if dtype is None:
        if base != "float32":  # as saved is float32: the weights a folder holds
            warnings.warn(
                f"MODEL {path}'s threshold was certified on the {base} base; without --dtype it runs as saved, on "
                f"float32, whose layers compute other values, which the certificate does not cover: give --dtype "
                f"{base} to run what was certified",
                UserWarning,
                stacklevel=3,
            )
        return
    warnings.warn(
        f"MODEL {path}'s threshold was certified on {base}; on {dtype} its layers compute other values, which "
        f"the certificate does not cover. Certify it on {dtype} first, on a copy of the folder: "
        f"eek calibrate COPY ROWS --dtype {dtype} (ROWS: the calibration rows, e.g. the validation split); "
        f"eek serve certifies at start-up, without changing the folder, when given --calibration ROWS",
        UserWarning,
        stacklevel=3,
    )


def _warn_other_int8_isa(path: str, certified_on: str | None) -> None:
    """One warning where the folder's int8 threshold was certified on another class of CPU than this one
    (``certified_on``; None: not recorded): its int8 GEMMs accumulate differently here."""
    here = int8_isa()
    if certified_on is None or here in (certified_on, "unknown"):
        return
    warnings.warn(
        f"MODEL {path}'s threshold was certified on int8 on a {certified_on} CPU; this one is {here}, whose int8 "
        f"kernels accumulate differently (with or without VNNI), so the certificate may not hold here. Certify it "
        f"on this machine first, on a copy of the folder: eek calibrate COPY ROWS --dtype int8 (ROWS: the "
        f"calibration rows); eek serve certifies at start-up, without changing the folder, when given --calibration ROWS",
        UserWarning,
        stacklevel=4,
    )


def fit_certificate(path: str) -> dict | None:
    """The certificate ``eek fit`` saved in ``path/eek_fit.json`` (``budget``, a fraction, ``confidence``,
    ``risk``, ``rows``, ``bound``, ``certified``, ..., with the fit's ``target``), or None: no such file,
    a fit that did not certify (``confidence`` null), or one whose risk is not counted per row."""
    record = FitRecord.read(path)
    return None if record is None else usable_certificate(record.certificate, record.target)


def usable_certificate(certificate, target) -> dict | None:
    """``certificate`` (a certificate's fields) with ``target``, or None where it certifies nothing the
    audit can watch: not a dict, not counted per row, or without a numeric budget and confidence."""
    if not isinstance(certificate, dict) or certificate.get("unit", "rows") != "rows":
        return None
    budget, confidence = certificate.get("budget"), certificate.get("confidence")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (budget, confidence)):
        return None
    return {**certificate, "target": target}


def accuracy_audit_budget(path: str, *, certificate: dict | None | str = SAVED) -> float | None:
    """The accuracy lost (a fraction) that ``path/eek_fit.json``'s certificate (or ``certificate``, as
    :func:`audit_settings` takes it) bounds, what labelled audited inputs are watched against; None
    where it certifies disagreement, or there is none."""
    if certificate == SAVED:
        certificate = fit_certificate(path)
    elif certificate is not None:
        certificate = usable_certificate(certificate, certificate.get("target"))
    if certificate is None or certificate.get("target") != "accuracy":
        return None
    return float(certificate["budget"])


def audit_settings(
    path: str,
    budget: float | None = None,
    confidence: float | None = None,
    *,
    certificate: dict | None | str = SAVED,
    where: str | None = None,
) -> tuple[float | None, float, str]:
    """The audit watch's budget (a fraction, or None), confidence and where they come from, for the model
    folder ``path``: each as given, else the certificate of ``path/eek_fit.json``, else no budget and 0.95.
    ``certificate`` (with ``where``, what made it): another certificate than the saved one, in
    :func:`fit_certificate`'s shape (e.g. the one ``eek serve --calibration`` made at start-up).

    The audit counts disagreement with the full model (it has no labels). A certificate on accuracy
    lost bounds something else: disagreements that cancel (the exit right where the full model is
    wrong, and the reverse) cost no accuracy, so a served disagreement over that budget is no sign of
    a shift (the demo's folder, audited on its own test split, warned so at -0.12 points lost). Such a
    certificate gives no budget here; the audit reports the disagreement and its bound, and says why."""
    if certificate == SAVED:
        certificate, where = fit_certificate(path), str(Path(path) / FIT_FILE)
    elif certificate is not None:
        certificate = usable_certificate(certificate, certificate.get("target"))
    if certificate is None:
        source = "as given" if budget is not None else "no budget: none given and no certificate in eek_fit.json"
        return budget, 0.95 if confidence is None else confidence, source
    if certificate.get("target") == "accuracy" and budget is None:
        source = (
            f"no disagreement budget: {where} certifies accuracy lost (<= {100 * certificate['budget']:g} "
            "points), which disagreement with the full model does not measure (disagreements that cancel cost no "
            "accuracy); eek serve watches the accuracy lost against it on the audited inputs whose labels are sent "
            "to POST /feedback; give --audit-budget to watch disagreement against a budget of your own"
        )
        return None, float(certificate["confidence"]) if confidence is None else confidence, source
    kind = "accuracy lost" if certificate.get("target") == "accuracy" else "disagreement"
    source = (
        f"the certificate of {where}: {kind} <= {100 * certificate['budget']:g}% with "
        f"confidence {100 * certificate['confidence']:g}%"
    )
    if budget is not None and confidence is not None:
        return budget, confidence, "as given"
    if budget is None and confidence is None:
        return float(certificate["budget"]), float(certificate["confidence"]), f"from {source}"
    if budget is None:
        return float(certificate["budget"]), confidence, f"budget from {source}; confidence as given"
    return budget, float(certificate["confidence"]), f"budget as given; confidence from {source}"


def load_classifier(path: str):
    """A fine-tuned classifier and its tokenizer from ``path`` (patched or not): checked, in eval mode."""
    from earlyexit_kernels.training.fit_texts import FitError

    model, tokenizer = load_model(path, "Entropy(0.0)")
    if model.config.num_labels < 2:
        raise FitError(
            f"MODEL {path} is a regression head (num_labels == 1): eek fit calibrates on accuracy and needs a "
            f"classifier (num_labels >= 2)"
        )
    return model.eval(), tokenizer
