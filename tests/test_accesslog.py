"""
The access log's line format on its own, and its batching to the file.
"""

from __future__ import annotations

import json
import os
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aigateway.accesslog import BATCH, AccessLog, line
from aigateway.proxy.usage import Usage

RECORD = (
    1795581411.4731,
    "446d66161678000000000000",
    '10.0.0.1", "x": "\n',
    b"POST",
    '/v1/"chat"\\\u00e9\u2028',
    "chat-route",
    "chat",
    "llm",
    "127.0.0.1:8000",
    200,
    2,
    ("127.0.0.1:8001", "127.0.0.1:8000"),
    308,
    419,
    0.005762,
    0.0054441,
    None,
    Usage('gpt-"4"\n', 41, 33, 74),
    'refused "quoted"\r\n',
    False,
)


class LineTests(SynchronousTestCase):
    def test_every_field_survives_json(self) -> None:
        """
        Whatever a client or a target chose (client IP, path, model, error)
        is escaped; the line is one JSON object ending with a newline.
        """
        text = line(RECORD)
        assert text.endswith("\n") and text.count("\n") == 1
        assert json.loads(text) == {
            "time": 1795581411.473,
            "request_id": "446d66161678000000000000",
            "client_ip": '10.0.0.1", "x": "\n',
            "method": "POST",
            "path": '/v1/"chat"\\\u00e9\u2028',
            "route": "chat-route",
            "service": "chat",
            "upstream": "llm",
            "target": "127.0.0.1:8000",
            "status": 200,
            "attempts": 2,
            "tried": ["127.0.0.1:8001", "127.0.0.1:8000"],  # in attempt order
            "bytes_in": 308,
            "bytes_out": 419,
            "latency_ms": {"request": 5.762, "upstream": 5.444, "proxy": None},
            "tokens": {
                "model": 'gpt-"4"\n',
                "prompt": 41,
                "completion": 33,
                "total": 74,
            },
            "error": 'refused "quoted"\r\n',
            "client_gone": False,
        }

    def test_nulls(self) -> None:
        record = list(RECORD)
        record[7] = ""  # a service on a host, no upstream
        record[8] = None  # no target was tried
        record[11] = ()
        record[15] = None
        record[17] = None
        record[18] = None
        parsed = json.loads(line(tuple(record)))
        assert parsed["upstream"] is None and parsed["target"] is None
        assert parsed["tried"] == [] and parsed["tokens"] is None
        assert parsed["latency_ms"]["upstream"] is None and parsed["error"] is None


class BatchTests(SynchronousTestCase):
    def test_written_in_batches_and_on_close(self) -> None:
        # (Not self.mktemp(): under pytest that lands in the source tree.)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "access.log")
        clock = Clock()
        log = AccessLog(clock, path)
        for _ in range(3):
            log.write(RECORD)
        clock.advance(1.0)  # four ticks: formatted and flushed
        with open(path, encoding="utf-8") as f:
            assert len(f.read().splitlines()) == 3
        for _ in range(BATCH + 1):
            log.write(RECORD)
        log.close()
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert len(lines) == BATCH + 4
        assert all(json.loads(text)["status"] == 200 for text in lines)
