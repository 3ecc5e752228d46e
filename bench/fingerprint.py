"""Per-licensee fingerprints on two real architectures: what they cost in output, and how well a leaked
copy is traced after the changes a leaker would make (issue 21).

Models, built here in PyTorch (nothing downloaded):

- ``encoder``: ``torch.nn.TransformerEncoder``, 4 layers, d_model 256, 4 heads, feed-forward 1024, fixed
  random init (seed 0; each layer its own Xavier-uniform weights, not four copies of one), eval mode;
  its output on a fixed set of 128 random sequences (length 16) is mean-pooled into one embedding per
  sequence;
- ``cnn``: three 3x3 conv layers (32, 64, 128 channels, max-pooled) and two linear layers (2048->256->10),
  trained 150 Adam steps on a synthetic 10-class task (class prototypes plus noise, about 80-90% accurate,
  so that many inputs sit near a decision boundary), on a fixed set of 1,024 images.

Quality: each of several licensees' copies against the original on the fixed inputs: largest absolute
output difference, relative difference ``||y' - y|| / ||y||``, top-1 agreement (cnn) or the lowest
embedding cosine (encoder). The baseline, measured in the same run, is the original cast to bf16 and
back (a change every serving stack makes without a second thought): ``x bf16`` is the median ratio of
the fingerprint's relative change to the cast's. Budget: at most the bf16 cast's change (ratio <= 1),
top-1 agreement >= 99%, cosine >= 0.9999.

Identification: ``--trials`` licensees drawn from ``--candidates`` (default 1,000) licence ids; each copy
is leaked as is, cast to fp16 and to bf16, quantised to int8 (symmetric, per tensor and per output
channel, dequantised), 10%-magnitude pruned, Gaussian noise of 10x the mark's step added, averaged
with another licensee's copy (collusion: a success names one of the two), and "stripped" by two
colluders (the weights where their copies differ set to the midpoint, which is the original). A
success names the right licence at or above the threshold ``sqrt(2 ln(C / 1e-6))``. False accusations:
every innocent candidate's score in every trace, plus every candidate on unfingerprinted copies (the
original; copies with independent noise of one step; fine-tuned copies): how many reach the threshold
(the analytic bound per trace is 1e-6). A last table sweeps the number k of colluders who "strip" the
mark: where their copies differ the mark is exposed and the midpoint is the original weight, so they
restore it there; only positions where all k copies agree (a 2^(1-k) share) still carry it.

    python bench/fingerprint.py [--quick] [--trials 10] [--candidates 1000] [--json]

A default run takes about 2-3 minutes on 2 cores; ``--quick`` a smoke run of well under a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch as st
import torch
from machine import machine

import modelseal
from modelseal.recipients.symmetric import SymmetricKey
from modelseal.sealing import fingerprint as fp
from modelseal.sealing import trace as tr

State = dict[str, torch.Tensor]
KEY = fp.FingerprintKey(b"bench fingerprint key, fixed....")
WEIGHTS = ("F16", "BF16", "F32", "F64")


# --- the two models ---------------------------------------------------------------------------------------


def encoder() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
    g = torch.Generator().manual_seed(2)
    for p in net.parameters():  # TransformerEncoder deep-copies one layer: give each its own weights, as
        if p.dim() > 1:  # training would (identical tensors carry the same marks: tied weights, review L3)
            torch.nn.init.xavier_uniform_(p, generator=g)
    inputs = torch.randn(128, 16, 256, generator=torch.Generator().manual_seed(1))
    return net, inputs


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = torch.nn.Conv2d(64, 128, 3, padding=1)
        self.f1 = torch.nn.Linear(2048, 256)
        self.f2 = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, act = torch.nn.functional.max_pool2d, torch.relu
        x = pool(act(self.c1(x)), 2)
        x = pool(act(self.c2(x)), 2)
        x = pool(act(self.c3(x)), 2)
        return self.f2(act(self.f1(x.flatten(1))))


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class task: smooth class prototypes (fixed) plus per-image noise (seeded)."""
    protos = torch.nn.functional.interpolate(torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(99)), 32)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return protos[labels] + 2.5 * torch.randn(n, 3, 32, 32, generator=g), labels


def train(net: torch.nn.Module, steps: int, seed: int, lr: float) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        x, y = synthetic(64, seed * 100_000 + step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()


def cnn() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = CNN()
    train(net, 150, 1, 1e-3)
    inputs, _labels = synthetic(1024, 7)
    return net, inputs


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]] = {"encoder": encoder, "cnn": cnn}


# --- copies and what leakers do to them -------------------------------------------------------------------


def to_bytes(state: State) -> bytes:
    return st.save({k: v.detach().contiguous() for k, v in state.items()})


def marked(plain: bytes, licence: str) -> State:
    buf = bytearray(plain)
    fp.apply(buf, fp.Fingerprint(KEY, licence), "bench")
    return st.load(bytes(buf))


def is_weight(v: torch.Tensor) -> bool:
    return v.is_floating_point() and v.ndim >= 2


def cast(dtype: torch.dtype) -> Callable[[State], State]:
    return lambda s: {k: v.to(dtype) for k, v in s.items()}


def int8(per_channel: bool) -> Callable[[State], State]:
    def quantise(s: State) -> State:
        out = {}
        for k, v in s.items():
            if not is_weight(v):
                out[k] = v
                continue
            w = v.float()
            top = w.abs().flatten(1).amax(1).view(-1, *[1] * (w.ndim - 1)) if per_channel else w.abs().max()
            scale = torch.clamp(top, min=1e-12) / 127
            out[k] = (torch.round(w / scale).clamp(-127, 127) * scale).to(v.dtype)
        return out

    return quantise


def prune(s: State) -> State:
    out = {}
    for k, v in s.items():
        if is_weight(v):
            cut = v.abs().flatten().kthvalue(max(1, v.numel() // 10)).values
            v = torch.where(v.abs() <= cut, torch.zeros_like(v), v)
        out[k] = v
    return out


def noise(original: State, times: float, seed: int) -> Callable[[State], State]:
    """Gaussian noise of ``times`` the mark's step (DELTA x the row's RMS) on every weight (a leaker
    hoping to drown the mark; also the "independently perturbed" unmarked copies)."""

    def add(s: State) -> State:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in s.items():
            if is_weight(v):
                rms = original[k].float().flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (v.ndim - 1))
                v = v + times * fp.DELTA * rms * torch.randn(v.shape, generator=g)
            out[k] = v
        return out

    return add


def permute_units(kind: str, seed: int) -> Callable[[State], State]:
    """Permute and rescale hidden units without changing the function (behind a ReLU, and max-pooling
    commutes with positive scales): the rows of one layer and the matching input columns of the next.
    Encoder: each feed-forward block's hidden units; CNN: every conv channel and the hidden linear units
    (c3's channels are blocks of 16 columns of f1). The second review's evasion; the trace aligns first."""
    pairs = (
        [(f"layers.{i}.linear1", f"layers.{i}.linear2", 1) for i in range(4)] if kind == "encoder"
        else [("c1", "c2", 1), ("c2", "c3", 1), ("c3", "f1", 16), ("f1", "f2", 1)]
    )  # fmt: skip

    def apply(s: State) -> State:
        s, g = dict(s), torch.Generator().manual_seed(seed)
        for first, second, block in pairs:
            w = s[f"{first}.weight"]
            order = torch.randperm(w.shape[0], generator=g)
            scale = torch.rand(w.shape[0], generator=g) * 1.5 + 0.5
            s[f"{first}.weight"] = w[order] * scale.view(-1, *[1] * (w.ndim - 1))
            s[f"{first}.bias"] = s[f"{first}.bias"][order] * scale
            cols = (order[:, None] * block + torch.arange(block)).flatten()
            w2 = s[f"{second}.weight"]
            s[f"{second}.weight"] = w2[:, cols] / scale.repeat_interleave(block).view(1, -1, *[1] * (w2.ndim - 2))
        return s

    return apply


def strip(copies: list[State]) -> State:
    """Colluders' best cheap move: where their copies differ, the mark is exposed and the midpoint of
    the two values seen is the original weight; elsewhere they cannot tell."""
    out = {}
    for k in copies[0]:
        stack = torch.stack([c[k] for c in copies])
        lo, hi = stack.min(0).values, stack.max(0).values
        out[k] = torch.where(lo != hi, (lo + hi) / 2, stack[0])
    return out


# --- measurements -----------------------------------------------------------------------------------------


def outputs(net: torch.nn.Module, state: State, inputs: torch.Tensor) -> torch.Tensor:
    net.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        return torch.cat([net(inputs[i : i + 128]) for i in range(0, len(inputs), 128)])


def change(kind: str, y0: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    row = {"max_abs": float((y - y0).abs().max()), "relative": float((y - y0).norm() / y0.norm())}
    if kind == "cnn":
        row["top1_agreement"] = float((y.argmax(1) == y0.argmax(1)).float().mean())
    else:
        row["min_cosine"] = float(torch.nn.functional.cosine_similarity(y.mean(1), y0.mean(1), dim=1).min())
    return row


class Tracer:
    """The original as the trace sees it, and the candidates' patterns, built once per model."""

    def __init__(self, plain: bytes, candidates: list[str]) -> None:
        self.original = tr.Tensors()
        self.original.add_plain(plain, "original")
        self.candidates = candidates
        layout = self.residual(st.load(plain)).layout()
        t0 = time.perf_counter()
        self.bank = tr.Patterns(KEY, layout, candidates)
        self.bank_s = time.perf_counter() - t0
        self.dense = self.bank.rows.astype(np.float32)  # the library converts per chunk; a bench can keep it
        self.positions = sum(k for _n, k in layout)

    def residual(self, state: State) -> tr.Residual:
        suspect = tr.Tensors()
        suspect.add_plain(to_bytes(state), "suspect")
        return tr.residual(self.original, suspect, KEY)

    def trace(self, state: State) -> tuple[tr.TraceResult, np.ndarray]:
        found = self.residual(state)
        r = found.vector
        norm = float(np.sqrt(np.dot(r.astype(np.float64), r)))
        z = self.dense @ r / norm if norm else np.zeros(len(self.candidates))
        return tr.decide(z, self.candidates, found, KEY, tr.ALPHA), z


def run_model(kind: str, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    t0 = time.perf_counter()
    net, inputs = MODELS[kind]()
    original = {k: v.detach().clone() for k, v in net.state_dict().items()}
    plain = to_bytes(original)
    candidates = [f"licence-{i:05d}" for i in range(args.candidates)]
    tracer = Tracer(plain, candidates)
    limit = tr.threshold(len(candidates))
    y0 = outputs(net, original, inputs)

    # quality: licensees' copies against the original, with the bf16 cast as the same-run baseline
    base = change(kind, y0, outputs(net, cast(torch.bfloat16)(original), inputs))
    quality = [change(kind, y0, outputs(net, marked(plain, c), inputs)) for c in candidates[: args.quality]]
    key = "top1_agreement" if kind == "cnn" else "min_cosine"
    summary = {
        "max_abs": max(q["max_abs"] for q in quality),
        "relative": statistics.median(q["relative"] for q in quality),
        key: min(q[key] for q in quality),
        "x_bf16": statistics.median(q["relative"] / base["relative"] for q in quality),
        "bf16_cast": base,
        "noise_10pct": change(kind, y0, outputs(net, noise(original, 0.1 / fp.DELTA, 5)(original), inputs)),
        # ~0: the same function, at other positions and scales
        "units_permuted": change(kind, y0, outputs(net, permute_units(kind, 11)(original), inputs)),
    }

    # identification after what leakers do
    attacks: dict[str, Callable[[State], State]] = {
        "exact copy": lambda s: s,
        "fp16 cast": cast(torch.float16),
        "bf16 cast": cast(torch.bfloat16),
        "int8 per tensor": int8(False),
        "int8 per channel": int8(True),
        "10% pruned": prune,
        "noise 10% of RMS": noise(original, 0.1 / fp.DELTA, 5),
        "fine-tuned": lambda s: tuned(kind, s, 77),
        "units permuted + rescaled": permute_units(kind, 11),
    }
    rows: dict[str, dict[str, Any]] = {
        name: {"ok": 0, "n": 0, "scores": []}
        for name in [*attacks, "2-copy average"]
    }
    innocent: list[float] = []
    trace_s: list[float] = []
    picks = rng.choice(len(candidates), size=(args.trials, 2), replace=True)
    for a, b in picks:
        if a == b:
            b = (b + 1) % len(candidates)
        copy_a, copy_b = marked(plain, candidates[a]), marked(plain, candidates[b])
        leaks = {name: attack(copy_a) for name, attack in attacks.items()}
        leaks["2-copy average"] = {k: (copy_a[k] + copy_b[k]) / 2 for k in copy_a}
        for name, leak in leaks.items():
            t1 = time.perf_counter()
            result, z = tracer.trace(leak)
            trace_s.append(time.perf_counter() - t1)
            guilty = {candidates[a]} if name in attacks else {candidates[a], candidates[b]}
            row = rows[name]
            row["n"] += 1
            row["ok"] += result.licence in guilty
            row["scores"].append(max(float(z[candidates.index(g)]) for g in guilty))
            innocent.extend(float(v) for i, v in enumerate(z) if candidates[i] not in guilty)

    # unfingerprinted copies: nobody may be named
    unmarked: dict[str, State] = {"original": original}
    for i in range(args.trials):
        unmarked[f"noise {i}"] = noise(original, 1.0, 1000 + i)(original)
    for i in range(max(1, args.trials // 5)):
        unmarked[f"fine-tuned {i}"] = tuned(kind, original, 50 + i)
    null: list[float] = []
    accused = 0
    for leak in unmarked.values():
        result, z = tracer.trace(leak)
        accused += result.identified
        null.extend(float(v) for v in z)

    sweep = []
    for k in args.sweep:
        copies = [marked(plain, candidates[i]) for i in range(k)]
        result, z = tracer.trace(strip(copies))
        sweep.append({"colluders": k, "best_colluder_score": float(max(z[:k])), "identified": result.licence in
                      candidates[:k], "expected": math.sqrt(tracer.positions * 2.0 ** (1 - k))})  # fmt: skip

    return {
        "model": kind,
        "weights": sum(v.numel() for v in original.values() if is_weight(v)),
        "positions": tracer.positions,
        "candidates": len(candidates),
        "threshold": limit,
        "quality": summary,
        "identification": {
            name: {
                "accuracy": r["ok"] / r["n"],
                "trials": r["n"],
                "median_score": statistics.median(r["scores"]),
                "min_score": min(r["scores"]),
            }
            for name, r in rows.items()
        },
        "innocent_scores": {
            "count": len(innocent),
            "over_threshold": sum(v >= limit for v in innocent),
            "max": max(innocent),
            "std": float(np.std(innocent)),
        },
        "unmarked": {
            "copies": len(unmarked),
            "accused": accused,
            "scores": len(null),
            "over_threshold": sum(v >= limit for v in null),
            "max": max(null),
        },
        "sweep": sweep,
        "trace_s_median": statistics.median(trace_s),
        "bank_s": tracer.bank_s,
        "model_s": time.perf_counter() - t0,
    }


def tuned(kind: str, state: State, seed: int) -> State:
    """``state`` fine-tuned a little: the CNN 10 more Adam steps (lr 1e-4) on fresh data of its task, the
    encoder 3 steps (lr 1e-4) towards random targets."""
    net = MODELS[kind]()[0] if kind == "encoder" else CNN()
    net.load_state_dict({k: v.float() for k, v in state.items()})
    if kind == "cnn":
        train(net, 10, seed, 1e-4)
    else:
        finetune_encoder(net, seed)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def finetune_encoder(net: torch.nn.Module, seed: int) -> None:
    """A few steps towards another target: an independent, unmarked derivative of the original."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train()
    for _ in range(3):
        x = torch.randn(4, 16, 256, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), torch.randn(4, 16, 256, generator=g)).backward()
        opt.step()
    net.eval()


def seal_overhead(rounds: int) -> dict[str, float]:
    """``modelseal.seal`` of the encoder with and without a fingerprint, same run, interleaved."""
    net, _ = encoder()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "encoder.safetensors"
        st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, src)
        recipient = SymmetricKey.generate()
        mark = fp.Fingerprint(KEY, "licence-00001")
        times: dict[str, list[float]] = {"plain": [], "fingerprinted": []}
        for i in range(rounds):
            for name in (("plain", "fingerprinted") if i % 2 else ("fingerprinted", "plain")):
                t0 = time.perf_counter()
                modelseal.seal(src, Path(tmp) / "out", [recipient], force=True,
                               fingerprint=mark if name == "fingerprinted" else None)  # fmt: skip
                times[name].append(time.perf_counter() - t0)
        return {
            "mib": src.stat().st_size / 2**20,
            "plain_s": statistics.median(times["plain"]),
            "fingerprinted_s": statistics.median(times["fingerprinted"]),
            "x_plain": statistics.median(f / p for f, p in zip(times["fingerprinted"], times["plain"], strict=True)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 trials, 1000 candidates")
    parser.add_argument("--trials", type=int, default=10, help="licensees traced per model and attack")
    parser.add_argument("--candidates", type=int, default=1000, help="licence ids a trace chooses among")
    parser.add_argument("--quality", type=int, default=5, help="licensees' copies measured for output change")
    parser.add_argument("--models", default="encoder,cnn")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.quality = 3, 2
    args.sweep = [2, 6, 10, 12, 14] if not args.quick else [2, 12]
    torch.set_num_threads(2)
    rng = np.random.default_rng(2026)
    t0 = time.perf_counter()
    results = [run_model(kind, args, rng) for kind in args.models.split(",")]
    overhead = seal_overhead(3 if args.quick else 5)
    if args.json:
        print(json.dumps({"machine": machine(), "models": results, "seal": overhead}, indent=2))
        return
    print(machine())
    print(f"fingerprint: DELTA {fp.DELTA} x row RMS on {fp.DENSITY:.0%} of each >=2-D float tensor "
          f"(<= {fp.MAX_PER_TENSOR} per tensor); {args.candidates} candidates; threshold "
          f"{tr.threshold(args.candidates):.2f} (false accusation < 1e-6 per trace)")  # fmt: skip
    print("\nOutput change, fingerprinted copy vs original (fixed inputs; baseline: original cast to bf16):")
    print(f"{'model':8} {'weights':>9} {'marked':>7} {'max abs':>9} {'relative':>9} {'x bf16':>7}  agreement")
    for r in results:
        q = r["quality"]
        agree = (f"top-1 {q['top1_agreement']:.2%} (bf16 cast {q['bf16_cast']['top1_agreement']:.2%})"
                 if "top1_agreement" in q else f"cosine >= {q['min_cosine']:.6f} (bf16 cast "
                 f"{q['bf16_cast']['min_cosine']:.6f})")  # fmt: skip
        print(f"{r['model']:8} {r['weights']:>9} {r['positions']:>7} {q['max_abs']:>9.2e} {q['relative']:>9.2e} "
              f"{q['x_bf16']:>7.2f}  {agree}")  # fmt: skip
    for r in results:
        n = r["quality"]["noise_10pct"]
        agree = f"top-1 {n['top1_agreement']:.2%}" if "top1_agreement" in n else f"cosine >= {n['min_cosine']:.6f}"
        print(f"{r['model']:8} with noise of 10% of row RMS instead (the attack row below): max abs "
              f"{n['max_abs']:.2e}, relative {n['relative']:.2e}, {agree}")  # fmt: skip
    print(f"\nIdentification among {args.candidates} licences ({args.trials} licensees per row; median / min score):")
    names = list(results[0]["identification"])
    print(f"{'leaked copy':18} " + "  ".join(f"{r['model']:>24}" for r in results))
    for name in names:
        cells = []
        for r in results:
            row = r["identification"][name]
            cells.append(f"{row['accuracy']:>6.0%} {row['median_score']:>8.1f} / {row['min_score']:>6.1f}")
        print(f"{name:18} " + "  ".join(f"{c:>24}" for c in cells))
    print("\nFalse accusations (threshold as above):")
    for r in results:
        i, u = r["innocent_scores"], r["unmarked"]
        print(f"{r['model']:8} innocent candidates in traces: {i['over_threshold']}/{i['count']} over (max "
              f"{i['max']:.2f}, std {i['std']:.2f}); unfingerprinted copies: {u['accused']}/{u['copies']} accused, "
              f"{u['over_threshold']}/{u['scores']} scores over (max {u['max']:.2f})")  # fmt: skip
    print("\nColluders stripping the mark (weights that differ between their copies set to the midpoint):")
    for r in results:
        cells = ", ".join(f"{s['colluders']}: {s['best_colluder_score']:.1f} ({s['expected']:.1f})"
                          f"{'' if s['identified'] else ' MISSED'}" for s in r["sweep"])  # fmt: skip
        print(f"{r['model']:8} colluders: best colluder score (expected sqrt(positions x 2^(1-k))): {cells}")
    print("\nTrace of 1000 candidates, median: " + ", ".join(f"{r['model']} {r['trace_s_median']:.3f} s (patterns "
          f"built once in {r['bank_s']:.1f} s)" for r in results))  # fmt: skip
    print(f"Seal {overhead['mib']:.1f} MiB encoder, median: plain {overhead['plain_s']:.3f} s, fingerprinted "
          f"{overhead['fingerprinted_s']:.3f} s, x plain {overhead['x_plain']:.2f}")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
