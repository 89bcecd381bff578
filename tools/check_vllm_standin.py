#!/usr/bin/env python
"""Check tether's vLLM backend against the source of the release it is pinned to, without importing vLLM.

    pip download vllm==0.33.0 --no-deps -d /tmp/vllm-dl
    unzip -q /tmp/vllm-dl/vllm-0.33.0-*.whl -d /tmp/vllm-src
    .venv/bin/python tools/check_vllm_standin.py /tmp/vllm-src

Every name tether/generation.py declares it passes to vLLM (the LLM keywords, the LLM methods and
their keywords, the SamplingParams and LoRARequest fields, the values it relies on) is looked up in
the release's source with `ast`; so are the signatures of the stand-in engine the tests run the
backend against (tests/test_generation.py), which may use no name the release lacks. Prints OK or
MISSING per name and exits 1 on any mismatch. It cannot pass on an empty or unreadable tree: the
release's version must match, a made-up name must be reported missing, and the LoRA detector must
find LoRA support where the release has it (LlamaForCausalLM).
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether import config as limits  # noqa: E402  (the release pin and what it serves)
from tether import generation as backend  # noqa: E402  (torch only; vLLM is never imported)

STAND_IN = REPO / "tests" / "test_generation.py"
MADE_UP = "tether_made_up_name"
LORA_CONTROL = "LlamaForCausalLM"  # has SupportsLoRA in every release tether has read


class Source:
    """The unpacked release: `root` holds the `vllm` package."""

    def __init__(self, root: Path):
        self.root = root if (root / "vllm").is_dir() else root.parent

    @lru_cache(maxsize=None)
    def module(self, dotted: str) -> ast.Module | None:
        path = self.root / (dotted.replace(".", "/") + ".py")
        return ast.parse(path.read_text()) if path.is_file() else None

    def find_class(self, dotted: str, name: str) -> tuple[str, ast.ClassDef] | None:
        """Class `name` as module `dotted` defines or imports it: (defining module, node)."""
        tree = self.module(dotted)
        if tree is None:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return dotted, node
        origin = imported_from(tree, dotted, name)
        return self.find_class(origin, name) if origin else None

    def method(self, dotted: str, cls: str, name: str, depth: int = 0) -> ast.FunctionDef | None:
        """`cls.name`, looked up through the base classes the source defines."""
        found = self.find_class(dotted, cls)
        if found is None or depth > 8:
            return None
        where, node = found
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == name:
                return item
        for base in node.bases:
            hit = self.method(where, base_name(base), name, depth + 1)
            if hit is not None:
                return hit
        return None

    def supports_lora(self, dotted: str, cls: str, depth: int = 0) -> bool:
        found = self.find_class(dotted, cls)
        if found is None or depth > 8:
            return False
        where, node = found
        return any(base_name(b) == "SupportsLoRA" or self.supports_lora(where, base_name(b), depth + 1)
                   for b in node.bases)


def imported_from(tree: ast.Module, dotted: str, name: str) -> str | None:
    package = dotted.rsplit(".", 1)[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                return f"{base}.{node.module}" if node.module else base
            return node.module
    return None


def base_name(node: ast.expr) -> str:
    node = node.value if isinstance(node, ast.Subscript) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def parameters(function: ast.FunctionDef | None) -> tuple[set[str], bool]:
    """Named parameters (self excluded) and whether it takes **kwargs."""
    if function is None:
        return set(), False
    args = function.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs} - {"self", "cls"}
    return names, args.kwarg is not None


def fields(node: ast.ClassDef | None) -> set[str]:
    """What a class is built from: its annotated attributes (a dataclass's or msgspec.Struct's
    fields) and the parameters of its own __init__ (a plain class)."""
    if node is None:
        return set()
    annotated = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)
                 and isinstance(item.target, ast.Name)}
    init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
    return annotated | parameters(init)[0]


def assigned_value(tree: ast.Module | None, name: str) -> ast.expr | None:
    for node in (tree.body if tree else []):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        if getattr(node, "value", None) is not None and any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.value  # a bare annotation (`x: str`) is skipped
    return None


def literal_values(tree: ast.Module | None, name: str) -> tuple:
    """The values of `name = Literal[...]`."""
    value = assigned_value(tree, name)
    if not isinstance(value, ast.Subscript):
        return ()
    inner = value.slice
    return tuple(ast.literal_eval(e) for e in (inner.elts if isinstance(inner, ast.Tuple) else [inner]))


# --- the checks ---------------------------------------------------------------------------------


class Report:
    def __init__(self):
        self.checks = self.missing = 0

    def expect(self, ok: bool, label: str, where: str = "") -> bool:
        self.checks += 1
        self.missing += not ok
        print(f"{'OK     ' if ok else 'MISSING'} {label}" + (f"  ({where})" if where else ""))
        return ok


def check_release(src: Source, report: Report) -> None:
    version = assigned_value(src.module("vllm._version"), "__version__")
    found = getattr(version, "value", None)
    report.expect(found == limits.VLLM_RELEASE, f"release {limits.VLLM_RELEASE}", f"source says {found}")


def check_llm(src: Source, report: Report) -> None:
    init, takes_kwargs = parameters(src.method("vllm.entrypoints.llm", "LLM", "__init__"))
    found = src.find_class("vllm.engine.arg_utils", "EngineArgs")
    engine_args = fields(found[1]) if found else set()
    for keyword in backend.LLM_KEYWORDS:
        where = "LLM.__init__" if keyword in init else "EngineArgs via **kwargs" if takes_kwargs and \
            keyword in engine_args else "neither LLM.__init__ nor EngineArgs"
        report.expect(keyword in init or (takes_kwargs and keyword in engine_args), f"LLM({keyword}=...)", where)
    for method, keywords in backend.LLM_METHODS.items():
        function = src.method("vllm.entrypoints.llm", "LLM", method)
        names, _ = parameters(function)
        report.expect(function is not None, f"LLM.{method}", "vllm/entrypoints/llm.py and its bases")
        for keyword in keywords:
            report.expect(keyword in names, f"LLM.{method}({keyword}=...)")


def check_requests(src: Source, report: Report) -> None:
    for dotted, cls, keywords in (("vllm.sampling_params", "SamplingParams", backend.SAMPLING_PARAMS_KEYWORDS),
                                  ("vllm.lora.request", "LoRARequest", backend.LORA_REQUEST_KEYWORDS)):
        found = fields((src.find_class(dotted, cls) or (None, None))[1])
        for keyword in keywords:
            report.expect(keyword in found, f"{cls}({keyword}=...)", dotted.replace(".", "/") + ".py")


def check_values(src: Source, report: Report) -> None:
    ranks = literal_values(src.module("vllm.config.lora"), "MaxLoRARanks")
    report.expect(ranks == limits.VLLM_LORA_RANKS, f"max_lora_rank values {limits.VLLM_LORA_RANKS}",
                  f"vllm/config/lora.py says {ranks}")
    modes = literal_values(src.module("vllm.config.model"), "LogprobsMode")
    report.expect(backend.LOGPROBS_MODE in modes, f"logprobs_mode={backend.LOGPROBS_MODE!r}", f"{modes}")
    executors = literal_values(src.module("vllm.config.parallel"), "DistributedExecutorBackend")
    report.expect(backend.EXECUTOR_BACKEND in executors, f"distributed_executor_backend={backend.EXECUTOR_BACKEND!r}",
                  f"{executors}")
    env = assigned_value(src.module("vllm.envs"), "environment_variables")
    keys = {k.value for k in getattr(env, "keys", []) if isinstance(k, ast.Constant)}
    report.expect(backend.IN_PROCESS_ENV in keys, f"environment variable {backend.IN_PROCESS_ENV}", "vllm/envs.py")
    tags = assigned_value(src.module("vllm.v1.executor.abstract"), "SLEEP_TAGS")
    found = set(ast.literal_eval(tags.args[0])) if isinstance(tags, ast.Call) and tags.args else set()
    report.expect(found == set(backend.ENGINE_MEMORY), f"wake_up tags {backend.ENGINE_MEMORY}",
                  f"vllm/v1/executor/abstract.py SLEEP_TAGS = {sorted(found)}")


def check_lora_support(src: Source, report: Report) -> None:
    table = assigned_value(src.module("vllm.model_executor.models.registry"), "_TEXT_GENERATION_MODELS")
    registry = ast.literal_eval(table) if table is not None else {}

    def supports(arch: str) -> bool:
        module, cls = registry[arch]
        return src.supports_lora(f"vllm.model_executor.models.{module}", cls)

    report.expect(LORA_CONTROL in registry and supports(LORA_CONTROL), f"{LORA_CONTROL} supports LoRA (control)")
    for arch in limits.VLLM_ARCHITECTURES_WITHOUT_LORA:
        report.expect(arch in registry and not supports(arch), f"{arch} registered without SupportsLoRA")


def check_stand_in(src: Source, report: Report, stand_in: Path) -> None:
    """The tests' stand-in may use no parameter or field name the release lacks."""
    tree = ast.parse(stand_in.read_text())
    local = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    engine = local.get("StandInLLM")
    report.expect(engine is not None, "stand-in StandInLLM", str(stand_in))
    init, _ = parameters(src.method("vllm.entrypoints.llm", "LLM", "__init__"))
    found = src.find_class("vllm.engine.arg_utils", "EngineArgs")
    accepted = {"__init__": init | (fields(found[1]) if found else set())}
    for method in backend.LLM_METHODS:
        accepted[method] = parameters(src.method("vllm.entrypoints.llm", "LLM", method))[0]
    for method, real in accepted.items():
        own = next((f for f in (engine.body if engine else []) if isinstance(f, ast.FunctionDef) and f.name == method),
                   None)
        names, _ = parameters(own)
        extra = sorted(names - real)
        report.expect(own is not None and not extra, f"stand-in LLM.{method} parameters",
                      f"not in the release: {extra}" if extra else "")
    for cls, dotted in (("SamplingParams", "vllm.sampling_params"), ("LoRARequest", "vllm.lora.request"),
                        ("Logprob", "vllm.logprobs"), ("CompletionOutput", "vllm.outputs"),
                        ("RequestOutput", "vllm.outputs")):
        extra = sorted(fields(local.get(cls)) - fields((src.find_class(dotted, cls) or (None, None))[1]))
        report.expect(cls in local and not extra, f"stand-in {cls} fields", f"not in the release: {extra}" if extra
                      else "")


def check_the_checker(src: Source, report: Report) -> None:
    """A made-up name must be missing: otherwise every lookup above proves nothing."""
    init, _ = parameters(src.method("vllm.entrypoints.llm", "LLM", "__init__"))
    found = fields((src.find_class("vllm.sampling_params", "SamplingParams") or (None, None))[1])
    report.expect(MADE_UP not in init and MADE_UP not in found and len(init) > 3 and len(found) > 3,
                  f"self-test: {MADE_UP!r} is reported missing, real names are found")


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "/tmp/vllm-src")
    stand_in = Path(argv[2]) if len(argv) > 2 else STAND_IN
    src = Source(root)
    if src.module("vllm.entrypoints.llm") is None:
        print(f"no vLLM source under {root}: unpack the vllm=={limits.VLLM_RELEASE} wheel there (see this file)")
        return 2
    report = Report()
    for check in (check_release, check_llm, check_requests, check_values, check_lora_support, check_the_checker):
        check(src, report)
    check_stand_in(src, report, stand_in)
    print(f"{report.checks} checks against vLLM {limits.VLLM_RELEASE} at {src.root}: {report.missing} missing")
    return 1 if report.missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
