"""The house rules of the package layout, checked on the source: no import cycle, no import from a
lower layer into a higher one, tools on the public API only, files short enough to read, and tests
that share helpers through conftest.py or a helper module, never by importing another test file."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "rwkvclip_dist"
# Lower layers may not import higher ones. Imports inside functions count too: a hidden cycle is
# still a cycle.
LAYERS = [
    {"typed_config", "cli", "outputs", "strict_yaml", "versions"},
    {"model", "ops"},
    {"data", "descriptions"},
    {"parallel", "loss", "pretrained_format", "hub"},
    {"pretrained", "convert", "checkpoint", "eval"},
    {"training"},
    {"train", "demo"},
]
MAX_LINES = 300


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every rwkvclip_dist module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rwkvclip_dist"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rwkvclip_dist"):
            found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "_csrc" not in p.parts}
    graph = {}
    for name, path in files.items():
        # ``from rwkvclip_dist.x import y`` depends on x; the package root's lazy names are not edges.
        graph[name] = {m for m in _imports(path) if m in files and m != "rwkvclip_dist"}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module}: its folder {top!r} is in no layer of tests/test_layout.py")


def test_no_import_goes_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{a} -> {b}" for a, deps in _graph().items() if a != "rwkvclip_dist"
                    for b in deps if _layer(b) > _layer(a))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


# The trainer's side: what training ranks import. The shard builder (data/shards/) is tools' code.
TRAINER_SIDE = ("rwkvclip_dist.training", "rwkvclip_dist.parallel", "rwkvclip_dist.loss", "rwkvclip_dist.model",
                "rwkvclip_dist.ops", "rwkvclip_dist.train")


def _trainer_side(module: str) -> bool:
    top_level_data = (module.startswith("rwkvclip_dist.data.") and module.count(".") == 2
                      and module != "rwkvclip_dist.data.shards")
    return top_level_data or any(module == s or module.startswith(s + ".") for s in TRAINER_SIDE)


def test_the_trainer_side_never_reaches_the_shard_builder():
    graph = _graph()
    wrong = []
    for start in sorted(m for m in graph if _trainer_side(m)):
        seen, todo = {start: [start]}, [start]
        while todo:  # through any chain of imports, not only direct ones
            node = todo.pop()
            for nxt in graph.get(node, ()):
                if nxt not in seen:
                    seen[nxt] = seen[node] + [nxt]
                    todo.append(nxt)
        reached = sorted(m for m in seen if m.startswith("rwkvclip_dist.data.shards"))
        if reached:
            wrong.append(" -> ".join(seen[reached[0]]))
    assert not wrong, "the trainer's side imports the shard builder (rwkvclip_dist.data.shards):\n" + "\n".join(wrong)


def test_no_module_of_the_package_imports_the_local_s3_harness():
    users = sorted(m for m, deps in _graph().items() if "rwkvclip_dist.data.local_s3" in deps)
    assert not users, f"the test and benchmark S3 server is imported by the package: {users}"


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    # Package __init__ files re-export their submodules; an edge into one's own package is not a cycle.
    edges = {a: {b for b in deps if b != a and not a.startswith(b + ".")} for a, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_tools_use_public_names_and_do_not_edit_sys_path():
    for path in sorted((REPO / "tools").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rwkvclip_dist"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private names {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                raise AssertionError(f"{path.name} edits or reads sys.path; the package is installed")


def test_no_test_file_imports_another():
    tests = REPO / "tests"
    test_modules = {p.stem for p in tests.glob("test_*.py")}
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module.split(".")[0]]
            else:
                continue
            found += [f"tests/{path.name}:{node.lineno} imports {n}" for n in names if n in test_modules]
    assert not found, "shared test helpers belong in tests/conftest.py or a helper module:\n" + "\n".join(found)


def test_files_stay_short_and_the_entry_point_thin():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and "_csrc" not in p.parts}
    assert not long, f"files over {MAX_LINES} lines: {long}"
    assert len((PACKAGE / "train.py").read_text().splitlines()) < 60


def _main_source(tool: Path) -> tuple[Path, ast.Module]:
    """The file that defines ``main`` for ``tool``: the tool itself, or the module it imports main from."""
    tree = ast.parse(tool.read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names):
            path = REPO / (node.module.replace(".", "/") + ".py")
            return path, ast.parse(path.read_text())
    return tool, tree


def test_every_tool_follows_the_one_cli_convention():
    """``main(argv)`` is ``run_tool(parser, run, argv)`` (``--debug``, ``prog: error:`` lines, exit 2,
    intermixed options and positionals); the parser names the tool; nothing parses arguments by itself;
    the script ends with ``sys.exit(main())``."""
    wrong = []
    for tool in sorted((REPO / "tools").glob("*.py")):
        path, tree = _main_source(tool)
        where = f"tools/{tool.name}" + ("" if path == tool else f" (main in {path.relative_to(REPO)})")
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        calls = [c for m in mains for c in ast.walk(m) if isinstance(c, ast.Call)]
        if not any(getattr(c.func, "id", "") == "run_tool" for c in calls):
            wrong.append(f"{where}: main() does not return run_tool(parser, run, argv)")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("parse_args", "parse_known_args", "parse_intermixed_args"):
                wrong.append(f"{where}:{node.lineno}: parses arguments itself; run_tool does")
            if name == "ArgumentParser":
                prog = next((k.value for k in node.keywords if k.arg == "prog"), None)
                if not (isinstance(prog, ast.Constant) and prog.value == tool.name):
                    wrong.append(f"{where}:{node.lineno}: ArgumentParser without prog={tool.name!r}")
        ending = ast.parse(tool.read_text()).body[-1]
        if not (isinstance(ending, ast.If) and "sys.exit(main())" in ast.unparse(ending)):
            wrong.append(f"tools/{tool.name}: does not end with `if __name__ == \"__main__\": sys.exit(main())`")
    assert not wrong, "\n".join(wrong)


COMPAT = {"rwkvclip_dist/parallel/deepspeed_compat.py", "rwkvclip_dist/data/streaming_compat.py"}
THIRD_PARTY = ("deepspeed", "streaming")
# Private attributes of other libraries that a module importing DeepSpeed or Streaming may use:
# os._exit (the documented way to leave without clean-up).
ALLOWED_PRIVATE = {"_exit"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_only_the_compat_modules_use_deepspeeds_and_streamings_private_names():
    """Imports of private DeepSpeed/Streaming names or modules, private attributes of other objects (in
    a module that imports either library), and private methods overridden in subclasses of their
    classes live in the two compat modules."""
    wrong = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "tools").glob("*.py")]):
        where = str(path.relative_to(REPO))
        if where in COMPAT or "_csrc" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        uses_them = any(isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in THIRD_PARTY
                        or isinstance(n, ast.Import) and any(a.name.split(".")[0] in THIRD_PARTY for a in n.names)
                        for n in ast.walk(tree))
        third_party_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
                third_party_names.update(a.asname or a.name for a in node.names)
                if any(_private(p) for p in node.module.split(".")) or any(_private(a.name) for a in node.names):
                    wrong.append(f"{where}:{node.lineno}: from {node.module} import a private name")
            elif isinstance(node, ast.Import):
                wrong += [f"{where}:{node.lineno}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] in THIRD_PARTY and any(_private(p) for p in a.name.split("."))]
            elif (isinstance(node, ast.Attribute) and uses_them and _private(node.attr)
                  and node.attr not in ALLOWED_PRIVATE):
                if getattr(node.value, "id", "") not in ("self", "cls"):
                    wrong.append(f"{where}:{node.lineno}: .{node.attr} of another object")
            elif isinstance(node, ast.ClassDef) and {getattr(b, "id", "") for b in node.bases} & third_party_names:
                wrong += [f"{where}:{f.lineno}: overrides {f.name} of a third-party class" for f in node.body
                          if isinstance(f, ast.FunctionDef) and _private(f.name)]
    assert not wrong, "go through parallel/deepspeed_compat.py or data/streaming_compat.py:\n" + "\n".join(wrong)


def test_the_package_imports_streaming_only_through_its_compat_module():
    """Streaming's package ``__init__`` imports transformers and scikit-learn (seconds per process): the
    package's modules import it through data/streaming_compat.py, which imports it light."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(REPO))
        if where in COMPAT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            wrong += [f"{where}:{node.lineno}: {name}" for name in names if name.split(".")[0] == "streaming"]
    assert not wrong, "import Streaming through rwkvclip_dist/data/streaming_compat.py:\n" + "\n".join(wrong)
