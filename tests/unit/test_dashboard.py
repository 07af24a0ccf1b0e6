"""The "cispo health" W&B workspace view: its specification (a plain object, tested offline), its
conversion to a wandb_workspaces Workspace, and `cispo-dashboard` creating then updating it on a W&B
server, here a fake GraphQL server on 127.0.0.1 reached through WANDB_BASE_URL."""

import ast
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cispo.driver import dashboard
from cispo.driver.dashboard import NOT_LOGGED_YET, Panel, to_workspace, view_spec

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["learning", "CISPO health", "length and curriculum", "throughput", "rewards", "MoE health"]


def source_strings() -> set[str]:
    """Every string literal (and f-string constant part) in the installed packages' source, the view's
    own module aside (it names the keys nobody logs yet)."""
    out: set[str] = set()
    for root in ("cispo", "rollout", "rewards"):
        for path in (REPO / root).rglob("*.py"):
            if path.name == "dashboard.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.add(node.value)
    return out


def test_the_view_has_the_sections_and_the_metrics_the_issue_names():
    spec = view_spec("cispo")
    assert [s.name for s in spec.sections] == SECTIONS
    keys = spec.keys()
    for key in (
        "reward/mean", "eval/accuracy", "cispo/is_weight_max", "cispo/is_weight_p99", "cispo/clip_frac_low",
        "cispo/clip_frac_high", "train_infer/logprob_max_abs_diff", "entropy", "cispo/approx_kl",
        "response_length/mean", "response_length/p99", "curriculum/budget", "curriculum/stage",
        "rollout/finish_length", "rollout/finish_repetition", "throughput/tokens_per_s",
        "throughput/tokens_per_s_per_device", "time/weight_sync_s", "time/worker_idle_s",
        "time/learner_idle_s", "reward/errors", "reward/timeouts", "moe/router_entropy",
        "actor/router_aux_loss", "moe/routing_mismatch_frac",
    ):  # fmt: skip
        assert key in keys, key
    panels = {p.title: p for s in spec.sections for p in s.panels}
    assert panels["held-out accuracy"].x == "eval/step" and panels["train reward"].x == "rollout/step"
    assert panels["expert load (max/mean tokens per expert)"].regex == r"^moe/layer_\d+/load_max_over_mean$"
    assert "grpo/clip_frac_high" in view_spec("grpo").keys()  # the loss prefix follows algorithm.loss


def test_every_panel_key_is_logged_today_or_listed_as_not_yet():
    """A typo in a key would leave a panel silently empty: each key is a string the code logs (directly,
    or a loss metric under its prefix), or one NOT_LOGGED_YET declares."""
    strings = source_strings()
    pending = {key.format(loss="cispo") for key in NOT_LOGGED_YET}
    for key in view_spec("cispo").keys() - pending - set(dashboard.AXES):  # axes: wandb_run logs them
        prefix, _, name = key.partition("/")
        logged = key in strings or (prefix in ("cispo", "actor") and name in strings)
        assert logged, f"{key} is not logged anywhere and not in NOT_LOGGED_YET"
    for key in pending:  # and the list stays honest: a key a stage starts logging leaves it
        prefix, _, name = key.partition("/")
        assert key not in strings and not (prefix == "cispo" and name in strings), f"{key} is logged now"
    with pytest.raises(ValueError, match="give y keys or a regex"):
        Panel("empty")


def test_the_spec_converts_to_a_workspace_offline():
    workspace = to_workspace(view_spec(), "team", "proj")
    view = workspace._to_model()
    assert view.name == dashboard.VIEW_ID and view.display_name == "cispo health"
    spec = json.loads(view.spec.model_dump_json(by_alias=True, exclude_none=True))
    sections = spec["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == SECTIONS
    accuracy = sections[0]["panels"][1]["config"]
    assert accuracy["xAxis"] == "eval/step" and accuracy["metrics"] == ["eval/accuracy"]
    per_reward = sections[4]["panels"][0]["config"]
    assert per_reward["useMetricRegex"] and per_reward["metricRegex"] == r"^reward/[^/]+/mean$"


class FakeWandb(BaseHTTPRequestHandler):
    """Just enough of W&B's GraphQL API: the viewer, a project's views by name, upsertView."""

    views: dict[str, dict] = {}
    upserts: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw) if self.path == "/graphql" else {}  # also: the SDK's telemetry posts
        query, variables = body.get("query", ""), body.get("variables") or {}
        if "upsertView" in query:
            type(self).upserts.append(variables)
            stored = {"id": variables.get("id") or "view-1", "displayName": variables["displayName"]}
            type(self).views[variables["name"]] = {**stored, "spec": variables["spec"]}
            data = {"upsertView": {"view": {"id": stored["id"], "name": variables["name"]}, "inserted": True}}
        elif "allViews" in query:
            view = type(self).views.get(variables.get("viewName", ""))
            data = {"project": {"allViews": {"edges": [{"node": view}] if view else []}}}
        elif "viewer" in query:
            data = {"viewer": {"id": "u1", "entity": "team", "username": "me", "email": "", "flags": "{}",
                               "teams": {"edges": []}}}  # fmt: skip
        else:
            data = {}
        out = json.dumps({"data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(monkeypatch, tmp_path):
    FakeWandb.views, FakeWandb.upserts = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def test_cispo_dashboard_creates_then_updates_the_view_on_the_server_of_wandb_base_url(fake_server, capsys):
    assert dashboard.main(["--project", "proj", "--entity", "team"]) == 0
    assert dashboard.main(["--project", "proj", "--entity", "team", "--loss", "grpo"]) == 0
    first, second = FakeWandb.upserts
    assert first["name"] == second["name"] == dashboard.VIEW_ID and first["projectName"] == "proj"
    assert "id" not in first and second["id"] == "view-1"  # the second run updated the same view
    assert "grpo/clip_frac_high" in second["spec"] and "cispo/clip_frac_high" in first["spec"]
    assert "view 'cispo health' saved" in capsys.readouterr().out
    # A run's own creation never replaces a view that exists (a user may have edited it).
    assert dashboard.save_view(view_spec(), "team", "proj", replace=False) == ""
    assert len(FakeWandb.upserts) == 2
