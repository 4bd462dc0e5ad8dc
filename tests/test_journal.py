"""The run journal (events.jsonl): the tolerant reader, and the fast step decoder against the encoder."""

from __future__ import annotations

import math

import pytest

from engine.events import StepCompleted
from engine.run.journal import SKIPPED, EventTail, parse_line, step_loss, step_losses


def test_tail_reader_keeps_offset_and_waits_for_a_half_written_line(tmp_path):
    path = tmp_path / "events.jsonl"
    a, b = (StepCompleted(step=i, epoch=1, loss=0.5, lrs={}, step_seconds=0.1) for i in (1, 2))
    line_b = b.to_json()
    path.write_text(a.to_json() + "\n" + line_b[:20])
    tail = EventTail(path)
    assert [e.step for e in tail.read()] == [1]
    assert tail.read() == []                                  # still half a line
    with open(path, "a") as fh:
        fh.write(line_b[20:] + "\n")
    assert [e.step for e in tail.read()] == [2]
    assert tail.offset == path.stat().st_size


def test_tail_reader_recovers_a_line_glued_to_a_torn_one_and_restarts_after_truncation(tmp_path):
    path = tmp_path / "events.jsonl"
    good = StepCompleted(step=7, epoch=1, loss=0.25, lrs={}, step_seconds=0.1).to_json()
    path.write_text('{"v":1,"type":"st' + good + "\n" + "not json\n")   # a crash mid-write, then a new writer
    tail = EventTail(path)
    assert [e.step for e in tail.read()] == [7]
    assert parse_line(b"garbage") is None
    path.write_text(StepCompleted(step=1, epoch=1, loss=0.1, lrs={}, step_seconds=0.1).to_json() + "\n")
    events = tail.read()
    assert tail.truncated and [e.step for e in events] == [1]


@pytest.mark.parametrize("loss", [0.25, -0.5, 1e-30, 12345.678, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("skipped", [False, True])
def test_fast_step_decoder_reads_what_to_json_wrote(loss, skipped):
    event = StepCompleted(step=41, epoch=3, loss=loss, lrs={"unet": 1e-4, "text_encoder": 5e-5}, step_seconds=0.125,
                          skipped=skipped, t=1_700_000_000.123456)
    line = event.to_json().encode()
    decoded = step_loss(line)
    assert decoded is not None and decoded[0] == 41
    assert decoded[1] == loss or (math.isnan(loss) and math.isnan(decoded[1]))
    assert parse_line(line) == event or math.isnan(loss)          # the slow path agrees (nan != nan)
    assert (SKIPPED in line) is skipped


def test_fast_step_decoder_skips_other_records_and_finds_every_step_in_a_range():
    lines = [StepCompleted(step=i, epoch=1, loss=i / 10, lrs={}, step_seconds=0.1).to_json() for i in (1, 2, 3)]
    blob = ("\n".join([lines[0], '{"v":1,"type":"log","t":1.0,"level":"info","message":"\\"step\\":9"}']
                       + lines[1:]) + "\n").encode()
    assert step_losses(blob, 0, len(blob)) == ([1, 2, 3], [0.1, 0.2, 0.3])
    assert step_loss(b'{"v":1,"type":"log","t":1.0,"level":"info","message":"x"}') is None
