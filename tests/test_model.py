"""The encoder: published sizes, kernel path = reference path, checkpoint loading, bad input."""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from csfm.model.batch import Batch
from csfm.model.checkpoint import load_pretrained, save_checkpoint
from csfm.model.config import preset
from csfm.model.encoder import CSFMEncoder
from csfm.model.pretrain import MaskedPretrainer


def make_batch(seed: int = 0, vocab: int = 2048) -> Batch:
    """A 1-lead, an ECG+PPG and a 12-lead record of different lengths, with 5, 0 and 64 text tokens."""
    g = torch.Generator().manual_seed(seed)
    signals = [torch.randn(1, 2500, generator=g), torch.randn(2, 2500, generator=g),
               torch.randn(12, 1000, generator=g)]
    ids = [torch.tensor([1]), torch.tensor([1, 12]), torch.arange(12)]
    text = [torch.randint(0, vocab, (5,), generator=g), torch.zeros(0, dtype=torch.long),
            torch.randint(0, vocab, (64,), generator=g)]
    return Batch(signals, ids, text, [torch.ones_like(s, dtype=torch.bool) for s in signals], ["a", "b", "c"])


@pytest.mark.parametrize("name, millions", [("tiny", 42.5), ("base", 108.6), ("large", 266.5)])
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        model = CSFMEncoder(preset(name))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.005, count


def test_reference_parameter_names():
    names = set(CSFMEncoder(preset("demo", depth=1)).state_dict())
    for key in ["ts_to_patch_embedding.1.weight", "ts_to_patch_embedding.2.bias", "ts_to_patch_embedding.3.weight",
                "ts_channel_type_embedding", "ts_pos_embedding", "text_to_embedding.0.weight",
                "text_to_embedding.1.bias", "text_pos_embedding", "text_type_embedding", "cls_token",
                "transformer.layers.0.0.norm.weight", "transformer.layers.0.0.to_qkv.weight",
                "transformer.layers.0.0.to_out.0.weight", "transformer.layers.0.1.net.0.weight",
                "transformer.layers.0.1.net.1.weight", "transformer.layers.0.1.net.4.bias", "transformer.norm.weight"]:
        assert key in names, key
    assert "transformer.layers.0.0.to_qkv.bias" not in names


def _pair(config):
    fused = CSFMEncoder(config)
    reference = CSFMEncoder(config, backend="reference")
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def test_kernel_path_equals_reference_path_values_and_grads():
    fused, reference = _pair(preset("demo", dropout=0.0))
    batch = make_batch()
    outs = []
    for model in (fused, reference):
        out = model(batch)
        (out.cls.square().sum() + out.mean.sum()).backward()
        outs.append((out.tokens.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_each_record_alone_equals_its_row_in_a_mixed_batch():
    model = CSFMEncoder(preset("demo")).eval()
    batch = make_batch()
    together = model(batch)
    for b in range(len(batch)):
        alone = model(Batch([batch.signals[b]], [batch.channel_ids[b]], [batch.text_ids[b]], [batch.valid[b]]))
        torch.testing.assert_close(alone.cls[0], together.cls[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.mean[0], together.mean[b], atol=1e-5, rtol=1e-5)


def test_pretrainer_kernel_path_equals_reference_and_all_params_learn():
    config = preset("demo", dropout=0.0)
    fused = MaskedPretrainer(config)
    reference = MaskedPretrainer(config, backend="reference")
    reference.load_state_dict(fused.state_dict())
    batch = make_batch()
    losses = []
    for model in (fused, reference):
        out = model(batch, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        losses.append(out.loss.item())
        assert int(out.patch_mask.sum()) == sum(n - int(n * 0.25) for n in out.n_patch)
    assert abs(losses[0] - losses[1]) < 1e-5
    unused = [n for n, p in fused.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == [], unused


def test_reference_checkpoint_layout_loads(tmp_path):
    config = preset("demo", depth=2)
    source = CSFMEncoder(config)
    state = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    state["mlp_head.weight"] = torch.zeros(5, config.dim)
    torch.save(state, tmp_path / "csfm.pth")
    loaded = load_pretrained(tmp_path / "csfm.pth", config)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    save_checkpoint(tmp_path / "ours", source, config)
    ours = load_pretrained(tmp_path / "ours", config)
    assert torch.equal(ours.cls_token, source.cls_token)


def test_mismatched_checkpoints_give_readable_errors(tmp_path):
    config = preset("demo", depth=2)
    state = {f"encoder.{k}": v for k, v in CSFMEncoder(config).state_dict().items()}
    del state["encoder.cls_token"]
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing: cls_token(.|\n)*unexpected: extra.weight"):
        load_pretrained(tmp_path / "broken.pth", config)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(tmp_path / "broken.pth", preset("demo", depth=2, dim=64, dim_head=16))
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth: not a readable torch checkpoint"):
        load_pretrained(tmp_path / "corrupt.pth", config)
    save_checkpoint(tmp_path / "other", CSFMEncoder(preset("demo", depth=1)), preset("demo", depth=1))
    with pytest.raises(ValueError, match="missing: transformer.layers.1"):
        load_pretrained(tmp_path / "other", config)
    (tmp_path / "other" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_pretrained(tmp_path / "other", config)


def test_bad_batches_are_rejected():
    model = CSFMEncoder(preset("demo"))
    batch = make_batch()
    too_long = Batch(batch.signals[:1], batch.channel_ids[:1], [torch.zeros(65, dtype=torch.long)], batch.valid[:1])
    with pytest.raises(ValueError, match="65 text tokens"):
        model(too_long)
    with pytest.raises(ValueError, match="no usable channel"):
        Batch([torch.zeros(0, 2500)], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)],
              [torch.zeros(0, 2500, dtype=torch.bool)])
    with pytest.raises(ValueError, match="do not agree"):
        Batch([torch.zeros(2, 2500)], [torch.zeros(3, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)],
              [torch.zeros(2, 2500, dtype=torch.bool)])
    with pytest.raises(ValueError, match="multiple of the 25"):
        model(Batch([torch.zeros(1, 2510)], [torch.tensor([1])], [torch.zeros(0, dtype=torch.long)],
                    [torch.ones(1, 2510, dtype=torch.bool)]))
    with pytest.raises(ValueError, match="multiple of the 25"):
        model(Batch([torch.zeros(1, 5010)], [torch.tensor([1])], [torch.zeros(0, dtype=torch.long)],
                    [torch.ones(1, 5010, dtype=torch.bool)]))


def test_long_records_are_encoded_as_pooled_10s_windows():
    """A 25 s record = windows of 10 s, 10 s and 5 s; its embedding is the mean of theirs."""
    model = CSFMEncoder(preset("demo")).eval()
    g = torch.Generator().manual_seed(1)
    long = torch.randn(2, 6250, generator=g)
    ids, text = torch.tensor([1, 12]), torch.randint(0, 100, (4,), generator=g)
    out = model(Batch([long, long[:, :1000]], [ids, ids], [text, text],
                      [torch.ones_like(long, dtype=torch.bool), torch.ones(2, 1000, dtype=torch.bool)]))
    assert out.window_owner.tolist() == [0, 0, 0, 1]
    pieces = [long[:, :2500], long[:, 2500:5000], long[:, 5000:]]
    alone = [model(Batch([p], [ids], [text], [torch.ones_like(p, dtype=torch.bool)])) for p in pieces]
    torch.testing.assert_close(out.cls[0], torch.stack([a.cls[0] for a in alone]).mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean[0], torch.stack([a.mean[0] for a in alone]).mean(0), atol=1e-5, rtol=1e-5)


class HostReads(TorchFunctionMode):
    """Records every call that reads tensor values back to the host: on CUDA each is a device
    sync (and a graph break under torch.compile). Recorded as "<call> at <file>:<line>"."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
             "unique"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def _record(self, what: str) -> None:
        frame = next(f for f in traceback.extract_stack()[::-1] if "/torch/" not in f.filename
                     and f.filename != __file__)
        self.reads.append(f"{what} at {Path(frame.filename).name}:{frame.lineno}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS:
            self._record(name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, (tuple, list)) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self._record(f"boolean-mask {name}")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and \
                any(isinstance(a, torch.Tensor) for a in args[1:2]):
            self._record("repeat_interleave without output_size")
        return func(*args, **kwargs)


def test_pool_by_owner_means_and_maxima_per_owner():
    from csfm.model.encoder import pool_by_owner

    rows = torch.tensor([[1.0, 5.0], [2.0, 2.0], [3.0, -1.0], [-4.0, -6.0]], requires_grad=True)
    owner = torch.tensor([0, 1, 0, 1])
    mean = pool_by_owner(rows, owner, 3)
    assert torch.equal(mean, torch.tensor([[2.0, 2.0], [-1.0, -2.0], [0.0, 0.0]]))  # owner 2 has no row
    both = pool_by_owner(rows, owner, 3, "mean+max")
    assert torch.equal(both[:, 2:], torch.tensor([[3.0, 5.0], [2.0, 2.0], [0.0, 0.0]]))
    mean.sum().backward()
    assert torch.equal(rows.grad, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_by_owner(rows, owner, 3, "max")


def test_encoder_forward_and_backward_read_nothing_back():
    """The batch's host lengths travel with it, so nothing in the encoder reads a tensor back
    (on CUDA: no host sync). CPU stand-in for the gpu test under set_sync_debug_mode."""
    model = CSFMEncoder(preset("demo", dropout=0.1)).train()
    batch = make_batch()
    with HostReads() as spy:
        out = model(batch)
        (out.cls.sum() + out.mean.sum()).backward()
    assert spy.reads == []


def test_pretraining_step_reads_back_only_the_scored_sample_count():
    model = MaskedPretrainer(preset("demo"))
    with HostReads() as spy:
        model(make_batch(), generator=torch.Generator().manual_seed(0)).loss.backward()
    assert len(spy.reads) == 1 and spy.reads[0].startswith("__int__ at pretrain.py"), spy.reads


def test_host_read_spy_sees_the_reads_it_must():
    """The spy itself: each kind of read it claims to catch is caught."""
    t = torch.arange(4)
    with HostReads() as spy:
        t.tolist(), int(t[0]), bool(t.any()), t[t > 1], torch.repeat_interleave(t, t), t.nonzero()
        torch.repeat_interleave(t, t, output_size=6)  # no read: the size is given
    assert [r.split(" at ")[0] for r in spy.reads] == [
        "tolist", "__int__", "__bool__", "boolean-mask __getitem__", "repeat_interleave without output_size",
        "nonzero"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_kernel_path_equals_reference_path_on_cuda():
    """The compiled Triton kernels of every op inside the encoder and the pretraining step, vs the
    plain-torch reference with the same weights (fp32)."""
    config = preset("demo", dropout=0.0)
    fused, reference = (MaskedPretrainer(config, backend=b).cuda() for b in ("auto", "reference"))
    reference.load_state_dict(fused.state_dict())
    batch = make_batch().to("cuda")
    outs = []
    for model in (fused, reference):
        out = model(batch, generator=torch.Generator("cuda").manual_seed(5))
        out.loss.backward()
        outs.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert abs(outs[0][0] - outs[1][0]) < 1e-4
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_encoder_forward_has_no_host_sync_on_cuda(autocast):
    """torch.cuda.set_sync_debug_mode("error") raises on any host sync: the packed encoder's
    forward (patch embedding, layout, varlen attention, pooling) has none, so it can be captured
    in a CUDA graph. The first call (kernel compilation, cuBLAS set-up) runs before the check."""
    model = CSFMEncoder(preset("demo", dropout=0.0)).cuda()
    batch = make_batch().to("cuda")
    context = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with context():
        expected = model(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with context():
            out = model(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # equal up to the order of index_add's atomic sums in the token mean
    torch.testing.assert_close(out.cls, expected.cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean, expected.mean, atol=1e-5, rtol=1e-5)


def test_masked_patches_get_the_mean_of_their_records_kept_patches_at_the_same_time():
    from csfm.model.config import ModelConfig
    from csfm.model.pretrain import add_same_time_mean
    from csfm_kernels import random_masking

    # record 0: 3 channels x 2 positions, record 1: 1 channel x 2 positions (packed channel-major)
    pos = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    noise = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.3, 0.7], [0.9, 0.1, 2.0, 2.0, 2.0, 2.0]])
    plan = random_masking([6, 2], 0.5, noise=noise)  # keeps rows 0, 3, 4 and row 7 (record 1's second)
    assert plan.mask.tolist() == [False, True, True, False, False, True, True, False]
    tokens = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    out = add_same_time_mean(tokens, plan, pos, n_positions=2)
    expected = tokens.clone()
    expected[1] += tokens[3]                    # position 1 of record 0: only row 3 kept
    expected[5] += tokens[3]
    expected[2] += (tokens[0] + tokens[4]) / 2  # position 0 of record 0: rows 0 and 4 kept
    # row 6 (record 1, position 0): no kept row there, nothing added; record 0's rows are not used
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="decoder_same_time_mean must be a bool"):
        ModelConfig(decoder_same_time_mean=1)


def test_same_time_mean_changes_only_the_decoder_and_is_off_in_the_published_presets():
    assert not any(preset(name).decoder_same_time_mean for name in ("tiny", "base", "large"))
    batch = make_batch()
    plain = MaskedPretrainer(preset("demo", decoder_same_time_mean=False))
    with_mean = MaskedPretrainer(preset("demo"))
    with_mean.load_state_dict(plain.state_dict())  # same parameters: only the forward differs
    def both(ratio):
        return [model(batch, ratio, generator=torch.Generator().manual_seed(3)) for model in (plain, with_mean)]

    a, b = both(0.0)  # nothing masked: nothing added
    torch.testing.assert_close(a.text_ce, b.text_ce)
    a, b = both(0.75)
    assert not torch.allclose(a.signal_sse, b.signal_sse)
    b.loss.backward()
    assert with_mean.encoder.cls_token.grad is not None


def test_span_noise_masks_whole_runs_of_a_channel_at_the_same_ratio():
    from csfm.model.pretrain import span_noise
    from csfm_kernels import random_masking

    shapes = [(3, 100), (1, 37)]  # 3 channels x 10 s, and one channel of 3.7 s
    n = [c * p for c, p in shapes]
    noise = span_noise(torch.rand(2, 300, generator=torch.Generator().manual_seed(0)), shapes, span=10)
    plan = random_masking(n, 0.75, noise=noise)
    assert [int(m.sum()) for m in plan.mask.split(n)] == [n[0] - int(n[0] * 0.25), n[1] - int(n[1] * 0.25)]
    for mask, (channels, positions) in zip(plan.mask.split(n), shapes):
        runs = [mask.reshape(channels, positions)[c, a:a + 10] for c in range(channels)
                for a in range(0, positions, 10)]
        mixed = sum(1 for run in runs if 0 < int(run.sum()) < len(run))
        assert mixed <= 1  # every run is kept or masked whole, but the one at the cut
    with pytest.raises(ValueError, match=r"noise must be \[B=2, >= 300\]"):
        span_noise(torch.rand(2, 100), shapes, 10)


def test_span_masking_in_the_pretrainer_follows_the_generator_and_the_given_noise():
    from csfm.model.pretrain import span_noise
    from csfm_kernels import random_masking

    batch = make_batch()
    spans = MaskedPretrainer(preset("demo", depth=1), mask_span=5).eval()
    a = spans(batch, generator=torch.Generator().manual_seed(1))
    b = spans(batch, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.signal_sse, b.signal_sse)
    mask = a.patch_mask[:100]  # the 1-lead record's 100 patches
    assert sum(len(set(mask[i:i + 5].tolist())) > 1 for i in range(0, 100, 5)) <= 1
    # noise given (as the training loop draws it for a global batch): the spans still apply
    noise = torch.rand(3, 1300, generator=torch.Generator().manual_seed(2))
    given = spans(batch, signal_noise=noise, text_noise=torch.rand(3, 64))
    shapes = [(x.shape[0], x.shape[1] // 25) for x in batch.signals]
    expected = random_masking([c * p for c, p in shapes], 0.75, noise=span_noise(noise, shapes, 5))
    assert torch.equal(given.patch_mask, expected.mask)
    with pytest.raises(ValueError, match="mask_span must be a whole number of patches >= 1"):
        MaskedPretrainer(preset("demo", depth=1), mask_span=0)


def test_paired_info_nce_prefers_each_views_partner():
    import math

    from csfm.model.pretrain import paired_info_nce

    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # pairs agree, records orthogonal
    # row 0: positive logit 1/t, negatives 0 and 0 -> -log(e^(1/t) / (e^(1/t) + 2)), the same for every row
    t = 0.5
    expected = 4 * -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert float(paired_info_nce(z, t)) == pytest.approx(expected, rel=1e-6)
    swapped = z[[0, 2, 1, 3]]  # pairs now disagree: a higher loss
    assert float(paired_info_nce(swapped, t)) > expected
    with pytest.raises(ValueError, match="even number >= 2"):
        paired_info_nce(z[:3], t)


def _beats(times_s: list[float], length: int = 2500, fs: float = 250.0) -> torch.Tensor:
    """[1, length] zeros with a unit spike at each time (s): a QRS-like train of beats."""
    x = torch.zeros(1, length)
    x[0, [round(t * fs) for t in times_s if t * fs < length]] = 5.0
    return x


def test_envelope_autocorrelation_peaks_at_a_steady_beat_interval_only():
    from csfm.model.pretrain import envelope_autocorrelation, rhythm_lags

    lags = rhythm_lags(250.0)
    assert lags[0] == 50 and lags[-1] == 500 and len(lags) == 46  # 0.2-2.0 s every 0.04 s
    regular = _beats([0.3 + 0.8 * k for k in range(13)])
    gen = torch.Generator().manual_seed(0)
    irregular = _beats(torch.cumsum(0.4 + 0.8 * torch.rand(20, generator=gen), 0).tolist())
    flat = torch.zeros(1, 2500)
    x = torch.cat([regular, irregular, flat])
    valid = torch.ones_like(x, dtype=torch.bool)
    acf, used = envelope_autocorrelation(x, valid, lags, 10)
    assert used.tolist() == [True, True, False] and acf[2].abs().sum() == 0  # a flat channel is left out
    assert lags[acf[0].argmax()] == 200 and acf[0].max() > 0.8  # the 0.8 s beat interval
    assert acf[1].max() < 0.5  # irregular beats: no lag lines them up
    # invalid samples count as absent: the same beats with garbage where valid is False
    noisy, mask = regular.clone(), valid[:1].clone()
    noisy[0, 2000:], mask[0, 2000:] = 100.0, False
    part, _ = envelope_autocorrelation(noisy, mask, lags, 10)
    clean, _ = envelope_autocorrelation(regular[:, :2000], valid[:1, :2000], lags, 10)
    torch.testing.assert_close(part, clean)
    # lags beyond a short window read 0
    short, _ = envelope_autocorrelation(regular[:, :300], valid[:1, :300], lags, 10)
    assert short[0, lags >= 300].abs().sum() == 0


def test_rhythm_targets_average_used_channels_and_group_lengths():
    from csfm.model.pretrain import envelope_autocorrelation, rhythm_lags, rhythm_targets

    lags = rhythm_lags(250.0)
    gen = torch.Generator().manual_seed(1)
    signals = [torch.randn(2, 2500, generator=gen), torch.randn(1, 1250, generator=gen),
               torch.cat([torch.randn(1, 2500, generator=gen), torch.zeros(1, 2500)])]
    valid = [torch.ones_like(x, dtype=torch.bool) for x in signals]
    batch = Batch(signals, [torch.tensor([1, 7]), torch.tensor([1]), torch.tensor([1, 2])],
                  [torch.zeros(0, dtype=torch.int64)] * 3, valid)
    targets = rhythm_targets(batch, lags, 10)
    assert targets.shape == (3, 46)
    for b in range(3):
        acf, used = envelope_autocorrelation(signals[b], valid[b], lags, 10)
        torch.testing.assert_close(targets[b], acf[used].mean(0))  # the flat channel of sample 2 is left out


@pytest.mark.parametrize("rhythm_input", ["mean", "tokens"])
def test_rhythm_pretrainer_adds_its_loss_and_trains_the_encoder(rhythm_input):
    from csfm.model.token_rhythm import RHYTHM_WIDTH

    batch = make_batch()
    model = MaskedPretrainer(preset("demo", depth=1), rhythm_weight=2.0, rhythm_input=rhythm_input)
    assert model.rhythm_head.in_features == (model.config.dim if rhythm_input == "mean" else RHYTHM_WIDTH)
    plain = MaskedPretrainer(preset("demo", depth=1))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("rhythm_head.")})
    out = model(batch, generator=torch.Generator().manual_seed(0))
    base = plain(batch, generator=torch.Generator().manual_seed(0))
    assert out.n_rhythm == len(batch) and base.n_rhythm == 0 and out.rhythm_sse.item() > 0
    torch.testing.assert_close(out.loss, base.loss + 2.0 * out.rhythm_sse / len(batch))
    torch.testing.assert_close(out.weighted_loss(out.n_signal, out.n_text, 2 * len(batch)),
                               base.loss + 2.0 * out.rhythm_sse / (2 * len(batch)))  # a global count divides
    out.rhythm_sse.backward()  # the rhythm loss alone reaches the encoder and its head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.transformer.parameters())
    assert all(p.grad is not None for p in model.rhythm_head.parameters())
    assert not any(k.startswith("rhythm_lags") for k in model.state_dict())  # derived, not stored
    with pytest.raises(ValueError, match="rhythm_weight must be >= 0"):
        MaskedPretrainer(preset("demo", depth=1), rhythm_weight=-1.0)
    with pytest.raises(ValueError, match="rhythm_input must be one of"):
        MaskedPretrainer(preset("demo", depth=1), rhythm_weight=1.0, rhythm_input="cls")


def test_token_rhythm_head_reads_the_visible_tokens_where_they_sit():
    """rhythm_input tokens: the head's input is token_rhythm of the encoder's visible patch
    tokens at their places in the window, computed apart from the pretrainer."""
    from csfm.model.token_rhythm import patch_places, token_rhythm
    from csfm_kernels import gather_kept, random_masking

    batch = make_batch()
    model = MaskedPretrainer(preset("demo", depth=1), rhythm_weight=1.0, rhythm_input="tokens")
    seen = {}
    model.rhythm_head.register_forward_pre_hook(lambda module, args: seen.update(input=args[0]))
    model(batch, generator=torch.Generator().manual_seed(3))
    enc = model.encoder
    patch_rows, n_patch = enc.embed_signals(batch)
    text_rows, n_text = enc.embed_text(batch)
    generator = torch.Generator().manual_seed(3)
    signal_plan = random_masking(n_patch, 0.75, generator)
    text_plan = random_masking(n_text, 0.5, generator)
    encoded = enc.encode(gather_kept(patch_rows, signal_plan), signal_plan.n_kept,
                         gather_kept(text_rows, text_plan), text_plan.n_kept)
    places = patch_places([x.shape[1] for x in batch.signals], [x.shape[0] for x in batch.signals],
                          signal_plan.keep_rows)
    expected = token_rhythm(encoded.tokens[encoded.layout.patch_rows], places)
    torch.testing.assert_close(seen["input"], expected)


def test_contrastive_pretrainer_scores_pairs_and_trains_the_encoder():
    batch = make_batch()
    pairs = Batch([s for s in batch.signals[:2] for _ in range(2)], [c for c in batch.channel_ids[:2] for _ in range(2)],
                  [t for t in batch.text_ids[:2] for _ in range(2)], [v for v in batch.valid[:2] for _ in range(2)])
    model = MaskedPretrainer(preset("demo", depth=1), contrastive_weight=0.5)
    g = torch.Generator().manual_seed(0)
    plain = model(pairs, generator=torch.Generator().manual_seed(0))
    out = model(pairs, generator=g, paired=True)
    assert plain.n_contrast == 0 and out.n_contrast == 4 and out.contrast_ce.item() > 0
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.contrast_ce / 4)
    out.contrast_ce.backward()  # the contrastive loss alone reaches the encoder and the projection
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.transformer.parameters())
    assert all(p.grad is not None for p in model.projection.parameters())
    with pytest.raises(ValueError, match="contrastive_weight must be >= 0"):
        MaskedPretrainer(preset("demo", depth=1), contrastive_weight=-1)
