"""Shared helpers of the cache benchmarks (ttft, restore, capacity, save, agents).

Every part works in a private temporary PARLEY_HOME (`temp_home`): catalog,
caches and personas written by a benchmark never touch the user's data. The
model itself is loaded by `parley bench` before the parts run.

Context text: the shipped public-domain English text in `app/bench/texts/`,
tokenized with the model's own tokenizer (`context_text`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TEXT = Path(__file__).parent / "texts" / "jargon-file-4.4.7.txt"


def out(args):
    """Where tables and progress go: stderr when `--json` prints the JSON on stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def log(args, message: str) -> None:
    print(message, file=out(args), flush=True)


def quick(args) -> bool:
    return bool(getattr(args, "quick", False))


def repeats(args, default: int = 3) -> int:
    """Runs per measurement (median taken): `--repeats`, never fewer than 3 outside tests."""
    n = getattr(args, "repeats", None) or default
    return max(1, int(n))


def median(xs) -> float:
    return float(statistics.median(xs))


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


@contextlib.contextmanager
def temp_home(prefix: str = "parley-bench-"):
    """A throw-away PARLEY_HOME for the duration of a part (the previous value is restored)."""
    old = os.environ.get("PARLEY_HOME")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        os.environ["PARLEY_HOME"] = str(home)
        try:
            yield home
        finally:
            if old is None:
                os.environ.pop("PARLEY_HOME", None)
            else:
                os.environ["PARLEY_HOME"] = old


def text_tokens(lm, n: int | None = None) -> list[int]:
    """Token ids of the shipped English text (repeated if a model's tokenizer makes it shorter than `n`)."""
    ids = lm.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    if n is not None:
        while len(ids) < n:
            ids = ids + ids
        ids = ids[:n]
    return ids


def context_text(lm, n_tokens: int) -> str:
    """About `n_tokens` tokens of the shipped text, as text (cut on a token boundary)."""
    return lm.tokenizer.decode(text_tokens(lm, n_tokens))


def make_pool(lm, home: Path, scheme: str = "q4", catalog=None):
    """A BlockPool (and its catalog) under `home`, as `Session.open` builds it."""
    from app.catalog import Catalog
    from app.catalog.caches import CacheStore
    from app.engine.session import activation_dtype, kv_shape
    from app.kvstore.pool import BlockPool
    from app.kvstore.schemes import get_scheme
    from app.model.arch import sliding_windows

    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    catalog = catalog or Catalog(home / "catalog.db")
    return BlockPool(CacheStore(catalog), home / "caches", lm.fingerprint, get_scheme(scheme), lm.n_layers,
                     activation_dtype(lm.model), kv_shape(lm.model), sliding_windows(lm.model))


def fill(lm, pool, ids: list[int]):
    """A ConversationCache holding `ids`, prefilled by the engine's own `prefill` (chunks of 512)."""
    from app.engine.generation import prefill
    from app.kvstore.conversation_cache import ConversationCache

    cache = ConversationCache.empty(lm.n_layers, pool.scheme, pool.fingerprint)
    logits = None
    for step in prefill(lm.model, cache, ids):
        logits = step.logits
    return cache, logits


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    result = fn(*a, **kw)
    return result, time.perf_counter() - t0


def drop_page_cache(paths) -> bool:
    """Ask the kernel to drop these (clean, fsynced) files from the page cache; True if it could.

    `posix_fadvise(DONTNEED)` needs no privileges and touches only these files, so
    the next read comes from the disk (or the virtual disk's host cache: on a VM
    the host may still have them in its own RAM).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            ok = False
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def raw_read(paths) -> tuple[int, float]:
    """Read every file whole the way a restore reads them; (bytes, seconds).

    The floor a restore is compared with: the same prefetching read as
    `BlockPool.load` (files read in order on a `ReadAhead` helper thread, the
    kernel asked to prefetch all but the first with `blockfile.prefetch`), minus
    the checks and the decode. A plain one-file-after-another read would be a
    slower baseline than the restore's own read, flattering the restore.
    """
    from functools import partial

    from app.kvstore.blockfile import prefetch
    from app.kvstore.read_ahead import ReadAhead

    paths = [Path(p) for p in paths]
    t0 = time.perf_counter()
    total = 0
    with ReadAhead([partial(Path.read_bytes, p) for p in paths], hint=partial(prefetch, paths[1:])) as files:
        for data in files:
            total += len(data)
    return total, time.perf_counter() - t0


def cache_files(pool, key: str) -> list[Path]:
    """The block files and the tail file a stored cache is made of."""
    row = pool.record(key)
    return [pool.block_path(h) for h in row.chain] + [pool.tail_path(row.tail_file)]


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain right-aligned text table."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(c) -> str:
    if isinstance(c, float):
        if c >= 100:
            return f"{c:,.0f}"
        if c >= 10:
            return f"{c:.1f}"
        return f"{c:.2f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def machine() -> dict:
    """Where the numbers came from: `parley doctor`'s facts (kernels and variant, CPU, BLAS, MLX, versions)."""
    from app.diagnostics import active_setup

    return active_setup()
