"""Progress as whole lines where the output is not a terminal: the demo's stages and its fine-tuning.

A fake clock drives the lines' timing; the fine-tuning's lines are checked on a tiny BERT.
"""

import io

from conftest import word_bert, word_texts

from earlyexit_kernels.demo.progress_lines import RateLines, StageLines, duration
from earlyexit_kernels.demo.real_task import FineTuneRecipe, Split, fine_tune


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_durations_read_as_a_person_reads_them():
    assert [duration(s) for s in (0.2, 12.4, 89, 91, 300, 3500, 3599, 3900)] == [
        "1 s",
        "12 s",
        "89 s",
        "2 min",
        "5 min",
        "58 min",
        "1 h 00 min",
        "1 h 05 min",
    ]


def test_a_stage_line_as_each_stage_starts_and_ends():
    clock, out = Clock(), io.StringIO()
    stages = StageLines(3, out, clock=clock)
    stages.start("fine-tuning", "about 5 min on 2 cores")
    clock.now += 290
    stages.start("fitting")  # ends the first
    clock.now += 40
    stages.end()
    stages.end()  # nothing more
    assert out.getvalue().splitlines() == [
        "stage 1/3: fine-tuning (about 5 min on 2 cores)",
        "stage 1/3 done in 5 min",
        "stage 2/3: fitting",
        "stage 2/3 done in 40 s",
    ]


def test_rate_lines_after_the_first_steps_then_a_minute_apart_with_the_time_left_at_the_rate():
    clock, out = Clock(), io.StringIO()
    bar = RateLines(100, "fine-tuning", stream=out, first=4, every_s=60, clock=clock)
    for _ in range(40):  # 2 s a step
        clock.now += 2
        bar.set_postfix(loss="0.500", refresh=False)
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    # after 4 steps (8 s): 96 steps left at 2 s; then the first step a minute later (step 34, at 68 s)
    assert lines[0] == "fine-tuning: 4 of 100 steps in 8 s (2.00 s/step): about 3 min left at this rate; loss 0.500"
    assert lines[1] == "fine-tuning: 34 of 100 steps in 68 s (2.00 s/step): about 2 min left at this rate; loss 0.500"
    assert lines[2] == "fine-tuning: 40 of 100 steps in 80 s; loss 0.500"
    assert len(lines) == 3


def test_fine_tuning_writes_lines_where_asked(tmp_path, capsys):
    model, tokenizer = word_bert(tmp_path, 2, hidden_size=16, num_hidden_layers=2, intermediate_size=32)
    texts = [t or "w1" for t in word_texts(96, seed=0, longest=8)]
    train = Split(texts, [i % 2 for i in range(96)])
    fine_tune(model, tokenizer, train, FineTuneRecipe(batch_size=8, max_length=16), "lines", "fine-tuning tiny")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("fine-tuning tiny: 8 of 12 steps in ") and "left at this rate; loss " in lines[0]
    assert lines[-1].startswith("fine-tuning tiny: 12 of 12 steps in ")
