"""A training run's rows and result, and the log lines kept above its progress bar."""

from __future__ import annotations

import io

from flaap_mq.training.progress import TqdmStream
from flaap_mq.training.records import TARGET_ACCURACY, RoundRecord, TrainingResult


def _record(round_: int, test_accuracy: float) -> RoundRecord:
    return RoundRecord(round_, None, None, 0, 0.5, test_accuracy, 1.0, 10, 20, 3)


def test_a_row_s_fields_are_the_csv_columns_in_order():
    record = _record(1, 0.5)
    assert RoundRecord.fields() == list(record.values())
    assert RoundRecord.fields()[:2] == ["round", "train_loss"]
    assert RoundRecord.fields()[-2:] == ["silos", "dropped"]
    assert record.values()["bytes_received"] == 20


def test_the_first_trained_round_reaching_an_accuracy():
    # Row 0 (the initial model) does not count, even when it is accurate.
    result = TrainingResult([_record(0, 0.95), _record(1, 0.7), _record(2, 0.92)], [], None, 0)
    assert result.first_round_reaching(TARGET_ACCURACY) == 2
    assert result.first_round_reaching(0.99) is None
    assert result.final_accuracy == 0.92


def test_log_lines_go_out_whole():
    out = io.StringIO()
    stream = TqdmStream(out)
    assert stream.write("one\ntw") == 6
    assert out.getvalue() == "one\n"
    stream.write("o\n")
    stream.write("three")
    stream.flush()
    assert out.getvalue() == "one\ntwo\nthree\n"
