"""How the code reward's test process runs the tests (part of the sandbox program; see ``code_harness``).

The tests run as the module ``__main__`` of the test process, so assert-style tests, HumanEval's
``check(candidate)`` call and an ``if __name__ == "__main__": unittest.main()`` block all run as written.
If the tests end by exiting (``unittest.main()``, ``sys.exit``), their exit status is the verdict.
Otherwise every test they define is run and counted, as unittest and pytest would: ``unittest.TestCase``
classes, ``test*`` functions, and ``test*`` methods of ``Test*`` classes (``pytest.mark.parametrize`` is
expanded; other fixtures are not supported and fail the test that asks for them). A ``test*`` function the
tests call themselves is their helper, not collected. Only objects the tests' own source defined are
collected: nothing the solution sends is a class or a function of the test process.
"""

import sys
import types

TESTS_FILE = "<tests>"


class TestsFailed(Exception):
    """Some collected tests failed or errored; the message counts them."""


def _own(obj, module):
    """Defined by the tests' source (not imported into it, not a Remote of the solution)."""
    if isinstance(obj, types.FunctionType):
        return obj.__code__.co_filename == TESTS_FILE
    return isinstance(obj, type) and obj.__module__ == module


def _parametrized(fn):
    """``(kwargs, id)`` for each case of ``pytest.mark.parametrize`` marks (stacked marks multiply)."""
    cases = [({}, "")]
    for mark in reversed(getattr(fn, "pytestmark", [])):
        if getattr(mark, "name", "") != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = []
        for row in values:
            if type(row).__name__ == "ParameterSet":  # pytest.param(...)
                row = row.values
            elif len(names) == 1:
                row = (row,)
            rows.append(dict(zip(names, row)))
        cases = [({**kw, **r}, f"{i}[{j}]") for i, (kw, _) in enumerate(cases) for j, r in enumerate(rows)]
    return cases


def _call(fn, label, failures):
    """Run one test callable for each parametrize case; record failures as ``label: Exception``."""
    import inspect

    wanted = [p.name for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
    ran = 0
    for kwargs, case in _parametrized(fn):
        missing = [n for n in wanted if n not in kwargs]
        ran += 1
        if missing:
            failures.append(f"{label}: needs {missing} (fixtures are not supported)")
            continue
        try:
            fn(**kwargs)
        except Exception as e:
            failures.append(f"{label}{case}: {type(e).__name__}: {e}"[:300])
    return ran


def _unittest_cases(classes, failures):
    import unittest

    suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(c) for c in classes)
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=0).run(suite)
    for test, _ in result.failures + result.errors:
        failures.append(f"{test.id()}: failed")
    failures += [f"{test.id()}: unexpected success" for test in result.unexpectedSuccesses]
    return result.testsRun


def names_loaded(code):
    """Names the tests' code (and every function in it) reads: a ``test*`` function the tests call
    themselves is a helper of theirs (it may want arguments), not a test to collect."""
    import dis

    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_NAME", "LOAD_GLOBAL")}
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= names_loaded(const)
    return names


def _methods(cls, label, failures):
    """The ``test*`` methods of a pytest-style class, each on a fresh instance."""
    ran = 0
    for attr in sorted(vars(cls)):
        if attr.startswith("test") and isinstance(vars(cls)[attr], types.FunctionType):
            try:
                bound = getattr(cls(), attr)
            except Exception as e:
                failures.append(f"{label}.{attr}: {type(e).__name__}: {e}"[:300])
                ran += 1
                continue
            ran += _call(bound, f"{label}.{attr}", failures)
    return ran


def run_collected(ns, module, called=()):
    """Run every test the tests' namespace defines (``called``: names the tests read themselves); the
    number run. Raises TestsFailed if any failed."""
    failures, ran = [], 0
    case_cls = getattr(sys.modules.get("unittest"), "TestCase", None)
    own = {k: v for k, v in list(ns.items()) if _own(v, module)}
    cases = [
        v for v in own.values() if case_cls is not None and isinstance(v, type) and issubclass(v, case_cls)
    ]
    if cases:
        ran += _unittest_cases(cases, failures)
    for name, obj in own.items():
        if isinstance(obj, types.FunctionType) and name.startswith("test") and name not in called:
            ran += _call(obj, name, failures)
        elif isinstance(obj, type) and name.startswith("Test") and obj not in cases:
            ran += _methods(obj, name, failures)
    if failures:
        raise TestsFailed(f"{len(failures)} of {ran} tests failed: " + "; ".join(failures[:3]))
    return ran
