"""The stand-ins of tests/a1111 against a real web UI's source.

No web UI can be installed here, so the extension is tested on stand-ins of the ``modules.*``
it uses (tests/a1111/webui, custom_words.py). These tests read a real checkout with ``ast`` (it
cannot be imported without gradio and the rest) and check the contract both rely on:

* every name the extension takes from ``modules.*`` is defined there;
* every ``p.<attribute>`` the extension reads is one the web UI's processing code sets;
* every public function and method of a stand-in exists in the web UI with the same parameters
  (names, order, kinds, which have defaults), and every public attribute of the processing
  stand-in is one the real processing class has.

Set ``A1111_PATH`` and/or ``FORGE_PATH`` to a checkout's root (e.g. from
``github:lllyasviel/stable-diffusion-webui-forge``); without them the tests skip, as in CI.
"""

from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXTENSION = HERE.parents[1] / "a1111_extension"
STANDINS = HERE / "webui" / "modules"

ROOTS = [(name, Path(os.environ[var])) for name, var in (("a1111", "A1111_PATH"),
                                                          ("forge", "FORGE_PATH"))
         if os.environ.get(var)]
pytestmark = pytest.mark.skipif(not ROOTS, reason="set A1111_PATH / FORGE_PATH to a web UI "
                                                  "checkout to check the stand-ins against it")
webui = pytest.mark.parametrize("root", [r for _, r in ROOTS], ids=[n for n, _ in ROOTS])

# the real classes the processing stand-in mirrors (p is one of these in a script's process)
PROCESSING_CLASSES = ("StableDiffusionProcessing", "StableDiffusionProcessingTxt2Img",
                      "StableDiffusionProcessingImg2Img")
# the processing stand-in's own test controls, which no web UI has
STANDIN_ONLY = {"layout", "fail_at_call", "unet_calls", "hr_sd_model", "refiner_sd_model",
                "comments"}
# test helpers of the stand-ins, which must not shadow a real name
STANDIN_HELPERS = {"scripts.load_extension_scripts", "shared.fresh_options",
                   "CustomWords.add_embedding"}
# custom_words.py's classes -> (file, class) of A1111 1.10's hijacked text encoder (Forge has
# none: its text engine in backend/text_processing replaces the hijack, and its
# sd_hijack_clip.py is commented out; the extension then reads the prompt with the tokenizer)
CUSTOM_WORDS = {"PromptChunk": ("modules/sd_hijack_clip.py", "PromptChunk"),
                "Embedding": ("modules/textual_inversion/textual_inversion.py", "Embedding"),
                "EmbeddingDatabase": ("modules/textual_inversion/textual_inversion.py",
                                      "EmbeddingDatabase"),
                "Hijack": ("modules/sd_hijack.py", "StableDiffusionModelHijack"),
                "EmbeddingsWithFixes": ("modules/sd_hijack.py", "EmbeddingsWithFixes"),
                "CustomWords": ("modules/sd_hijack_clip.py",
                                "FrozenCLIPEmbedderWithCustomWordsBase")}


def parse(path: Path) -> ast.Module:
    with warnings.catch_warnings():  # the web UI's own invalid escapes in regex strings
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(path.read_text(encoding="utf-8"))


def top_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines at its top level (defs, classes, assignments, imports)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            names |= top_level_names(ast.Module(body=[n for n in ast.walk(node)
                                                      if n is not node and n in _children(node)],
                                                type_ignores=[]))
    return names


def _children(node) -> list:
    out = list(getattr(node, "body", [])) + list(getattr(node, "orelse", []))
    for handler in getattr(node, "handlers", []):
        out += handler.body
    return out + list(getattr(node, "finalbody", []))


def classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def methods(cls: ast.ClassDef, tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """A class's methods, its bases' (defined in the same file) included."""
    found = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes(tree):
            found.update(methods(classes(tree)[base.id], tree))
    found.update({n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)})
    return found


def attributes(cls: ast.ClassDef, tree: ast.Module) -> set[str]:
    """Class-level names and every ``self.<name>`` a method of the class (or a base) assigns."""
    names = set(methods(cls, tree))
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes(tree):
            names |= attributes(classes(tree)[base.id], tree)
    for node in cls.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names | stored_attributes(cls, "self")


def stored_attributes(tree: ast.AST, owner: str) -> set[str]:
    """Every ``<owner>.<name> = ...`` (plain, tuple or augmented target) under ``tree``."""
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name)
            and n.value.id == owner}


def signature(fn: ast.FunctionDef) -> list[tuple[str, str, bool]]:
    """(name, kind, has a default) of each parameter."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    sig = [(p.arg, "positional", d) for p, d in zip(positional, defaults)]
    if a.vararg:
        sig.append((a.vararg.arg, "*args", False))
    sig += [(p.arg, "keyword", d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        sig.append((a.kwarg.arg, "**kwargs", False))
    return sig


def extension_files() -> list[Path]:
    return sorted(EXTENSION.rglob("*.py"))


def attribute_uses(tree: ast.AST):
    """(owner, name, stored) for each ``owner.name`` and each ``getattr / hasattr / setattr(
    owner, "name")``, where owner is a plain name or the last attribute of a chain
    (``shared.opts.x``: owner "opts")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner, name, stored = node.value, node.attr, isinstance(node.ctx, ast.Store)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant):
            owner, name, stored = node.args[0], node.args[1].value, node.func.id == "setattr"
        else:
            continue
        owner_name = getattr(owner, "id", None) or getattr(owner, "attr", None)
        if owner_name:
            yield owner_name, name, stored


def used_module_names() -> set[tuple[str, str]]:
    """(module, name) for each ``from modules.X import Y`` and each ``X.Y`` read on a module
    the extension imported with ``from modules import X``."""
    used = set()
    for path in extension_files():
        tree = parse(path)
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "modules":
                for alias in node.names:
                    used.add(("modules", alias.name))
                    bound[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modules."):
                used |= {(node.module.split(".", 1)[1], a.name) for a in node.names}
        used |= {(bound[owner], name) for owner, name, _ in attribute_uses(tree)
                 if owner in bound}
    return used


def read_settings() -> tuple[set[str], set[str]]:
    """Options the extension reads on ``shared.opts`` (not its own: it registers those) and
    command-line options it reads on ``shared.cmd_opts`` (attribute or getattr)."""
    options, flags, own = set(), set(), set()
    for path in extension_files():
        tree = parse(path)
        own |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                and isinstance(n.value, str) and n.value.startswith("unhype_")}
        for owner, name, stored in attribute_uses(tree):
            if owner == "opts" and not stored and name not in ("add_option", "data"):
                options.add(name)
            elif owner == "cmd_opts":
                flags.add(name)
    return options - own, flags


def read_attributes(owner: str) -> dict[str, str]:
    """Attributes the extension reads on the variable `owner` (``p``, ``sd_model``), minus the
    ones it sets on it itself, with a file each was seen in."""
    read, own = {}, set()
    for path in extension_files():
        for who, name, stored in attribute_uses(parse(path)):
            if who == owner:
                if stored:
                    own.add(name)
                else:
                    read.setdefault(name, path.name)
    return {k: v for k, v in read.items() if k not in own and not k.startswith("__")}


def real_processing_attributes(root: Path) -> set[str]:
    tree = parse(root / "modules" / "processing.py")
    found = classes(tree)
    names = set().union(*(attributes(found[c], tree) for c in PROCESSING_CLASSES if c in found))
    # attributes process_images_inner and the samplers set on p from outside the class
    samplers = sorted((root / "modules").glob("sd_samplers*.py"))
    for path in [root / "modules" / "processing.py", *samplers]:
        names |= stored_attributes(parse(path), "p")
    return names


@webui
def test_every_name_the_extension_imports_exists(root):
    missing = []
    for module, name in sorted(used_module_names()):
        if module == "modules":  # from modules import X: a module file or package
            if not ((root / "modules" / f"{name}.py").is_file()
                    or (root / "modules" / name).is_dir()):
                missing.append(f"modules.{name}")
            continue
        path = root / "modules" / f"{module.replace('.', '/')}.py"
        if not path.is_file() or name not in top_level_names(parse(path)):
            missing.append(f"modules.{module}.{name}")
    assert not missing, f"not in {root}: {missing}"


@webui
def test_every_setting_the_extension_reads_is_the_web_uis(root):
    options, flags = read_settings()
    known = (root / "modules" / "shared_options.py").read_text(encoding="utf-8")
    missing = [o for o in sorted(options) if f'"{o}"' not in known]
    parsers = [root / "modules" / "cmd_args.py",
               *(root / "extensions-builtin").glob("*/preload.py")]
    declared = "\n".join(p.read_text(encoding="utf-8") for p in parsers if p.is_file())
    missing += [f"--{f}" for f in sorted(flags) if f'"--{f.replace("_", "-")}"' not in declared
                and f'"--{f}"' not in declared]
    assert not missing, f"settings the web UI at {root} does not define: {missing}"


@webui
def test_every_attribute_the_extension_reads_on_p_is_set_by_the_web_ui(root):
    real = real_processing_attributes(root)
    missing = {k: v for k, v in read_attributes("p").items() if k not in real}
    assert not missing, f"p attributes the web UI at {root} never sets: {missing}"


# what A1111's sd_model (ldm / sgm's LatentDiffusion, outside the web UI's own source) has
LDM_MODEL_ATTRIBUTES = {"model", "cond_stage_model", "get_learned_conditioning"}


@webui
def test_every_model_attribute_the_extension_reads_is_forges(root):
    """Forge's models are its own diffusion engines (backend/diffusion_engine): what the
    extension reads on sd_model is an attribute or method one of them defines."""
    if not (root / "backend" / "diffusion_engine").is_dir():
        pytest.skip("not Forge: A1111's sd_model is ldm's LatentDiffusion, outside its source")
    real = set()
    for path in (root / "backend" / "diffusion_engine").glob("*.py"):
        tree = parse(path)
        real |= stored_attributes(tree, "self")
        real |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    missing = {k: v for k, v in read_attributes("sd_model").items()
               if k not in real and k not in LDM_MODEL_ATTRIBUTES}
    assert not missing, f"sd_model attributes no Forge engine defines: {missing}"


@webui
def test_processing_standin_attributes_are_real_ones(root):
    real = real_processing_attributes(root)
    tree = parse(STANDINS / "processing.py")
    cls = classes(tree)["StableDiffusionProcessingTxt2Img"]
    mine = {n for n in attributes(cls, tree) if not n.startswith("_")} - STANDIN_ONLY
    assert not mine - real, f"stand-in attributes the web UI at {root} lacks: {mine - real}"


def real_class(root: Path, module: str, name: str,
               seen: set | None = None) -> tuple[ast.ClassDef, ast.Module] | None:
    """A class of modules/<module>.py, also where that module imports it from another of the
    web UI's modules (shared.Options lives in modules/options.py)."""
    seen = set() if seen is None else seen
    path = root / "modules" / f"{module}.py"
    if module in seen or not path.is_file():
        return None
    seen.add(module)
    tree = parse(path)
    if name in classes(tree):
        return classes(tree)[name], tree
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modules."):
            if name in {a.name for a in node.names}:
                return real_class(root, node.module.split(".", 1)[1], name, seen)
        if isinstance(node, ast.ImportFrom) and node.module == "modules":
            for alias in node.names:
                found = real_class(root, alias.name, name, seen)
                if found:
                    return found
    return None


def standin_pairs(root: Path):
    """(label, stand-in def, real def) for every public function and method of the
    ``modules.*`` stand-ins and the hijacked-encoder stand-in, with the real one or None."""
    for path in sorted(STANDINS.glob("*.py")):
        real_path = root / "modules" / path.name
        mine = parse(path)
        real = parse(real_path) if real_path.is_file() else ast.Module(body=[], type_ignores=[])
        real_fns = {n.name: n for n in real.body if isinstance(n, ast.FunctionDef)}
        for node in mine.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                if f"{path.stem}.{node.name}" in STANDIN_HELPERS:
                    assert node.name not in top_level_names(real), node.name
                    continue
                yield f"{path.stem}.{node.name}", node, real_fns.get(node.name)
            elif isinstance(node, ast.ClassDef):
                real_cls, real_tree = real_class(root, path.stem, node.name) or (None, None)
                real_methods = methods(real_cls, real_tree) if real_cls else {}
                for name, fn in methods(node, mine).items():
                    if not name.startswith("_") or name == "__init__" and real_cls:
                        yield f"{path.stem}.{node.name}.{name}", fn, real_methods.get(name)
    if (root / "modules_forge").is_dir():
        return
    mine = parse(HERE / "custom_words.py")
    for name, (real_file, real_name) in CUSTOM_WORDS.items():
        real_path = root / real_file
        real = parse(real_path) if real_path.is_file() else ast.Module(body=[], type_ignores=[])
        real_cls = classes(real).get(real_name)
        real_methods = methods(real_cls, real) if real_cls else {}
        for method, fn in methods(classes(mine)[name], mine).items():
            if f"{name}.{method}" in STANDIN_HELPERS:
                assert method not in real_methods, method
            elif not method.startswith("_"):
                yield f"{real_name}.{method}", fn, real_methods.get(method)


@webui
def test_standin_functions_have_the_real_signatures(root):
    problems = []
    for label, mine, real in standin_pairs(root):
        if real is None:
            problems.append(f"{label}: not in the web UI")
        elif signature(mine) != signature(real):
            problems.append(f"{label}: stand-in {signature(mine)} != real {signature(real)}")
    assert not problems, "\n".join(problems)
