"""Every call we make into Megatron-Core (and Transformer Engine where importable) binds to the
installed signature, and every attribute we read from a Megatron config exists.

The GPU path cannot run on CPU CI, so a wrong keyword there (``normalization=`` passed to the TE
layer spec, which takes the norm from ``TransformerConfig.normalization``) would only surface on
the first GPU. This test reads our source with ``ast``, resolves each called name that was
imported from ``megatron.core`` / ``transformer_engine`` (directly, through a module attribute,
through ``super()`` in a subclass of a Megatron class, or through ``self.x`` where the same
class assigned ``self.x = MegatronClass(...)``), and binds the call's positional count and
keyword names with ``inspect.signature(...).bind``. ``**name`` is expanded where ``name`` was
assigned a ``dict(...)`` literal in the same function.

Calls it cannot resolve statically (methods of objects passed in) are not checked; the CPU
tests exercise those.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("megatron_qk", "benchmarks", "tools")
PREFIXES = ("megatron.core", "transformer_engine")
# Names under which our code holds Megatron configs, and the config class each one is.
CONFIG_NAMES = {
    "config": "megatron.core.transformer.transformer_config:TransformerConfig",
    "tf_config": "megatron.core.transformer.transformer_config:TransformerConfig",
    "transformer_config": "megatron.core.transformer.transformer_config:TransformerConfig",
    "ddp_config": "megatron.core.distributed:DistributedDataParallelConfig",
    "optimizer_config": "megatron.core.optimizer:OptimizerConfig",
}


def te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class UnresolvableError(Exception):
    """A Megatron/TE name that cannot be imported here."""


def _resolve(module: str, attrs: list[str]):
    obj = importlib.import_module(module)
    path = module
    for attr in attrs:
        path = f"{path}.{attr}"
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
        elif inspect.ismodule(obj):
            try:
                obj = importlib.import_module(path)
            except ImportError as exc:
                raise UnresolvableError(path) from exc
        else:
            raise UnresolvableError(path)
    return obj


def _imports(tree: ast.AST) -> dict[str, tuple[str, list[str]]]:
    """Local name -> (module, attribute path) for names imported from Megatron/TE."""
    names: dict[str, tuple[str, list[str]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith(PREFIXES):
                for alias in node.names:
                    names[alias.asname or alias.name] = (node.module, [alias.name])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PREFIXES) and alias.asname:
                    names[alias.asname] = (alias.name, [])
    return names


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _dict_literals(func: ast.AST) -> dict[str, list[str]]:
    """Names assigned ``dict(k=...)`` in ``func`` -> their keys."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(func):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "dict"
        ):
            keys = [k.arg for k in node.value.keywords if k.arg is not None]
            found[node.targets[0].id] = keys
    return found


@dataclasses.dataclass
class Site:
    file: str
    line: int
    target: str
    obj: object
    positional: int  # -1: unknown (a *args splat)
    keywords: list[str]
    self_bound: bool  # the callable takes ``self`` first (super() / instance forward)
    partial: bool  # a ``**mapping`` whose keys are unknown: required arguments may be in it

    def check(self) -> str | None:
        try:
            sig = inspect.signature(self.obj)
        except (TypeError, ValueError):
            return None  # builtins without a signature
        args = [None] * (self.positional + (1 if self.self_bound else 0))
        kwargs = dict.fromkeys(self.keywords)
        try:
            if self.positional < 0:
                sig.bind_partial(**kwargs)
            elif self.partial:
                sig.bind_partial(*args, **kwargs)
            else:
                sig.bind(*args, **kwargs)
        except TypeError as exc:
            return f"{self.file}:{self.line}: {self.target}{sig}: {exc}"
        return None


class _Walker(ast.NodeVisitor):
    def __init__(self, file: str, tree: ast.AST):
        self.file = file
        self.imports = _imports(tree)
        self.sites: list[Site] = []
        self.unresolved: list[str] = []
        self.config_reads: list[tuple[int, str, str]] = []
        self._class_base: list[object | None] = [None]
        self._self_attrs: list[dict[str, object]] = [{}]
        self._dicts: list[dict[str, list[str]]] = [{}]

    def _lookup(self, chain: list[str]):
        if chain[0] not in self.imports:
            return None
        module, attrs = self.imports[chain[0]]
        try:
            return _resolve(module, attrs + chain[1:])
        except (UnresolvableError, ImportError) as exc:
            name = ".".join([module, *attrs, *chain[1:]])
            if "transformer_engine" in name and not te_importable():
                return None
            self.unresolved.append(f"{self.file}: {name} ({exc})")
            return None

    def visit_ClassDef(self, node: ast.ClassDef):
        base = None
        for b in node.bases:
            chain = _chain(b)
            if chain:
                base = self._lookup(chain) or base
        attrs: dict[str, object] = {}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Call):
                target = _chain(sub.targets[0]) if len(sub.targets) == 1 else None
                func = _chain(sub.value.func)
                if target and len(target) == 2 and target[0] == "self" and func:
                    obj = self._lookup(func)
                    if inspect.isclass(obj):
                        attrs[target[1]] = obj
        self._class_base.append(base)
        self._self_attrs.append(attrs)
        self.generic_visit(node)
        self._class_base.pop()
        self._self_attrs.pop()

    def visit_FunctionDef(self, node):
        self._dicts.append(_dict_literals(node))
        self.generic_visit(node)
        self._dicts.pop()

    def visit_AsyncFunctionDef(self, node):  # noqa: N802 (ast.NodeVisitor's naming)
        self.visit_FunctionDef(node)

    def visit_Attribute(self, node: ast.Attribute):
        chain = _chain(node)
        if chain and len(chain) >= 2:
            if chain[0] == "self" and len(chain) >= 3 and chain[1] in CONFIG_NAMES:
                self.config_reads.append((node.lineno, chain[1], chain[2]))
            elif chain[0] in CONFIG_NAMES and self.imports:
                self.config_reads.append((node.lineno, chain[0], chain[1]))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call):
        obj, target, self_bound = None, "", False
        func = node.func
        chain = _chain(func)
        if chain:
            obj, target = self._lookup(chain), ".".join(chain)
            if obj is None and chain[0] == "self" and len(chain) >= 2:
                cls = self._self_attrs[-1].get(chain[1])
                if cls is not None:
                    method = chain[2] if len(chain) == 3 else "forward"
                    if len(chain) <= 3 and hasattr(cls, method):
                        obj, self_bound = getattr(cls, method), True
        elif (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Call)
            and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "super"
            and self._class_base[-1] is not None
        ):
            base = self._class_base[-1]
            obj, target, self_bound = getattr(base, func.attr, None), f"super().{func.attr}", True
        if obj is not None and callable(obj):
            positional = len(node.args)
            if any(isinstance(a, ast.Starred) for a in node.args):
                positional = -1
            keywords, partial = [], False
            for kw in node.keywords:
                if kw.arg is not None:
                    keywords.append(kw.arg)
                elif isinstance(kw.value, ast.Name) and kw.value.id in self._dicts[-1]:
                    keywords += self._dicts[-1][kw.value.id]
                else:
                    partial = True
            self.sites.append(
                Site(self.file, node.lineno, target, obj, positional, keywords, self_bound, partial)
            )
        self.generic_visit(node)


def walk_source(files: list[Path]) -> list[_Walker]:
    walkers = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        walker = _Walker(name, tree)
        walker.visit(tree)
        walkers.append(walker)
    return walkers


def _our_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def _config_attributes(spec: str) -> set[str]:
    module, name = spec.split(":")
    cls = getattr(importlib.import_module(module), name)
    return {f.name for f in dataclasses.fields(cls)} | set(dir(cls))


def binding_errors(files: list[Path]) -> list[str]:
    """Every problem found in ``files``: bad calls, unimportable names, unknown config fields."""
    errors = []
    known = {name: _config_attributes(spec) for name, spec in CONFIG_NAMES.items()}
    for walker in walk_source(files):
        errors += walker.unresolved
        errors += [e for e in (site.check() for site in walker.sites) if e]
        for line, holder, attr in walker.config_reads:
            if attr not in known[holder]:
                spec = CONFIG_NAMES[holder]
                errors.append(f"{walker.file}:{line}: {holder}.{attr} is not a field of {spec}")
    return errors


def test_every_call_into_megatron_binds_to_the_installed_signature():
    files = _our_files()
    assert len(files) > 20
    walkers = walk_source(files)
    checked = sum(len(w.sites) for w in walkers)
    # The walker must actually see our Megatron calls (a resolver that silently found nothing
    # would pass): the builder's TransformerConfig and GPTModel calls at least.
    targets = {s.target for w in walkers for s in w.sites}
    assert {"TransformerConfig", "GPTModel", "ColumnParallelLinear"} <= targets, targets
    assert "get_gpt_layer_with_transformer_engine_spec" in targets
    assert checked > 40, checked
    assert binding_errors(files) == []


def test_the_guard_catches_a_wrong_keyword_and_config_field(tmp_path):
    """Today's defect shape: a keyword the TE spec lacks, a config field that does not exist."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from megatron.core.models.gpt.gpt_layer_specs import (\n"
        "    get_gpt_layer_with_transformer_engine_spec,\n"
        ")\n"
        "from megatron.core.transformer import TransformerConfig\n\n\n"
        "def build(config):\n"
        "    kwargs = dict(num_layers=2, hidden_size=8, num_attention_heads=2, bogus_flag=1)\n"
        "    TransformerConfig(**kwargs)\n"
        "    x = config.num_query_groups + config.not_a_field\n"
        "    return get_gpt_layer_with_transformer_engine_spec(normalization='RMSNorm'), x\n",
        encoding="utf-8",
    )
    errors = binding_errors([bad])
    assert any("normalization" in e for e in errors), errors
    assert any("bogus_flag" in e for e in errors), errors
    assert any("config.not_a_field" in e for e in errors), errors
    assert not any("config.num_query_groups" in e for e in errors), errors
    assert len(errors) == 3, errors


def test_the_guard_reports_names_megatron_does_not_have(tmp_path):
    bad = tmp_path / "bad_import.py"
    bad.write_text(
        "from megatron.core.tensor_parallel import NoSuchLinear\n\n"
        "def f():\n    return NoSuchLinear(1, 2)\n",
        encoding="utf-8",
    )
    assert any("NoSuchLinear" in e for e in binding_errors([bad]))


@pytest.mark.parametrize("cuda", [True, False])
def test_speed_flags_are_transformer_config_fields(monkeypatch, cuda):
    import importlib.util

    from megatron_qk.models import speed

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(speed, "te_available", lambda: True)
    fields = _config_attributes(CONFIG_NAMES["tf_config"])
    assert set(speed.training_speed_flags(cuda=cuda)) <= fields


# ---------------------------------------------------------------------------------------------
# The reverse direction: megatron-core calling our modules.
#
# Our layer spec puts our classes into slots that megatron-core fills by calling them
# (``SelfAttention`` calls ``submodules.linear_qkv(...)``, ``TransformerBlock`` builds each layer
# spec with ``build_module``). A keyword a new release starts to pass (0.18 passes ``name=`` to
# ``linear_qkv``) breaks every model build. This reads the installed megatron-core's source, finds
# each call site that reaches one of our classes, and binds its argument shape to our signature.


@dataclasses.dataclass
class ReverseSite:
    """One megatron-core call site that constructs or calls one of our spec modules.

    ``callee``: the called expression's trailing attribute chain (``submodules.linear_qkv``), or
    ``build_module:<first argument chain>`` for a ``build_module(spec, ...)`` call, whose
    arguments reach ``spec.module(*args, **spec.params, **kwargs)``.
    """

    module: str
    cls: str
    callee: str
    target: object
    extra_keywords: tuple[str, ...] = ()  # the spec's params that build_module adds
    self_bound: bool = True


def _our_reverse_sites() -> list[ReverseSite]:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_qk.models.qk_capture import capturing_core_attention
    from megatron_qk.models.specs import _layer_seeded_class
    from megatron_qk.models.split_qkv import SplitQKVLinear

    attention = "megatron.core.transformer.attention"
    capturing = capturing_core_attention(DotProductAttention)
    return [
        ReverseSite(attention, "SelfAttention", "submodules.linear_qkv", SplitQKVLinear.__init__),
        ReverseSite(attention, "SelfAttention", "self.linear_qkv", SplitQKVLinear.forward),
        ReverseSite(attention, "Attention", "submodules.core_attention", capturing.__init__),
        ReverseSite(attention, "Attention", "self.core_attention", capturing.forward),
        ReverseSite(
            "megatron.core.transformer.transformer_block",
            "TransformerBlock",
            "build_module:layer_spec",
            _layer_seeded_class().__init__,
            # build_module adds the spec's submodules and params (build_block_spec's init_seed).
            extra_keywords=("submodules", "init_seed"),
        ),
    ]


def _callee_chain(call: ast.Call) -> str | None:
    """``a.b(...)`` -> "a.b"; ``apply_module(a.b)(...)`` -> "a.b"; build_module -> its spec."""
    func = call.func
    if isinstance(func, ast.Call) and _chain(func.func) == ["apply_module"] and func.args:
        func = func.args[0]
    chain = _chain(func)
    if chain == ["build_module"] and call.args:
        spec = _chain(call.args[0])
        return f"build_module:{'.'.join(spec)}" if spec else None
    return ".".join(chain) if chain else None


def reverse_binding_errors(sites: list[ReverseSite]) -> tuple[list[str], int]:
    """Bind each megatron-core call site to our callable; (errors, call sites checked)."""
    errors, checked = [], 0
    for site in sites:
        module = importlib.import_module(site.module)
        path = inspect.getsourcefile(module)
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == site.cls]
        calls = [
            n
            for c in classes
            for n in ast.walk(c)
            if isinstance(n, ast.Call) and _callee_chain(n) == site.callee
        ]
        if not calls:
            errors.append(f"{site.module}.{site.cls}: no call of {site.callee} found")
        sig = inspect.signature(site.target)
        for call in calls:
            checked += 1
            where = f"{path}:{call.lineno} ({site.cls} -> {site.callee})"
            if any(isinstance(a, ast.Starred) for a in call.args):
                errors.append(f"{where}: *args splat, cannot check")
                continue
            keywords = [k.arg for k in call.keywords if k.arg is not None]
            splat = any(k.arg is None for k in call.keywords)
            positional = len(call.args) - (1 if site.callee.startswith("build_module:") else 0)
            args = [None] * (positional + (1 if site.self_bound else 0))
            kwargs = dict.fromkeys([*keywords, *site.extra_keywords])
            try:
                (sig.bind_partial if splat else sig.bind)(*args, **kwargs)
            except TypeError as exc:
                errors.append(f"{where}: {site.target.__qualname__}{sig}: {exc}")
    return errors, checked


def test_megatron_calls_into_our_spec_modules_bind_to_our_signatures():
    """Defect shape of issue 21 item 2: 0.18+ passes ``name=`` to the ``linear_qkv`` builder."""
    sites = _our_reverse_sites()
    errors, checked = reverse_binding_errors(sites)
    assert errors == []
    assert checked >= len(sites), checked


def test_the_reverse_guard_catches_a_keyword_our_module_lacks():
    """A class without ``**kwargs`` that lacks one keyword megatron passes is reported."""

    def narrow(self, input_size, output_size, *, config, init_method, gather_output, bias):
        raise AssertionError("never called")

    site = ReverseSite(
        "megatron.core.transformer.attention", "SelfAttention", "submodules.linear_qkv", narrow
    )
    errors, checked = reverse_binding_errors([site])
    assert checked >= 1
    assert errors and all("unexpected keyword" in e for e in errors), errors
    missing = ReverseSite("megatron.core.transformer.attention", "SelfAttention", "nope", narrow)
    assert reverse_binding_errors([missing])[0] == [
        "megatron.core.transformer.attention.SelfAttention: no call of nope found"
    ]


def test_setup_py_declares_the_range_versions_py_supports():
    """setup.py's megatron-core requirement, versions.py's range and the installed release agree."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    from megatron_qk.compat import versions

    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    declared = [
        Requirement(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("megatron-core")
    ]
    assert len(declared) == 1, declared
    spec = declared[0].specifier
    assert {str(s) for s in spec} == {
        f">={versions.MIN_VERSION}",
        f"<{versions.MAX_VERSION_EXCLUSIVE}",
    }
    assert versions.is_supported(), versions.INSTALLED
    for v in ("0.16.1", "0.17.1", "0.18.2", "0.19.2"):
        assert Version(v) in spec and versions.is_supported(Version(v)), v
    for v in ("0.15.3", "0.20.0"):
        assert Version(v) not in spec and not versions.is_supported(Version(v)), v
    assert versions.LINEAR_TAKES_NAME == (versions.INSTALLED >= Version("0.18"))
