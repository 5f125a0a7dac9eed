"""`--model PATH.gguf`: convert a GGUF file (llama.cpp, Ollama, LM Studio) once into an mlx-lm folder.

The file is read with the `gguf` package (memory-mapped; tensors dequantized
by its numpy dequantizers, see `gguf_tensors`), renamed and fixed up per
architecture (`gguf_arch`), its tokenizer rebuilt from the metadata
(`gguf_tokenizer`), and written into `$PARLEY_HOME/models/<name>-<id>`: a
temporary sibling folder renamed into place, so an interrupted or refused
conversion leaves nothing half-written. The id is a digest of the file's
path, size and modification time, so the same file is converted once and
reused; a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from app import paths
from app.errors import ParleyError
from app.model import gguf_arch
from app.model.gguf_tensors import tensor_to_mlx
from app.model.gguf_tokenizer import build_tokenizer, dump_json, tokenizer_config

Progress = Callable[[int, int, str], None]
SOURCE_FILE = "parley-source.json"


def converted_folder(gguf: Path) -> Path:
    """Where `gguf`'s conversion lives (whether or not it exists yet)."""
    st = gguf.stat()
    ident = hashlib.sha256(f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return paths.models_dir() / f"{gguf.stem}-{ident}"


def source_stamp(gguf: Path) -> dict:
    """What a conversion was made from: the file's path, size and modification time."""
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_converted_from(folder: Path, gguf: Path) -> bool:
    """Whether `folder` holds a finished conversion of `gguf` as it is now (a replaced or edited file is not)."""
    try:
        made_from = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (folder / "config.json").is_file() and made_from == source_stamp(gguf)


def gguf_model_folder(gguf: Path, progress: Progress | None = None) -> Path:
    """The mlx-lm folder for `gguf`, converted now if it was not before."""
    dest = converted_folder(gguf)
    if not (dest / "config.json").is_file():
        convert_any_gguf(gguf, dest, progress)
    return dest


def open_gguf(path: Path):
    """A `gguf.GGUFReader` over the file, or a clear error naming it."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ParleyError(f"No such file or folder: {path}.")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ParleyError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/... on damaged files
        raise ParleyError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}). "
                          "Download it again.") from exc


def read_meta(reader) -> dict:
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # an exotic value type: not one Parley reads
            continue
    return meta


def convert_any_gguf(gguf: Path, dest: Path, progress: Progress | None = None) -> Path:
    """Convert `gguf` into an mlx-lm folder at `dest` (atomic); return `dest`."""
    import mlx.core as mx

    from app.model.convert import unpermute_rows

    reader = open_gguf(gguf)
    meta = read_meta(reader)
    arch = gguf_arch.check_gguf_architecture(meta.get("general.architecture"), str(gguf))
    names = {t.name for t in reader.tensors}
    tokenizer = build_tokenizer(meta, str(gguf))  # refuses an unsupported tokenizer before any work
    config = gguf_arch.config_from_meta(arch, meta, names, len(meta["tokenizer.ggml.tokens"]))
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    weights, quant = {}, {}
    total = len(reader.tensors)
    for i, tensor in enumerate(reader.tensors):
        if progress:
            progress(i, total, f"converting {tensor.name}")
        target = gguf_arch.mlx_name(arch, tensor.name)
        if target is None:  # rope_freqs: becomes rope_scaling
            config["rope_scaling"] = gguf_arch.llama3_scaling_from_freqs(
                tensor.data, config["head_dim"], config["rope_theta"])
            continue
        try:
            out = tensor_to_mlx(tensor, tensor.name)
        except ParleyError as exc:
            raise ParleyError(f"{gguf}: {exc}") from exc
        which = gguf_arch.needs_unpermute(arch, tensor.name)
        for part in ("weight", "scales", "biases"):
            if part in out:
                a = out[part]
                if which:
                    a = unpermute_rows(a, config["num_attention_heads" if which == "q" else "num_key_value_heads"])
                offset = gguf_arch.norm_offset(arch, tensor.name)
                if offset:
                    a = (a.astype(mx.float32) + offset).astype(a.dtype)
                weights[target if part == "weight" else target.rsplit(".", 1)[0] + "." + part] = a
        if out["bits"]:
            quant[target.rsplit(".", 1)[0]] = {"group_size": 32, "bits": out["bits"]}
        mx.eval(list(weights.values())[-3:])
    if quant:
        bits = [q["bits"] for q in quant.values()]
        config["quantization"] = {"group_size": 32, "bits": max(set(bits), key=bits.count), **quant}
    write_model_folder(gguf, dest, weights, config, tokenizer, meta)
    if progress:
        progress(total, total, "saved")
    return dest


def write_model_folder(gguf: Path, dest: Path, weights: dict, config: dict, tokenizer, meta: dict) -> None:
    """Write an mlx-lm folder (weights, config, tokenizer, template, where it came from) at `dest`, atomically."""
    import mlx.core as mx

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        tok_config = tokenizer_config(meta)
        (tmp / "tokenizer_config.json").write_text(dump_json(tok_config))
        if "chat_template" in tok_config:
            (tmp / "chat_template.jinja").write_text(tok_config["chat_template"])
        (tmp / SOURCE_FILE).write_text(json.dumps(source_stamp(gguf)))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
