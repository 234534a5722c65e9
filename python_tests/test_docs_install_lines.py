"""Every install line a user reads works from a checkout of the repository.

The package is not on a package index: ``pip install 'earlyexit_kernels[serve]'`` fails. The
documents install an extra from the repository (``pip install --no-build-isolation '.[serve]'``)
or its packages by name; the error messages name the packages
(:mod:`earlyexit_kernels.integrations.extras`), which must be the extras of pyproject.toml.
"""

import re
from pathlib import Path

import pytest

from earlyexit_kernels.integrations.extras import EXTRAS, install_line

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

REPOSITORY = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
#: where a user or a test reads an install line: the documents, the package's messages, the tests' skip reasons
TEXTS = [
    *DOCUMENTS,
    *sorted((REPOSITORY / "earlyexit_kernels").rglob("*.py")),
    *sorted(Path(__file__).parent.glob("*.py")),
]
PYPROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
PYPROJECT_EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def _relative(path: Path) -> str:
    return str(path.relative_to(REPOSITORY))


def test_nothing_installs_the_package_by_name_from_an_index():
    by_name = re.compile(r"pip install[^\n`]*earlyexit_kernels\[")
    offenders = [_relative(p) for p in TEXTS if p != Path(__file__) and by_name.search(p.read_text())]
    assert not offenders, f"'pip install earlyexit_kernels[...]' cannot work from a checkout: {offenders}"


def test_every_extra_installed_from_the_repository_is_one_of_pyproject():
    named = {
        (_relative(p), extra)
        for p in DOCUMENTS
        for group in re.findall(r"pip install [^\n`]*'\.\[([^\]]+)\]'", p.read_text())
        for extra in group.split(",")
    }
    assert named, "the documents install no extra from the repository"
    unknown = sorted((document, extra) for document, extra in named if extra not in PYPROJECT_EXTRAS)
    assert not unknown, f"extras pyproject.toml does not define: {unknown}"


def test_the_messages_extras_are_pyproject_s():
    assert {extra: list(requirements) for extra, requirements in EXTRAS.items()} == {
        extra: PYPROJECT_EXTRAS[extra] for extra in EXTRAS
    }


def test_an_install_line_installs_the_extra_s_packages_quoted_for_a_shell():
    assert install_line("cli") == "pip install pyarrow pandas"
    assert install_line("ray") == "pip install 'ray[data]>=2.40' pandas pyarrow"


def test_the_install_section_names_every_extra_and_where_eek_lands():
    section = (REPOSITORY / "docs" / "development.md").read_text().split("## Install from source")[1].split("\n## ")[0]
    missing = [extra for extra in PYPROJECT_EXTRAS if f"`{extra}`" not in section]
    assert not missing, f"docs/development.md's install step does not say what these extras are for: {missing}"
    assert ".venv/bin/eek" in section


def test_the_quick_start_says_where_each_console_script_is():
    quick_start = (REPOSITORY / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    missing = [name for name in PYPROJECT["project"]["scripts"] if f"`.venv/bin/{name}`" not in quick_start]
    assert not missing, f"the README's Quick start does not say where {missing} is after make"
