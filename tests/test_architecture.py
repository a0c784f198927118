"""The design's rules, checked: layers point one way, no private module is imported across packages, no file
names a path outside the repository, and every registered component honours its contract."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "fsl_lsskd"

# low to high: a module may import its own layer and lower layers only
LAYERS = [
    {"errors", "utils", "registry", "protocol", "options", "record", "deps", "progress", "bounds", "inputs",
     "seeding"},
    {"data", "backbones"},
    {"methods"},
    {"checkpoint"},
    {"eval"},
    {"train"},
    {"edge"},
    {"bench"},            # planning and running a grid: config, grid, runner, launch, validate
    {"report"},           # tables, figures, statistics: may read bench.config/bench.grid, never the reverse
    {"bench.commands"},   # bench's click commands and edge_column (BENCH_COMMANDS)
    {"cli", "perf", "migrate", "__init__", "__main__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

#: The modules of ``bench`` above ``report``: the click commands and ``edge_column`` (the library function of
#: ``fsl-bench edge``, which reads cells through ``report.collect``). Every other ``bench`` module is the grid package.
BENCH_COMMANDS = {"commands", "edge_cmd", "edge_column"}


def _unit(module: str) -> str:
    """``fsl_lsskd.eval.scoring`` -> ``eval``; ``fsl_lsskd.errors`` -> ``errors``; ``fsl_lsskd.bench.commands``
    -> ``bench.commands`` (:data:`BENCH_COMMANDS`), ``fsl_lsskd.bench.grid`` -> ``bench``."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "bench" and parts[2] in BENCH_COMMANDS:
        return "bench.commands"
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """Every fsl_lsskd module ``path`` imports (at module level or inside functions), absolute names."""
    rel = path.relative_to(REPO).with_suffix("")
    here = list(rel.parts)
    if here[-1] == "__init__":
        here = here[:-1]
        package = here
    else:
        package = here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("fsl_lsskd")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("fsl_lsskd"):
                continue
            if node.module is None or (node.level and not node.module):
                out += [f"{mod}.{a.name}" for a in node.names]
            else:
                out.append(mod)
                out += [f"{mod}.{a.name}" for a in node.names if (PKG.parent / f"{mod}.{a.name}".replace(".", "/")
                                                                  ).with_suffix(".py").is_file()]
    return [".".join(here)], out


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_layers_point_one_way_and_private_modules_stay_home():
    assert set(RANK) >= {p.stem if p.parent == PKG else p.parent.relative_to(PKG).parts[0] for p in _modules()}, \
        "a new top-level module or package needs a layer in LAYERS"
    upward, private = [], []
    for path in _modules():
        (me,), imported = _imports(path)
        src = _unit(me)
        for mod in imported:
            dst = _unit(mod)
            if RANK.get(dst, 99) > RANK[src]:
                upward.append(f"{me} imports {mod} ({src} -> {dst})")
            parts = mod.split(".")
            for i, part in enumerate(parts[1:], start=1):
                if part.startswith("_") and part not in ("__init__", "__main__"):
                    owner = ".".join(parts[:i])  # the package holding the private module
                    mine = ".".join(me.split(".")[:-1]) if path.name != "__init__.py" else me
                    if owner != mine:
                        private.append(f"{me} imports private {mod}")
    assert not upward, "\n".join(upward)
    assert not private, "\n".join(private)


def _module_of(name: str) -> str:
    """The fsl_lsskd module an imported name lives in: ``fsl_lsskd.report.results.ResultSet`` ->
    ``fsl_lsskd.report.results``; a package is its ``__init__`` (``fsl_lsskd.report``)."""
    parts = name.split(".")
    while parts:
        base = PKG.parent.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return name


def _graph(key) -> dict:
    """``{key(module): {key(imported module), ...}}`` over every fsl_lsskd module, lazy imports included;
    ``key`` maps a module name to a node (or None to leave it out); self-edges are dropped."""
    out: dict = {}
    for path in _modules():
        (me,), imported = _imports(path)
        src = key(me)
        if src is None:
            continue
        deps = out.setdefault(src, set())
        for mod in imported:
            dst = key(_module_of(mod))
            if dst is not None and dst != src:
                deps.add(dst)
    return out


def _cycles(graph) -> list:
    """Every cycle of a directed graph ``{node: {node, ...}}`` found by depth-first search, each as the list of
    its nodes with the first repeated at the end; empty when the graph is acyclic."""
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_grid_package_never_imports_report():
    """config, grid, runner, launch, validate plan and run a grid; reporting reads what they wrote. Only bench's
    command modules (:data:`BENCH_COMMANDS`) may import ``fsl_lsskd.report``."""
    offenders = []
    for path in sorted((PKG / "bench").glob("*.py")):
        (me,), imported = _imports(path)
        if _unit(me) == "bench":
            offenders += [f"{me} imports {mod}" for mod in imported if mod.split(".")[:2] == ["fsl_lsskd", "report"]]
    assert not offenders, "the grid package imports reporting:\n" + "\n".join(offenders)


def test_report_modules_import_each_other_without_a_cycle():
    """Inside ``report`` the imports form a tree (results <- tables, figures <- files), lazy imports included:
    a cycle hidden in a function body (tables <-> figures, before) is one too."""
    graph = _graph(lambda m: m if m.startswith("fsl_lsskd.report.") else None)
    assert graph, "no report module found"
    cycles = _cycles(graph)
    assert not cycles, "import cycles among report modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_between_packages():
    """The packages and top-level modules of fsl_lsskd (the units of :data:`LAYERS`, bench's commands apart from
    its grid package) import each other without a cycle, also within one layer."""
    cycles = _cycles(_graph(_unit))
    assert not cycles, "import cycles between packages:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_names_a_path_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = re.compile(rb"(/work/|/home/[a-z]|/root/|/tmp/pytest|/Users/|C:\\\\)")
    # files of the development machine's data folder beside the checkout: tests find it through conftest's
    # SHARED_DATA; nothing a user reads may point there
    dev_data = re.compile(rb"\.\./shared/data/\w")
    offenders = []
    for rel in tracked:
        p = REPO / rel
        if p.suffix in (".npz", ".png", ".pdf", ".safetensors") or not p.is_file() or rel.startswith("tests/data/"):
            continue
        data = p.read_bytes()
        matches = list(pattern.finditer(data)) + ([] if rel.startswith("tests/") else list(dev_data.finditer(data)))
        for m in matches:
            if rel == "tests/test_architecture.py":
                continue
            line = data[:m.start()].count(b"\n") + 1
            offenders.append(f"{rel}:{line}: {data[max(0, m.start() - 30):m.end() + 30]!r}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------------------------- registry contracts
def _registry(kind):
    from fsl_lsskd.registry import ALL

    return ALL[kind]


@pytest.mark.parametrize("name", _registry("methods").names())
def test_every_method_trains_a_step_and_exports_its_plain_backbone(name):
    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.checkpoint import build_method
    from fsl_lsskd.methods.base import Batch, Method, MethodConfig

    cls = _registry("methods").get(name)
    assert issubclass(cls, Method) and issubclass(cls.config_cls, MethodConfig) and cls.__doc__
    assert cls.config_cls.__doc__ and "." in cls.config_cls.__doc__  # defaults cite their source
    cfg = cls.config_cls()
    if getattr(cfg, "n_way", None):  # episodic: a tiny episode
        overrides = {"n_way": 2, "n_shot": 1, "n_query": 1, "episodes_per_epoch": 1}
        if "inner_steps" in cls.config_cls.__dataclass_fields__:
            overrides.update(inner_steps=1, meta_batch_size=1)
        cfg = cls.config_cls(**{**cfg.__dict__, **overrides})
    torch.manual_seed(0)
    teacher = None
    if cls.needs_teacher:
        t_cls = _registry("methods").get(cls.default_teacher)
        teacher = t_cls(create_backbone("conv4", num_classes=4, image_size=16), 4, 8)
    m = cls(create_backbone("conv4", num_classes=4, image_size=16), 4, 8, cfg, teacher)
    if m.episodic:
        n = cfg.n_way * (cfg.n_shot + cfg.n_query) * getattr(cfg, "meta_batch_size", 1)
        labels = torch.arange(cfg.n_way).repeat_interleave(cfg.n_shot + cfg.n_query).repeat(n // (
            cfg.n_way * (cfg.n_shot + cfg.n_query)))
        batch = Batch(torch.randn(n, 3, 16, 16), labels, torch.arange(n))
    else:
        batch = Batch(torch.randn(4, 3, 16, 16), torch.arange(4), torch.arange(4))
    out = m.training_step(batch, 0)
    out["loss"].backward()
    m.on_step_end(batch, 0)
    plain = create_backbone("conv4", num_classes=0, image_size=16)
    exported = m.export_backbone()
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in plain.parameters())
    meta = {"method": name, "backbone": "conv4", "num_classes": 4, "num_samples": 8, "image_size": 16,
            "method_config": cfg.__dict__}
    assert type(build_method(meta)) is cls  # rebuildable from its recorded meta


@pytest.mark.parametrize("name", _registry("readouts").names())
def test_every_readout_has_settings_and_scores_episodes(name):
    from fsl_lsskd.eval.base import EpisodeInputs, Readout, ReadoutConfig
    from fsl_lsskd.eval.scoring import ReadoutSpec

    cls = _registry("readouts").get(name)
    assert issubclass(cls, Readout) and issubclass(cls.config_cls, ReadoutConfig) and cls.__doc__
    spec = ReadoutSpec.parse(name)
    assert spec.label == name and spec.identity()["readout"] == name
    if name == "maml_finetune":  # needs a trained MAML method: tests/test_meta.py
        return
    rng = np.random.default_rng(0)
    feats = (np.repeat(np.eye(6, 16), 8, axis=0) + 0.1 * rng.normal(size=(48, 16))).astype(np.float32)
    rows = np.stack([np.stack([c * 8 + rng.permutation(8)[:4] for c in rng.permutation(6)[:3]]) for _ in range(5)])
    inputs = EpisodeInputs(rows=rows, n_shot=1, features=feats)
    if cls.needs_images:  # image-level: six flat colours (+ noise) through a random Conv-4
        from fsl_lsskd.backbones import create_backbone

        colours = rng.integers(0, 255, size=(6, 1, 1, 1, 3))
        images = np.clip(colours + rng.normal(0, 8, size=(6, 8, 16, 16, 3)), 0, 255).astype(np.uint8)
        torch.manual_seed(0)
        inputs = EpisodeInputs(rows=rows, n_shot=1, images=images.reshape(48, 16, 16, 3), image_size=16,
                               backbone=create_backbone("conv4", num_classes=0, image_size=16).eval())
    out = spec.build().predict(inputs)
    assert out.correct.shape == (5,) and (out.correct.mean() if cls.needs_images else out.correct.min()) > 0.5
    if cls.probabilistic:
        assert out.probs.shape == (5, 9, 3) and np.allclose(out.probs.sum(-1), 1, atol=1e-5)


@pytest.mark.parametrize("name", _registry("backbones").names())
def test_every_registered_backbone_is_a_timm_model_with_stages(name):
    import timm

    from fsl_lsskd.backbones import create_backbone, forward_stages, stage_indices

    assert timm.is_model(name)
    m = create_backbone(name, num_classes=5, image_size=32).eval()
    maps, logits = forward_stages(m, torch.zeros(2, 3, 32, 32))
    assert len(maps) == len(stage_indices(m)) and logits.shape == (2, 5)


@pytest.mark.parametrize("name", _registry("datasets").names())
def test_every_dataset_declares_its_options_and_contract(name):
    from fsl_lsskd.data.base import FewShotDataset

    cls = _registry("datasets").get(name)
    assert issubclass(cls, FewShotDataset) and cls.__doc__
    assert isinstance(getattr(cls, "options", ()), tuple)
    for hook in ("class_split", "load_split", "verify"):
        assert callable(getattr(cls, hook)), hook
