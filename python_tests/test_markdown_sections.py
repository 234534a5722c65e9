"""Generated Markdown sections: replaced between their markers, appended when the markers are missing."""

from benchmarks.suite.markdown_sections import replace_section

START, END = "<!-- x:start -->", "<!-- x:end -->"


def test_the_marked_part_is_replaced_and_the_rest_kept():
    text = f"# Doc\n\nbefore\n{START}\nold\n{END}\nafter\n"
    assert (
        replace_section(text, START, END, f"{START}\nnew\n{END}\n") == f"# Doc\n\nbefore\n{START}\nnew\n{END}\nafter\n"
    )


def test_without_markers_the_section_is_appended_under_its_heading():
    section = f"{START}\nnew\n{END}\n"
    assert replace_section("# Doc\n", START, END, section, "Results") == f"# Doc\n\n## Results\n\n{section}"
    assert replace_section("# Doc\n", START, END, section) == f"# Doc\n\n{section}"
