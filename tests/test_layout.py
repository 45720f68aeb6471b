"""The repository's shape: it speaks of itself only, and the serving subpackage keeps its internals to itself."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".cfg", ".toml", ".html", ".yaml", ".yml"}
SKIPPED_DIRS = {".git", ".venv", "__pycache__", "data", "node_modules", "build", "dist"}


def text_files(*roots: str):
    """The repository's text files under `roots` (all of it by default): source, docs, scripts, tests."""
    for root in roots or (".",):
        for folder, dirs, files in os.walk(ROOT / root):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info"))
            for name in sorted(files):
                path = Path(folder) / name
                if path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
                    yield path


# ----------------------------------------------------------------------------
# The project speaks of itself only: no documents, trackers or machines that are not in the repository.

SELF_REFERENCES = {
    "a background document (state the fact, or cite its public source)": re.compile(r"\bREFERENCE\b|\b(?i:reference\.md)\b"),
    "an outside specification (a GPU is 'the GPU', a Hub model card 'the model card')": re.compile(r"\bthe card\b", re.I),
    "an issue tracker's number (say what the code does and why)": re.compile(r"\bissues?\s*#?\s*\d+|\bthe issue\b", re.I),
    "the development environment (describe what any user would run)": re.compile(
        r"\b(CONVENTIONS|HELPERS)\.md\b|/work/(shared|issues)\b|\blent to\b|\bdev machine\b|\bdevice tool\b", re.I),
}
REFERENCE_WORD = re.compile(r"\breferences?\b(?:'s)?", re.I)
# "reference" as an ordinary word (a reference image, a storage reference, the accuracy reference) is lowercase and
# never possessive; anything else names a document unless it is one of these:
ALLOWED_REFERENCE = (
    re.compile(r"^\s*(#|\"\"\"|-)?\s*References?\b(?!'s)"),           # a capital at the start of a sentence or a list item
)


def self_references(path: Path) -> list[str]:
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        where = f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}"
        found += [f"{where}  <- {why}" for why, pattern in SELF_REFERENCES.items() if pattern.search(line)]
        for word in REFERENCE_WORD.finditer(line):
            ordinary = word.group() in ("reference", "references")
            if not ordinary and not any(allowed.search(line) for allowed in ALLOWED_REFERENCE):
                found.append(f"{where}  <- '{word.group()}' names a document; say what it says instead")
    return found


def test_the_repository_names_no_outside_documents_issues_or_machines():
    found = [hit for path in text_files() for hit in self_references(path)]
    assert not found, "\n".join(found)


def test_the_self_reference_scan_finds_what_it_must_and_passes_ordinary_words(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = ["as REFERENCE's profile shows", "see Reference's table", "the card's spelling", "(issue 8)", "Issue 23, 1: sockets",
           "fixed in issue #12", "the issue's rule", "no GPU machine was lent to this work", "see /work/shared/notes"]
    good = ["the reference image", "a malformed storage reference", "the accuracy reference (eager fp32)", "references to tensors",
            "reference = build(config)", "the model card lists it", "the GPU, its clocks", "References: the papers below"]
    (tmp_path / "bad.md").write_text("\n".join(bad) + "\n")
    (tmp_path / "good.py").write_text("\n".join(f"# {line}" for line in good) + "\n")
    assert sorted({int(hit.split(":")[1]) for hit in self_references(tmp_path / "bad.md")}) == list(range(1, len(bad) + 1))
    assert self_references(tmp_path / "good.py") == []


# ----------------------------------------------------------------------------
# t2f.engine.serve: others use the names its __init__ exports, never its modules.

SERVE = "t2f.engine.serve"


def serve_internals_imported(path: Path) -> list[str]:
    """Imports of t2f.engine.serve's modules (not its exported names) in the Python file `path`, outside the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    parts = path.relative_to(ROOT).parent.parts                  # t2f/ is the package t2f; engine/backends/ t2f.engine.backends
    package = ".".join(("t2f",) + (parts[1:] if parts[:1] == ("t2f",) else parts))
    exported = set(__import__(SERVE, fromlist=["__all__"]).__all__)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                 # relative: resolved against the file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            names = [f"{base}.{alias.name}" if base == SERVE and alias.name not in exported else base for alias in node.names]
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names if name.startswith(SERVE + ".")]
    return found


def test_nothing_outside_the_serving_package_imports_its_modules():
    sources = [p for p in text_files("t2f", "engine", "export", "trainer", "benchmarks") if p.suffix == ".py"
               and (ROOT / "engine" / "serve") not in p.parents] + [ROOT / "setup.py"]
    found = [hit for path in sources for hit in serve_internals_imported(path)]
    found += [f"{p.relative_to(ROOT)}: {m}" for p in text_files("docs") if p.suffix == ".md"
              for m in re.findall(r"\bt2f\.engine\.serve\.\w+", p.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)
    assert serve_internals_imported(ROOT / "tests" / "test_front.py")                 # the scan sees them (tests may)


def test_the_serving_package_and_its_protocol_import_without_the_fronts_libraries():
    """Triton's model.py imports the protocol in NVIDIA's container, where t2f[serve]'s libraries may be missing."""
    code = ("import sys; import t2f.engine.serve as s; import t2f.engine.serve.protocol; from t2f.engine.serve import "
            "write_repository, TEXT_MODEL, MODELS; print(TEXT_MODEL, MODELS, callable(write_repository)); "
            "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('starlette', 'uvicorn', 'tritonclient', 'grpc', 'websockets')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["t2f ('t2f', 't2f_image') True", "[]"]
