"""Per-tensor codes of ``tvbasis.codes``: round trips, exact byte counts, seeded masks, parsing, bias/variance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tvbasis.codes import (
    CodeSpec,
    TensorKey,
    bias_variance,
    code,
    decode,
    encode,
    nbytes,
    parse_code,
    registry,
)
from tvbasis.codes import keep as keep_module
from tvbasis.codes import rsign as rsign_module
from tvbasis.codes.lloydmax import LEVEL_INNER, LEVEL_OUTER, THRESHOLD
from tvbasis.codes.packing import pack_rows, unpack_rows
from tvbasis.errors import TvbasisError
from tvbasis.store.quantize import quantize_rows

ALL_SPECS = [
    "int8",
    "int4",
    "int2",
    "lloydmax2",
    "sign",
    "keep:0.0625:int4:seed=0",
    "keep:0.5:int8:seed=3",
    "keep:0.3:int2:seed=1",
    "keep:0.25:sr2:seed=2",
    "keep:1.0:sr2:seed=0",
    "keep:0.25:sr2:clip=3:seed=2",
    "keep:0.25:sr2:clip=2.75:seed=0",
    "rsign:0.25:seed=1",
    "rsign:1.0:seed=0",
    "rsign:0.05:seed=3",
    "topk:0.05",
    "topk:0.5",
    "lowrank:3",
    "lowrank:2:fp32",
    "fp32",
    "fp16",
    "bf16",
    "none",
]
# odd row lengths for the packed codes, 1-D and 3-D tensors, a single entry
SHAPES = [(6, 10), (5, 7), (3, 1), (1, 9), (4, 3, 5), (13,), (1,), (2, 33)]
KEY = TensorKey("layer.0.weight", "task_a", 0)


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("text", ALL_SPECS)
def test_nbytes_from_shape_equals_payload(text: str) -> None:
    spec = parse_code(text)
    for shape in SHAPES:
        enc = encode(spec, _x(shape), KEY)
        assert enc.nbytes == nbytes(spec, shape), (text, shape)
        assert decode(enc).shape == shape


@pytest.mark.parametrize(
    ("text", "shape", "expected"),
    [
        ("int8", (6, 10), 6 * 10 + 4 * 6),
        ("int4", (5, 7), 5 * 4 + 4 * 5),  # 7 nibbles -> 4 bytes per row
        ("int2", (5, 7), 5 * 2 + 4 * 5),  # 7 crumbs -> 2 bytes per row
        ("lloydmax2", (2, 33), 2 * 9 + 4 * 2),
        ("sign", (2, 33), 2 * 5 + 4 * 2),
        ("keep:0.25:int4:seed=0", (6, 10), 6 * 2 + 4 * 6),  # k = round(2.5) = 3 -> 2 bytes; the seed is the spec's
        ("keep:0.5:sr2:seed=0", (6, 10), 6 * (2 + 2)),  # bfloat16 scale, then 5 crumbs -> 2 bytes
        ("rsign:0.25:seed=0", (2, 100), 2 * (2 + 4)),  # bfloat16 scale, then 25 sign bits -> 4 bytes
        ("rsign:0.01:seed=0", (3, 100), 3 * (2 + 1)),  # at least MIN_KEPT = 8 signs a row
        ("rsign:0.1:seed=0", (3, 5), 3 * (2 + 1)),  # a row shorter than MIN_KEPT is kept whole
        ("topk:0.05", (10, 100), 2 * 50 + 50 * 2),  # 50 two-byte indices (100) < 125-byte bitmap
        ("topk:0.5", (10, 100), 2 * 500 + 125),  # bitmap
        ("lowrank:3", (6, 10), (6 + 10) * 3 * 2),
        ("lowrank:8:fp32", (6, 10), (6 + 10) * 6 * 4),  # rank capped at 6
        ("bf16", (4, 3, 5), 60 * 2),
        ("none", (4, 3, 5), 0),
    ],
)
def test_byte_formulas(text: str, shape: tuple[int, ...], expected: int) -> None:
    assert nbytes(parse_code(text), shape) == expected


def test_int8_matches_store_quantizer_and_half_scale_bound() -> None:
    x = _x((6, 10))
    enc = encode(parse_code("int8"), x)
    q, scale = quantize_rows(x)
    assert torch.equal(enc.payload["codes"], q) and torch.equal(enc.payload["scale"], scale)
    err = (decode(enc) - x.double()).abs()
    assert torch.all(err <= scale.double()[:, None] / 2 + 1e-7)


@pytest.mark.parametrize(("text", "levels"), [("int4", 7), ("int2", 1)])
def test_narrow_uniform_round_trip(text: str, levels: int) -> None:
    x = _x((5, 7), 1)
    enc = encode(parse_code(text), x)
    scale = x.abs().amax(dim=1).double() / levels
    err = (decode(enc) - x.double()).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)
    assert torch.allclose(decode(enc).abs().amax(dim=1), x.abs().amax(dim=1).double(), rtol=1e-6)


def test_packing_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    for bits in (1, 2, 4, 8):
        for n in (1, 3, 7, 8, 9):
            u = torch.randint(0, 1 << bits, (3, n), generator=g, dtype=torch.uint8)
            packed = pack_rows(u, bits)
            assert packed.shape == (3, math.ceil(n * bits / 8))
            assert torch.equal(unpack_rows(packed, bits, n), u)


def test_lloydmax_levels_are_gaussian_centroids() -> None:
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    assert (phi(0) - phi(THRESHOLD)) / (cdf(THRESHOLD) - 0.5) == pytest.approx(LEVEL_INNER, rel=1e-9)
    assert phi(THRESHOLD) / (1 - cdf(THRESHOLD)) == pytest.approx(LEVEL_OUTER, rel=1e-9)


def test_lloydmax_decodes_to_nearest_level() -> None:
    x = _x((4, 50), 2)
    y = decode(encode(parse_code("lloydmax2"), x))
    sigma = x.double().square().mean(dim=1).sqrt()
    levels = torch.tensor([-LEVEL_OUTER, -LEVEL_INNER, LEVEL_INNER, LEVEL_OUTER], dtype=torch.float64)
    candidates = levels[None, None, :] * sigma[:, None, None]  # (rows, 1, 4)
    nearest = candidates.expand(4, 50, 4).gather(
        2, (x.double()[:, :, None] - candidates).abs().argmin(dim=2, keepdim=True)
    )[:, :, 0]
    assert torch.allclose(y, nearest, rtol=1e-6)
    # on Gaussian data it beats ternary int2 by far
    assert (y - x).square().sum() < 0.5 * (decode(encode(parse_code("int2"), x)) - x).square().sum()


def test_sign_keeps_every_sign_and_mean_magnitude() -> None:
    x = _x((5, 13), 3)
    y = decode(encode(parse_code("sign"), x))
    assert torch.equal(torch.sign(y), torch.sign(x.double()))
    assert torch.allclose(y.abs(), x.abs().mean(dim=1, keepdim=True).double().expand_as(y), rtol=1e-6)


def test_topk_keeps_exactly_the_k_largest() -> None:
    for shape, fraction in [((10, 100), 0.05), ((10, 100), 0.5), ((7, 3), 0.2)]:
        x = _x(shape, 4)
        y = decode(encode(parse_code(f"topk:{fraction}"), x))
        k = max(1, math.floor(fraction * x.numel() + 0.5))
        top = set(torch.topk(x.abs().reshape(-1), k).indices.tolist())
        assert set(y.reshape(-1).nonzero().reshape(-1).tolist()) == top
        flat = x.reshape(-1)
        assert torch.equal(y.reshape(-1)[list(top)], flat[list(top)].half().double())


def test_lowrank_full_rank_exact_and_truncation_is_svd() -> None:
    x = _x((6, 9), 5)
    y = decode(encode(parse_code("lowrank:6:fp32"), x))
    assert torch.allclose(y, x.double(), atol=1e-5)
    y2 = decode(encode(parse_code("lowrank:2:fp32"), x))
    s = torch.linalg.svdvals(x.double())
    assert (y2 - x.double()).square().sum().item() == pytest.approx(s[2:].square().sum().item(), rel=1e-5)
    y16 = decode(encode(parse_code("lowrank:6"), x))
    assert torch.allclose(y16, x.double(), atol=1e-2)
    # a 1-D tensor is one row: rank 1 is exact
    v = _x((11,), 6)
    assert torch.allclose(decode(encode(parse_code("lowrank:4:fp32"), v)), v.double(), atol=1e-6)


def test_tensor_wide_codes_refuse_row_blocks() -> None:
    for text, shape in [("topk:0.5", (4, 6)), ("lowrank:2", (4, 6)), ("int8", (6,))]:
        with pytest.raises(ValueError, match="whole tensor"):
            encode(parse_code(text), _x(shape), TensorKey("w", "t", 2))
    assert not code("topk").row_local and not code("lowrank").row_local and code("keep").row_local


def test_none_and_dense() -> None:
    x = _x((4, 3, 5), 7)
    assert torch.equal(decode(encode(parse_code("none"), x)), torch.zeros(4, 3, 5, dtype=torch.float64))
    assert torch.equal(decode(encode(parse_code("fp32"), x)), x.double())
    assert torch.equal(decode(encode(parse_code("fp16"), x)), x.half().double())
    assert torch.equal(decode(encode(parse_code("bf16"), x)), x.bfloat16().double())


def _keep_chunks(spec: CodeSpec, x: torch.Tensor, cuts: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoded rows and the payload (every part is per row) of ``x`` coded in blocks cut at ``cuts``."""
    bounds = [0, *cuts, x.shape[0]]
    encs = [encode(spec, x[a:b], TensorKey(KEY.tensor, KEY.task, a)) for a, b in itertools.pairwise(bounds)]
    payload = {k: torch.cat([e.payload[k] for e in encs]) for k in encs[0].payload}
    return torch.cat([decode(e) for e in encs]), payload


@pytest.mark.parametrize("values", ["int4", "sr2"])
def test_keep_is_chunk_invariant(monkeypatch: pytest.MonkeyPatch, values: str) -> None:
    x = _x((11, 8), 8)
    spec = parse_code(f"keep:0.25:{values}:seed=5")
    for block in (keep_module.KEEP_BLOCK, 16, 8):  # 16: two rows per random block; 8: one
        monkeypatch.setattr(keep_module, "KEEP_BLOCK", block)
        whole = encode(spec, x, KEY)
        for cuts in ([1], [3, 4, 9], [2, 5], list(range(1, 11))):
            y, payload = _keep_chunks(spec, x, cuts)
            assert torch.equal(y, decode(whole))
            assert payload.keys() == whole.payload.keys()
            assert all(torch.equal(payload[k], whole.payload[k]) for k in payload)
        # exactly k = 2 kept per row, and the kept values are the quantized row's, rescaled by n / k
        y = decode(whole)
        assert torch.all((y != 0).sum(dim=1) <= 2)
    # masks differ across seeds, tasks and tensors
    base = decode(encode(spec, x, KEY)) != 0
    for other in (
        encode(parse_code(f"keep:0.25:{values}:seed=6"), x, KEY),
        encode(spec, x, TensorKey(KEY.tensor, "task_b", 0)),
        encode(spec, x, TensorKey("layer.1.weight", KEY.task, 0)),
    ):
        assert not torch.equal(decode(other) != 0, base)


def test_keep_is_unbiased_and_its_error_split_is_exact() -> None:
    x = _x((3, 16), 9)
    n_seeds = 600
    for text in ("keep:0.25:int8", "keep:0.5:int2"):
        spec = parse_code(text)
        samples = torch.stack([decode(encode(parse_code(f"{text}:seed={s}"), x, KEY)) for s in range(n_seeds)])
        expected = keep_module.expected_rows(spec, x)
        p = 4 / 16 if "0.25" in text else 0.5
        std_of_mean = math.sqrt((1 - p) / p) * expected.abs() / math.sqrt(n_seeds)
        assert torch.all((samples.mean(dim=0) - expected).abs() <= 5 * std_of_mean + 1e-12)
        err = bias_variance(spec, x, KEY)
        assert err.bias_sq == pytest.approx((expected - x.double()).square().sum().item())
        assert err.variance == pytest.approx((1 - p) / p * expected.square().sum().item())
        empirical = (samples - x.double()).square().sum(dim=(1, 2)).mean().item()
        assert empirical == pytest.approx(err.expected_sq, rel=0.1)
    # int8 quantization is tiny: the mean approaches x itself
    int8 = torch.stack([decode(encode(parse_code(f"keep:0.5:seed={s}"), x, KEY)) for s in range(n_seeds)])
    assert (int8.mean(dim=0) - x.double()).norm() < 0.1 * x.norm()
    assert code("keep").unbiased and not code("topk").unbiased


def test_sr2_rounds_at_random_to_four_levels_without_bias_inside_its_clip() -> None:
    x = _x((4, 64), 11)
    x[0, 0] = 10.0  # far beyond 2 x the row's RMS: clipped
    spec = parse_code("keep:1.0:sr2")
    scale = keep_module.sr2_scale(spec, keep_module.rows_of(x)).double()
    assert torch.allclose(scale, 2 * x.double().square().mean(dim=1).sqrt(), rtol=1e-2)
    n_seeds = 800
    samples = torch.stack([decode(encode(parse_code(f"keep:1.0:sr2:seed={s}"), x, KEY)) for s in range(n_seeds)])
    levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float64)
    ratio = samples / scale[None, :, None]
    assert torch.all((ratio[..., None] - levels).abs().amin(dim=-1) < 1e-9)  # only the four levels
    clipped = torch.maximum(torch.minimum(x.double(), scale[:, None]), -scale[:, None])
    assert torch.equal(keep_module.expected_rows(spec, x), clipped)
    # each value rounds to one of the two levels around it, with the probabilities that make it unbiased
    step = 2 / 3 * scale[:, None]
    assert torch.all((samples - clipped).abs() < step + 1e-9)
    std_of_mean = step / 2 / math.sqrt(n_seeds)
    assert torch.all((samples.mean(dim=0) - clipped).abs() <= 5 * std_of_mean)
    err = bias_variance(spec, x, KEY)
    assert err.bias_sq == pytest.approx((clipped - x.double()).square().sum().item())
    outlier = (10.0 - scale[0].item()) ** 2  # most of the bias; a few other entries lie beyond 2 RMS
    assert outlier <= err.bias_sq <= 1.1 * outlier
    empirical = (samples - clipped).square().sum(dim=(1, 2)).mean().item()
    assert empirical == pytest.approx(err.variance, rel=0.1)
    assert code("keep").unbiased


def test_sr2_error_split_with_keep_and_its_advantage_over_int4() -> None:
    x = _x((3, 16), 12)
    spec = parse_code("keep:0.25:sr2")
    samples = torch.stack([decode(encode(parse_code(f"keep:0.25:sr2:seed={s}"), x, KEY)) for s in range(1500)])
    err = bias_variance(spec, x, KEY)
    empirical = (samples - keep_module.expected_rows(spec, x)).square().sum(dim=(1, 2)).mean().item()
    assert empirical == pytest.approx(err.variance, rel=0.1)
    # on Gaussian rows, at the same bytes, sr2 has less bias and less variance than int4 quantizing
    big = _x((64, 256), 13)
    sr2 = bias_variance(parse_code("keep:0.0625:sr2"), big)
    k_int4 = 16 - 8  # int4 keeping 8 of 256 (4 values + 4 scale bytes = 8) vs sr2's 24 (6 + 2 bytes)
    int4 = bias_variance(parse_code(f"keep:{k_int4 / 256}:int4"), big)
    assert nbytes(parse_code(f"keep:{k_int4 / 256}:int4"), big.shape) == nbytes(
        parse_code(f"keep:{24 / 256}:sr2"), big.shape
    )
    sr2 = bias_variance(parse_code(f"keep:{24 / 256}:sr2"), big)
    assert sr2.bias_sq < int4.bias_sq and sr2.variance < 0.7 * int4.variance
    # a wider clip: far less bias, more variance, still less than int4's at the same bytes
    wide = bias_variance(parse_code(f"keep:{24 / 256}:sr2:clip=3"), big)
    assert wide.bias_sq < 0.1 * sr2.bias_sq and sr2.variance < wide.variance < 0.9 * int4.variance


def test_sr2_clip_sets_the_stored_scale_and_defaults_to_two() -> None:
    x = _x((6, 40), 14)
    rms = x.double().square().mean(dim=1).sqrt()
    for text, clip in [("keep:0.5:sr2", 2.0), ("keep:0.5:sr2:clip=2", 2.0), ("keep:0.5:sr2:clip=3.5", 3.5)]:
        spec = parse_code(text)
        assert keep_module.sr2_clip(spec) == clip
        scale = encode(spec, x, KEY).payload["kept"][:, :2].reshape(-1).clone().view(torch.bfloat16).double()
        assert torch.allclose(scale, clip * rms, rtol=1e-2)
    # the default is left out of the spec: specs written before the clip existed compare equal
    assert parse_code("keep:0.5:sr2:clip=2") == parse_code("keep:0.5:sr2")
    assert str(parse_code("keep:0.5:sr2:clip=3")) == "keep:0.5:sr2:clip=3:seed=0"
    # same kept set and rounding stream: only the scale, so the levels, differ
    narrow, wide = (decode(encode(parse_code(f"keep:0.5:sr2:{c}"), x, KEY)) for c in ("clip=2", "clip=3"))
    assert torch.equal(narrow != 0, wide != 0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 100, 384])
def test_rsign_rotation_is_orthogonal_and_inverted(n: int) -> None:
    x = _x((4, n), 15).double()
    r = rsign_module.rotation(7, KEY, 4, n)
    y = rsign_module.rotate(x, r)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
    assert torch.allclose(rsign_module.unrotate(y, r), x)
    # rows get their own rotations
    if n > 2:
        assert not torch.equal(r.permutation[0], r.permutation[1]) or not torch.equal(r.signs[0, 0], r.signs[0, 1])


def _structured(rows: int, n: int, seed: int) -> torch.Tensor:
    """Rows with a block of large entries and a trend: not Gaussian, the case a plain Hadamard
    transform of a length that is not a power of two gets wrong."""
    x = _x((rows, n), seed).double() * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    x[:, : n // 4] *= 4
    return x


def test_rsign_projection_is_exact_and_it_is_unbiased_with_the_variance_it_states() -> None:
    x = _structured(3, 100, 16)
    x[1] = 0.0  # a zero row decodes to zero
    n_seeds = 2000
    spec = parse_code("rsign:0.1")
    samples = torch.stack([decode(encode(parse_code(f"rsign:0.1:seed={s}"), x, KEY)) for s in range(n_seeds)])
    assert torch.equal(samples[:, 1], torch.zeros_like(samples[:, 1]))
    # <x_hat, x> = ||x||^2 on every row and seed, up to the bfloat16 scale
    energy = x.square().sum(dim=1)
    projection = (samples * x).sum(dim=2)[:, [0, 2]] / energy[[0, 2]]
    assert torch.all((projection - 1).abs() < 2**-8)
    err = bias_variance(spec, x, KEY)
    assert err.bias_sq == 0.0
    k = rsign_module.kept_count(0.1, 100)
    assert k == 10
    assert err.variance == pytest.approx(rsign_module.variance_factor(100, k) * x.square().sum().item())
    empirical = (samples - x).square().sum(dim=(1, 2)).mean().item()
    assert empirical == pytest.approx(err.variance, rel=0.05)
    # the mean over seeds approaches x: what is left is the mean's own noise (variance / seeds)
    mean_error = (samples.mean(dim=0) - x).square().sum().item()
    assert mean_error < 1.5 * err.variance / n_seeds
    assert code("rsign").unbiased


def test_rsign_variance_factor_on_the_sphere() -> None:
    assert rsign_module.variance_factor(1, 1) == 0.0  # one entry: coded exactly
    # many kept coordinates: pi n / 2k - 1, with the 1.71 / k correction of the scale's noise
    for n, k in [(4096, 512), (384, 48), (1536, 96)]:
        approx = math.pi * n / (2 * k) * (1 + (math.pi / 2 - 1) * 3 / k) - 1
        assert rsign_module.variance_factor(n, k) == pytest.approx(approx, rel=0.02)
    # every coordinate kept: DRIVE's pi / 2 - 1 as the row grows
    assert rsign_module.variance_factor(4096, 4096) == pytest.approx(math.pi / 2 - 1, rel=0.02)
    assert rsign_module.variance_factor(384, 48) == rsign_module.variance_factor(384, 48)  # fixed draws


def test_rsign_single_entry_and_short_rows() -> None:
    x = torch.tensor([[3.0], [-2.0]])
    y = decode(encode(parse_code("rsign:0.5"), x, KEY))
    assert torch.allclose(y, x.double(), rtol=2**-8)
    assert rsign_module.kept_count(0.01, 5) == 5 and rsign_module.kept_count(0.001, 1000) == 8


def test_rsign_is_chunk_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _x((11, 24), 17)
    spec = parse_code("rsign:0.5:seed=5")
    for block in (keep_module.KEEP_BLOCK, 48, 24):  # 48: two rows per random block; 24: one
        monkeypatch.setattr(keep_module, "KEEP_BLOCK", block)
        whole = encode(spec, x, KEY)
        for cuts in ([1], [3, 4, 9], list(range(1, 11))):
            y, payload = _keep_chunks(spec, x, cuts)
            assert torch.equal(y, decode(whole))
            assert all(torch.equal(payload[k], whole.payload[k]) for k in whole.payload)
    base = decode(encode(spec, x, KEY))
    for other in (
        encode(parse_code("rsign:0.5:seed=6"), x, KEY),
        encode(spec, x, TensorKey(KEY.tensor, "task_b", 0)),
        encode(spec, x, TensorKey("layer.1.weight", KEY.task, 0)),
    ):
        assert not torch.allclose(decode(other), base)


def test_rsign_has_less_variance_than_sr2_at_the_same_bytes() -> None:
    big = _x((64, 256), 18)
    sr2, rs = parse_code(f"keep:{24 / 256}:sr2"), parse_code(f"rsign:{48 / 256}")
    assert nbytes(sr2, big.shape) == nbytes(rs, big.shape)  # 2 + 6 bytes a row each
    sr2_err, rs_err = bias_variance(sr2, big), bias_variance(rs, big)
    assert rs_err.bias_sq == 0 < sr2_err.bias_sq
    assert rs_err.variance < 0.7 * sr2_err.variance
    # and what it states is what it does, on these rows with one seed
    realised = (decode(encode(rs, big)) - big.double()).square().sum().item()
    assert realised == pytest.approx(rs_err.variance, rel=0.1)


def test_deterministic_codes_error_is_all_bias() -> None:
    x = _x((5, 7), 10)
    for text in ("int4", "sign", "topk:0.2", "lowrank:2", "none"):
        spec = parse_code(text)
        err = bias_variance(spec, x)
        assert err.variance == 0
        assert err.bias_sq == pytest.approx((decode(encode(spec, x)) - x.double()).square().sum().item())
    assert bias_variance(parse_code("none"), x).bias_sq == pytest.approx(x.double().square().sum().item())


@pytest.mark.parametrize("text", ALL_SPECS)
def test_spec_strings_round_trip(text: str) -> None:
    spec = parse_code(text)
    assert parse_code(str(spec)) == spec


def test_parse_defaults() -> None:
    assert str(parse_code("keep:0.5")) == "keep:0.5:int8:seed=0"
    assert str(parse_code("keep:0.125:seed=7:int2")) == "keep:0.125:int2:seed=7"
    assert str(parse_code("keep:0.125:sr2")) == "keep:0.125:sr2:seed=0"
    # a deterministic keep's spec is as it always was (stores written before sr2 read the same)
    assert parse_code("keep:0.5:int2").params == (("bits", 2), ("p", 0.5), ("seed", 0))
    assert parse_code("keep:0.5:sr2") != parse_code("keep:0.5:int2")
    assert str(parse_code("lowrank:8")) == "lowrank:8:fp16"
    assert str(parse_code(" topk:0.05 ")) == "topk:0.05"
    assert str(parse_code("rsign:0.125")) == "rsign:0.125:seed=0"
    assert {"int8", "int4", "int2", "lloydmax2", "sign", "keep", "rsign", "topk", "lowrank", "none", "fp32"} <= set(
        registry()
    )


@pytest.mark.parametrize(
    "text",
    [
        "int3",
        "",
        "int8:2",
        "keep",
        "keep:0",
        "keep:1.5",
        "keep:abc",
        "keep:0.5:int5",
        "keep:0.5:seed=-1",
        "keep:0.5:sr3",
        "keep:0.5:sr2:clip=0",
        "keep:0.5:sr2:clip=-1",
        "keep:0.5:sr2:clip=nan",
        "keep:0.5:sr2:clip=inf",
        "keep:0.5:sr2:clip=wide",
        "keep:0.5:int4:clip=3",
        "rsign",
        "rsign:0",
        "rsign:1.5",
        "rsign:0.5:int4",
        "rsign:0.5:seed=x",
        "topk",
        "topk:0",
        "topk:0.1:0.2",
        "lowrank",
        "lowrank:0",
        "lowrank:2.5",
        "lowrank:4:int8",
        "none:1",
    ],
)
def test_bad_spec_strings_name_the_string(text: str) -> None:
    with pytest.raises(TvbasisError) as info:
        parse_code(text)
    assert repr(text) in str(info.value)
