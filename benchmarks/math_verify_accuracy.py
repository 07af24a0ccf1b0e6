"""How often the `math` reward (rewards.math.score) agrees with math-verify's own test expectations when the
predictions are written the way a model writes a completion.

The corpus (tests/rewards/math_verify_corpus.json) is every (gold, prediction, expected) string triple of
math-verify 0.9.0's test suite (sdist tests/*.py, MIT, (c) HuggingFace) that runs with default verify
settings; ``--extract DIR`` rebuilds it from an unpacked sdist's tests/ folder. Each prediction that is a
bare answer ("$9$", "1,000.99", "28 percent") is wrapped in each style below; one that is already a
model-written solution (it holds a \\boxed{} or "final answer", or runs past 200 characters) is scored as
written, with strict_format on and off. The gold is the reference as is. Agreement = the score is 1 exactly
when the test expects a match.
``math_verify_raw`` is math-verify itself on the raw pair (parse both, verify), the ceiling for reference.

    python benchmarks/math_verify_accuracy.py [--out benchmarks/results/math_verify_accuracy.json]
    python benchmarks/math_verify_accuracy.py --extract /tmp/mv/math_verify-0.9.0/tests
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "rewards" / "math_verify_corpus.json"
SOURCE = (
    "math-verify 0.9.0 sdist (pypi.org/project/math-verify), tests/*.py; MIT, (c) 2024 The HuggingFace Team"
)
_DEFAULTS = {"precision": 6, "strict": True, "allow_set_relation_comp": False}

_LAST_ENV = re.compile(r"(\$\$|\$|\\\[|\\\()(.*?)(\$\$|\$|\\\]|\\\))(?!.*(?:\$|\\\[|\\\())", re.DOTALL)
_PROSE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")


def _boxed(pred: str) -> str:
    """The answer with its (last) math boxed: "Therefore $\\boxed{x \\geq 5}$ is the solution."."""
    m = _LAST_ENV.search(pred)
    if m and m.group(2).strip():
        return f"{pred[: m.start(2)]}\\boxed{{{m.group(2).strip()}}}{pred[m.end(2) :]}"
    return f"$\\boxed{{{pred.strip()}}}$"


def _delimited(pred: str) -> str:
    """As a model writes it after a marker: math in "$...$", prose as is."""
    if "$" in pred or "\\(" in pred or "\\[" in pred or _PROSE.search(pred):
        return pred
    return f"${pred}$"


_THINK = "Let me work through this step by step, checking each case before I commit to a result.\n\n"

# name -> (completion from a bare answer, strict_format)
STYLES: dict[str, tuple[Callable[[str], str], bool]] = {
    "boxed": (lambda p: f"{_THINK}Putting it together: {_boxed(p)}", True),
    "final_answer": (
        lambda p: f"{_THINK}So the answer is {_delimited(p)}.\n\nFinal answer: {_delimited(p)}",
        True,
    ),
    "minerva": (
        lambda p: f"{_THINK}Final Answer: The final answer is {_delimited(p)}. I hope it is correct.",
        True,
    ),
    "answer_tag": (lambda p: f"<think>{_THINK.strip()}</think>\n<answer>{p}</answer>", True),
    "unmarked": (lambda p: f"{_THINK}That leaves {_delimited(p)}", False),
}


def is_solution(pred: str) -> bool:
    """Already a model-written completion (scored as written) rather than a bare answer to wrap."""
    return "\\boxed" in pred or "\\fbox" in pred or "final answer" in pred.lower() or len(pred) > 200


def completions(case: dict) -> list[tuple[str, str, bool]]:
    """(style, completion, strict_format) for one corpus case."""
    pred = case["pred"]
    if is_solution(pred):
        return [("as_written", pred, True), ("as_written_unstrict", pred, False)]
    return [(name, make(pred), strict) for name, (make, strict) in STYLES.items()]


# --- corpus extraction from math-verify's test files -------------------------------------------------


def _const(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None


def _call_kwargs(fn: ast.FunctionDef) -> dict | None:
    """match_types/precision/strict/allow_set_relation_comp of the compare call in a test body; for
    tests that call verify(parse(gold), parse(pred)) directly, math-verify's parse defaults."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "compare_strings":
            kw = {k.arg: k.value for k in node.keywords}
            out = {"match_types": _const(kw["match_types"]) if "match_types" in kw else ["latex", "expr"]}
            for name in _DEFAULTS:
                if name in kw:
                    value = kw[name]
                    out[name] = value.id if isinstance(value, ast.Name) else _const(value)
            return out
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "verify":
            return {"match_types": ["latex", "expr"], "parse_defaults": True}
    return None


def extract(tests_dir: Path) -> dict:
    cases = []
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            call = _call_kwargs(fn)
            for dec in fn.decorator_list:
                if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", None) == "parametrize"):
                    continue
                names = [s.strip() for s in _const(dec.args[0]).split(",")]
                if call is None or "gold" not in names or "pred" not in names:
                    continue
                for row in dec.args[1].elts:
                    values = [_const(v) for v in row.elts]
                    row_args = dict(zip(names, values, strict=True))
                    gold, pred = row_args["gold"], row_args["pred"]
                    expected = row_args.get("expected", row_args.get("result"))
                    if not (isinstance(gold, str) and isinstance(pred, str) and expected in (0, 1)):
                        continue  # not a pure string pair (f-strings, configs)
                    settings = {k: row_args.get(v, v) if isinstance(v, str) else v for k, v in call.items()}
                    if any(settings.get(k, d) != d for k, d in _DEFAULTS.items()):
                        continue  # a non-default verify setting: the expectation is not ours to meet
                    cases.append(
                        {
                            "file": path.name,
                            "test": fn.name,
                            "line": row.lineno,
                            "match_types": settings["match_types"],
                            "gold": gold,
                            "pred": pred,
                            "expected": int(expected),
                        }
                    )
    return {"source": SOURCE, "cases": cases}


# --- measurement ---------------------------------------------------------------------------------------


def load(path: Path = CORPUS) -> list[dict]:
    return json.loads(path.read_text())["cases"]


def agreement(cases: list[dict]) -> dict:
    """Per style: n, agreeing, false accepts (scored 1, expected 0), false rejects; and the disagreements."""
    from rewards.math import check

    stats: dict[str, dict] = {}
    misses = []
    for i, case in enumerate(cases):
        for style, completion, strict in completions(case):
            result = check(completion, case["gold"], strict_format=strict)
            s = stats.setdefault(style, {"n": 0, "agree": 0, "false_accept": 0, "false_reject": 0})
            s["n"] += 1
            if int(result.score) == case["expected"]:
                s["agree"] += 1
            else:
                s["false_accept" if result.score else "false_reject"] += 1
                misses.append({"case": i, "style": style, "reason": result.reason})
    total = {k: sum(s[k] for s in stats.values()) for k in ("n", "agree", "false_accept", "false_reject")}
    stats["overall"] = total
    for s in stats.values():
        s["agreement"] = round(s["agree"] / s["n"], 4) if s["n"] else None
    return {"styles": stats, "misses": misses}


def math_verify_raw(cases: list[dict]) -> dict:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    agree = sum(
        int(verify(parse(c["gold"], config), parse(c["pred"], config))) == c["expected"] for c in cases
    )
    return {"n": len(cases), "agree": agree, "agreement": round(agree / len(cases), 4)}


def table(result: dict) -> str:
    lines = [
        f"`math` reward vs math-verify's test expectations ({result['cases']} cases, {result['source']})",
        "",
        "| style | scored | agree | false accept | false reject | agreement |",
        "|---|---|---|---|---|---|",
    ]
    for style, s in result["styles"].items():
        lines.append(
            f"| {style} | {s['n']} | {s['agree']} | {s['false_accept']} | {s['false_reject']} "
            f"| {100 * s['agreement']:.1f}% |"
        )
    raw = result["math_verify_raw"]
    lines.append(
        f"| math_verify_raw (bare pair) | {raw['n']} | {raw['agree']} | | | {100 * raw['agreement']:.1f}% |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "math_verify_accuracy.json"))
    parser.add_argument("--extract", metavar="TESTS_DIR", help="rebuild the corpus from math-verify's tests/")
    args = parser.parse_args()
    if args.extract:
        corpus = extract(Path(args.extract))
        CORPUS.write_text(json.dumps(corpus, indent=1, ensure_ascii=False) + "\n")
        print(f"{len(corpus['cases'])} cases -> {CORPUS}")
        return
    sys.path.insert(0, str(ROOT))
    cases = load()
    start = time.monotonic()
    result = {"source": json.loads(CORPUS.read_text())["source"], "cases": len(cases), **agreement(cases)}
    result["seconds"] = round(time.monotonic() - start, 1)
    result["math_verify_raw"] = math_verify_raw(cases)
    text = table(result)
    result["table"] = text
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
