"""The command line answers at once: `--help` of every command, and a mistake in a benchmark file or an option,
are answered without importing torch, timm, mlflow, scikit-learn, SciPy, pandas or matplotlib (seconds each) and
without decoding any data. Each check runs in a fresh interpreter and reads its ``sys.modules``; nothing is
timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fsl_lsskd.data.fake import write_fake_cifar100

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "mlflow", "sklearn", "scipy", "pandas", "matplotlib")

# Walks the click tree: `--help` of the group and of every (sub)command, in one interpreter, and records which
# heavy modules each one imported first.
HELP_WALK = textwrap.dedent("""
    import json, sys
    import click
    from fsl_lsskd.cli import main

    HEAVY = %r
    report, paths = [], [[]]
    while paths:
        path = paths.pop(0)
        before = {m for m in HEAVY if m in sys.modules}
        code = main.main([*path, "--help"], prog_name="fsl-bench", standalone_mode=False)
        report.append({"path": path, "code": code, "imported": sorted({m for m in HEAVY if m in sys.modules} - before)})
        ctx = click.Context(main)
        cmd = main
        for name in path:
            cmd = cmd.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            paths += [path + [name] for name in cmd.list_commands(ctx)]
    print("REPORT " + json.dumps({"report": report}))
""") % (HEAVY,)

# Runs one command line and reports its exit code and which heavy modules it imported.
RUN_ONE = textwrap.dedent("""
    import json, sys
    from fsl_lsskd.cli import main

    HEAVY = %r
    code = main.main(sys.argv[1:], prog_name="fsl-bench", standalone_mode=False)
    print("REPORT " + json.dumps({"code": code, "imported": sorted(m for m in HEAVY if m in sys.modules)}))
""") % (HEAVY,)


def _python(code: str, *args, cwd: Path, env: dict = None) -> dict:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return {**json.loads(lines[-1][len("REPORT "):]), "stdout": proc.stdout, "stderr": proc.stderr}


def test_help_of_every_command_imports_no_heavy_module(tmp_path):
    report = _python(HELP_WALK, cwd=tmp_path)["report"]
    paths = [" ".join(r["path"]) for r in report]
    assert {"", "run", "train", "evaluate", "table", "publish", "export", "edge", "ls", "perf", "perf train",
            "perf eval", "perf data", "data", "data verify", "data prepare", "store", "store migrate"} <= set(paths), paths
    for r in report:
        assert r["code"] == 0, r
        assert r["imported"] == [], f"`fsl-bench {' '.join(r['path'])} --help` imported {r['imported']}"


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=6, per_class_test=2, seed=5)


def _bench(path: Path, data: str, methods: str = "[ce, lsskd]", backbones: str = "[conv4]") -> Path:
    path.write_text(textwrap.dedent(f"""
        name: grid
        description: "startup test grid"
        datasets: [cifar_fs]
        data: {{cifar_fs: {data}}}
        backbones: {backbones}
        methods: {methods}
        seeds: [0]
        image_size: 32
        train: {{epochs: 1, batch_size: 32, validation: null}}
        eval: {{split: test, n_shot: [1], n_query: 5, n_episodes: 20}}
    """))
    return path


def _no_heavy_and_nothing_decoded(res: dict, cache: Path, *fragments: str) -> None:
    out = res["stdout"] + res["stderr"]
    assert res["code"] == 2, out[-3000:]
    for f in fragments:
        assert f in out, (f, out[-3000:])
    assert res["imported"] == [], f"the error came after importing {res['imported']}"
    assert not (cache / "data").exists() and not (cache / "generated").exists(), sorted(cache.rglob("*"))


@pytest.mark.parametrize("case", ["method typo", "backbone typo", "missing archive in the file",
                                  "missing --data path", "method typo, generated data"])
def test_benchmark_file_errors_come_before_heavy_imports_and_decoding(tmp_path, cifar_archive, case):
    cache = tmp_path / "cache"
    env = {"FSL_BENCH_CACHE": str(cache)}
    args = ["run", None, "--dry-run"]
    if case == "method typo":
        bench = _bench(tmp_path / "grid.yaml", f"{{archive: {cifar_archive}}}", methods="[ce, lsskdd]")
        fragments = ["unknown method 'lsskdd'", "Did you mean 'lsskd'"]
    elif case == "backbone typo":
        from fsl_lsskd.registry import timm_model_names

        env["FSL_BENCH_CACHE"] = os.environ["FSL_BENCH_CACHE"]  # timm's names cached by this process
        cache = Path(env["FSL_BENCH_CACHE"])
        timm_model_names()
        bench = _bench(tmp_path / "grid.yaml", f"{{archive: {cifar_archive}}}", backbones="[conv4, resnt12]")
        fragments = ["unknown backbone 'resnt12'", "Did you mean 'resnet12'"]
    elif case == "missing archive in the file":
        bench = _bench(tmp_path / "grid.yaml", f"{{archive: {tmp_path / 'nowhere.tar.gz'}}}")
        fragments = ["nowhere.tar.gz", "does not exist", "--data cifar_fs=PATH"]
    elif case == "missing --data path":
        bench = _bench(tmp_path / "grid.yaml", f"{{archive: {cifar_archive}}}")
        args += ["--data", f"cifar_fs={tmp_path / 'nowhere.tar.gz'}"]
        fragments = ["--data cifar_fs=", "does not exist"]
    else:
        bench = _bench(tmp_path / "grid.yaml", "{generate: [5, 2]}", methods="[ce, lsskdd]")
        fragments = ["unknown method 'lsskdd'"]
    args[1] = bench
    res = _python(RUN_ONE, *args, cwd=tmp_path, env=env)
    _no_heavy_and_nothing_decoded(res, cache, *fragments)


@pytest.mark.parametrize("case", ["train method typo", "train missing archive", "evaluate readout typo",
                                  "evaluate missing checkpoint", "export missing checkpoint", "table baseline typo",
                                  "perf too many processes"])
def test_option_errors_come_before_heavy_imports(tmp_path, cifar_archive, case):
    cache = tmp_path / "cache"
    data = ["--dataset", "cifar_fs", "--archive", cifar_archive]
    args = {
        "train method typo": ["train", "--method", "lsskdd", *data, "--out", tmp_path / "run"],
        "train missing archive": ["train", "--dataset", "cifar_fs", "--archive", tmp_path / "nowhere.tar.gz",
                                  "--out", tmp_path / "run"],
        "evaluate readout typo": ["evaluate", "--untrained", "--backbone", "conv4", *data, "--readouts",
                                  "protonet,logreg_batchd"],
        "evaluate missing checkpoint": ["evaluate", "--checkpoint", tmp_path / "nowhere", *data],
        "export missing checkpoint": ["export", tmp_path / "nowhere", "--out", tmp_path / "export"],
        "table baseline typo": ["table", _bench(tmp_path / "grid.yaml", f"{{archive: {cifar_archive}}}"),
                                "--baseline", "cee"],
        "perf too many processes": ["perf", "train", "--synthetic", "64", "--processes", "1,100000"],
    }[case]
    fragments = {"train method typo": ["unknown method 'lsskdd'"], "train missing archive": ["does not exist"],
                 "evaluate readout typo": ["unknown readout 'logreg_batchd'"],
                 "evaluate missing checkpoint": ["nowhere", "does not exist"],
                 "export missing checkpoint": ["nowhere", "does not exist"],
                 "table baseline typo": ["unknown method 'cee'"],
                 "perf too many processes": ["--processes 100000", "at most"]}[case]
    res = _python(RUN_ONE, *args, cwd=tmp_path, env={"FSL_BENCH_CACHE": str(cache)})
    _no_heavy_and_nothing_decoded(res, cache, *fragments)
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()


def test_registry_names_read_from_the_sources_are_what_importing_registers():
    """The registries list, check and suggest names from their packages' sources (nothing imported); importing
    every module must register exactly those names, from those modules."""
    from fsl_lsskd.registry import ALL, registered_in_source

    for kind, reg in ALL.items():
        found = registered_in_source(reg.package, reg.symbol)
        assert found, kind
        reg.load_all()
        assert sorted(found) == sorted(reg._items), (kind, sorted(found), sorted(reg._items))
        for name, module in found.items():
            assert reg.get(name) is reg._items[name]
            assert sys.modules[module].__dict__.get(reg.symbol) is reg, (kind, name, module)


def test_class_constants_read_from_the_sources_are_the_imported_ones():
    """Planning a grid and computing training identities read ``needs_teacher``, ``default_teacher`` and
    ``config_cls`` (from fsl_lsskd.methods.configs) without importing the method (no torch): for every registered
    name, a value read statically is the imported class's attribute, and those three are decidable for every
    method."""
    from fsl_lsskd.registry import (_DEFAULT, _MISSING, ALL, METHODS, READOUTS, _NameRef, _static_class_constant,
                                    registered_in_source)

    decided = 0
    for kind, reg in ALL.items():
        modules = registered_in_source(reg.package, reg.symbol)
        for attr in ("needs_teacher", "default_teacher", "has_rotation_classifiers", "config_cls", "needs_method"):
            for name in modules:
                found = _static_class_constant(reg.package, reg.symbol, name, attr)
                if isinstance(found, _NameRef):
                    found = reg._light_name(found)
                if (reg is METHODS and attr in ("needs_teacher", "default_teacher", "config_cls")
                        or reg is READOUTS and attr in ("config_cls", "needs_method")):
                    assert found is not _MISSING, (name, attr)
                if found is _MISSING:
                    continue
                decided += 1
                cls = reg.get(name)
                if found is _DEFAULT:
                    assert not hasattr(cls, attr), (kind, name, attr)
                else:
                    assert found == getattr(cls, attr), (kind, name, attr, found)
    assert decided >= 3 * len(METHODS) + 2 * len(READOUTS)


PLAN = textwrap.dedent("""
    import json, sys
    from fsl_lsskd.bench.config import load_benchmark
    from fsl_lsskd.bench.grid import expand, with_teachers

    HEAVY = %r
    from fsl_lsskd.bench.measures import bench_cell_key

    bench = load_benchmark(sys.argv[1])
    cells = with_teachers(expand(bench))
    teachers = sorted({c.teacher.method for c in cells if c.teacher is not None})
    keys = {bench_cell_key(bench, c) for c in cells}  # training identities: the methods' configs, no torch
    assert len(keys) == len(cells), (len(keys), len(cells))
    from fsl_lsskd.bench.measures import measures

    scores = [m for c in cells for m in measures(bench, c)]  # scoring identities: the readouts' configs
    assert scores
    print("REPORT " + json.dumps({"cells": len(cells), "teachers": teachers,
                                  "imported": sorted(m for m in HEAVY if m in sys.modules)}))
""") % (HEAVY,)


def test_planning_a_grid_and_its_training_identities_imports_no_heavy_module(tmp_path):
    """`table --from-results` and `run --dry-run` plan the grid and compute its training identities first: the
    distillation rows' teachers and every method's config come from the sources and fsl_lsskd.methods.configs,
    not from importing torch."""
    res = _python(PLAN, REPO / "benchmarks" / "short_distill_tiny_imagenet.yaml", cwd=tmp_path)
    assert res["imported"] == [] and res["teachers"] and res["cells"] > 0, res
