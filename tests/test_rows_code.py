"""``rows:CODE``: rows a task leaves untouched cost nothing; the Gram pass counts them, stores keep
the counts, the planner prices the code with them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common import write_family
from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.codes import TensorKey, bias_variance, decode, encode, nbytes, parse_code
from tvbasis.codes.core import nonzero_row_count
from tvbasis.engine.streaming import gram_pass
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method
from tvbasis.planning.budget import build_for_budget, estimate_plan, plan_budget, stats_from_store
from tvbasis.store import open_store
from tvbasis.store.residuals import CodePlan, TensorCode, payload_parts, residual_header_bytes, uniform_plan
from tvbasis.tasks import TaskVectorSet
from tvbasis.tasks.taskvectors import plan_chunks

pytestmark = pytest.mark.usefixtures("one_thread")
EXCLUDE = ["head.*"]
EMBED = "embed.weight"
runner = CliRunner()


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory):
    """5 tasks, each leaving 3/4 of ``embed.weight``'s 37 rows (its own random set) untouched."""
    return write_family(tmp_path_factory.mktemp("sparse"), T=5, untouched_rows=0.75)


def with_zero_rows(shape: tuple[int, ...], zero_every: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows = x.reshape(shape[0], -1) if len(shape) >= 2 else x.reshape(1, -1)
    rows[::zero_every] = 0.0
    return x


# -- the code ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inner",
    [
        "int8",
        "int4",
        "keep:0.25:int4:seed=2",
        "keep:0.5:sr2:seed=1",
        "rsign:0.5:seed=1",
        "topk:0.2",
        "lowrank:2",
        "fp16",
        "sign",
    ],
)
@pytest.mark.parametrize("shape", [(40, 12), (9, 3, 4), (4, 16)])
def test_zero_rows_stay_zero_and_the_rest_is_the_inner_code(inner: str, shape: tuple[int, ...]) -> None:
    spec = parse_code(f"rows:{inner}")
    assert str(spec) == f"rows:{parse_code(inner)}" and parse_code(str(spec)) == spec
    x = with_zero_rows(shape)
    key = TensorKey("t", "task", 0)
    enc = encode(spec, x, key)
    out = decode(enc)
    rows = x.reshape(shape[0], -1)
    nonzero = rows.ne(0).any(dim=1)
    assert out.shape == x.shape
    assert torch.equal(out.reshape(shape[0], -1)[~nonzero], torch.zeros_like(rows[~nonzero], dtype=torch.float64))
    compact = rows[nonzero].reshape(-1, *shape[1:])
    expect = decode(encode(parse_code(inner), compact, key))
    torch.testing.assert_close(out.reshape(shape[0], -1)[nonzero], expect.reshape(int(nonzero.sum()), -1))
    # bytes: exactly what the count says; pricing by the shape alone counts every row
    count = nonzero_row_count(x)
    assert enc.nbytes == nbytes(spec, shape, count)
    assert nbytes(spec, shape) == nbytes(spec, shape, shape[0]) > enc.nbytes or count == shape[0]
    # its error is the inner code's on the nonzero rows
    assert bias_variance(spec, x, key) == bias_variance(parse_code(inner), compact, key)


def test_all_zero_and_dense_tensors() -> None:
    spec = parse_code("rows:keep:0.5:int4:seed=0")
    zero = torch.zeros(30, 8)
    enc = encode(spec, zero)
    assert torch.equal(decode(enc), torch.zeros(30, 8, dtype=torch.float64))
    assert enc.nbytes == nbytes(spec, (30, 8), 0) == 8  # the count; no rows
    dense = torch.randn(30, 8)
    # every row nonzero: a bitmap (4 bytes) beats 30 one-byte indices, on top of the inner code
    assert encode(spec, dense).nbytes == 8 + 4 + nbytes(parse_code("keep:0.5:int4:seed=0"), (30, 8))
    few = torch.zeros(3000, 8)
    few[[5, 700, 2999]] = 1.0
    # three of 3,000 rows: two-byte indices (6 bytes) beat a 375-byte bitmap
    assert encode(spec, few).nbytes == 8 + 6 + nbytes(parse_code("keep:0.5:int4:seed=0"), (3, 8))
    assert torch.equal(decode(encode(parse_code("rows:fp32"), few)), few.double())
    # a 1-D tensor is one row, as for every code
    bias = torch.randn(16)
    assert torch.equal(decode(encode(parse_code("rows:fp32"), bias)), bias.double())
    assert encode(parse_code("rows:fp32"), bias).nbytes == nbytes(parse_code("rows:fp32"), (16,), 1) == 8 + 1 + 64
    assert encode(parse_code("rows:fp32"), torch.zeros(16)).nbytes == nbytes(parse_code("rows:fp32"), (16,), 0) == 8


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rows", "name the code of the nonzero rows"),
        ("rows:", "name the code of the nonzero rows"),
        ("rows:none", "other than 'none'"),
        ("rows:rows:int8", "other than 'rows'"),
        ("rows:int9", "unknown code 'int9'"),
        ("rows:keep:2", "must be in"),
    ],
)
def test_bad_specs_are_refused_clearly(text: str, match: str) -> None:
    with pytest.raises(TvbasisError, match=match):
        parse_code(text)


# -- counting rows in the Gram pass ---------------------------------------------------------


def test_the_gram_pass_counts_nonzero_rows_whatever_the_chunking(sparse) -> None:
    tvs = TaskVectorSet(sparse.base, sparse.tasks, exclude=EXCLUDE)
    expect = {n: np.array([nonzero_row_count(d[n]) for d in sparse.deltas], dtype=np.int64) for n in sparse.names}
    assert list(expect[EMBED]) == [9] * 5  # 37 rows, 28 untouched by each task
    for chunk in (5, 64, 1 << 20):
        stats = gram_pass(tvs, chunk_elements=chunk, tensor_stats=True)
        assert stats.nonzero_rows is not None and list(stats.nonzero_rows) == [i.name for i in tvs.tensors]
        for n in sparse.names:
            np.testing.assert_array_equal(stats.nonzero_rows[n], expect[n])
    assert gram_pass(tvs, tensor_stats=False).nonzero_rows is None


# -- stores with rows codes --------------------------------------------------------------------


def decoded_tasks(store) -> dict[str, np.ndarray]:
    """Each tensor's decoded task vectors, (T, numel) per tensor."""
    out: dict[str, list[np.ndarray]] = {}
    eye = np.eye(store.n_tasks)
    for chunk in plan_chunks(store.tensors, 1 << 20):
        out.setdefault(chunk.tensor, []).append(
            np.stack([store.task_rows(chunk, eye[t]).numpy() for t in range(store.n_tasks)])
        )
    return {n: np.concatenate(parts, axis=1) for n, parts in out.items()}


def test_a_rows_coded_store_reconstructs_and_counts_its_bytes(sparse, tmp_path: Path) -> None:
    inner = parse_code("keep:0.5:int8:seed=1")
    rows_plan = CodePlan(
        tensors={EMBED: TensorCode(False, parse_code(f"rows:{inner}"))}, default=TensorCode(False, inner)
    )
    kw = {"exclude": EXCLUDE}
    store = build_store(sparse.base, sparse.tasks, make_method("pca", 0), tmp_path / "rows", codes=rows_plan, **kw)
    dense = build_store(
        sparse.base, sparse.tasks, make_method("pca", 0), tmp_path / "dense", codes=uniform_plan(inner), **kw
    )
    got, ref = decoded_tasks(store), decoded_tasks(dense)
    for t, (delta, task) in enumerate(zip(sparse.deltas, store.task_names, strict=True)):
        x = delta[EMBED]
        rows = x.reshape(x.shape[0], -1)
        nz = rows.ne(0).any(dim=1)
        expect = decode(encode(inner, rows[nz], TensorKey(EMBED, task, 0)))
        emb = got[EMBED][t].reshape(rows.shape)
        np.testing.assert_array_equal(emb[~nz.numpy()], 0.0)
        np.testing.assert_allclose(emb[nz.numpy()], expect.numpy(), atol=1e-12)
        for n in sparse.names:
            if n != EMBED:  # every other tensor is coded exactly as in the dense store
                np.testing.assert_array_equal(got[n][t], ref[n][t])
    # 9 of 37 rows per task: the embedding's payload shrinks to theirs plus the row set
    shape = store.shape_of(EMBED)
    saved = 5 * (nbytes(inner, shape) - nbytes(parse_code(f"rows:{inner}"), shape, 9))
    entry, dense_entry = store.manifest["residuals"], dense.manifest["residuals"]
    assert entry["payload_bytes"] == dense_entry["payload_bytes"] - saved and saved > 0
    assert store.manifest["bytes"]["residuals"] == sum(store.manifest["files"][f] for f in entry["files"])
    assert store.manifest["bytes"]["residuals"] < dense.manifest["bytes"]["residuals"]
    # the errors it reports are measured through it
    measured = [
        np.sqrt(sum(((got[n][t] - sparse.deltas[t][n].reshape(-1).numpy()) ** 2).sum() for n in sparse.names))
        / np.sqrt(sum((sparse.deltas[t][n].double() ** 2).sum().item() for n in sparse.names))
        for t in range(5)
    ]
    np.testing.assert_allclose([t["rel_error"] for t in store.manifest["tasks"]], measured, rtol=1e-9)
    # and the same bytes whatever the chunking
    small = build_store(
        sparse.base, sparse.tasks, make_method("pca", 0), tmp_path / "small", codes=rows_plan, chunk_elements=7, **kw
    )
    for f in entry["files"]:
        assert (small.path / f).read_bytes() == (store.path / f).read_bytes()


def test_a_basis_covering_a_rows_coded_tensor_is_refused(sparse, tmp_path: Path) -> None:
    with pytest.raises(TvbasisError, match=r"embed\.weight.*rows:int8.*-M 0"):
        build_store(
            sparse.base,
            sparse.tasks,
            make_method("pca", 2),
            tmp_path / "s",
            exclude=EXCLUDE,
            codes=uniform_plan("rows:int8"),
        )
    assert not (tmp_path / "s").exists()


def test_cli_builds_and_refuses_rows_codes(sparse, tmp_path: Path) -> None:
    args = ["build", "--base", str(sparse.base), "--exclude", "head.*", "--method", "pca"]
    args += [a for t in sparse.tasks for a in ("--task", f"{t.name}={t.path}")]
    ok = runner.invoke(app, [*args, "-M", "0", "--residual", "rows:int4", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert open_store(tmp_path / "ok").manifest["residuals"]["tensors"][EMBED]["residual"] == "rows:int4"
    info = runner.invoke(app, ["info", str(tmp_path / "ok")])
    assert info.exit_code == 0 and "rows:int4" in info.output
    bad = runner.invoke(app, [*args, "-M", "2", "--residual", "rows:int4", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "-M 0" in bad.output and not (tmp_path / "bad").exists()
    worse = runner.invoke(app, [*args, "-M", "0", "--residual", "rows:none", "--out", str(tmp_path / "worse")])
    assert worse.exit_code != 0 and "rows:none" in worse.output


# -- planning -------------------------------------------------------------------------------------


def test_the_planner_uses_rows_codes_where_rows_are_zero(sparse, tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    build_store(sparse.base, sparse.tasks, make_method("pca", 1), stats, exclude=EXCLUDE, tensor_stats=True)
    gram, grams, shapes, names = stats_from_store(stats)
    counts = open_store(stats).tensor_nonzero_rows
    kw = {"atoms": [0], "tensor_atoms": [], "codes": ("none", "int8", "int4")}
    # a budget (bytes: the tensors are tiny beside the fixed headers) with room for half of int8 everywhere
    headers = plan_budget(gram, grams, shapes, 10**9, nonzero_rows=counts, **kw).overhead_bytes
    budget = headers + 5 * sum(nbytes(parse_code("int8"), s) for s in shapes.values()) // 2
    with_rows = plan_budget(gram, grams, shapes, budget, task_names=names, nonzero_rows=counts, **kw)
    without = plan_budget(gram, grams, shapes, budget, task_names=names, **kw)
    chosen = {c.tensor: str(c.code.residual) for c in with_rows.choices}
    assert chosen[EMBED].startswith("rows:") and not any(v.startswith("rows:") for n, v in chosen.items() if n != EMBED)
    assert not any(str(c.code.residual).startswith("rows:") for c in without.choices)
    assert with_rows.loss < without.loss  # the bytes it saves buy precision elsewhere
    # it builds what it planned, within the budget; row_codes=False plans as before
    for row_codes in (True, False):
        store = build_for_budget(
            sparse.base,
            sparse.tasks,
            tmp_path / f"b{row_codes}",
            budget,
            exclude=EXCLUDE,
            stats_store=stats,
            row_codes=row_codes,
            **kw,
        )
        assert store.manifest["bytes"]["total"] <= budget
        codes = {n: v["residual"] for n, v in store.manifest["residuals"]["tensors"].items()}
        assert codes == {c.tensor: str(c.code.residual) for c in (with_rows if row_codes else without).choices}
    # pricing a rows code needs the counts, and with them is exact
    plan = CodePlan(
        tensors={EMBED: TensorCode(False, parse_code("rows:int8"))}, default=TensorCode(False, parse_code("int8"))
    )
    with pytest.raises(TvbasisError, match=r"embed\.weight.*count of nonzero rows"):
        estimate_plan(gram, grams, shapes, plan, 0, task_names=names)
    priced = estimate_plan(gram, grams, shapes, plan, 0, task_names=names, nonzero_rows=counts)
    rows_store = build_store(
        sparse.base, sparse.tasks, make_method("pca", 0), tmp_path / "r", exclude=EXCLUDE, codes=plan
    )
    assert sum(c.nbytes for c in priced.choices) == rows_store.manifest["residuals"]["payload_bytes"]


def test_residual_headers_are_priced_exactly(sparse, tmp_path: Path) -> None:
    """Header bytes of every task's residual file, from codes, shapes and row counts alone; the
    planner's overhead is them plus its fixed allowance, so a plan spends what headers leave."""
    stats = tmp_path / "stats"
    build_store(sparse.base, sparse.tasks, make_method("pca", 1), stats, exclude=EXCLUDE, tensor_stats=True)
    counts = open_store(stats).tensor_nonzero_rows
    plan = CodePlan(
        tensors={EMBED: TensorCode(False, parse_code("rows:keep:0.5:sr2:seed=1"))},
        default=TensorCode(False, parse_code("keep:0.25:int4")),
    )
    store = build_store(sparse.base, sparse.tasks, make_method("pca", 0), tmp_path / "s", exclude=EXCLUDE, codes=plan)
    files = [(store.path / f).read_bytes() for f in store.manifest["residuals"]["files"]]
    written = sum(8 + struct.unpack("<Q", f[:8])[0] for f in files)
    codes = {n: TensorCode.from_json(v) for n, v in store.manifest["residuals"]["tensors"].items()}
    shapes = {n: store.shape_of(n) for n in codes}
    assert residual_header_bytes(codes, shapes, store.task_names, counts) == written
    with pytest.raises(TvbasisError, match=r"embed\.weight.*count of nonzero rows"):
        residual_header_bytes(codes, shapes, store.task_names)
    gram, grams, shapes, names = stats_from_store(stats)
    room = 5 * sum(nbytes(parse_code("int8"), s) for s in shapes.values()) // 2  # half of int8 everywhere
    budget = plan_budget(gram, grams, shapes, 10**9, nonzero_rows=counts).overhead_bytes + room
    planned = plan_budget(gram, grams, shapes, budget, task_names=names, nonzero_rows=counts)
    chosen = {c.tensor: c.code for c in planned.choices}
    headers = residual_header_bytes(chosen, shapes, names, counts)
    fixed = estimate_plan(gram, grams, shapes, planned.codes, planned.n_atoms, task_names=names, nonzero_rows=counts)
    assert planned.overhead_bytes == fixed.overhead_bytes  # both price the chosen codes' headers exactly
    assert headers < planned.overhead_bytes <= planned.budget_bytes - sum(c.nbytes for c in planned.choices)


def test_plan_shows_the_share_of_rows_each_tensor_changes(sparse, tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    build_store(sparse.base, sparse.tasks, make_method("pca", 1), stats, exclude=EXCLUDE, tensor_stats=True)
    shown = runner.invoke(app, ["plan", str(stats), "--json"])
    assert shown.exit_code == 0, shown.output
    rows = {t["name"]: t["rows_changed"] for t in json.loads(shown.output)["tensors"]}
    assert rows[EMBED] == pytest.approx(9 / 37) and rows["layer.1.mlp.weight"] == 1.0
    table = runner.invoke(app, ["plan", str(stats)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "24.3%" in table.output and "share of its rows a task changes" in table.output
    plain = build_store(
        sparse.base, sparse.tasks, make_method("pca", 1), tmp_path / "p", exclude=EXCLUDE, tensor_stats=True
    )
    (plain.path / "tensor_rows.safetensors").unlink()  # a store written before the counts were kept
    manifest = json.loads((plain.path / "tvbasis.json").read_text())
    del manifest["files"]["tensor_rows.safetensors"]
    (plain.path / "tvbasis.json").write_text(json.dumps(manifest))
    older = runner.invoke(app, ["plan", str(plain.path), "--json"])
    assert older.exit_code == 0 and all(t["rows_changed"] is None for t in json.loads(older.output)["tensors"])


def test_cli_plans_and_builds_with_or_without_rows_codes(sparse, tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    build_store(sparse.base, sparse.tasks, make_method("pca", 1), stats, exclude=EXCLUDE, tensor_stats=True)
    counts = open_store(stats).tensor_nonzero_rows
    gram, grams, shapes, _ = stats_from_store(stats)
    budget = plan_budget(gram, grams, shapes, 10**9, nonzero_rows=counts).overhead_bytes + 6000
    codes = {}
    for flag in ("--row-codes", "--no-row-codes"):
        shown = runner.invoke(app, ["plan", str(stats), "--budget", str(budget), "--json", flag])
        assert shown.exit_code == 0, shown.output
        codes[flag] = json.loads(shown.output)["tensors"]
    assert codes["--row-codes"][EMBED].startswith("rows:") and not codes["--no-row-codes"][EMBED].startswith("rows:")
    args = ["build", "--base", str(sparse.base), "--exclude", "head.*", "--budget", str(budget), "--quiet"]
    args += [a for t in sparse.tasks for a in ("--task", f"{t.name}={t.path}")]
    built = runner.invoke(app, [*args, "--plan-from", str(stats), "--no-row-codes", "--out", str(tmp_path / "b")])
    assert built.exit_code == 0, built.output
    tensors = open_store(tmp_path / "b").manifest["residuals"]["tensors"]
    assert not any(v["residual"].startswith("rows:") for v in tensors.values())


@pytest.mark.parametrize(
    "inner", ["keep:0.0625:sr2:seed=0", "rsign:0.25:seed=0", "int4", "topk:0.2", "lowrank:2", "keep:0.5:int4", "fp16"]
)
def test_payload_parts_of_rows_codes_are_those_they_encode(inner: str) -> None:
    """The store lays out a rows code's parts without encoding the whole tensor: the same parts."""
    spec = parse_code(f"rows:{inner}")
    for shape, count in [((300, 12), 7), ((40, 12), 0), ((40, 12), 40), ((9, 3, 4), 5), ((9, 3, 4), 0), ((16,), 1)]:
        x = torch.zeros(shape)
        x.reshape(shape[0] if len(shape) > 1 else 1, -1)[:count] = 1.0
        encoded = {k: (tuple(v.shape), v.dtype) for k, v in encode(spec, x).payload.items()}
        laid_out = {p.name: (p.shape, p.dtype) for p in payload_parts(spec, shape, count)}
        assert laid_out == encoded, (shape, count)
