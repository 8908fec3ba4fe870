"""random-LTD on every covered model family, checked against the family's own unpatched block.

One table (``FAMILIES``) drives every check, one family per test case:

* the blocks found are the family's repeated block class;
* the patched block's output at the kept positions equals the UNPATCHED block (a copy made before the
  surgery) run on each sample's gathered subsequence with the inputs Hugging Face built for the full
  sequence restricted to those positions (its mask, its ALiBi or position bias at those positions) and its
  rotary module evaluated at the kept positions; dropped positions equal the block's input; gradients of
  the block's parameters and input equal the reference's;
* evaluation equals the unpatched model exactly and ``state_dict`` keys are unchanged;
* while dropping, decoders stay causal and padded models keep padding isolated (no NaN).

``test_every_registered_block_has_a_family`` fails for a registered block class without an entry here.
The token kernels run on their torch path here (they are checked against their reference in test_kernels*;
the Triton interpreter would triple this module's time), with one intra-op thread.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

from lightning_dataeff.kernels import use_torch_kernels
from lightning_dataeff.random_ltd import BlockAdapter, apply_random_ltd, find_blocks, register_block
from lightning_dataeff.random_ltd.blocks import base_type, registered_blocks

t = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
V, S, H, B = 32, 8, 16, 2
PAD = 2  # right-padding of sample 0 in the reference check (no kept token then has an empty attention row)


@pytest.fixture(autouse=True)
def _torch_kernels_one_thread():
    """Torch path of the kernels, one intra-op thread (tiny models run many times faster without a pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with use_torch_kernels():
        yield
    torch.set_num_threads(threads)


# --- a timm-style block (forward(x) -> x), registered by the user -------------------------------------------
class TimmBlock(nn.Module):
    """Stand-in for ``timm.models.vision_transformer.Block``: pre-norm attention and MLP on ``x``."""

    def __init__(self, dim: int = H, heads: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """Patch embedding, CLS token, learned positions, three TimmBlocks, final norm."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.patch = nn.Linear(4, H)
        self.cls = nn.Parameter(torch.randn(1, 1, H))
        self.pos = nn.Parameter(torch.randn(1, 17, H))
        self.blocks = nn.Sequential(*[TimmBlock() for _ in range(depth)])
        self.norm = nn.LayerNorm(H)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = pixel_values.unfold(2, 2, 2).unfold(3, 2, 2).reshape(pixel_values.shape[0], -1, 4)  # 16 patches
        x = torch.cat([self.cls.expand(p.shape[0], -1, -1), self.patch(p)], 1) + self.pos
        return self.norm(self.blocks(x))


register_block(TimmBlock, BlockAdapter("x", keep_positions=(0,)))


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        layer = nn.TransformerEncoderLayer(H, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        return self.enc(self.emb(input_ids), mask=causal, src_key_padding_mask=pad)


# --- the family table --------------------------------------------------------------------------------------
DEC = dict(num_hidden_layers=3, hidden_size=H, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
           vocab_size=V, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
ENC = dict(num_hidden_layers=3, hidden_size=H, num_attention_heads=2, intermediate_size=32, vocab_size=V,
           max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VIS = dict(num_hidden_layers=3, hidden_size=H, num_attention_heads=2, intermediate_size=32, image_size=8,
           patch_size=2, num_channels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
S2S = dict(encoder_layers=3, decoder_layers=3, d_model=H, encoder_attention_heads=2, decoder_attention_heads=2,
           encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=V, max_position_embeddings=32, dropout=0.0,
           pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)

WHISPER = {**{k: v for k, v in S2S.items() if k != "max_position_embeddings"}, "num_mel_bins": 4,
           "max_source_positions": S, "max_target_positions": 32}


@dataclass(frozen=True)
class Family:
    """``build(attn)`` makes the model; ``kind``: "decoder" (token ids, causal), "encoder" (token ids),
    "vision" (8x8 one-channel images), "speech" (Whisper features), "seq2seq" (token ids both sides)."""

    block: str  # class name of the repeated block
    build: Callable[[str], nn.Module]
    kind: str
    blocks: int = 3  # blocks (block calls) found
    target: int = 1  # the block call checked against the reference
    attn: tuple[str, ...] = ("sdpa",)
    padding: bool = True  # the model takes an attention mask
    others: tuple[str, ...] = ()  # other block classes found (the other side of an encoder-decoder)
    extra: dict = field(default_factory=dict)


def hf(config_cls: str, model_cls: str, **cfg) -> Callable[[str], nn.Module]:
    def build(attn: str) -> nn.Module:
        config = getattr(t, config_cls)(**cfg)
        config._attn_implementation = attn
        return getattr(t, model_cls)(config)

    return build


def plain(cls) -> Callable[[str], nn.Module]:
    return lambda attn: cls()


FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2Block", hf("GPT2Config", "GPT2LMHeadModel", n_layer=3, n_embd=H, n_head=2, vocab_size=V,
                                   n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                   "decoder", attn=("sdpa", "eager")),
    "llama": Family("LlamaDecoderLayer", hf("LlamaConfig", "LlamaForCausalLM", **DEC), "decoder",
                    attn=("sdpa", "eager")),
    "mistral": Family("MistralDecoderLayer", hf("MistralConfig", "MistralForCausalLM", **DEC, sliding_window=3),
                      "decoder"),
    "qwen2": Family("Qwen2DecoderLayer", hf("Qwen2Config", "Qwen2ForCausalLM", **DEC), "decoder"),
    "qwen3": Family("Qwen3DecoderLayer", hf("Qwen3Config", "Qwen3ForCausalLM", **DEC, head_dim=8), "decoder"),
    "gemma": Family("GemmaDecoderLayer", hf("GemmaConfig", "GemmaForCausalLM", **DEC, head_dim=8), "decoder"),
    "gemma2": Family("Gemma2DecoderLayer",
                     hf("Gemma2Config", "Gemma2ForCausalLM", **DEC, head_dim=8, sliding_window=3,
                        layer_types=["sliding_attention"] * 3), "decoder", attn=("eager",)),
    "phi3": Family("Phi3DecoderLayer", hf("Phi3Config", "Phi3ForCausalLM", **DEC), "decoder"),
    "phi": Family("PhiDecoderLayer", hf("PhiConfig", "PhiForCausalLM", **DEC, partial_rotary_factor=0.5,
                                        resid_pdrop=0.0, embd_pdrop=0.0), "decoder"),
    "gpt_neox": Family("GPTNeoXLayer", hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **DEC, rotary_pct=0.5),
                       "decoder"),
    "gptj": Family("GPTJBlock", hf("GPTJConfig", "GPTJForCausalLM", n_layer=3, n_embd=H, n_head=2, vocab_size=V,
                                   rotary_dim=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                   "decoder"),
    "opt": Family("OPTDecoderLayer", hf("OPTConfig", "OPTForCausalLM", num_hidden_layers=3, hidden_size=H,
                                        num_attention_heads=2, ffn_dim=32, vocab_size=V, word_embed_proj_dim=H,
                                        max_position_embeddings=32, dropout=0.0, pad_token_id=1), "decoder"),
    "bloom": Family("BloomBlock", hf("BloomConfig", "BloomForCausalLM", n_layer=3, hidden_size=H, n_head=2,
                                     vocab_size=V), "decoder", attn=("eager",)),
    "falcon": Family("FalconDecoderLayer", hf("FalconConfig", "FalconForCausalLM", num_hidden_layers=3,
                                              hidden_size=H, num_attention_heads=2, vocab_size=V), "decoder"),
    "falcon_alibi": Family("FalconDecoderLayer", hf("FalconConfig", "FalconForCausalLM", num_hidden_layers=3,
                                                    hidden_size=H, num_attention_heads=2, vocab_size=V, alibi=True),
                           "decoder", attn=("sdpa", "eager")),
    "mpt": Family("MptBlock", hf("MptConfig", "MptForCausalLM", n_layers=3, d_model=H, n_heads=2, vocab_size=V,
                                 max_seq_len=32), "decoder", attn=("eager",)),
    "stablelm": Family("StableLmDecoderLayer", hf("StableLmConfig", "StableLmForCausalLM", **DEC,
                                                  partial_rotary_factor=0.5), "decoder"),
    "cohere": Family("CohereDecoderLayer", hf("CohereConfig", "CohereForCausalLM", **DEC), "decoder"),
    "starcoder2": Family("Starcoder2DecoderLayer", hf("Starcoder2Config", "Starcoder2ForCausalLM", **DEC,
                                                      sliding_window=3, residual_dropout=0.0), "decoder"),
    "mixtral": Family("MixtralDecoderLayer", hf("MixtralConfig", "MixtralForCausalLM", **DEC, num_local_experts=4,
                                                num_experts_per_tok=2), "decoder"),
    "qwen2_moe": Family("Qwen2MoeDecoderLayer", hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **DEC,
                                                   moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                   num_experts=4, num_experts_per_tok=2), "decoder"),
    "clip_text": Family("CLIPEncoderLayer", hf("CLIPTextConfig", "CLIPTextModel", **ENC), "decoder"),
    "bert": Family("BertLayer", hf("BertConfig", "BertModel", **ENC), "encoder", attn=("sdpa", "eager")),
    "roberta": Family("RobertaLayer", hf("RobertaConfig", "RobertaModel", **ENC, pad_token_id=1), "encoder"),
    "electra": Family("ElectraLayer", hf("ElectraConfig", "ElectraModel", **ENC, embedding_size=8), "encoder"),
    "distilbert": Family("TransformerBlock", hf("DistilBertConfig", "DistilBertModel", n_layers=3, dim=H, n_heads=2,
                                                hidden_dim=32, vocab_size=V, dropout=0.0, attention_dropout=0.0),
                         "encoder"),
    "albert": Family("AlbertLayer", hf("AlbertConfig", "AlbertModel", **ENC, embedding_size=8), "encoder",
                     blocks=3),
    "t5_encoder": Family("T5Block", hf("T5Config", "T5EncoderModel", num_layers=3, d_model=H, num_heads=2, d_kv=8,
                                       d_ff=32, vocab_size=V, dropout_rate=0.0), "encoder"),
    "vit": Family("ViTLayer", hf("ViTConfig", "ViTModel", **VIS), "vision", padding=False),
    "deit": Family("DeiTLayer", hf("DeiTConfig", "DeiTModel", **VIS), "vision", padding=False),
    "dinov2": Family("Dinov2Layer", hf("Dinov2Config", "Dinov2Model", **VIS), "vision", padding=False),
    "clip_vision": Family("CLIPEncoderLayer", hf("CLIPVisionConfig", "CLIPVisionModel", **VIS), "vision",
                          padding=False),
    "whisper_encoder": Family("WhisperEncoderLayer",
                              hf("WhisperConfig", "WhisperModel", **WHISPER),
                              "speech", blocks=6, padding=False, others=("WhisperDecoderLayer",)),
    "bart_encoder": Family("BartEncoderLayer", hf("BartConfig", "BartModel", **S2S), "seq2seq", blocks=6,
                           others=("BartDecoderLayer",)),
    "bart_decoder": Family("BartDecoderLayer", hf("BartConfig", "BartModel", **S2S), "seq2seq", blocks=6, target=4,
                           others=("BartEncoderLayer",)),
    "mbart_encoder": Family("MBartEncoderLayer", hf("MBartConfig", "MBartModel", **S2S), "seq2seq", blocks=6,
                            others=("MBartDecoderLayer",)),
    "mbart_decoder": Family("MBartDecoderLayer", hf("MBartConfig", "MBartModel", **S2S), "seq2seq", blocks=6,
                            target=4, others=("MBartEncoderLayer",)),
    "timm": Family("TimmBlock", plain(TimmViT), "vision", padding=False),
    "torch_encoder": Family("TransformerEncoderLayer", plain(TorchEncoder), "decoder"),
}
DECODERS = [n for n, f in FAMILIES.items() if f.kind == "decoder"]
PADDED = [n for n, f in FAMILIES.items() if f.padding]
CASES = [(n, a) for n, f in FAMILIES.items() for a in f.attn]


@functools.lru_cache(maxsize=None)
def _built(name: str, attn: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[name].build(attn)
    with torch.no_grad():  # weights well above the init scale: position effects far above float noise
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model


def model_of(name: str, attn: str | None = None) -> nn.Module:
    """A fresh copy of the family's tiny model (built once per session), in training mode."""
    return copy.deepcopy(_built(name, attn or FAMILIES[name].attn[0])).train()


def inputs_of(name: str, pad: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs; ``pad`` right-pads sample 0 by that many tokens (models with an attention mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    kind = FAMILIES[name].kind
    if kind == "vision":
        return {"pixel_values": torch.randn(B, 1, 8, 8, generator=g)}
    if kind == "speech":
        return {"input_features": torch.randn(B, 4, 2 * S, generator=g), "decoder_input_ids": ids[:, :6]}
    out = {"input_ids": ids}
    if pad:
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, S - pad:] = 0
        out["attention_mask"] = mask
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, V, (B, 6), generator=g)
    return out


def main_output(res: Any) -> torch.Tensor:
    if torch.is_tensor(res):
        return res
    for key in ("logits", "last_hidden_state"):
        if getattr(res, key, None) is not None:
            return getattr(res, key)
    raise AssertionError(f"no output in {type(res).__name__}")


def encoder_output(res: Any) -> torch.Tensor:
    """The output at the padded sequence's positions (the encoder's, for encoder-decoder models)."""
    enc = getattr(res, "encoder_last_hidden_state", None)
    return enc if enc is not None else main_output(res)


def _rewind(state, step=5):
    state.step = step + 1
    state.step = step


# --- restricting the full-sequence block inputs to one sample's kept positions ----------------------------
def _rows_cols(m: torch.Tensor, b: int, idx: torch.Tensor, rows: bool) -> torch.Tensor:
    m = m[b if m.shape[0] > 1 else 0][None]
    if rows and m.shape[-2] > 1:
        m = m[:, :, idx]
    return m[..., idx]


def _rotary_module(model: nn.Module) -> nn.Module | None:
    blocks = {id(m) for _, m, _ in find_blocks(model)}
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding") and id(m) not in blocks:
            inside = any(id(sub) in blocks for sub in m.modules())
            if not inside:
                return m
    return None


def reference_inputs(name: str, model: nn.Module, args: dict, b: int, idx: torch.Tensor) -> dict:
    """The unpatched block's inputs for sample ``b`` restricted to the kept positions ``idx``."""
    block = FAMILIES[name].block
    hidden_arg = next(iter(args))
    x = args[hidden_arg]
    positions = args.get("position_ids")
    positions = (positions[b if positions.shape[0] > 1 else 0] if positions is not None
                 else torch.arange(x.shape[1]))[idx]
    out = {}
    for key, v in args.items():
        if key == hidden_arg:
            out[key] = x[b:b + 1, idx].detach().clone().requires_grad_()
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif key in ("cache", "past_key_values", "layer_past", "cache_position"):
            out[key] = None
        elif key == "attention_mask" and block == "TransformerEncoderLayer":
            out[key] = v
        elif key in ("attention_mask", "position_bias") and v.dim() == 4:
            out[key] = _rows_cols(v, b, idx, rows=True)
        elif key == "attention_mask" and v.dim() == 2:
            out[key] = v[b:b + 1, idx]
        elif key in ("encoder_attention_mask", "encoder_decoder_position_bias") and v.dim() == 4:
            m = v[b if v.shape[0] > 1 else 0][None]
            out[key] = m[:, :, idx] if m.shape[-2] == x.shape[1] else m
        elif key == "encoder_hidden_states":
            out[key] = v[b:b + 1]
        elif key == "position_ids":
            out[key] = positions[None]
        elif key == "position_embeddings":  # the model's rotary module at the true positions of the kept tokens
            out[key] = _rotary_module(model)(out[hidden_arg], positions[None])
            assert torch.equal(out[key][0][0], v[0][b if v[0].shape[0] > 1 else 0][idx])
        elif key == "alibi" and v.dim() == 3:  # Bloom [B*h, 1, S]: slopes times true key positions
            out[key] = v.view(B, -1, 1, v.shape[-1])[b][..., idx]
        elif key == "alibi":  # Falcon [B, h, 1, S]
            out[key] = v[b:b + 1][..., idx]
        elif key == "position_bias" and v.dim() == 3:  # MPT [h, 1, L]: its attention uses the last S columns
            out[key] = v[:, :, v.shape[-1] - x.shape[1]:][..., idx]
        elif key == "src_mask":
            out[key] = v[idx][:, idx]
        elif key == "src_key_padding_mask":
            out[key] = v[b:b + 1, idx]
        else:
            raise AssertionError(f"{name}: no reference restriction for argument {key!r}")
    return out


def _bound(module: nn.Module, base: type, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(base.forward).bind(module, *args, **kwargs)
    flat = {}
    for k, v in list(bound.arguments.items())[1:]:
        if bound.signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(v)
        else:
            flat[k] = v
    return flat


def _first(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[0]


def run_and_capture(name: str, attn: str):
    """Patch block call ``target`` only, run one training forward, return what the reference check needs."""
    fam = FAMILIES[name]
    model = model_of(name, attn)
    _, block, _ = find_blocks(model)[fam.target if fam.block != "AlbertLayer" else 0]
    ref_block = copy.deepcopy(block)
    base = type(block)
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((_bound(module, base, args, kwargs), output))

    state = apply_random_ltd(model, kept_tokens=4, layers=[fam.target], keep_positions=(), seed=2)
    handle = block.register_forward_hook(hook, with_kwargs=True)
    _rewind(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**inputs_of(name, pad=PAD if fam.padding else 0))
    handle.remove()
    call = fam.target if fam.block == "AlbertLayer" else 0
    args, output = seen[call]
    idx = state.last_indices[0]
    if find_blocks(model)[fam.target if fam.block != "AlbertLayer" else 0][2].shared_batch:
        idx = idx[:1].expand_as(idx)  # one subset per batch (MPT's bias has no batch dimension)
    return model, ref_block, args, _first(output), idx


def attended(name: str, inputs: dict) -> torch.Tensor:
    """Kept tokens whose restricted attention row is not empty (an empty row has no defined output: random-LTD
    lets such a token attend to itself, the unpatched block gives NaN or an average of masked keys)."""
    k = inputs[next(iter(inputs))].shape[1]
    mask = inputs.get("attention_mask", inputs.get("src_mask"))
    if mask is None or not torch.is_tensor(mask) or mask.dim() not in (2, 4) or mask.shape[-2] != k:
        return torch.ones(k, dtype=torch.bool)
    blocked_bool = FAMILIES[name].block in ("MptBlock", "TransformerEncoderLayer")
    if mask.dtype == torch.bool:
        allowed = ~mask if blocked_bool else mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed.reshape(-1, k, k).any(-1).all(0)


# --- the checks ---------------------------------------------------------------------------------------------
def test_every_registered_block_has_a_family():
    """A block class registered in the library (or here) without an entry in FAMILIES fails this test."""
    covered = {f.block for f in FAMILIES.values()}
    missing = [path for path in registered_blocks()
               if path.rsplit(".", 1)[-1] not in covered and not path.split(".")[0].startswith("test_")]
    assert not missing, f"registered block classes without a family entry in FAMILIES: {missing}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_blocks_found_by_type(name):
    fam = FAMILIES[name]
    model = model_of(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unhandled-argument warning for a covered family
        state = apply_random_ltd(model, kept_tokens=4)
    assert state.num_layers == fam.blocks
    found = find_blocks(model)
    assert {base_type(m).__name__ for _, m, _ in found} == {fam.block, *fam.others}
    assert any(type(m).__name__ == f"RandomLTD{fam.block}" for _, m, _ in found)


@pytest.mark.parametrize("name,attn", CASES)
def test_kept_tokens_match_the_unpatched_block(name, attn):
    model, ref_block, args, out, idx = run_and_capture(name, attn)
    for b in range(B):
        inputs = reference_inputs(name, model, args, b, idx[b])
        ref = _first(ref_block(**inputs))[0]
        rows = attended(name, inputs)
        torch.testing.assert_close(out[b, idx[b]][rows], ref[rows], rtol=1e-5, atol=1e-5, msg=f"sample {b}")


@pytest.mark.parametrize("name,attn", CASES)
def test_dropped_tokens_skip_the_block(name, attn):
    _, _, args, out, idx = run_and_capture(name, attn)
    x = args[next(iter(args))]
    dropped = torch.ones(x.shape[:2], dtype=torch.bool)
    dropped[torch.arange(B)[:, None], idx] = False
    assert dropped.any()
    assert torch.equal(out[dropped], x[dropped])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradients_match_the_unpatched_block(name):
    """Gradients of the block's own parameters and of its input (a block shared across depths, as ALBERT's,
    also reaches its parameters through its input: that path is subtracted by the chain rule)."""
    fam = FAMILIES[name]
    model, ref_block, args, out, idx = run_and_capture(name, fam.attn[0])
    x = args[next(iter(args))]
    block = find_blocks(model)[fam.target if fam.block != "AlbertLayer" else 0][1]
    params = [p for p in block.parameters() if p.requires_grad]
    ref_params = [p for p in ref_block.parameters() if p.requires_grad]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    want = [torch.zeros_like(p) for p in ref_params]
    want_x = w.clone()  # dropped tokens: identity
    for b in range(B):
        inputs = reference_inputs(name, model, args, b, idx[b])
        rows = attended(name, inputs)
        w[b, idx[b][~rows]] = 0.0  # kept tokens with an empty attention row have no reference
        sub = inputs[next(iter(inputs))]
        ref = _first(ref_block(**inputs))[0][rows]
        grads = torch.autograd.grad((ref * w[b, idx[b]][rows]).sum(), ref_params + [sub], allow_unused=True)
        want = [a + (g if g is not None else 0) for a, g in zip(want, grads[:-1])]
        want_x[b, idx[b]] = grads[-1][0]
    got = torch.autograd.grad((out * w).sum(), params + [x], allow_unused=True, retain_graph=True)
    through_x = torch.autograd.grad(x, params, grad_outputs=got[-1], allow_unused=True)
    names = [n for n, p in block.named_parameters() if p.requires_grad]
    for n, g, g_x, r in zip(names, got[:-1], through_x, want):
        direct = (g if g is not None else 0) - (g_x if g_x is not None else 0)
        torch.testing.assert_close(direct + torch.zeros_like(r), r, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(got[-1], want_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_eval_equals_unpatched_model_and_state_dict_keys_unchanged(name):
    model, ref = model_of(name), model_of(name)
    keys = list(model.state_dict())
    apply_random_ltd(model, kept_tokens=3)
    assert list(model.state_dict()) == keys
    model.eval()
    ref.eval()
    inputs = inputs_of(name, pad=PAD if FAMILIES[name].padding else 0)
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(ref(**inputs)))


#: Positions never dropped by default: the CLS token of encoders (DeiT: CLS and distillation), CLIP text's start
#: token, and nothing for decoders and discovered blocks.
DEFAULT_KEEP = {"bert": (0,), "roberta": (0,), "electra": (0,), "distilbert": (0,), "albert": (0,), "vit": (0,),
                "deit": (0, 1), "dinov2": (0,), "clip_text": (0,), "clip_vision": (0,), "timm": (0,)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_keep_positions(name):
    model = model_of(name)
    state = apply_random_ltd(model, kept_tokens=3, layers=[FAMILIES[name].target])
    assert state.keep_positions == DEFAULT_KEEP.get(name, ())


@pytest.mark.parametrize("name", DECODERS)
def test_causal_while_dropping(name):
    model = model_of(name)
    state = apply_random_ltd(model, kept_tokens=3)
    ids = inputs_of(name)["input_ids"]
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % V
    _rewind(state)
    a = main_output(model(input_ids=ids))
    _rewind(state)
    b = main_output(model(input_ids=ids2))
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("name", PADDED)
def test_padding_isolated_while_dropping(name):
    """Sample 0 is mostly padding, so some draws keep only pad tokens: outputs stay finite and real tokens do
    not see the pads' content."""
    model = model_of(name)
    state = apply_random_ltd(model, kept_tokens=2, keep_positions=())
    inputs = inputs_of(name)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 2:] = 0
    mask[1, S - 3:] = 0
    changed = dict(inputs, input_ids=torch.where(mask.bool(), inputs["input_ids"], (inputs["input_ids"] + 7) % V))
    real = mask.bool()
    for step in range(3):
        _rewind(state, step)
        a = encoder_output(model(**inputs, attention_mask=mask))
        _rewind(state, step)
        b = encoder_output(model(**changed, attention_mask=mask))
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)


# --- family-specific behaviour --------------------------------------------------------------------------------
def _calls_of(module: nn.Module):
    """Record ``(input hidden states, output hidden states)`` of every call of ``module``."""
    seen = []

    def hook(mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        seen.append((x, _first(output)))

    return seen, module.register_forward_hook(hook, with_kwargs=True)


def test_t5_block_owning_the_relative_bias_drops_on_true_positions():
    """T5's first block computes the relative position bias; dropping in it uses the bias of the true
    positions (its compute_bias over the full length, restricted), and the next block gets the full bias."""
    model = model_of("t5_encoder")
    block = model.encoder.block[0]
    ref_block = copy.deepcopy(block)
    state = apply_random_ltd(model, kept_tokens=4, layers=[0], keep_positions=(), seed=2)
    seen = []
    handle = block.register_forward_hook(lambda m, a, k, o: seen.append((a, k, o)), with_kwargs=True)
    _rewind(state)
    model(**inputs_of("t5_encoder"))
    handle.remove()
    (x, mask, *_), kwargs, out = seen[0]
    assert out[1].shape == (1, 2, S, S)  # the full bias goes on to block 1
    idx = state.last_indices[0]
    full = ref_block.layer[0].SelfAttention.compute_bias(S, S)
    for b in range(B):
        i = idx[b]
        ref = ref_block(x[b:b + 1, i], attention_mask=None if mask is None else _rows_cols(mask, b, i, True),
                        position_bias=full[:, :, i][..., i])[0]
        torch.testing.assert_close(out[0][b, i], ref[0], rtol=1e-5, atol=1e-5)


def test_gemma2_sliding_window_acts_on_true_positions():
    """The mask Gemma2's attention receives while dropping is HF's sliding-window mask function evaluated at
    the kept tokens' true positions, not at their indices in the kept subset."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    model = model_of("gemma2")
    state = apply_random_ltd(model, kept_tokens=4, layers=[1], keep_positions=(), seed=2)
    masks = []
    attn = model.model.layers[1].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, k: masks.append(k["attention_mask"]), with_kwargs=True)
    _rewind(state)
    model(**inputs_of("gemma2"))
    handle.remove()
    fn = sliding_window_causal_mask_function(model.config.sliding_window)
    got = masks[0] > torch.finfo(masks[0].dtype).min / 2
    for b in range(B):
        pos = state.last_indices[0][b]
        want = fn(b, 0, pos[:, None], pos[None, :])
        assert torch.equal(got[b, 0], want)
        k = torch.arange(len(pos))
        assert not torch.equal(fn(b, 0, k[:, None], k[None, :]), want)  # the window on indices would differ


@pytest.mark.parametrize("name", ["bart_decoder", "mbart_decoder"])
def test_cross_attention_queries_kept_tokens_keys_all_encoder_tokens(name):
    model = model_of(name)
    apply_random_ltd(model, kept_tokens=3, layers=[4])
    shapes = []
    attn = model.decoder.layers[1].encoder_attn
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: shapes.append((tuple((a or (k["hidden_states"],))[0].shape),
                                       tuple(k["key_value_states"].shape))), with_kwargs=True)
    model(**inputs_of(name, pad=PAD))
    handle.remove()
    assert shapes == [((B, 3, H), (B, S, H))]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_router_sees_only_kept_tokens(name):
    model = model_of(name)
    apply_random_ltd(model, kept_tokens=3)
    rows = []
    handles = [layer.mlp.gate.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
               for layer in model.model.layers]
    model(**inputs_of(name))
    for h in handles:
        h.remove()
    assert rows == [B * S, B * 3, B * S]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_auxiliary_loss_trains_the_routers_on_kept_tokens(name):
    """HF's load-balancing loss over the router logits recorded per layer (kept tokens in dropping layers)."""
    model = model_of(name)
    apply_random_ltd(model, kept_tokens=3)
    ids = inputs_of(name)["input_ids"]
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert [r.shape[0] for r in out.router_logits] == [B * S, B * 3, B * S]
    assert torch.isfinite(out.aux_loss)
    out.aux_loss.backward()
    grad = model.model.layers[1].mlp.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_albert_only_the_chosen_depths_drop_each_with_its_own_indices():
    """ALBERT runs one shared layer at every depth: layers=[0, 2] drops at depths 0 and 2 only."""
    model = model_of("albert")
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    state = apply_random_ltd(model, kept_tokens=4, layers=[0, 2], keep_positions=(), seed=2)
    seen, handle = _calls_of(layer)
    _rewind(state)
    model(**inputs_of("albert"))
    handle.remove()
    unchanged = [(x == y).all(-1) for x, y in seen]
    assert [int(u.sum()) for u in unchanged] == [B * (S - 4), 0, B * (S - 4)]
    for depth, slot in ((0, 0), (2, 1)):
        kept = torch.zeros(B, S, dtype=torch.bool)
        kept[torch.arange(B)[:, None], state.last_indices[slot]] = True
        assert torch.equal(~unchanged[depth], kept)
    assert not torch.equal(state.last_indices[0], state.last_indices[1])


def test_albert_counts_every_depth_once_per_forward():
    model = model_of("albert")
    state = apply_random_ltd(model, kept_tokens=3)
    model(**inputs_of("albert"))
    assert (state.consumed_tokens, state.consumed_layer_tokens) == (B * S, B * (S + 3 + S))


def test_albert_recomputed_under_checkpointing_uses_each_depths_indices():
    model, ref = model_of("albert"), model_of("albert")
    sa = apply_random_ltd(model, kept_tokens=3)
    sb = apply_random_ltd(ref, kept_tokens=3)
    ids = inputs_of("albert")["input_ids"]
    _rewind(sa)
    _rewind(sb)
    ya = torch.utils.checkpoint.checkpoint(lambda i: model(input_ids=i).last_hidden_state, ids, use_reentrant=False)
    yb = ref(input_ids=ids).last_hidden_state
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert sa.consumed_layer_tokens == sb.consumed_layer_tokens == B * (S + 3 + S)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_encoder_decoder_counts_each_side_at_its_length():
    model = model_of("bart_encoder")  # encoder 8 tokens, decoder 6; default layers: encoder 1-2, decoder 0-1
    state = apply_random_ltd(model, kept_tokens=3)
    model(**inputs_of("bart_encoder"))
    assert (state.consumed_tokens, state.consumed_layer_tokens) == (B * S, B * (S + 3 + 3 + 3 + 3 + 6))


def test_baseline_counter_counts_every_call_of_a_shared_layer():
    from lightning_dataeff.random_ltd import count_tokens

    model = model_of("albert")
    counter = count_tokens(model)
    model(**inputs_of("albert"))
    assert (counter.consumed_tokens, counter.consumed_layer_tokens) == (B * S, B * S * 3)


class PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, x):
        return x + self.lin(x)


class PlainModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[PlainBlock() for _ in range(3)])

    def forward(self, x):
        return self.blocks(x)


def test_unsupported_model_error_names_the_block_and_the_line_to_try():
    line = f"register_block({__name__}.PlainBlock, BlockAdapter('x'))"
    with pytest.raises(ValueError, match=r"its repeated block is PlainBlock \(3 in blocks\).*" + line.replace(
            "(", r"\(").replace(")", r"\)")):
        apply_random_ltd(PlainModel(), kept_tokens=2)


class RelBlock(nn.Module):
    """A block taking a relative-position tensor its adapter does not know about."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, hidden_states, rel_pos=None):
        out = self.lin(hidden_states)
        return out if rel_pos is None else out + rel_pos.sum(-1, keepdim=True)


register_block(RelBlock)


def _rel_model():
    return nn.Sequential(*[RelBlock() for _ in range(3)])


def test_unhandled_position_argument_warns_at_apply_time():
    with pytest.warns(UserWarning, match="RelBlock.forward takes 'rel_pos'.*does not gather"):
        apply_random_ltd(_rel_model(), kept_tokens=2)


def test_unhandled_position_argument_raises_while_dropping():
    model = _rel_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_random_ltd(model, kept_tokens=2)
    model.train()
    with pytest.raises(ValueError, match="RelBlock got 'rel_pos' with a dimension of the sequence length"):
        model[1](torch.randn(B, S, H), rel_pos=torch.randn(B, S, S))


def test_num_layers_counts_a_shared_layer_once_per_call():
    from lightning_dataeff.random_ltd import num_layers

    model = model_of("albert")
    assert len(find_blocks(model)) == 1 and num_layers(model) == 3
