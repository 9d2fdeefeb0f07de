"""The reasons table (`server/core/reasons.py`): one label, head and close code per reason; a message is its head
and its detail, the same at the upgrade and after it."""

import re

from moshi_ttt.server.core.reasons import WORKER_RESTARTING, Close, Reason, busy


def test_each_reason_has_its_own_short_label_and_a_close_code():
    labels = [r.label for r in Reason]
    assert len(set(labels)) == len(labels), labels
    assert all(re.fullmatch(r"[a-z_]{1,40}", label) for label in labels), labels
    assert all(isinstance(r.close, Close) for r in Reason)


def test_a_message_is_the_head_and_its_detail():
    assert Reason.IDLE.says("no audio received for 10 s") == "idle timeout: no audio received for 10 s"
    assert Reason.WORKER_RESTARTED.says() == "model worker restarted"
    assert busy(4) == "server busy: all 4 conversation slots are in use, try again later"
    assert WORKER_RESTARTING == "the model worker is restarting"
