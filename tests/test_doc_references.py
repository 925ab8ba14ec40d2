"""Every ``modlm.a.b`` and ``modlm/...`` the code's docstrings and comments, the README and
docs/ name exists.

Moved or renamed code leaves stale references behind in prose that no import checks; this test
resolves each dotted name (a module, then attributes of it) and lists those that do not.
"""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DOTTED = re.compile(r"\bmodlm(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
# Placeholders in prose ("modlm.X"), and a variable named modlm in the Llama conversion table.
_NOT_REFERENCES = {"modlm.X", "modlm.a.b", "modlm.replace"}
_PATH = re.compile(r"\bmodlm/[A-Za-z0-9_/]+\.(?:py|c)\b")


def _sources() -> list[Path]:
    files = [*ROOT.glob("modlm/**/*.py"), *ROOT.glob("benchmarks/*"), ROOT / "README.md", *ROOT.glob("docs/**/*.md")]
    files += [p for p in ROOT.glob("tests/**/*.py") if "fixtures" not in p.parts]  # fixtures keep old names
    return [p for p in files if p.is_file() and p.suffix in (".py", ".md")]


def _resolves(ref: str) -> bool:
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_named_modlm_object_exists():
    stale = sorted(
        f"{path.relative_to(ROOT)}: {ref}"
        for path in _sources()
        for ref in {m.group(0) for m in _DOTTED.finditer(path.read_text())}
        if ref not in _NOT_REFERENCES and not _resolves(ref)
    )
    assert not stale, "stale references to modlm objects:\n" + "\n".join(stale)


def test_every_named_modlm_file_exists():
    stale = sorted(
        f"{path.relative_to(ROOT)}: {ref}"
        for path in _sources()
        for ref in {m.group(0) for m in _PATH.finditer(path.read_text())}
        if not (ROOT / ref).exists()
    )
    assert not stale, "stale paths of modlm files:\n" + "\n".join(stale)
