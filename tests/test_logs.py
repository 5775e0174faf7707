"""Long-running commands log JSON lines whose ids are top-level keys."""

from __future__ import annotations

import json
import logging

from subledger.app.logs import JsonFormatter


def test_json_lines_carry_ids_as_keys() -> None:
    record = logging.LogRecord("subledger.relay", logging.WARNING, __file__, 1, "dead-lettered %s", ("m1",), None)
    record.message_id = "sl-abc.t"
    record.destination = "segment"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "dead-lettered m1"
    assert line["level"] == "warning" and line["logger"] == "subledger.relay"
    assert line["message_id"] == "sl-abc.t" and line["destination"] == "segment"
    assert "transition_id" not in line
