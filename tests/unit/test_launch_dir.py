"""A user's file named like one of our packages (rewards.py, rollout.py) in the launch directory neither
breaks our imports nor is silently taken for ours (issue #22): cispo.core.launch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cispo.core.launch import LAUNCH_DIR_ENV
from cispo.core.registry import import_path
from rewards import RewardInput, get_reward

USER_FILE = "def fn(inp):\n    return 0.25\n"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -c` puts the working directory first on sys.path, as Ray does in its workers."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", LAUNCH_DIR_ENV)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def launch_dir(tmp_path: Path) -> Path:
    for name in ("rewards.py", "rollout.py", "sandboxes.py"):
        (tmp_path / name).write_text(USER_FILE)
    (tmp_path / "myplug.py").write_text(USER_FILE)
    return tmp_path


def test_the_clash_is_real_without_the_launch_handling(launch_dir: Path) -> None:
    out = _python("import rewards.registry", launch_dir)
    assert "'rewards' is not a package" in out.stderr  # what cispo-train used to die of


def test_our_packages_win_and_the_users_module_is_found_by_path(launch_dir: Path) -> None:
    out = _python(
        """
        import importlib.util
        from cispo.core.launch import add_launch_dir
        add_launch_dir()
        import rewards.registry, sandboxes
        from cispo.core.registry import import_path
        print("rewards", rewards.__file__)
        print("sandboxes", sandboxes.__file__)
        print("rollout", importlib.util.find_spec("rollout").origin)
        print("by path", import_path("./rewards.py:fn")(None))
        print("by name", import_path("myplug:fn")(None))
        try:
            import_path("rewards:fn", "reward")
        except ValueError as err:
            print("refused", err)
        """,
        launch_dir,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    root = Path(__file__).resolve().parents[2]
    assert lines["rewards"] == str(root / "rewards" / "__init__.py")
    assert lines["sandboxes"] == str(root / "sandboxes" / "__init__.py")
    assert lines["rollout"] == str(root / "rollout" / "__init__.py")
    assert "by path 0.25" in out.stdout.splitlines() and "by name 0.25" in out.stdout.splitlines()
    assert "name yours by path: './rewards.py:fn'" in lines["refused"]


def test_pinned_packages_hold_with_the_launch_directory_first(launch_dir: Path) -> None:
    """Ray workers get the driver's working directory first on sys.path; the setup hook pins ours."""
    out = _python(
        f"""
        import sys
        sys.path.insert(0, {str(launch_dir)!r})
        from cispo.core.launch import pin_own_packages
        pin_own_packages()
        import rewards.base, sandboxes.base
        import myplug
        print(rewards.__file__, myplug.fn(None))
        """,
        launch_dir,
    )
    assert out.returncode == 0, out.stderr
    root = Path(__file__).resolve().parents[2]
    assert out.stdout.split() == [str(root / "rewards" / "__init__.py"), "0.25"]


def test_a_plugin_named_like_our_package_is_refused_in_process(
    launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(launch_dir))
    with pytest.raises(ValueError, match=r"reward 'rewards:fn': module 'rewards' is .*name yours by path"):
        get_reward("rewards:fn")
    assert get_reward(f"{launch_dir / 'rewards.py'}:fn")(RewardInput("q", "a")).score == 0.25
    # our own modules under that name still resolve: the launch directory has no rewards/math.py
    assert import_path("rewards.math:score")("\\boxed{2}", "2") == 1.0


def test_a_launch_module_is_found_by_name_in_a_child_process(launch_dir: Path, tmp_path_factory) -> None:
    """Children of the driver (reward workers, Ray actors) get the directory from $CISPO_LAUNCH_DIR, last
    on their path: not from PYTHONPATH, which would put it first."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env[LAUNCH_DIR_ENV] = str(launch_dir)
    code = "from cispo.core.registry import import_path; print(import_path('myplug:fn')(None))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "0.25", out.stderr


def test_reward_workers_load_our_packages_and_the_users_plugin(launch_dir: Path) -> None:
    """The workers' fork server inherits sys.path, launch directory included; it pins our packages first."""
    out = _python(
        """
        from cispo.core.launch import add_launch_dir
        add_launch_dir()
        from rewards import RewardInput, RewardScorer, RewardSpec
        with RewardScorer([RewardSpec("myplug:fn"), RewardSpec("exact_match")], max_workers=1) as scorer:
            print(scorer.score([RewardInput("q", "a", "a")])[0].score)
        """,
        launch_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1.25"]
