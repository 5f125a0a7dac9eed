"""Peak resident memory of a random 4-bit model on the CPU path: `python -m app.bench.rss [--hidden ...]`.

Builds a random-weight llama of about 0.5B parameters (Qwen2.5-0.5B's shape, 4-bit group 64) in a
temporary folder, then, in a fresh process, loads it with `load_model` (CPU path on), prefills 512
tokens and decodes 32, and prints the weight bytes on disk, the KV working copy, the peak RSS and the
budget 1.5 x weights + KV + 300 MB. The measuring process preloads the BLAS `parley` uses (`app.fastblas`):
without it every matmul ran on the reference BLAS and prefill took minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = {"hidden": 896, "layers": 24, "intermediate": 4864, "heads": 14, "kv_heads": 2, "vocab": 151936}


def build(dest: Path, shape: dict) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from app.model.tiny import CHATML, build_tokenizer

    config = {"model_type": "llama", "hidden_size": shape["hidden"], "num_hidden_layers": shape["layers"],
              "intermediate_size": shape["intermediate"], "num_attention_heads": shape["heads"],
              "num_key_value_heads": shape["kv_heads"], "head_dim": shape["hidden"] // shape["heads"],
              "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
              "vocab_size": shape["vocab"], "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    dest.mkdir(parents=True, exist_ok=True)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=64, bits=4)
    config["quantization"] = {"group_size": 64, "bits": 4}
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (dest / "config.json").write_text(json.dumps(config))
    tok = build_tokenizer(384)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return dest


def measure(folder: Path, n_prefill: int = 512, n_decode: int = 32) -> dict:
    import time

    import mlx.core as mx

    from app.engine.generation import prefill
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.schemes import get_scheme
    from app.model.loader import load_model

    lm = load_model(str(folder))
    cache = ConversationCache.empty(lm.n_layers, get_scheme("q4"), lm.fingerprint)
    ids = [5 + i % 300 for i in range(n_prefill)]
    t0 = time.perf_counter()
    logits = None
    for step in prefill(lm.model, cache, ids):
        logits = step.logits
    t1 = time.perf_counter()
    for i in range(n_decode):
        logits = lm.model(mx.array([[int(mx.argmax(logits).item()) % 300]]), cache=cache.layers)[:, -1, :]
        cache.appended([0])
    mx.eval(logits)
    t2 = time.perf_counter()
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    kv = cache.nbytes  # working copy (compact caches: the tail) + encoded blocks
    peak = _peak_rss_bytes()
    from app import fastblas

    return {"blas": Path(fastblas.loaded).name if fastblas.loaded else "reference",
            "weights_mb": weights / 2**20, "kv_working_copy_mb": kv / 2**20, "peak_rss_mb": peak / 2**20,
            "budget_mb": (1.5 * weights + kv) / 2**20 + 300, "prefill_tps": n_prefill / (t1 - t0),
            "decode_tps": n_decode / (t2 - t1)}


def _peak_rss_bytes() -> int:
    """This process image's peak resident memory: /proc's VmHWM on Linux.

    Not getrusage's ru_maxrss: Linux keeps that across fork and exec, so the measuring child reported the
    parent's resident memory at the fork (the parent had just built the 0.5B model: ~990 MB) whenever
    that was more than its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys as _sys

    scale = 1 if _sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", help="measure this model folder (in this process)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--decode", type=int, default=32, help="decode steps (default 32)")
    parser.add_argument("--only", choices=("fp32", "lean"), help="measure one way only")
    args = parser.parse_args(argv)
    from app import fastblas

    fastblas.preload()  # as `parley` does (app.cli): without it MLX's matmuls use the reference BLAS
    if args.folder:
        print(json.dumps(measure(Path(args.folder), args.prefill, args.decode)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "random-0.5b", SHAPE)
        results = {}
        ways = (("fp32 copies (before)", "1000000"), ("lean (after)", None))
        for label, lean_mb in [w for w in ways if args.only is None or (w[1] is None) == (args.only == "lean")]:
            env = {**os.environ, "PARLEY_LEAN_MB": lean_mb} if lean_mb else {
                k: v for k, v in os.environ.items() if k != "PARLEY_LEAN_MB"}
            out = subprocess.run([sys.executable, "-m", "app.bench.rss", "--folder", str(folder), "--prefill",
                                  str(args.prefill), "--decode", str(args.decode)],
                                 capture_output=True, text=True, check=True, env=env)
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    labels = list(results)
    print(f"{'':>20}  " + "  ".join(f"{label:>20}" for label in labels))
    print(f"{'blas':>20}  " + "  ".join(f"{results[label].pop('blas'):>20}" for label in labels))
    for key in results[labels[0]]:
        print(f"{key:>20}  " + "  ".join(f"{results[label][key]:>20,.1f}" for label in labels))
    print(f"{'within budget':>20}  " + "  ".join(
        f"{str(results[label]['peak_rss_mb'] <= results[label]['budget_mb']):>20}" for label in labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
