"""random-LTD functional API: surgery, adapters (masks, positions, rotary), indices, accounting, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_dataeff.random_ltd import (
    BlockAdapter,
    LayerTokenLRScheduler,
    apply_random_ltd,
    count_layer_tokens,
    find_blocks,
    register_block,
    remove_random_ltd,
)

pytest.importorskip("transformers")
from tiny_models import H, S, TorchEncoder, V, bert, gpt2, llama, vit  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run many times faster on one intra-op thread (no thread-pool barriers on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(kind):
    torch.manual_seed(0)
    ids = torch.randint(1, V, (2, S))
    if kind == "gpt2":
        return gpt2(), {"input_ids": ids}
    if kind == "llama":
        return llama(), {"input_ids": ids}
    if kind == "bert":
        return bert(), {"input_ids": ids}
    if kind == "vit":  # 16 patches + CLS = 17 tokens
        return vit(), {"pixel_values": torch.randn(2, 1, 8, 8)}
    model = TorchEncoder(batch_first=kind == "tel")
    return model, {"x": torch.randn(2, S, H)}


def out_of(res):
    if torch.is_tensor(res):
        return res
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


KINDS = ["gpt2", "llama", "bert", "vit", "tel", "tel_seq_first"]


@pytest.mark.parametrize("kind", KINDS)
def test_full_kept_equals_unpatched_and_eval_equals_unpatched(kind):
    model, inputs = make(kind)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    state = apply_random_ltd(model, kept_tokens=64)
    assert list(model.state_dict()) == keys
    assert state.layers == [1, 2] and state.num_layers == 4
    model.train()
    ref.train()
    a, b = out_of(model(**inputs)), out_of(ref(**inputs))
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
    assert state.last_indices is None  # nothing was gathered
    state.kept_tokens = 4
    assert not torch.equal(out_of(model(**inputs)), b)
    assert state.last_indices.shape == (2, 2, 4)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(out_of(model(**inputs)), out_of(ref(**inputs)))


def test_state_dict_round_trips_and_remove_restores():
    model, inputs = make("gpt2")
    plain = copy.deepcopy(model)
    block_cls = type(model.transformer.h[1])
    apply_random_ltd(model, kept_tokens=4)
    assert all(type(b).__name__ == "RandomLTD" + block_cls.__name__ for b in model.transformer.h)  # no hooks
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.transformer.h)
    torch.nn.init.normal_(model.transformer.h[1].mlp.c_fc.weight)
    plain.load_state_dict(model.state_dict())  # patched -> unpatched
    fresh = copy.deepcopy(plain)
    torch.nn.init.zeros_(fresh.transformer.h[1].mlp.c_fc.weight)
    model.load_state_dict(fresh.state_dict())  # unpatched -> patched
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, fresh.transformer.h[1].mlp.c_fc.weight)
    remove_random_ltd(model)
    assert all(type(b) is block_cls for b in model.transformer.h)
    assert all("_random_ltd" not in b.__dict__ for b in model.transformer.h)
    model.train()
    fresh.train()
    assert torch.equal(out_of(model(**inputs)), out_of(fresh(**inputs)))
    apply_random_ltd(model, kept_tokens=4)  # can be applied again after removal
    with pytest.raises(ValueError, match="already applied"):
        apply_random_ltd(model, kept_tokens=4)


def _hook_block_inputs(block):
    seen = {}

    def hook(mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    return seen, block.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_wrapped_block_equals_original_on_gathered_tokens(kind):
    """Dropped tokens pass unchanged; kept tokens equal the original block run on the gathered subsequence
    with gathered (true) positions and rotary tables."""
    model, inputs = make(kind)
    blocks = [b for _, b, _ in find_blocks(model)]
    seen, handle = _hook_block_inputs(blocks[1])
    model.train()
    model(**inputs)
    handle.remove()
    args, kwargs = seen["args"], dict(seen["kwargs"])
    ref_block = copy.deepcopy(blocks[1])
    state = apply_random_ltd(model, kept_tokens=3)
    x = args[0] if args else kwargs["hidden_states"]
    out = blocks[1](*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    idx = state.last_indices[0]
    assert idx.shape == (2, 3)
    dropped = torch.ones(2, S, dtype=torch.bool)
    dropped[torch.arange(2)[:, None], idx] = False
    assert torch.equal(out[dropped], x[dropped])
    for b in range(2):
        sub = x[b : b + 1, idx[b]]
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "use_cache", "hidden_states")}
        pos = torch.arange(S)[idx[b]][None]
        kw["position_ids"] = pos
        if kind == "llama":
            rotary = model.model.rotary_emb
            kw["position_embeddings"] = rotary(sub, pos)
            full = kwargs["position_embeddings"]
            assert torch.equal(kw["position_embeddings"][0], full[0][:, idx[b]])  # tables at the true positions
        if kind == "gpt2":
            expected = ref_block(sub, None, None, **kw)
        else:
            expected = ref_block(sub, **kw)
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(out[b, idx[b]], expected[0], rtol=1e-5, atol=1e-6)


def _rewind(state, step=5):
    state.step = step + 1
    state.step = step


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causality_while_dropping(kind, attn):
    model = gpt2(attn=attn) if kind == "gpt2" else llama(attn=attn)
    state = apply_random_ltd(model, kept_tokens=4)
    model.train()
    ids = torch.randint(1, V, (2, S))
    _rewind(state)
    a = model(input_ids=ids).logits
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % V
    _rewind(state)
    b = model(input_ids=ids2).logits
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_isolation_and_no_nan_while_dropping(kind, attn):
    model = {"gpt2": gpt2, "llama": llama, "bert": bert}[kind](attn=attn)
    state = apply_random_ltd(model, kept_tokens=2)
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(1, V, (3, S))
    mask = torch.ones(3, S, dtype=torch.long)
    left = kind == "llama"
    for b, n_pad in enumerate((6, 3, 0)):  # sample 0 is mostly padding: some draws keep only pads
        if n_pad:
            if left:
                mask[b, :n_pad] = 0
            else:
                mask[b, S - n_pad :] = 0
    ids2 = torch.where(mask.bool(), ids, (ids + 7) % V)
    for step in range(4):
        _rewind(state, step)
        a = out_of(model(input_ids=ids, attention_mask=mask))
        _rewind(state, step)
        b = out_of(model(input_ids=ids2, attention_mask=mask))
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)
    a.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_encoder_masks_while_dropping(batch_first):
    model = TorchEncoder(batch_first)
    state = apply_random_ltd(model, kept_tokens=3)
    model.train()
    x = torch.randn(2, S, H)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[0, 2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    x2 = x.clone()
    x2[0, 2:] += 5.0  # pad content
    x3 = x.clone()
    x3[:, -1] += 5.0  # last token
    for step in range(3):
        _rewind(state, step)
        a = model(x, mask=causal, src_key_padding_mask=pad)
        _rewind(state, step)
        b = model(x2, mask=causal, src_key_padding_mask=pad)
        _rewind(state, step)
        c = model(x3, mask=causal, src_key_padding_mask=pad)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a[~pad], b[~pad], rtol=0, atol=1e-5)
        torch.testing.assert_close(a[:, :-1], c[:, :-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,default", [("vit", (0,)), ("bert", (0,)), ("gpt2", ()), ("llama", ())])
def test_keep_positions_default_protects_cls_of_encoders(kind, default):
    model, inputs = make(kind)
    state = apply_random_ltd(model, kept_tokens=3, seed=1)
    assert state.keep_positions == default
    model.train()
    for step in range(4):
        state.step = step
        model(**inputs)
        if default:  # the CLS token is in every (layer, sample) subset
            assert (state.last_indices[..., 0] == 0).all()
    remove_random_ltd(model)
    assert apply_random_ltd(model, kept_tokens=3, keep_positions=()).keep_positions == ()  # explicit () overrides
    remove_random_ltd(model)
    assert apply_random_ltd(model, kept_tokens=3, keep_positions=[2]).keep_positions == (2,)


def test_fast_argument_binding_matches_inspect():
    from lightning_dataeff.random_ltd.apply import _bind, _call, _flatten, _spec

    class Block(nn.Module):
        def forward(self, hidden_states, attention_mask=None, /, scale=1.0, *, use_cache=False, **kw):
            return hidden_states * scale, attention_mask, use_cache, kw

    blk, x, spec = Block(), torch.ones(1, 2, 3), _spec(Block)
    for args, kwargs in [((x,), {}), ((x, None), {"scale": 2.0, "extra": 1}), ((x, None, 3.0), {"use_cache": True})]:
        flat = _flatten(spec, args, kwargs)
        ref = {k: v for k, v in _bind(Block, blk, args, kwargs)[1].items() if k != "self"}
        assert flat.keys() == ref.keys() and all(flat[k] is ref[k] for k in ref)
        got, want = _call(Block, spec, blk, flat), Block.forward(blk, *args, **kwargs)
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    assert _flatten(spec, (x, None, 2.0, 4), {}) is None  # too many positionals: inspect raises the TypeError
    with pytest.raises(TypeError):
        _bind(Block, blk, (x, None, 2.0), {"scale": 3.0})
    assert _flatten(spec, (x, None, 2.0), {"scale": 3.0}) is None  # given twice: left to inspect/forward


def test_indices_sorted_reproducible_and_keep_positions():
    model, inputs = make("vit")
    state = apply_random_ltd(model, kept_tokens=5, layers=[0, 2, 3], keep_positions=[0], seed=3)
    model.train()
    state.step = 7
    model(**inputs)
    first = state.last_indices.clone()
    assert first.shape == (3, 2, 5)
    assert (first[..., 0] == 0).all()  # CLS kept
    assert (first.diff(dim=-1) > 0).all()  # sorted, unique
    model(**inputs)  # a second forward at the same step (gradient accumulation) draws new indices
    assert not torch.equal(state.last_indices, first)
    _rewind(state, 7)
    model(**inputs)
    assert torch.equal(state.last_indices, first)
    other, _ = make("vit")
    st2 = apply_random_ltd(other, kept_tokens=5, layers=[0, 2, 3], keep_positions=[0], seed=4)
    other.train()
    st2.step = 7
    other(**inputs)
    assert not torch.equal(st2.last_indices, first)


def test_activation_checkpointing_reuses_indices():
    model, inputs = make("gpt2")
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sa = apply_random_ltd(model, kept_tokens=3)
    sb = apply_random_ltd(ref, kept_tokens=3)
    model.train()
    ref.train()
    sa.step = sb.step = 2
    la = model(**inputs, labels=inputs["input_ids"]).loss
    lb = ref(**inputs, labels=inputs["input_ids"]).loss
    assert torch.equal(sa.last_indices, sb.last_indices)
    la.backward()
    lb.backward()
    assert sa.consumed_tokens == sb.consumed_tokens == 2 * S  # recomputation is not counted again
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_whole_model_checkpoint_recomputation_is_not_a_new_forward():
    """torch.utils.checkpoint around the model re-runs the first block's hooks inside backward."""
    model = TorchEncoder()
    ref = copy.deepcopy(model)
    sa = apply_random_ltd(model, kept_tokens=3)
    sb = apply_random_ltd(ref, kept_tokens=3)
    model.train()
    ref.train()
    x = torch.randn(2, S, H)
    ya = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    yb = ref(x)
    first = sa.last_indices.clone()
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.equal(sa.last_indices, first) and torch.equal(first, sb.last_indices)
    assert sa.consumed_tokens == 2 * S
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_layer_token_accounting():
    model, inputs = make("gpt2")
    state = apply_random_ltd(model, kept_tokens=3, layers=[1, 2])
    model.train()
    model(**inputs)
    assert state.consumed_tokens == 2 * S
    assert state.consumed_layer_tokens == 2 * (S * 2 + 3 * 2) == count_layer_tokens(S, 3, 4, 2, batch_size=2)
    state.kept_tokens = 100  # capped at the sequence length
    model(**inputs)
    assert state.consumed_layer_tokens == count_layer_tokens(S, 3, 4, 2, 2) + 2 * S * 4
    model.eval()
    model(**inputs)  # evaluation is not counted
    assert state.consumed_tokens == 4 * S
    assert count_layer_tokens(1024, 128, 24, 22) == 1024 * 2 + 128 * 22


def _two_block_encoder():
    two = TorchEncoder()
    two.enc.layers = two.enc.layers[:2]
    return two


APPLY_ERRORS = {
    "out-of-range layer": (IndexError, "block index 4 is out of range.*4 blocks", dict(layers=[1, 4])),
    "duplicate layers": (ValueError, "duplicate", dict(layers=[1, 1])),
    "float layer": (TypeError, "not an integer", dict(layers=[1.0])),
    "kept_tokens 0": (ValueError, "kept_tokens must be a positive integer", dict(kept_tokens=0)),
    "negative keep position": (ValueError, "keep_positions", dict(keep_positions=[-1])),
    "fewer kept than keep_positions": (ValueError, "kept_tokens .1. must be >= the number of keep_positions",
                                       dict(kept_tokens=1, keep_positions=[0, 1])),
    "unregistered block_types": (ValueError, "block_types.*neither a registered block", dict(block_types=[nn.Linear])),
}


@pytest.mark.parametrize("case", list(APPLY_ERRORS))
def test_apply_errors_name_the_problem(case):
    exc, msg, kwargs = APPLY_ERRORS[case]
    model, _ = make("gpt2")
    with pytest.raises(exc, match=msg):
        apply_random_ltd(model, **{"kept_tokens": 4, **kwargs})


def test_error_without_blocks_says_what_to_register():
    with pytest.raises(ValueError, match="no transformer block found in Linear.*register_block"):
        apply_random_ltd(nn.Linear(2, 2), kept_tokens=4)


def test_error_remove_when_not_applied():
    with pytest.raises(ValueError, match="not applied"):
        remove_random_ltd(make("gpt2")[0])


def test_error_default_layers_of_a_two_block_model():
    with pytest.raises(ValueError, match="2 transformer block.*pass layers explicitly"):
        apply_random_ltd(_two_block_encoder(), kept_tokens=4)


def test_error_register_block_with_a_non_adapter():
    with pytest.raises(TypeError, match="BlockAdapter"):
        register_block(nn.Linear, adapter="x")


def test_error_negative_kept_tokens_on_the_state():
    state = apply_random_ltd(make("gpt2")[0], kept_tokens=4)
    with pytest.raises(ValueError, match="kept_tokens"):
        state.kept_tokens = -2


class MyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, h, *, scale=1.0):
        return self.lin(h) * scale


class TupleBlock(MyBlock):
    def forward(self, h, *, scale=1.0):
        return self.lin(h) * scale, "extra"


def test_register_custom_block():
    register_block(MyBlock, BlockAdapter("h"))
    model = nn.Sequential(*[MyBlock() for _ in range(3)])
    state = apply_random_ltd(model, kept_tokens=2)
    assert state.layers == [1]
    model.train()
    x = torch.randn(2, S, H)
    y = model[1](x, scale=2.0)
    idx = state.last_indices[0]
    keep = torch.zeros(2, S, dtype=torch.bool)
    keep[torch.arange(2)[:, None], idx] = True
    assert torch.equal(y[~keep], x[~keep])
    torch.testing.assert_close(y[keep], model[1].lin(x[keep]) * 2.0)
    remove_random_ltd(model)
    tup = nn.Sequential(*[TupleBlock() for _ in range(3)])  # subclasses use the registered adapter
    state = apply_random_ltd(tup, kept_tokens=2)
    tup.train()
    y, extra = tup[1](x)
    assert extra == "extra" and y.shape == x.shape
    keep = torch.zeros(2, S, dtype=torch.bool)
    keep[torch.arange(2)[:, None], state.last_indices[0]] = True
    assert torch.equal(y[~keep], x[~keep])


def test_layer_token_lr_scheduler():
    consumed = [0]
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = LayerTokenLRScheduler(opt, total_layer_tokens=1000, warmup_layer_tokens=100, decay="cosine",
                                  min_lr_ratio=0.1, counter=lambda: consumed[0])
    assert opt.param_groups[0]["lr"] == 0.0
    expected = {50: 0.5, 100: 1.0, 550: 0.55, 1000: 0.1, 5000: 0.1}
    for c, lr in expected.items():
        consumed[0] = c
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    lin = LayerTokenLRScheduler(opt, total_layer_tokens=100, decay="linear", counter=lambda: 25)
    assert lin.factor(25) == pytest.approx(0.75)
    opt2 = torch.optim.SGD([p], lr=1.0)
    resumed = LayerTokenLRScheduler(opt2, total_layer_tokens=1, counter=lambda: consumed[0])
    resumed.load_state_dict(sched.state_dict())
    assert resumed.total_layer_tokens == 1000 and opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    for kwargs, msg in [
        (dict(total_layer_tokens=0), "total_layer_tokens"),
        (dict(total_layer_tokens=10, warmup_layer_tokens=11), "warmup_layer_tokens"),
        (dict(total_layer_tokens=10, decay="step"), "decay"),
        (dict(total_layer_tokens=10, min_lr_ratio=2), "min_lr_ratio"),
    ]:
        with pytest.raises(ValueError, match=msg):
            LayerTokenLRScheduler(opt, counter=lambda: 0, **kwargs)


def test_hashed_indices_are_uniform_over_positions():
    """The counter-based draw keeps every position equally often (and pairs of positions too). Torch path of
    the selection (the Triton interpreter would run 1000 programs per draw); both select the same indices."""
    from lightning_dataeff.kernels import use_torch_kernels
    from lightning_dataeff.random_ltd import RandomLTDState

    state = RandomLTDState(kept_tokens=3, layers=list(range(50)), num_layers=50)
    counts, pairs = torch.zeros(S), torch.zeros(S, S)
    for step in range(20):
        state.step = step
        state.begin_forward(20, S)
        with use_torch_kernels():
            idx = state.indices(0, 20, S, 3, torch.device("cpu"))
        rows = state.last_indices.reshape(-1, 3)  # 50 layers x 20 samples per step
        hot = torch.zeros(rows.shape[0], S).scatter_(1, rows, 1.0)
        counts += hot.sum(0)
        pairs += hot.T @ hot
        assert idx.shape == (20, 3)
    n = 20 * 50 * 20
    torch.testing.assert_close(counts / n, torch.full((S,), 3 / S), rtol=0, atol=0.015)
    off = ~torch.eye(S, dtype=torch.bool)
    torch.testing.assert_close((pairs / n)[off], torch.full((S * S - S,), 3 * 2 / (S * (S - 1))), rtol=0, atol=0.015)


def test_sample_token_indices_rejects_random_bits_of_the_wrong_shape():
    from lightning_dataeff.kernels import sample_token_indices

    with pytest.raises(ValueError, match=r"random_bits has shape \(2, 8\); expected \(4, 8\)"):
        sample_token_indices(2, 8, 3, 2, random_bits=torch.zeros(2, 8, dtype=torch.int64))
