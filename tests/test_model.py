"""The foundation: converting the embedded GGUF, the tokenizer, loading, bad input."""

from __future__ import annotations

import os
import random
from pathlib import Path

import mlx.core as mx
import pytest

from app.errors import ParleyError
from app.model import convert
from app.model.chat_tokenizer import ChatTokenizer
from app.model.loader import load_model, resolve_model_folder

ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve café, Ærøskøbing, Straße, ¿qué tal?",
    "Emoji: 🙂🚀👩‍🔬 and flags 🇫🇷",
    "def add(a, b):\n    return a + b  # 12345\n\tif x != y: print(f'{x!r}')",
    "  leading and trailing spaces  \n\n",
]


def greedy(lm, prompt_ids, n):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm.model)
    y, out = mx.array([prompt_ids]), []
    for _ in range(n):
        y = mx.argmax(lm.model(y, cache=cache)[:, -1:], axis=-1)
        token = y.item()
        if token in lm.tokenizer.eos_ids:
            break
        out.append(token)
    return lm.tokenizer.decode_reply(out)


def test_tiny_model_loads_through_the_same_loader(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    logits = lm.model(mx.array([ids]))
    assert logits.shape == (1, len(ids), lm.tokenizer.vocab_size)
    assert lm.n_layers == 2 and lm.n_kv_heads == 2 and lm.head_dim == 16
    assert len(lm.fingerprint) == 64


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tiny_tokenizer_round_trips(tiny_model_dir, text):
    tok = ChatTokenizer(tiny_model_dir)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_embedded_tokenizer_round_trips(embedded_model_dir, text):
    tok = ChatTokenizer(embedded_model_dir)
    assert tok.decode(tok.encode(text)) == text


def test_embedded_tokenizer_splits_digits_and_knows_chatml(embedded_model_dir):
    tok = ChatTokenizer(embedded_model_dir)
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.encode("<|im_start|>")[0] == 1
    assert 2 in tok.eos_ids


def test_text_stream_never_splits_a_character(embedded_model_dir):
    tok = ChatTokenizer(embedded_model_dir)
    text = "Voilà 🚀 fini"
    stream = tok.stream()
    pieces = [stream.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def streamed_and_text(tok: ChatTokenizer, ids: list[int]) -> tuple[list[str], str]:
    """What a reply of `ids` streams (every non-empty delta, the end's rest included) and its saved text."""
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.rest()]
    return [p for p in pieces if p], stream.text


def test_text_stream_deltas_add_up_to_the_saved_text(tiny_model_dir):
    """A reply that ends on a token holding text then a cut byte ("l" + half a character) streams that text
    as its last delta; a reply of nothing but bytes that are no UTF-8 text streams nothing and is empty."""
    tok = ChatTokenizer(tiny_model_dir)
    vocab = tok.vocab_size
    decoded = {i: tok.decode_reply([i]) for i in range(vocab)}
    cut = next(i for i, d in decoded.items() if d.endswith("\ufffd") and d.rstrip("\ufffd"))
    byte = next(i for i, d in decoded.items() if d == "\ufffd")
    word = tok.encode("the")
    pieces, text = streamed_and_text(tok, word + [cut])
    assert "".join(pieces) == text == "the" + decoded[cut].rstrip("\ufffd")
    assert streamed_and_text(tok, [byte] * 8) == ([], "")
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))] + rng.choice([[], [cut], [byte]])
        pieces, text = streamed_and_text(tok, ids)
        assert "".join(pieces) == text, ids


@pytest.mark.real_model
def test_embedded_model_names_paris(embedded_model_dir):
    lm = load_model(str(embedded_model_dir))
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in greedy(lm, ids, 16)


@pytest.mark.real_model
def test_converted_folder_loads_with_plain_mlx_lm(embedded_model_dir):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(embedded_model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert "Paris" in mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)


def test_default_model_is_converted_once_into_parley_home(parley_home):
    calls = []
    folder = resolve_model_folder(None, progress=lambda done, total, label: calls.append((done, total)))
    assert folder.parent == parley_home / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    assert calls and calls[-1][0] == calls[-1][1]
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_folder(None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    from app.model.loader import embedded_gguf

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.mx, "save_safetensors", disk_full)
    with pytest.raises(OSError):
        convert.convert_gguf(embedded_gguf(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_gguf_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ParleyError, match="broken.gguf"):
        convert.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_is_named(tmp_path):
    with pytest.raises(ParleyError, match="nothing.gguf"):
        convert.read_gguf(tmp_path / "nothing.gguf")


def test_model_folder_without_tokenizer_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ParleyError, match="tokenizer.json"):
        load_model(str(folder))


def test_folder_that_is_not_a_model_is_named(tmp_path):
    with pytest.raises(ParleyError, match="config.json"):
        resolve_model_folder(str(tmp_path))


def test_unknown_architecture_is_named(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "weird"))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParleyError, match="weird"):
        load_model(str(folder))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_home_is_named(tmp_path, monkeypatch):
    home = tmp_path / "ro"
    home.mkdir(mode=0o500)
    monkeypatch.setenv("PARLEY_HOME", str(home))
    from app import paths

    with pytest.raises(ParleyError, match="PARLEY_HOME"):
        paths.parley_home()


def test_home_that_is_a_file_is_named(tmp_path, monkeypatch):
    home = tmp_path / "a-file"
    home.write_text("")
    monkeypatch.setenv("PARLEY_HOME", str(home))
    from app import paths

    with pytest.raises(ParleyError, match="a-file"):
        paths.parley_home()


def test_truncated_gguf_is_named(tmp_path):
    from app.model.loader import embedded_gguf

    whole = embedded_gguf().read_bytes()
    for cut in (16, 4096, len(whole) // 2, len(whole) - 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(whole[:cut])
        with pytest.raises(ParleyError, match=f"cut{cut}.gguf"):
            convert.read_gguf(bad)


def test_file_that_is_not_gguf_is_named(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello, I am a text file")
    with pytest.raises(ParleyError, match="magic"):
        convert.read_gguf(bad)
