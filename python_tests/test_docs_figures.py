"""The README's figures are the committed files' figures, and each names the machine that measured it.

A figure links the committed file and lines it comes from (``[2.89 mean layers](FILE#L30-L33)``,
``?plain=1`` before the anchor for a Markdown file): every number in the link's text is on
those lines, as written or as a number there rounded to the figure's decimals (1.12 for
1.118). Where the figure sits in a generated section of docs/benchmarks.md, this is the check
that the README still quotes what the generator wrote. When a file moves on, the failure says
on which lines each figure is now.

Every decimal figure of the README's "Use" and "Measured" sections is inside such a link, and a
paragraph of "Measured" that links a result file under ``benchmarks/results/`` names the CPU
docs/development.md records for that file.
"""

import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
README = (REPOSITORY / "README.md").read_text()
FIGURE_LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s?]+)(?:\?plain=1)?#L(\d+)(?:-L(\d+))?\)")
NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
CPUS = {"AMD EPYC": "AMD EPYC", "Xeon": "Intel Xeon", "not recorded": "not recorded"}


def numbers(text: str) -> list[Decimal]:
    return [Decimal(match.replace(",", "")) for match in NUMBER.findall(text)]


def is_quoted_by(figure: Decimal, number: Decimal) -> bool:
    """``figure`` is ``number``, or ``number`` rounded (half up or half even) to the figure's decimals."""
    step = Decimal(1).scaleb(figure.as_tuple().exponent)
    return figure in (number, number.quantize(step, ROUND_HALF_UP), number.quantize(step, ROUND_HALF_EVEN))


def section(title: str) -> str:
    return README.split(f"\n## {title}\n")[1].split("\n## ")[0]


FIGURE_LINKS = FIGURE_LINK.findall(README)


def test_the_readme_links_its_figures_to_lines():
    assert len(FIGURE_LINKS) >= 15


@pytest.mark.parametrize(("text", "path", "first", "last"), FIGURE_LINKS, ids=[link[0][:40] for link in FIGURE_LINKS])
def test_a_linked_figure_is_on_the_lines_it_links(text, path, first, last):
    lines = (REPOSITORY / path).read_text().splitlines()
    linked = numbers("\n".join(lines[int(first) - 1 : int(last or first)]))
    missing = [figure for figure in numbers(text) if not any(is_quoted_by(figure, n) for n in linked)]
    if missing:
        now = {
            str(figure): [i for i, line in enumerate(lines, 1) if any(is_quoted_by(figure, n) for n in numbers(line))]
            for figure in missing
        }
        pytest.fail(f"{path} lines {first}-{last or first} do not hold {missing}; lines that do: {now}")


def test_rounding_is_to_the_figure_s_decimals():
    assert is_quoted_by(Decimal("1.12"), Decimal("1.118"))
    assert is_quoted_by(Decimal("1.06"), Decimal("1.055"))
    assert is_quoted_by(Decimal("1.1"), Decimal("1.118"))
    assert not is_quoted_by(Decimal("1.13"), Decimal("1.118"))
    assert not is_quoted_by(Decimal("2134"), Decimal("2.134"))


def _outside_links_and_code(text: str) -> str:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = FIGURE_LINK.sub("", text)
    return re.sub(r"`[^`]*`", "", text)


@pytest.mark.parametrize("title", ["Use", "Measured"])
def test_every_decimal_figure_of_the_section_links_its_source(title):
    unlinked = re.findall(r"(?<![\w.])\d+\.\d+", _outside_links_and_code(section(title)))
    assert not unlinked, f'README "{title}": figures without a link to the line they come from: {unlinked}'


def _development_cpus() -> dict[str, str]:
    """A path under benchmarks/results/ (a file, or a folder ending in /) -> the CPU cell docs/development.md gives it."""
    table = (
        (REPOSITORY / "docs" / "development.md").read_text().split("## Which CPU each committed result came from")[1]
    )
    cpus = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 3:
            for path in re.findall(r"`([^`]+)`", cells[0]):
                cpus[path] = cells[1]
    return cpus


def _cpu_cell(result: str, cpus: dict[str, str]) -> str:
    """The file's own row, else its folder's (``<device>/<folder>/``)."""
    return cpus.get(result) or cpus["/".join(result.split("/")[:2]) + "/"]


def test_a_paragraph_that_quotes_a_result_file_names_its_cpu():
    cpus = _development_cpus()
    unnamed = []
    for paragraph in section("Measured").split("\n\n"):
        for path in re.findall(r"\]\(benchmarks/results/([^)#?\s]+)", paragraph):
            recorded = {name for key, name in CPUS.items() if key in _cpu_cell(path, cpus)}
            if recorded and not any(name in paragraph for name in recorded):
                unnamed.append((path, sorted(recorded)))
    assert not unnamed, f'README "Measured": paragraphs that quote these files do not name their CPU: {unnamed}'


def test_the_measured_section_says_timings_across_machines_do_not_compare():
    opening = section("Measured").strip().split("\n\n")[0]
    assert "AMD EPYC" in opening and "Intel Xeon" in opening and "do not compare" in opening
