"""app.model.q4_stacks: q/k/v and gate/up stacked while the weights file is read, each projection a view of its stack.

Same values as stacking by copy after loading (the way it was done before), so every output is bitwise equal, for
each kernel variant this machine runs; a damaged weights file is named when it is read.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from app.errors import ParleyError
from app.model import cpu_kernels, cpu_rewrite
from app.model.cpu_linear import SHORT_ROWS
from app.model.loader import load_model
from app.model.q4_stacks import stack_lazily, stack_of
from tests.kv_helpers import fill, greedy_steps, make_pool, tokens


def stacking_applies() -> bool:
    k = cpu_kernels.kernels()
    return k is not None and k.q4_fast() == 1 and mx.default_device() == mx.cpu


@pytest.fixture(params=cpu_kernels.VARIANTS)
def variant(request):
    """The kernels switched to one variant for the whole test, model load included (restored afterwards)."""
    if cpu_kernels.kernels() is None:
        pytest.skip("the C kernels are off or not built")
    info = cpu_kernels.variants()[request.param]
    if not (info["built"] and info["usable"]):
        pytest.skip(f"the {request.param} variant is not built or this CPU cannot run it")
    before = cpu_kernels.active_variant()
    cpu_kernels.use_variant(request.param)
    yield request.param
    cpu_kernels.use_variant(before)


def copy_stacked(model_dir, monkeypatch):
    """The model loaded with nothing stacked at load: `host_exec.stack_q4` copies, as before q4_stacks."""
    with monkeypatch.context() as m:
        m.setattr(cpu_rewrite, "_stack_groups", lambda model: [])
        return load_model(str(model_dir))


def ptr(a: mx.array) -> int:
    return np.asarray(a).ctypes.data


def test_projections_are_views_of_one_stack_holding_the_files_values(tiny_model_dir):
    if not stacking_applies():
        pytest.skip("no usable 4-bit kernels: nothing is stacked")
    lm = load_model(str(tiny_model_dir))
    stored = mx.load(str(tiny_model_dir / "model.safetensors"))
    for i, layer in enumerate(lm.model.model.layers):
        for module, names, stacked in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "_qkv"),
                                       (layer.mlp, ("gate_proj", "up_proj"), "_gate_up")):
            parts = [getattr(module, n) for n in names]
            stack = stack_of(parts)
            assert stack is not None
            q4 = module.__dict__[stacked]
            assert q4.w.ctypes.data == ptr(stack.weight) and q4.s.ctypes.data == ptr(stack.scales)
            row = 0
            for name, p in zip(names, parts):
                prefix = f"model.layers.{i}.{module is layer.mlp and 'mlp' or 'self_attn'}.{name}"
                assert np.array_equal(np.asarray(p.weight), np.asarray(stored[f"{prefix}.weight"]))
                for part in ("scales", "biases"):
                    assert p[part].dtype == mx.float32
                    assert np.array_equal(np.asarray(p[part]), np.asarray(stored[f"{prefix}.{part}"].astype(mx.float32)))
                rows = p.weight.shape[0]
                assert ptr(p.weight) == ptr(stack.weight) + row * p.weight.shape[1] * 4  # a view: no copy
                assert p.__dict__["_q4"].w.ctypes.data == ptr(p.weight)
                row += rows
        down = layer.mlp.down_proj
        assert layer.mlp.__dict__["_down"] is down.__dict__["_q4"]  # one projection is its own weights


def test_outputs_equal_stacking_by_copy_bitwise(tiny_model_dir, parley_home, monkeypatch, variant):
    stacked = load_model(str(tiny_model_dir))
    copied = copy_stacked(tiny_model_dir, monkeypatch)
    if stacking_applies():
        attn = stacked.model.model.layers[0].self_attn
        assert stack_of([attn.q_proj, attn.k_proj, attn.v_proj]) is not None
    short, long = tokens(SHORT_ROWS // 2, seed=1), tokens(3 * SHORT_ROWS, seed=2)
    for ids in (short, long):  # the 4-bit row kernels, then BLAS over the fp32 copies
        results = []
        for lm in (stacked, copied):
            cache = fill(lm, make_pool(lm), ids)
            logits, chosen = greedy_steps(lm, cache, ids[-1], 6)
            results.append((logits, chosen))
        assert results[0][1] == results[1][1]
        for a, b in zip(results[0][0], results[1][0]):
            assert np.array_equal(a, b)


def test_stack_of_wants_all_parts_in_order(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), fast_cpu=False)
    attn = lm.model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    before = [np.array(p.weight) for p in parts]
    assert stack_of(parts) is None
    stack = stack_lazily(parts)
    mx.eval(attn.parameters())
    assert stack_of(parts) is stack
    assert stack_of(parts[:2]) is None and stack_of(parts[::-1]) is None and stack_of(parts[1:]) is None
    for p, b in zip(parts, before):
        assert np.array_equal(np.asarray(p.weight), b)


def test_a_damaged_weights_file_is_named_when_read(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # the header is whole, the tensors are cut short
    with pytest.raises(ParleyError, match="model"):
        load_model(str(broken))
