"""The documentation is complete inside the repository: links resolve, nothing points outside it.

A user who clones the repository has the README and ``docs/`` only: every relative link
must reach a file of the repository (and a heading, when it names one), every document must
be reachable from the index, and no text may send the reader to files the repository does
not ship.
"""

import re
from pathlib import Path

import pytest

import earlyexit_kernels as eek

REPOSITORY = Path(__file__).resolve().parents[1]
DOCS = REPOSITORY / "docs"
DOCUMENTS = [REPOSITORY / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
#: the names of the pages an index must list
EXPECTED_PAGES = {
    "index.md",
    "usage.md",
    "exit_methods.md",
    "api.md",
    "serving.md",
    "training.md",
    "architecture.md",
    "extending.md",
    "benchmarks.md",
    "development.md",
}


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    found, in_code = set(), False
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^#{1,6} (.+)$", line)):
            found.add(slug(match.group(1)))
    return found


def links(document: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    return [a or b for a, b in LINK.findall(text)]


def test_slug_follows_github():
    assert slug("Many sequences: `eek.classify` and the continuous engine") == (
        "many-sequences-eekclassify-and-the-continuous-engine"
    )
    assert slug("Batch size 1") == "batch-size-1"


def test_the_docs_folder_has_every_page():
    assert {p.name for p in DOCS.glob("*.md")} == EXPECTED_PAGES


#: a link to lines of a file: ``#L12`` or ``#L12-L20`` (GitHub's; ``?plain=1`` shows a Markdown file's source)
LINE_ANCHOR = re.compile(r"L(\d+)(?:-L(\d+))?")


def _line_anchor_resolves(path: Path, anchor: str) -> bool:
    first, last = LINE_ANCHOR.fullmatch(anchor).groups()
    return 1 <= int(first) <= int(last or first) <= len(path.read_text().splitlines())


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_relative_links_resolve(document):
    broken = []
    for target in links(document):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: outside the repository by intent
        path, _, anchor = target.partition("#")
        path = path.removesuffix("?plain=1")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists() or REPOSITORY not in (resolved, *resolved.parents):
            broken.append(target)
        elif anchor and LINE_ANCHOR.fullmatch(anchor):
            if not _line_anchor_resolves(resolved, anchor):
                broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{document.name}: links that do not resolve: {broken}"


def test_every_page_is_reachable_from_the_readme():
    readme_targets = {(REPOSITORY / t.partition("#")[0]).resolve() for t in links(REPOSITORY / "README.md")}
    assert (DOCS / "index.md").resolve() in readme_targets
    index_targets = {(DOCS / t.partition("#")[0]).resolve() for t in links(DOCS / "index.md")}
    missing = sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.resolve() not in index_targets)
    assert not missing, f"docs/index.md does not link {missing}"


def _shipped_text_files():
    for folder, patterns in (
        (REPOSITORY, ("README.md", "Makefile", "setup.py", "pyproject.toml")),
        (DOCS, ("*.md",)),
        (REPOSITORY / "earlyexit_kernels", ("**/*.py",)),
        (REPOSITORY / "csrc", ("**/*.h", "**/*.cpp", "**/*.cu")),
        (REPOSITORY / "scripts", ("*",)),
        (REPOSITORY / "benchmarks", ("**/*.py", "*.md", "results/**/*.md")),
    ):
        for pattern in patterns:
            yield from (p for p in folder.glob(pattern) if p.is_file())


def test_nothing_points_outside_the_repository():
    """The package was specified in files outside it; what ships must not send users there."""
    outside = re.compile(r"shared/spec|\.\./shared|EXIT_METHODS\.md|API\.md")
    offenders = [
        str(p.relative_to(REPOSITORY)) for p in _shipped_text_files() if outside.search(p.read_text(errors="replace"))
    ]
    assert not offenders


def test_no_command_a_user_copies_takes_the_development_machine_s_lock():
    """The project's machines serialise their timings with ``flock /tmp/eek-cpu.lock``; a reader has no such lock."""
    offenders = [str(p.relative_to(REPOSITORY)) for p in DOCUMENTS if "/tmp/eek-cpu.lock" in p.read_text()]
    assert not offenders, f"these documents quote the development machine's lock file: {offenders}"


def test_the_api_page_names_every_public_name():
    text = (DOCS / "api.md").read_text()
    missing = [name for name in eek.__all__ if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"docs/api.md does not describe {missing}"


def test_the_ray_data_section_imports_what_earlyexit_kernels_ray_exports():
    """The section's import line is the module's ``__all__``, and every public name of the
    implementation it mentions can be imported from the public module."""
    import earlyexit_kernels.integrations.ray_data as implementation
    import earlyexit_kernels.ray as public

    section = (DOCS / "api.md").read_text().split("\n## Ray Data\n")[1].split("\n## ")[0]
    imported = re.search(r"from earlyexit_kernels\.ray import (.+)", section).group(1)
    assert {name.strip() for name in imported.split(",")} == set(public.__all__)
    mentioned = {name for name in implementation.__all__ if re.search(rf"\b{name}\b", section)}
    assert mentioned <= set(public.__all__), f"earlyexit_kernels.ray does not export {mentioned - set(public.__all__)}"


@pytest.mark.parametrize("document", ["README.md", "docs/usage.md"])
def test_the_supported_models_tables_list_every_supported_class(document):
    """A user decides from these tables whether their model is supported; none may be left out."""
    text = (REPOSITORY / document).read_text()
    missing = [cls.__name__ for cls in eek.SUPPORTED_MODELS if f"`{cls.__name__}`" not in text]
    assert not missing, f"{document}'s supported-models table lacks {missing}"


def test_every_committed_benchmark_result_says_which_cpu_it_came_from():
    """docs/development.md lists every file under benchmarks/results/ (itself or its folder)."""
    section = (DOCS / "development.md").read_text().split("## Which CPU each committed result came from")[1]
    listed = set(re.findall(r"`([^`]+)`", section))
    results = REPOSITORY / "benchmarks" / "results"
    missing = []
    misplaced = []
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        relative = path.relative_to(results).as_posix()
        parts = relative.split("/")
        if len(parts) < 2 or parts[0] not in RESULT_FOLDERS:
            misplaced.append(relative)
        if relative not in listed and f"{'/'.join(parts[:2])}/" not in listed:
            missing.append(relative)
    assert not misplaced, f"a result sits in the folder of the device that measured it ({RESULT_FOLDERS}): {misplaced}"
    assert not missing, f"docs/development.md does not say which CPU these came from: {missing}"


#: the folders of benchmarks/results/: one per device (earlyexit_kernels.bench.results.device_folder), and two
#: for results whose CPU no note recorded and for those without timings
RESULT_FOLDERS = ("amd_epyc", "intel_xeon", "nvidia_h100_80gb_hbm3", "unknown_cpu", "any_device")


def test_a_device_s_results_folder_is_named_for_its_kind():
    from earlyexit_kernels.bench.results import device_folder

    assert device_folder("cpu", "AMD EPYC 7B13") == "amd_epyc"
    assert device_folder("cpu", "Intel(R) Xeon(R) Processor @ 2.60GHz") == "intel_xeon"
    assert device_folder("cuda", "NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert device_folder("cuda", "NVIDIA H200") == "nvidia_h200"


def test_the_benchmarks_readme_lists_every_script():
    readme = (REPOSITORY / "benchmarks" / "README.md").read_text()
    scripts = sorted(
        p.relative_to(REPOSITORY / "benchmarks").as_posix() for p in (REPOSITORY / "benchmarks").glob("*/*.py")
    )
    assert scripts, "no script found under benchmarks/<kind>/"
    missing = [name for name in scripts if f"`{name}`" not in readme]
    assert not missing, f"benchmarks/README.md's table lacks {missing}: add a row saying what each measures"
