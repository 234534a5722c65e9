"""Every list of supported families a user reads is the package's: ``eek.SUPPORTED_MODELS`` and its adapters.

The families and their names come from ``SUPPORTED_MODELS.families()``; what a family accepts
from its adapter: the attention implementations it runs (``attention_implementations``), whether
the continuous engine can compile its layer calls (``layer_call_is_module_call``), whether its
head is the one the fused kernels compute (``TanhPoolerHead``) and whether its layers split into
the token-wise parts packed calls need. A list in the documents or an error message that leaves
a family out, or names one that does not belong, fails here.
"""

import re
from pathlib import Path

import pytest
from test_model_families import FAMILIES, tiny_family

import earlyexit_kernels as eek
from earlyexit_kernels.engine.layers.packed_layer import splits_into_token_parts
from earlyexit_kernels.integrations.model_folder import ModelFolderError, load_model
from earlyexit_kernels.models import TanhPoolerHead
from earlyexit_kernels.patching.patch import current_adapter

REPOSITORY = Path(__file__).resolve().parents[1]
FAMILY_OF = eek.SUPPORTED_MODELS.families()  # class name -> family name
ADAPTER_OF = {cls.__name__: eek.SUPPORTED_MODELS[cls] for cls in eek.SUPPORTED_MODELS}

EVERY_FAMILY = set(FAMILY_OF.values())
EAGER_ONLY = {
    FAMILY_OF[name] for name, adapter in ADAPTER_OF.items() if "sdpa" not in adapter.attention_implementations
}
COMPILE_REFUSED = {FAMILY_OF[name] for name, adapter in ADAPTER_OF.items() if not adapter.layer_call_is_module_call}
FUSED_HEAD = {FAMILY_OF[name] for name, adapter in ADAPTER_OF.items() if issubclass(adapter, TanhPoolerHead)}


def _packed_refused() -> set[str]:
    """The families whose layers the continuous engine cannot pack (``packed=True`` refused), from a tiny model each."""
    refused = set()
    for family in FAMILIES:
        model = eek.patch(tiny_family(family), eek.Entropy(0.3), backend="torch")
        adapter = current_adapter(model)
        packable = adapter.layer_call_is_module_call and all(
            splits_into_token_parts(adapter.layer_module(i)) for i in range(adapter.num_layers)
        )
        if not packable:
            refused.add(FAMILY_OF[type(model).__name__])
    return refused


def named_families(text: str) -> set[str]:
    """The supported families ``text`` names ("RoBERTa" is not named by "XLM-RoBERTa" nor "RoBERTa-likes")."""
    return {family for family in EVERY_FAMILY if re.search(rf"(?<![\w-]){re.escape(family)}(?![\w-])", text)}


def _read(document: str) -> str:
    return (REPOSITORY / document).read_text()


def _one(pattern: str, document: str) -> str:
    found = re.findall(pattern, _read(document), flags=re.S | re.M)
    assert len(found) == 1, f"{document}: the list this test reads ({pattern!r}) is not there once; update the test"
    return found[0]


def test_family_names_are_one_per_class_and_the_tests_build_every_class():
    assert len(EVERY_FAMILY) == len(FAMILY_OF)
    assert {type(tiny_family(family)).__name__ for family in FAMILIES} == set(FAMILY_OF)


#: (document, a pattern whose group is a list of families, the families it must name)
FAMILY_LISTS = [
    ("README.md", r"^Batched early-exit inference for BERT-like encoders \(([^)]+)\)", EVERY_FAMILY),
    ("docs/api.md", r"except ([A-Za-z0-9, -]+) \(`\"eager\"` only", EAGER_ONLY),
    ("docs/usage.md", r"\. ([A-Za-z0-9, -]+) layers take more than `\(hidden, mask\)`", COMPILE_REFUSED),
    ("docs/usage.md", r"\(([A-Za-z0-9, -]+) refuse it:\s+their layers take more than", COMPILE_REFUSED),
]


@pytest.mark.parametrize(
    ("document", "pattern", "expected"), FAMILY_LISTS, ids=[f"{d}-{i}" for i, (d, *_) in enumerate(FAMILY_LISTS)]
)
def test_a_list_of_families_in_the_documents_is_the_package_s(document, pattern, expected):
    assert named_families(_one(pattern, document)) == expected


def test_the_families_that_refuse_packed_calls_are_those_serving_md_names():
    listed = _one(r"on a family whose layers do not\s+split so \(([^)]+)\)", "docs/serving.md")
    assert named_families(listed) == _packed_refused()


def test_the_api_page_lists_every_supported_class():
    listed = _one(r"Supported classes \(subclasses too\)(.+?)Attention:", "docs/api.md")
    assert set(re.findall(r"`(\w+ForSequenceClassification)`", listed)) == set(FAMILY_OF)


def _table_rows(document: str) -> dict[str, dict[str, str]]:
    """Class name -> {column header: cell} for the supported-models table of ``document`` (one row may hold several classes)."""
    lines = _read(document).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| family |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for class_name in re.findall(r"`(\w+ForSequenceClassification)`", line):
            rows[class_name] = cells
    return rows


@pytest.mark.parametrize("document", ["README.md", "docs/usage.md"])
def test_the_supported_models_tables_say_what_each_adapter_accepts(document):
    rows = _table_rows(document)
    assert set(rows) == set(FAMILY_OF)
    for class_name, cells in rows.items():
        family = FAMILY_OF[class_name]
        assert ("sdpa" not in cells["attention accepted"]) == (family in EAGER_ONLY), (document, family)
        fused = next(cell for header, cell in cells.items() if header.startswith(("exit heads", "head fused")))
        assert fused.startswith(("fused", "yes")) == (family in FUSED_HEAD), (document, family)
        if "not supported" in cells:
            assert ("compile=True" in cells["not supported"]) == (family in COMPILE_REFUSED), (document, family)


def test_the_error_for_a_folder_that_is_not_a_classifier_names_every_family(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(ModelFolderError) as error:
        load_model(str(tmp_path), "Entropy(0.3)")
    assert named_families(str(error.value)) == EVERY_FAMILY
