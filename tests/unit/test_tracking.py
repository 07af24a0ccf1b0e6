"""Where a run's words and numbers go: cli.log and plain progress lines off a terminal, W&B settings from
the standard WANDB_* variables and the logging config."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cispo.core.config import LoggingConfig
from cispo.driver import tracking
from cispo.driver.tracking import Tracker, resolve_wandb_mode


@pytest.mark.parametrize(
    ("requested", "env", "expected"),
    [
        ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
        ("auto", {"WANDB_DISABLED": "true"}, "disabled"),
        ("offline", {"WANDB_MODE": "online"}, "offline"),  # an explicit logging.wandb wins
        ("auto", {}, "offline"),  # no API key here
    ],
)
def test_wandb_mode_honours_the_environment(monkeypatch, requested, env, expected):
    for key in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking.Path, "home", lambda: Path("/nonexistent"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert resolve_wandb_mode(requested) == expected


def test_wandb_init_takes_project_entity_dir_from_env_and_group_tags_name_from_config(monkeypatch, tmp_path):
    import wandb

    seen = {}

    class FakeRun:
        summary: dict = {}

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or FakeRun())
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    cfg = LoggingConfig(wandb="offline", group="sweep-1", tags=["cispo", "k4"], progress=False)
    Tracker(cfg, tmp_path / "run", "addition", {}, total_steps=2).close()
    assert seen["project"] == "from-env" and seen["entity"] == "team"
    assert seen["dir"] == str(tmp_path / "wandb-dir")
    assert seen["group"] == "sweep-1" and seen["tags"] == ["cispo", "k4"]
    assert seen["name"] == "addition-run" and seen["mode"] == "offline"
    cfg = LoggingConfig(wandb="offline", project="mine", run_name="named", progress=False)
    Tracker(cfg, tmp_path / "run2", "addition", {}, total_steps=2).close()
    assert seen["project"] == "mine" and seen["name"] == "named"
    assert seen["group"] == "named"  # no group configured: the run's own name groups its W&B runs


def test_plain_progress_lines_every_log_every_steps_to_stdout_and_cli_log(tmp_path, capsys):
    cfg = LoggingConfig(wandb="disabled", log_every=2, progress=True)  # no terminal here: no bar
    tracker = Tracker(cfg, tmp_path, "addition", {}, total_steps=4)
    tracker.print("warm start: loaded from cache")
    for step in range(1, 5):
        tracker.log(step, {"reward/mean": step / 10, "eval/accuracy": 0.5, "time/step_s": 0.25})
    tracker.close()
    out = capsys.readouterr().out
    assert "step 2: reward 0.200  eval 0.500" in out and "step 4: reward 0.400" in out
    assert "step 1:" not in out and "step 3:" not in out
    log = (tmp_path / "cli.log").read_text()
    assert "warm start: loaded from cache" in log and "step 4: reward 0.400" in log
    assert not (tmp_path / "wandb").exists()


class _Healthz(BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        self.send_response(404)  # any answer means the server is there
        self.end_headers()

    def log_message(self, *args):
        pass


def test_auto_mode_probes_the_server_of_wandb_base_url(monkeypatch, tmp_path):
    """A self-hosted server: `auto` goes online when WANDB_BASE_URL's server answers (the probe reaches
    it, not api.wandb.ai), offline when nothing listens there."""
    for key in ("WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "local-0123456789")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        assert tracking.wandb_base_url() == f"http://127.0.0.1:{server.server_address[1]}"
        assert resolve_wandb_mode("auto") == "online"
        assert _Healthz.paths == ["/healthz"]
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    assert resolve_wandb_mode("auto") == "offline"


def test_wandb_login_host_is_the_server_when_the_variable_is_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    assert tracking.wandb_base_url() == "https://api.wandb.ai"
    (tmp_path / "settings").write_text("[default]\nbase_url = https://wandb.example.org/\n")
    assert tracking.wandb_base_url() == "https://wandb.example.org"
