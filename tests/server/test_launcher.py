"""The one serve-subprocess launcher (support.launcher): it reports a server that cannot start
with its exit code and log, and stops a running one cleanly with SIGINT (Ctrl-C)."""

import signal
import urllib.request

import pytest

from support.launcher import ServeError, ServeProcess


def test_a_server_that_cannot_start_is_reported_with_its_exit_code_and_log(tmp_path):
    srv = ServeProcess(tmp_path, ["--no-such-flag"]).start()
    with pytest.raises(ServeError) as e:
        srv.wait_listening()
    assert "exited with code 2" in str(e.value) and "unrecognized arguments: --no-such-flag" in str(e.value), e.value
    assert not srv.running and srv.url is None
    assert srv.stop() == 2 and srv.stop() == 2  # idempotent


@pytest.mark.slow  # a serve subprocess start-up, ~4 s
def test_sigint_stops_a_listening_server_cleanly(tmp_path):
    srv = ServeProcess(tmp_path, ["--max-conversations", "1"], host="127.0.0.1")
    with srv:
        assert srv.host == "127.0.0.1" and srv.url == f"http://127.0.0.1:{srv.port}" and srv.port > 0
        assert srv.ws_url == f"ws://127.0.0.1:{srv.port}/api/chat"
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            assert r.status == 200
        assert srv.stop(signal.SIGINT) == 0, srv.log_tail()
    assert srv.returncode == 0 and not srv.running
    assert any("listening on" in line for line in srv.stdout_lines), srv.stdout_lines
