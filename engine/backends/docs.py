"""The backend tables of README.md and docs/backends.md, made from what t2f's own backend classes declare.

    python -m t2f.engine.backends.docs README.md docs/backends.md            # rewrite the tables between their markers
    python -m t2f.engine.backends.docs --check README.md docs/backends.md    # exit 1, naming them, where one differs

A table sits between `<!-- backends:NAME -->` and `<!-- /backends:NAME -->` (NAME one of TABLES); everything outside
the markers is the document's own. tests/test_backend_registry.py holds the documents to these tables.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from t2f.files import atomic_path, is_regular_file
from t2f.precision import Precision

from .base import Backend
from .registry import builtin_classes, preference

DEVICES = {"cpu": "CPU", "cuda": "CUDA"}
PRECISION_NEEDS = {Precision.BF16: "a CPU with bf16 instructions (AVX512_BF16 or AMX)"}


def _precisions(cls: type[Backend]) -> str:
    """"fp32, fp16 (CUDA), bf16 (CPU)": a precision's device where it runs on one of the backend's several."""
    return ", ".join(f"{p} ({DEVICES[p.device_type]})" if p.device_type and len(cls.devices) > 1 else str(p)
                     for p in cls.precisions)


def _graphs(cls: type[Backend]) -> str:
    if not cls.uses_artifacts:
        return "eager modules (nothing exported)"
    if cls.exports_on_demand:
        return "ONNX graphs: `--artifacts DIR`, else exported into `T2F_CACHE/onnx/` on first use"
    return "`--artifacts DIR` made by t2f-export"


def _needs(cls: type[Backend], precision: Precision) -> str:
    """What an entry of auto's list needs besides its device: a package, artifacts, instructions."""
    needs = [cls.install]
    needs.append("`--artifacts` engines" if cls.uses_artifacts and not cls.exports_on_demand else "")
    needs.append(PRECISION_NEEDS.get(precision, ""))
    return "; ".join(n for n in needs if n) or "-"


def auto_table(classes: dict[str, type[Backend]] | None = None) -> str:
    """`auto`'s list per device: the first entry that runs here is picked (`registry.preference`)."""
    classes = builtin_classes() if classes is None else classes
    lines = ["| device | `auto` tries, in this order | precision | needs |", "|---|---|---|---|"]
    for device, label in DEVICES.items():
        for i, (name, precision) in enumerate(preference(device, classes), 1):
            lines.append(f"| {label if i == 1 else ''} | {i}. `{name}` | {precision} | {_needs(classes[name], precision)} |")
    return "\n".join(lines)


def backends_table(classes: dict[str, type[Backend]] | None = None) -> str:
    """One row per backend: what it runs on and in, what it needs, where `auto` tries it, what runs."""
    classes = builtin_classes() if classes is None else classes
    places = {device: {entry: i for i, entry in enumerate(preference(device, classes), 1)} for device in DEVICES}
    lines = ["| `--backend` | devices | precisions | noise modes | memory formats | text towers | graphs | install | "
             "`auto` tries it | what runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cls in classes.items():
        auto = "; ".join(f"{DEVICES[d]} " + ", ".join(f"#{i} {p}" for (n, p), i in places[d].items() if n == name)
                         for d in DEVICES if any(n == name for n, _ in places[d])) or "never"
        towers = "any open_clip tower" if cls.any_text_tower else "t2f's exportable rewrite"
        lines.append(f"| `{name}` | {', '.join(DEVICES[d] for d in cls.devices)} | {_precisions(cls)} | "
                     f"{', '.join(cls.noise_modes)} | {', '.join(cls.memory_formats)} | {towers} | {_graphs(cls)} | "
                     f"{cls.install or '-'} | {auto} | {cls.description} |")
    return "\n".join(lines)


TABLES = {"auto": auto_table, "backends": backends_table}
MARKED = re.compile(r"(<!-- backends:(\w+) -->\n)(.*?)(<!-- /backends:\2 -->)", re.S)


def update(text: str) -> str:
    """`text` with every marked table made anew (ValueError for a marker naming no table)."""
    def fill(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise ValueError(f"no backend table {m.group(2)!r}; one of {', '.join(TABLES)}")
        return f"{m.group(1)}{TABLES[m.group(2)]()}\n{m.group(4)}"

    return MARKED.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    """0 when done (or, with --check, when every table is current), 1 where --check finds one out of date, 2 for bad
    arguments or a file that cannot be read or written (one line)."""
    args = sys.argv[1:] if argv is None else argv
    check, paths = "--check" in args, [Path(a) for a in args if a != "--check"]
    if not paths:
        print("usage: python -m t2f.engine.backends.docs [--check] FILE.md ...", file=sys.stderr)
        return 2
    stale = []
    try:
        for path in paths:
            if not is_regular_file(path):
                raise OSError(f"{path} is not a regular file")
            text = path.read_text(encoding="utf-8")
            new = update(text)
            if new != text:
                stale.append(str(path))
                if not check:
                    with atomic_path(path) as tmp:
                        tmp.write_text(new, encoding="utf-8")
    except (OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if stale:
        print(f"{'out of date' if check else 'rewrote'}: {', '.join(stale)}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
