"""Forward cost of per-sample composition against the plain base model (issue: <= 1.5x at K = 4).

Runs all-MiniLM-L6-v2 on batches of real text-suite sentences, once plainly and once as a
:class:`tvbasis.composition.composed.ComposedModel` with K directions on every tensor and a
different coefficient vector per sample, exactly (one GEMM against the K stacked deltas per
linear layer) and through rank-r factors of each 2-D delta. Cost depends on shapes only, so the
directions are random with the base's shapes. Every figure is a ratio against the base measured
in the same run, interleaved (base, composed, base, ...), best of ``--repeat``.

    .venv/bin/python benchmarks/compose_forward.py [--batch 32] [--repeat 7]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from tvbasis.composition.composed import ComposedModel
from tvbasis.composition.directions import low_rank_factors
from tvbasis.textsuite.compose import token_features
from tvbasis.textsuite.data import load_task
from tvbasis.textsuite.model import _load, _pad, _tokenize, minilm_path


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer, base = _load(minilm_path())
    base.eval()
    task = load_task("fortune_topic")  # the suite's longest texts: most batches fill the 32-token cap
    seqs = _tokenize(tokenizer, [ex.text for ex in task.test[: args.batch]], 32)
    ids, mask = _pad(seqs, tokenizer.pad_token_id or 0)
    print(
        f"all-MiniLM-L6-v2, batch {args.batch} x {ids.shape[1]} tokens, {args.threads} threads, best of {args.repeat}"
    )

    @torch.inference_mode()
    def run_base() -> None:
        base(input_ids=ids, attention_mask=mask)

    table = base.get_input_embeddings().weight

    @torch.inference_mode()
    def run_tokens() -> None:
        token_features(table, ids, mask)

    names = [n for n, _ in base.named_parameters() if not n.startswith("pooler.")]
    shapes = dict(base.named_parameters())
    rows = []
    for k in args.ks:
        dirs = {n: 1e-3 * torch.randn(k, *shapes[n].shape) for n in names}
        blocks = dict.fromkeys(names, 0)
        variants: list[tuple[str, dict | None]] = [("exact", None)]
        for r in args.ranks:
            factors, _ = low_rank_factors(dirs, r, skip={n for n in names if "embeddings" in n})
            variants.append((f"rank {r}", factors))
        for label, factors in variants:
            composed = ComposedModel(copy.deepcopy(base), dirs, blocks, 1, low_rank=factors)
            z = torch.randn(args.batch, k, 1)

            @torch.inference_mode()
            def run_composed(composed: ComposedModel = composed, z: torch.Tensor = z) -> None:
                with composed.coefficients(z):
                    composed(input_ids=ids, attention_mask=mask)

            t_base1 = best_time(run_base, args.repeat)
            t_comp = best_time(run_composed, args.repeat)
            t_base2 = best_time(run_base, args.repeat)
            t_base = min(t_base1, t_base2)
            # Per-sample composers also need features: a base forward (pooled) or a gather (tokens).
            t_tok = best_time(run_tokens, args.repeat)
            rows.append(
                (k, label, t_base, t_comp, t_comp / t_base, (t_comp + t_base) / t_base, (t_comp + t_tok) / t_base)
            )
            del composed
    print()
    print(
        "| K | deltas | base ms | composed ms | composed / base | + pooled features / base | + token features / base |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, label, tb, tc, ratio, e2e, tok in rows:
        print(f"| {k} | {label} | {tb * 1e3:.1f} | {tc * 1e3:.1f} | {ratio:.2f} | {e2e:.2f} | {tok:.2f} |")


if __name__ == "__main__":
    main()
