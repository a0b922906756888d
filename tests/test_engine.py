"""The streaming engine: chunk-size invariance, formats, hashing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import save_file

from common import base_state, flat, read_flat, task_deltas, write_family
from tvbasis.build import build_store
from tvbasis.engine import atom_pass, gram_pass
from tvbasis.engine.streaming import gram_sum
from tvbasis.io import open_checkpoint
from tvbasis.io.writer import SafetensorsStreamWriter, TensorSpec, shard_plan
from tvbasis.methods import make_method
from tvbasis.tasks import TaskSource, TaskVectorSet
from tvbasis.tasks.taskvectors import plan_chunks, plan_partitions

EXCLUDE = ["head.*"]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=5, rank=2)


def test_gram_is_exact_and_in_float64(family) -> None:
    tvs = TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE)
    V = family.dense()
    stats = gram_pass(tvs, chunk_elements=13)
    assert stats.gram.dtype == np.float64
    np.testing.assert_allclose(stats.gram, V.T @ V, rtol=1e-12)
    assert tvs.dim == V.shape[0]
    assert sorted(i.name for i in tvs.tensors) == sorted(family.names)  # ints and excluded heads left out


def test_chunks_cover_every_entry_once(family) -> None:
    tvs = TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE)
    for size in (1, 7, 64, 10**9):
        chunks = plan_chunks(tvs.tensors, size)
        assert sum(c.numel if c.row_numel else 1 for c in chunks) == tvs.dim
        offsets = [c.offset for c in chunks]
        assert offsets == sorted(offsets)


@pytest.mark.parametrize(
    "method,kw",
    [("pca", {}), ("autoencoder", {"steps": 100}), ("random", {}), ("sample", {}), ("cluster", {"merge": "ties"})],
)
def test_results_do_not_depend_on_chunk_size(family, tmp_path: Path, method: str, kw: dict) -> None:
    stores = [
        build_store(
            family.base,
            family.tasks,
            make_method(method, 3, seed=2, **kw),
            tmp_path / f"s{c}",
            exclude=EXCLUDE,
            chunk_elements=c,
        )
        for c in (5, 97, 1 << 20)
    ]
    ref = stores[-1]
    for s in stores[:-1]:
        np.testing.assert_allclose(s.gram, ref.gram, rtol=1e-12)
        np.testing.assert_allclose(s.decoder, ref.decoder, rtol=1e-7, atol=1e-9)
        for a, b in zip(s.manifest["tasks"], ref.manifest["tasks"], strict=True):
            assert a["rel_error"] == pytest.approx(b["rel_error"], abs=1e-7)
            assert a["content_hash"] == b["content_hash"]
        assert s.manifest["base"]["content_hash"] == ref.manifest["base"]["content_hash"]
        if ref.manifest["atoms"]["stored"]:
            for va, vb in zip(s.manifest["atoms"]["vectors"], ref.manifest["atoms"]["vectors"], strict=True):
                np.testing.assert_allclose(
                    read_flat(s.path / va["files"][0], family.names),
                    read_flat(ref.path / vb["files"][0], family.names),
                    atol=1e-6,
                )


def test_content_hashes_are_of_the_task_vector_tensors(family) -> None:
    tvs = TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE)
    stats = gram_pass(tvs, chunk_elements=11)
    ckpt = open_checkpoint(family.tasks[0].path)
    digests = b"".join(  # each tensor's own hash, in the store's fixed tensor order
        xxhash.xxh3_128_digest(ckpt.read(info.name).reshape(-1).view(torch.uint8).numpy().tobytes())
        for info in tvs.tensors
    )
    assert stats.task_hashes[0] == xxhash.xxh3_128_hexdigest(digests)
    assert len(set(stats.task_hashes)) == len(family.tasks)


def test_partitions_depend_on_the_layout_only(family) -> None:
    tvs = TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE)
    parts = plan_partitions(tvs.tensors, 100)
    assert [n for p in parts for n in p] == [i.name for i in tvs.tensors]
    sizes = {i.name: i.numel for i in tvs.tensors}
    assert all(sum(sizes[n] for n in p[:-1]) < 100 for p in parts)  # closed as soon as it is large enough
    assert len(plan_partitions(tvs.tensors, 1)) == len(tvs.tensors)
    # per-partition sums of one partition at a time add up to the same G
    whole = gram_pass(tvs, partition_elements=100).gram
    one = sum(
        gram_sum(TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE, only=p), partition_elements=100)
        for p in parts
    )
    np.testing.assert_array_equal((one + one.T) / 2, whole)


@pytest.mark.parametrize(
    "method,kw",
    [("pca", {}), ("pca", {"center": True}), ("autoencoder", {"steps": 50}), ("sample", {}), ("cluster", {})],
)
def test_exact_atom_statistics_match_the_stored_atoms(family, method: str, kw: dict) -> None:
    """fp32 builds of linear methods take S^T S and S^T V from G; they must agree with
    the statistics measured on the float32 atoms the unmeasured pass writes."""
    tvs = TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE)
    m = make_method(method, 2, **kw)
    m.fit(gram_pass(tvs).gram)
    exact = m.atom_stats(gram_pass(tvs).gram)
    assert exact is not None
    written: list[torch.Tensor] = []

    def keep(chunk, S: torch.Tensor) -> torch.Tensor:
        assert S.dtype == torch.float32  # unmeasured passes work in the atoms' own precision
        written.append(S.clone())
        return S

    assert atom_pass(tvs, m.atom_rows, keep, chunk_elements=37, measure=False) is None
    S = torch.cat(written).to(torch.float64).numpy()
    V = np.stack([flat(family.deltas[t], [i.name for i in tvs.tensors]) for t in range(tvs.n_tasks)], axis=1)
    np.testing.assert_allclose(S.T @ S, exact[0], rtol=1e-5, atol=1e-6 * np.abs(exact[0]).max())
    np.testing.assert_allclose(S.T @ V, exact[1], rtol=1e-5, atol=1e-6 * np.abs(exact[1]).max())
    measured = atom_pass(tvs, m.atom_rows, lambda c, S: S.to(torch.float32), chunk_elements=37)
    assert measured is not None
    np.testing.assert_allclose(measured.atom_gram, exact[0], rtol=1e-5, atol=1e-6 * np.abs(exact[0]).max())


def _save_hf_sharded(state: dict[str, torch.Tensor], directory: Path, n_shards: int = 3) -> None:
    directory.mkdir(parents=True)
    names = list(state)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_every_checkpoint_format_gives_the_same_gram(tmp_path: Path) -> None:
    base = base_state(0)
    deltas = task_deltas(3, 1)
    fts = [{k: v + d[k] if k in d else v for k, v in base.items()} for d in deltas]
    grams = []
    # one safetensors file; sharded HF dir; pytorch_model.bin dir; torch file with nested state_dict
    writers = {
        "st": lambda s, p: (save_file(s, str(p.with_suffix(".safetensors"))), p.with_suffix(".safetensors"))[1],
        "shard": lambda s, p: (_save_hf_sharded(s, p), p)[1],
        "bin": lambda s, p: (p.mkdir(), torch.save(s, p / "pytorch_model.bin"), p)[2],
        "pt": lambda s, p: (torch.save({"state_dict": s, "epoch": 3}, p.with_suffix(".pt")), p.with_suffix(".pt"))[1],
    }
    for kind, write in writers.items():
        b = write(base, tmp_path / f"{kind}-base")
        tasks = [TaskSource(f"t{i}", write(ft, tmp_path / f"{kind}-t{i}")) for i, ft in enumerate(fts)]
        tvs = TaskVectorSet(b, tasks, exclude=EXCLUDE)
        grams.append(gram_pass(tvs, chunk_elements=50).gram)
    for g in grams[1:]:
        np.testing.assert_allclose(g, grams[0], rtol=1e-12)


def test_mixed_precision_inputs(tmp_path: Path) -> None:
    fam = write_family(tmp_path, T=3, dtype=torch.bfloat16)
    tvs = TaskVectorSet(fam.base, fam.tasks, exclude=EXCLUDE)
    V = fam.dense()
    np.testing.assert_allclose(gram_pass(tvs).gram, V.T @ V, rtol=1e-10)


def test_stream_writer_output_reads_back(tmp_path: Path) -> None:
    specs = [
        TensorSpec("a", (5, 3), torch.bfloat16),
        TensorSpec("b", (), torch.float32),
        TensorSpec("c", (7,), torch.int64),
    ]
    a = torch.randn(5, 3).to(torch.bfloat16)
    with SafetensorsStreamWriter(tmp_path / "x.safetensors", specs) as w:
        w.write("a", a[:2])
        w.write("a", a[2:])
        w.write("b", torch.tensor(3.5))
        w.write("c", torch.arange(7))
    ck = open_checkpoint(tmp_path / "x.safetensors")
    assert torch.equal(ck.read("a"), a) and float(ck.read("b")) == 3.5 and torch.equal(ck.read("c"), torch.arange(7))
    plan = shard_plan(specs * 1, max_shard_bytes=30)
    assert len(plan) > 1 and all(f.startswith("model-") for f, _ in plan)
