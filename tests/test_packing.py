"""Packed (unpadded) attention gives the same embeddings and gradients as the padded model."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

from mirrorfast.data import TokenizedTexts, packed_batch, padded_batch
from mirrorfast.model import Encoder
from mirrorfast.packing import packed_attention

TEXTS = ["hi", "a considerably longer sentence, with punctuation and more words", "mid sized text here",
         "naïve café 東京 😀", "x y"]


def tiny_setup(minilm_dir, pooling: str, seed: int, arch: str = "bert"):
    """A float64 tiny BERT (or RoBERTa) without dropout (results comparable to ~1e-9), and the 10 views of TEXTS."""
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "roberta":  # positions numbered from pad_token_id + 1, as RoBERTa does
        config = RobertaConfig(**sizes, pad_token_id=tok.pad_token_id, max_position_embeddings=24 + tok.pad_token_id + 2)
        model = RobertaModel(config).double()
    else:
        model = BertModel(BertConfig(**sizes)).double()
    tt = TokenizedTexts.build(tok, TEXTS, 24)
    rows = np.array([4, 0, 2, 1, 3])
    return tok, model, Encoder(model, tok, pooling, 24, "tiny"), [(tt, rows), (tt, rows[::-1])]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_equals_padded(minilm_dir, pooling, arch):
    tok, model, encoder, views = tiny_setup(minilm_dir, pooling, seed=0, arch=arch)

    padded = encoder.embed_batch(padded_batch(views, tok.pad_token_id))
    grad_padded = torch.autograd.grad(padded.square().sum(), list(model.parameters()), allow_unused=True)
    before = model.config._attn_implementation
    with packed_attention(model):
        assert model.config._attn_implementation == "mirrorfast_packed"
        packed = encoder.embed_batch(packed_batch(views))
        grad_packed = torch.autograd.grad(packed.square().sum(), list(model.parameters()), allow_unused=True)
    assert model.config._attn_implementation == before  # restored afterwards
    torch.testing.assert_close(packed, padded, rtol=1e-9, atol=1e-9)
    for gp, gq in zip(grad_padded, grad_packed):
        if gp is not None:
            torch.testing.assert_close(gq, gp, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("pooling,segment_max", [("cls", 128), ("mean", 128), ("cls", 9)])
def test_bucketed_packing_adds_only_isolated_padding(minilm_dir, pooling, segment_max):
    """Padding a packed batch to a bucketed length (static shapes for CUDA graphs) changes nothing."""
    from mirrorfast.data import pad_segments
    from mirrorfast.kernels import info_nce

    tok, model, encoder, views = tiny_setup(minilm_dir, pooling, seed=1)
    plain = packed_batch(views)
    bucketed = packed_batch(views, tok.pad_token_id, bucket=64, pad_segment_max=segment_max)
    k = pad_segments(64, segment_max)
    assert k == (1 if segment_max == 128 else 8)
    assert bucketed.input_ids.shape[1] % 64 == 0 and bucketed.input_ids.shape[1] >= plain.input_ids.shape[1] + k
    assert bucketed.cu_seqlens.shape[0] == plain.cu_seqlens.shape[0] + k
    pad_lengths = (bucketed.cu_seqlens[1:] - bucketed.cu_seqlens[:-1])[-k:]
    assert (pad_lengths >= 1).all() and (pad_lengths <= segment_max).all()
    assert bucketed.max_len == max(-(-plain.max_len // 32) * 32, segment_max)  # MAX_LEN_MULTIPLE
    real = plain.input_ids.shape[1]  # padding positions are 0 (valid in any model, however few positions)
    assert (bucketed.position_ids[0, real:] == 0).all() and torch.equal(bucketed.position_ids[0, :real], plain.position_ids[0])
    assert bucketed.tokens == plain.tokens and bucketed.views == plain.views == 10

    losses, grads = [], []
    with packed_attention(model):
        for batch in (plain, bucketed):
            embeddings = encoder.embed_batch(batch)
            assert embeddings.shape == (10, 32)
            loss = info_nce(embeddings[:5], embeddings[5:], 0.05, backend="torch")
            losses.append(loss)
            grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                             allow_unused=True))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


def test_chunked_padding_equals_one_padded_batch(minilm_dir):
    """Encoding a padded batch in length-sorted chunks (each at its own width) changes nothing."""
    tok, model, encoder, views = tiny_setup(minilm_dir, "mean", seed=2)
    whole = padded_batch(views, tok.pad_token_id, views_per_chunk=1000)
    chunked = padded_batch(views, tok.pad_token_id, views_per_chunk=2)
    assert len(whole.chunks) == 1 and len(chunked.chunks) >= 2
    assert chunked.chunks[-1][2] < whole.input_ids.shape[1]  # the short views really ran narrower
    torch.testing.assert_close(encoder.embed_batch(chunked), encoder.embed_batch(whole), rtol=1e-9, atol=1e-9)


@pytest.mark.triton_cpu
def test_cuda_kernel_override_is_validated(minilm_dir, monkeypatch):
    """MIRRORFAST_PACKED_ATTENTION picks (auto), or forces FlashAttention, the gathered-SDPA path or the one-tile
    Triton kernel; anything else is one clear error as packed attention is switched on (before any work). The
    CPU gathers (or runs the Triton kernel under the interpreter, as here), and every path gives the same
    embeddings."""
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.packing import ATTENTION_ENV, cuda_kernel, packed_kernel

    tok, model, encoder, views = tiny_setup(minilm_dir, "cls", seed=2)
    with packed_attention(model):
        default = encoder.embed_batch(packed_batch(views))
    cpu = torch.device("cpu")
    for value, kernel, on_cpu in (("", "auto", "sdpa"), ("auto", "auto", "sdpa"), ("flash", "flash", "sdpa"),
                                  (" SDPA ", "sdpa", "sdpa"), ("triton", "triton", "triton")):
        monkeypatch.setenv(ATTENTION_ENV, value)
        assert cuda_kernel() == kernel
        assert packed_kernel(cpu, 20) == on_cpu  # TRITON_INTERPRET=1 here (conftest)
        with packed_attention(model):  # the same computation exactly, or (Triton kernel) up to rounding
            exact = 0 if on_cpu == "sdpa" else 1e-7
            torch.testing.assert_close(encoder.embed_batch(packed_batch(views)), default, rtol=exact, atol=exact)
    # The Triton kernel where it cannot run is an error, not another kernel in its place.
    with pytest.raises(MirrorfastError, match="=triton takes views of up to 128 tokens; this run's max length is 200"):
        packed_kernel(cpu, 200)
    with pytest.raises(MirrorfastError, match=r"=triton takes at most 131071 views x heads a batch .* up to "
                                              r"10923 views x 12 heads"):
        packed_kernel(cpu, 20, views=10923, heads=12)
    assert packed_kernel(cpu, 20, views=10922, heads=12) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(MirrorfastError, match="=triton runs on a CUDA GPU .* this run is on cpu"):
        packed_kernel(cpu, 20)
    monkeypatch.setenv(ATTENTION_ENV, "xformers")
    with pytest.raises(MirrorfastError, match="MIRRORFAST_PACKED_ATTENTION must be one of"):
        with packed_attention(model):
            pass
    assert model.config._attn_implementation != "mirrorfast_packed"  # nothing was switched


def test_auto_takes_the_triton_kernel_where_a_run_fits_it(monkeypatch):
    """`auto` on an sm80+ GPU: the Triton kernel for runs whose views (max_length <= 128), views x heads (dropout
    offsets) and head dimension (<= 64, as timed) fit it, FlashAttention otherwise or when nothing is said of the
    run's batches; the overrides win; no triton installed: FlashAttention. Off CUDA: the gathered SDPA path."""
    import importlib.util

    from mirrorfast import packing
    from mirrorfast.packing import ATTENTION_ENV, packed_kernel

    cuda = torch.device("cuda")  # a device object only: nothing touches a GPU
    monkeypatch.setattr(packing, "flash_supported", lambda device: device.type == "cuda")
    bert = dict(views=409, heads=12, head_dim=64)
    assert packed_kernel(cuda, 50, **bert) == "triton"
    assert packed_kernel(cuda, 128, **bert) == "triton"
    assert packed_kernel(torch.device("cpu"), 50, **bert) == "sdpa"
    assert packed_kernel(cuda, 129, **bert) == "flash"
    assert packed_kernel(cuda, 50, **{**bert, "head_dim": 32}) == "triton"
    assert packed_kernel(cuda, 50, **{**bert, "head_dim": 128}) == "flash"
    assert packed_kernel(cuda, 50, **{**bert, "views": 10923}) == "flash"  # 10923 x 12 > 131071
    assert packed_kernel(cuda, 50, **{**bert, "views": 10922}) == "triton"
    assert packed_kernel(cuda, 50) == packed_kernel(cuda) == "flash"  # nothing said of the batches
    for value, kernel in (("flash", "flash"), ("sdpa", "sdpa"), ("triton", "triton"), ("auto", "triton")):
        monkeypatch.setenv(ATTENTION_ENV, value)
        assert packed_kernel(cuda, 50, **bert) == kernel
    monkeypatch.setenv(ATTENTION_ENV, "auto")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert packed_kernel(cuda, 50, **bert) == "flash"


@pytest.mark.triton_cpu
def test_kernel_is_decided_once_per_context(minilm_dir, monkeypatch):
    """packed_attention decides the kernel as it is entered (the trainer passes the one it decided for its
    longest views); the forwards inside never decide again, and a packed forward outside it is an error."""
    pytest.importorskip("triton")
    from mirrorfast.errors import MirrorfastError
    from mirrorfast.packing import ATTENTION_ENV

    tok, model, encoder, views = tiny_setup(minilm_dir, "cls", seed=4)
    batch = packed_batch(views)
    with packed_attention(model) as kernel:
        assert kernel == "sdpa"  # the CPU's path for the default ("auto")
        gathered = encoder.embed_batch(batch)
        monkeypatch.setenv(ATTENTION_ENV, "triton")  # too late for this context
        assert torch.equal(encoder.embed_batch(batch), gathered)
    with packed_attention(model) as kernel:
        assert kernel == "triton"
        tiled = encoder.embed_batch(batch)
    with packed_attention(model, "sdpa"):  # the caller's decision wins
        assert torch.equal(encoder.embed_batch(batch), gathered)
    assert not torch.equal(tiled, gathered)  # the two kernels round differently: the check above can fail
    with pytest.raises(MirrorfastError, match="inside mirrorfast.packing.packed_attention"):
        encoder.embed_batch(batch)


@pytest.mark.triton_cpu
def test_triton_packed_attention_in_the_model(minilm_dir, monkeypatch):
    """The one-tile Triton kernel inside a real (float32, dropout-free) BERT: packed equals padded, forward and
    gradients (the Triton interpreter here; compiled on a GPU)."""
    pytest.importorskip("triton")
    from mirrorfast.packing import ATTENTION_ENV

    monkeypatch.setenv(ATTENTION_ENV, "triton")
    tok, model, encoder, views = tiny_setup(minilm_dir, "mean", seed=3)
    model.float()
    padded = encoder.embed_batch(padded_batch(views, tok.pad_token_id))
    grad_padded = torch.autograd.grad(padded.square().sum(), list(model.parameters()), allow_unused=True)
    with packed_attention(model):
        packed = encoder.embed_batch(packed_batch(views, tok.pad_token_id, bucket=64, pad_segment_max=16))
        grad_packed = torch.autograd.grad(packed.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for gp, gq in zip(grad_padded, grad_packed):
        if gp is not None:
            torch.testing.assert_close(gq, gp, rtol=1e-4, atol=1e-5)

def test_bucketed_max_len_takes_few_values(minilm_dir):
    """With bucketing (CUDA graphs) max_len is static per shape: at least the padding-segment cap, rounded
    up to a multiple of MAX_LEN_MULTIPLE beyond it, so long views give a few shapes, not one per batch."""
    from mirrorfast.data import MAX_LEN_MULTIPLE

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    for words, expected in ((3, 128), (140, 160), (150, 160), (160, 192)):
        tt = TokenizedTexts.build(tok, ["x " * words, "y"], 512)
        rows = np.array([0, 1])
        longest = int(tt.lengths(rows).max())
        batch = packed_batch([(tt, rows), (tt, rows)], tok.pad_token_id, bucket=512)
        assert batch.max_len == max(128, -(-longest // MAX_LEN_MULTIPLE) * MAX_LEN_MULTIPLE) == expected, words
        assert batch.max_len >= longest and packed_batch([(tt, rows), (tt, rows)]).max_len == longest


def test_ids_are_stored_int32_and_fed_int64(minilm_dir):
    """TokenizedTexts keeps ids in int32 (half the memory of a large corpus); every batch hands the model
    int64 ids with the same values, padded, packed and bucketed alike."""
    tok, _, _, views = tiny_setup(minilm_dir, "cls", seed=2)
    tt = views[0][0]
    assert tt.ids.dtype == np.int32
    assert tt.ids.tolist() == [i for row in tok(TEXTS, truncation=True, max_length=24)["input_ids"] for i in row]
    for batch in (padded_batch(views, tok.pad_token_id), packed_batch(views),
                  packed_batch(views, tok.pad_token_id, bucket=64)):
        assert batch.input_ids.dtype == torch.int64
    packed = packed_batch(views).input_ids[0].tolist()
    assert packed == [i for tt_, rows in views for r in rows for i in tt_.ids[tt_.offsets[r]:tt_.offsets[r + 1]].tolist()]
