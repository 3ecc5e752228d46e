"""Per-licensee fingerprints (issue 21, part 3): seal a marked copy, leak it, trace it back.

The fast tier checks the scheme on real safetensors bytes (positions, signs, dtype survival, the
threshold) and a trace through real PyTorch models sealed and opened with modelseal; the slow tier runs
the commands as a user does, in subprocesses. bench/fingerprint.py measures quality and accuracy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import modelseal
from modelseal.errors import KeyFileError, ModelsealError, UsageError
from modelseal.recipients.hpke import HpkeIdentity
from modelseal.sealing import fingerprint as fp
from modelseal.sealing import trace as tr

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

CANDIDATES = [f"customer-{i:04d}" for i in range(128)]
KEY = fp.FingerprintKey(bytes(range(32)))


def model(seed: int = 0) -> torch.nn.Module:
    """A small real network: a conv stem, a transformer layer, a linear head (about 180k weights)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.Flatten(0, -1),
        torch.nn.Unflatten(0, (-1, 64)),
        torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True),
        torch.nn.Linear(64, 10),
    ).eval()


def state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors_torch.save({k: v.detach().contiguous() for k, v in state.items()})


def marked(state: dict[str, torch.Tensor], licence: str, key: fp.FingerprintKey = KEY) -> bytearray:
    buf = bytearray(state_bytes(state))
    fp.apply(buf, fp.Fingerprint(key, licence), "model")
    return buf


def tensors(buf: bytes | bytearray) -> tr.Tensors:
    found = tr.Tensors()
    found.add_plain(buf, "model")
    return found


def trace_bytes(
    suspect: bytes | bytearray, original: bytes | bytearray, key: fp.FingerprintKey = KEY
) -> tr.TraceResult:
    return tr.score(tr.residual(tensors(original), tensors(suspect), key), key, CANDIDATES)


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return model().state_dict()


# --- the scheme --------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=16, max_size=64),
    a=st.text(st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=20),
    b=st.text(st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=20),
    rows=st.integers(2, 300),
    cols=st.integers(128, 300),
)
def test_the_pattern_is_a_function_of_key_and_licence(secret: bytes, a: str, b: str, rows: int, cols: int) -> None:
    key, again = fp.FingerprintKey(secret), fp.FingerprintKey(bytes(secret))
    idx = fp.positions(key, "w", [rows, cols])
    assert np.array_equal(idx, fp.positions(again, "w", [rows, cols]))  # the same positions for every licence
    assert idx.size == fp.count(rows * cols) == np.unique(idx).size and 0 <= idx.min() and idx.max() < rows * cols
    sa = fp.sign_bits(key, a, "w", idx.size)
    assert np.array_equal(sa, fp.sign_bits(again, a, "w", idx.size))
    if a != b:  # another licence: an independent pattern, about half the signs differ
        differ = np.count_nonzero(sa != fp.sign_bits(key, b, "w", idx.size))
        assert abs(differ - idx.size / 2) < 6 * math.sqrt(idx.size) / 2 + 1
    other = fp.FingerprintKey(secret + b"x")
    assert not np.array_equal(idx, fp.positions(other, "w", [rows, cols])) or idx.size == rows * cols


def test_positions_are_spread_and_bounded() -> None:
    idx = fp.positions(KEY, "big", [4096, 4096])
    assert idx.size == fp.MAX_PER_TENSOR  # capped: a trace costs positions x candidates
    counts = np.bincount(idx // (4096 * 4096 // 16), minlength=16)
    assert counts.min() > fp.MAX_PER_TENSOR / 16 * 0.9  # uniform over the tensor, not clustered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_selected_weight_moves_its_way_in_the_tensors_own_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    w = torch.randn(256, 300) * 0.02
    w[0, :50] = 0  # zeros stay zero: a sparse model would show where the mark is
    w[1, :50] *= 1000  # large values, where bf16's step is coarser than the change
    state = {"w": w.to(dtype)}
    before = state["w"].float().flatten()
    after = safetensors_torch.load(bytes(marked(state, "lic-1")))["w"].float().flatten()
    idx = torch.from_numpy(fp.positions(KEY, "w", [256, 300]))
    sign = torch.from_numpy(fp.signs(KEY, "lic-1", "w", idx.numel()))
    moved = (after - before)[idx]
    live = before[idx] != 0
    assert torch.all(torch.sign(moved[live]) == sign[live])
    assert torch.all(moved[~live] == 0)
    changed = torch.nonzero(after != before).flatten()
    assert set(changed.tolist()) <= set(idx.tolist())
    rms = before.view(256, 300).pow(2).mean(1).sqrt()
    # the stated step, give or take the dtype's rounding (one unit in the last place where it cannot hold it)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}.get(dtype, 0.0) * before[idx].abs()
    assert torch.all(moved.abs() <= fp.DELTA * rms[idx // 300] * 1.01 + 2 * ulp)


def test_the_threshold_bounds_false_accusations() -> None:
    assert tr.threshold(1000) == pytest.approx(6.44, abs=0.01)
    assert tr.threshold(100) == pytest.approx(6.07, abs=0.01)
    # Hoeffding + Bonferroni: C * exp(-t^2/2) = alpha at the threshold
    assert 1000 * math.exp(-tr.threshold(1000) ** 2 / 2) == pytest.approx(1e-6)
    assert tr.log10_bound(tr.threshold(1000), 1000) == pytest.approx(-6)
    # empirical: innocent patterns against a fixed residual score like N(0, 1), far under the threshold
    rng = np.random.default_rng(0)
    r = rng.standard_t(3, 5000).astype(np.float32)  # heavy tailed, as fine-tuning noise can be
    z = tr.Patterns(KEY, [("w", 5000)], [f"x{i}" for i in range(2000)]).scores(r)
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1 and z.max() < tr.threshold(2000)


def test_the_key_never_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = fp.FingerprintKey.generate()
    key.save(tmp_path / "fp.key")
    assert (tmp_path / "fp.key").stat().st_mode & 0o777 == 0o600
    assert fp.FingerprintKey.load(tmp_path / "fp.key") == key
    secret_text = (tmp_path / "fp.key").read_text().split(":")[-1].strip()
    assert secret_text not in repr(key) and key.key_id in repr(key)
    monkeypatch.setenv("FPKEY", secret_text)
    assert fp.FingerprintKey.load("env:FPKEY") == key
    monkeypatch.setenv("FPKEY", (tmp_path / "fp.key").read_text())
    assert fp.FingerprintKey.load("env:FPKEY") == key
    for spec in ("env:UNSET_FPKEY", secret_text, str(tmp_path / "nope")):
        with pytest.raises(KeyFileError) as err:
            fp.FingerprintKey.load(spec)
        assert secret_text not in str(err.value)
    (tmp_path / "short.key").write_text(f"{fp.LABEL}:AAAA\n")
    with pytest.raises(KeyFileError, match="at least 16 bytes"):
        fp.FingerprintKey.load(tmp_path / "short.key")


# --- tracing ------------------------------------------------------------------------------------------


def test_each_licensee_is_named_and_nobody_else(original: dict[str, torch.Tensor]) -> None:
    plain = state_bytes(original)
    for licence in CANDIDATES[:3]:
        result = trace_bytes(marked(original, licence), plain)
        assert result.identified and result.licence == licence and result.implicated == [licence]
        assert result.score > 3 * result.threshold and result.top[1].score < result.threshold
    untouched = trace_bytes(plain, plain)
    assert not untouched.identified and untouched.score == 0 and untouched.verdict == "no licensee identified"


def test_the_chunked_score_is_the_pattern_banks(original: dict[str, torch.Tensor]) -> None:
    """``score`` builds patterns per tensor and chunk (bounded memory); a bank of whole rows agrees."""
    found = tr.residual(tensors(state_bytes(original)), tensors(marked(original, CANDIDATES[300 % 128])), KEY)
    many = [f"c{i}" for i in range(600)] + [CANDIDATES[300 % 128]]  # more than one chunk of candidates
    result = tr.score(found, KEY, many)
    bank = tr.Patterns(KEY, found.layout(), many).scores(found.vector)
    assert result.licence == many[-1] and result.score == pytest.approx(bank[-1], rel=1e-5)
    assert [s.score for s in result.top] == pytest.approx(sorted(bank, reverse=True)[:5], rel=1e-4, abs=1e-4)


def test_an_independently_changed_copy_is_not_accused(original: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(9)
    tuned = {k: v + 0.01 * v.std() * torch.randn_like(v) if v.ndim > 1 else v for k, v in original.items()}
    result = trace_bytes(state_bytes(tuned), state_bytes(original))
    assert not result.identified and result.positions > 500


def test_a_wrong_key_identifies_nobody(original: dict[str, torch.Tensor]) -> None:
    leaked = marked(original, CANDIDATES[5])
    result = trace_bytes(leaked, state_bytes(original), fp.FingerprintKey(b"another owner's key!"))
    assert not result.identified


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cast_copy_is_traced(original: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    leaked = safetensors_torch.load(bytes(marked(original, CANDIDATES[7])))
    cast = {k: v.to(dtype) for k, v in leaked.items()}
    result = trace_bytes(state_bytes(cast), state_bytes(original))
    assert result.licence == CANDIDATES[7]


def test_pruned_and_averaged_copies(original: dict[str, torch.Tensor]) -> None:
    a = safetensors_torch.load(bytes(marked(original, CANDIDATES[1])))
    b = safetensors_torch.load(bytes(marked(original, CANDIDATES[2])))
    pruned = {}
    for k, v in a.items():
        cut = v.abs().flatten().kthvalue(max(1, v.numel() // 10)).values
        pruned[k] = torch.where(v.abs() <= cut, torch.zeros_like(v), v)
    assert trace_bytes(state_bytes(pruned), state_bytes(original)).licence == CANDIDATES[1]
    averaged = trace_bytes(state_bytes({k: (a[k] + b[k]) / 2 for k in a}), state_bytes(original))
    assert set(averaged.implicated) == {CANDIDATES[1], CANDIDATES[2]}


def test_a_reshaped_tensor_leaves_the_others_to_name_the_licensee(original: dict[str, torch.Tensor]) -> None:
    """A padded vocabulary or an added token reshapes one tensor: it used to fail the whole trace."""
    leaked = safetensors_torch.load(bytes(marked(original, CANDIDATES[5])))
    name = next(k for k, v in leaked.items() if v.ndim == 2 and v.numel() >= 1024)
    leaked[name] = torch.cat([leaked[name], torch.zeros(1, leaked[name].shape[1])])
    result = trace_bytes(state_bytes(leaked), state_bytes(original))
    assert result.licence == CANDIDATES[5] and result.missing_tensors == 1


def test_permuted_and_rescaled_hidden_units_are_put_back_before_scoring() -> None:
    """The second review's evasion: permute a ReLU MLP's hidden units and scale each (its outputs do not
    change) and the mark scored 3.35 against a threshold of 6.44. The trace now aligns the copy first."""
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 10)).eval()  # fmt: skip
    state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    leaked = safetensors_torch.load(bytes(marked(state, CANDIDATES[9])))
    g = torch.Generator().manual_seed(5)
    for first, second in (("0", "2"), ("2", "4")):  # each hidden layer: a permutation and positive scales
        order = torch.randperm(256, generator=g)
        scale = torch.rand(256, generator=g) * 3 + 0.25
        leaked[f"{first}.weight"] = leaked[f"{first}.weight"][order] * scale[:, None]
        leaked[f"{first}.bias"] = leaked[f"{first}.bias"][order] * scale
        leaked[f"{second}.weight"] = leaked[f"{second}.weight"][:, order] / scale[None, :]
    x = torch.randn(32, 64, generator=g)
    with torch.no_grad():
        before = mlp(x)
        mlp.load_state_dict(leaked)
        assert torch.allclose(mlp(x), before, atol=1e-3)  # the same function (up to the tiny marks)
    result = tr.score(tr.residual(tensors(state_bytes(state)), tensors(state_bytes(leaked)), KEY), KEY, CANDIDATES)
    assert result.licence == CANDIDATES[9] and result.score > 3 * result.threshold
    plain = tr.residual(tensors(state_bytes(state)), tensors(state_bytes(state)), KEY)
    assert plain.aligned == []  # an untouched copy is scored as it is


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(8, 96), cols=st.integers(8, 96), seed=st.integers(0, 2**16))
def test_alignment_undoes_row_and_column_permutations_and_scales(rows: int, cols: int, seed: int) -> None:
    from modelseal.sealing.align import align

    rng = np.random.default_rng(seed)
    original = rng.standard_normal((rows, cols, 3), dtype=np.float32)  # a conv-like tensor: columns are groups
    r, c = rng.permutation(rows), rng.permutation(cols)
    sr, sc = rng.uniform(0.3, 3, rows).astype(np.float32), rng.uniform(0.3, 3, cols).astype(np.float32)
    suspect = original[r][:, c] * sr[:, None, None] * sc[None, :, None]
    aligned, how = align(original, suspect)
    assert how.changed and np.allclose(aligned, original, rtol=1e-4, atol=1e-5)
    _, nothing = align(original, original.copy())
    assert not nothing.changed


def test_tied_weights_carry_the_same_marks(original: dict[str, torch.Tensor]) -> None:
    """Tied weights are written twice; marked apart, the positions where the copies differ showed where
    the marks were (the review removed the mark by adding noise there)."""
    name = next(k for k, v in original.items() if v.ndim == 2 and v.numel() >= 1024)
    state = {**original, "tied.copy": original[name].clone()}
    copy = safetensors_torch.load(bytes(marked(state, CANDIDATES[2])))
    assert torch.equal(copy[name], copy["tied.copy"]) and not torch.equal(copy[name], original[name])
    assert trace_bytes(state_bytes(copy), state_bytes(state)).licence == CANDIDATES[2]


def test_sparse_and_quantized_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    from modelseal.errors import FormatError
    from modelseal.sealing.convert import checkpoint_to_safetensors

    torch.save({"w": torch.eye(4).to_sparse()}, tmp_path / "sparse.pt")
    torch.save({"w": torch.quantize_per_tensor(torch.ones(4, 4), 0.1, 0, torch.qint8)}, tmp_path / "q.pt")
    for path, kind in ((tmp_path / "sparse.pt", "sparse_coo"), (tmp_path / "q.pt", "quantized")):
        with pytest.raises(FormatError, match=f"is {kind}: only dense, unquantised tensors"):
            checkpoint_to_safetensors(path)


def test_bad_inputs_are_clear(original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    plain = state_bytes(original)
    other = state_bytes({k: v[:2] if v.ndim > 1 else v for k, v in original.items()})
    with pytest.raises(UsageError, match="none of the original's fingerprinted tensors"):  # every one reshaped
        tr.residual(tensors(plain), tensors(other), KEY)
    with pytest.raises(UsageError, match="none of the original's fingerprinted tensors"):
        tr.residual(tensors(plain), tensors(state_bytes({"x": torch.ones(3)})), KEY)
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(UsageError, match="not a tensor format"):
        tr.trace(tmp_path / "m.onnx", tmp_path / "m.onnx", KEY, CANDIDATES)
    with pytest.raises(UsageError, match="does not exist"):
        tr.trace(tmp_path / "m.onnx", tmp_path / "missing.safetensors", KEY, CANDIDATES)
    with pytest.raises(UsageError, match="licence id"):
        tr.unique_candidates(["ok", " padded"])


# --- through modelseal: seal, open with PyTorch, trace ---------------------------------------------------


def test_seal_open_trace_round_trip(
    original: dict[str, torch.Tensor], tmp_path: Path, host: HpkeIdentity
) -> None:
    """The owner seals a marked copy of a .pt checkpoint; the host loads it into torch; it leaks as a
    state dict and as the sealed file; both trace to the licence, among 128 candidates."""
    import modelseal.torch

    torch.save(original, tmp_path / "model.pt")
    result = modelseal.seal(
        tmp_path / "model.pt",
        tmp_path / "c.sealed.safetensors",
        [host.recipient],
        fingerprint=fp.Fingerprint(KEY, CANDIDATES[42]),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.sealed.safetensors", "model.pt"]  # no marked plaintext
    mark = result.outputs[0]["fingerprint"]
    assert isinstance(mark, dict) and mark["licence"] == CANDIDATES[42] and mark["positions"] > 1000
    net = model()
    modelseal.torch.load_model(net, tmp_path / "c.sealed.safetensors", identity=host)
    x = torch.randn(1, 3, 10, 10)
    reference = model()
    assert torch.allclose(net(x), reference(x), atol=1e-2)  # the marked copy still computes the same thing
    torch.save(net.state_dict(), tmp_path / "leak.bin")
    for suspect in (tmp_path / "leak.bin", tmp_path / "c.sealed.safetensors"):
        traced = tr.trace(suspect, tmp_path / "model.pt", KEY, CANDIDATES, identity=host)
        assert traced.licence == CANDIDATES[42], suspect
    # a fingerprint needs tensors: an opaque bundle is refused before anything is written
    with pytest.raises(UsageError, match="needs tensors"):
        modelseal.seal(tmp_path / "model.pt", tmp_path / "b.sealed", [host.recipient], as_bundle=True,
                       fingerprint=fp.Fingerprint(KEY, "x"))  # fmt: skip
    assert not (tmp_path / "b.sealed").exists()


def test_sealed_directory(original: dict[str, torch.Tensor], tmp_path: Path, host: HpkeIdentity) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    names = sorted(original)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        safetensors_torch.save_file({k: original[k].contiguous() for k in part}, src / f"model-{i}.safetensors")
    (src / "config.json").write_text("{}")
    modelseal.seal(src, tmp_path / "sealed", [host.recipient], fingerprint=fp.Fingerprint(KEY, CANDIDATES[9]))
    assert tr.trace(tmp_path / "sealed", src, KEY, CANDIDATES, identity=host).licence == CANDIDATES[9]
    (src / "extra.bin").write_bytes(b"0")
    with pytest.raises(ModelsealError, match="cannot carry a fingerprint"):
        modelseal.seal(src, tmp_path / "sealed2", [host.recipient], fingerprint=fp.Fingerprint(KEY, "x"))


# --- the commands, as a user runs them -----------------------------------------------------------------


def ms(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "modelseal", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("modelseal: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.slow
def test_cli_end_to_end(original: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    safetensors_torch.save_file({k: v.contiguous() for k, v in original.items()}, "orig.safetensors")
    assert ms("keygen", "-o", "host.key").returncode == 0
    made = json.loads(ms("fingerprint", "keygen", "-o", "fp.key", "--json").stdout)
    assert Path("fp.key").stat().st_mode & 0o777 == 0o600
    secret = Path("fp.key").read_text().split(":")[-1].strip()
    sealed = ms("seal", "orig.safetensors", "-o", "c.sealed.safetensors", "-r", "host.pub",
                "--fingerprint", "acme-17", "--fingerprint-key", "env:FP", "--json",
                env={"FP": Path("fp.key").read_text()})  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr
    mark = json.loads(sealed.stdout)["outputs"][0]["fingerprint"]
    assert mark["licence"] == "acme-17" and mark["key_id"] == made["key_id"]
    ids = [f"acme-{i}" for i in range(200)]
    Path("ids.txt").write_text("# our customers\n" + "\n".join(ids) + "\n")
    found = ms("trace", "c.sealed.safetensors", "-i", "host.key", "--original", "orig.safetensors",
               "--fingerprint-key", "fp.key", "--candidates", "@ids.txt", "--json")  # fmt: skip
    assert found.returncode == 0, found.stderr
    report = json.loads(found.stdout)
    assert report["verdict"] == "identified" and report["licence"] == report["best"] == "acme-17"
    assert report["confidence"] == 1.0 and report["log10_false_accusation_bound"] < -100
    assert report["score"] > report["threshold"] == pytest.approx(tr.threshold(200), abs=1e-3)
    assert len(report["top"]) == 5 and report["top"][0]["licence"] == "acme-17" and report["candidates"] == 200
    clean = ms("trace", "orig.safetensors", "--original", "orig.safetensors", "--fingerprint-key", "fp.key",
               "--candidates", ",".join(ids), "--json")  # fmt: skip
    assert clean.returncode == tr_exit_not_identified()
    assert json.loads(clean.stdout)["licence"] is None and json.loads(clean.stdout)["confidence"] == 0
    for proc in (found, clean, sealed):
        assert secret not in proc.stdout + proc.stderr
    # bad inputs: one line each, naming the problem
    gone = ms("trace", "c.sealed.safetensors", "-i", "host.key", "--original", "gone.safetensors",
              "--fingerprint-key", "fp.key", "--candidates", "a")  # fmt: skip
    one_line_error(gone, "gone.safetensors does not exist")
    Path("m.onnx").write_bytes(b"\x08\x07")
    one_line_error(ms("seal", "m.onnx", "-o", "m.sealed", "-r", "host.pub", "--fingerprint", "a",
                      "--fingerprint-key", "fp.key"), "not a tensor format")  # fmt: skip
    one_line_error(ms("seal", "orig.safetensors", "-o", "x.sealed", "-r", "host.pub", "--fingerprint", "a"),
                   "go together")  # fmt: skip
    torch.save({"other.weight": torch.ones(4, 4, 3, 3)}, "small.pt")
    one_line_error(ms("trace", "small.pt", "--original", "orig.safetensors", "--fingerprint-key", "fp.key",
                      "--candidates", "a"), "none of the original's fingerprinted tensors")  # fmt: skip
    shrunk = {k: v[:2] if v.ndim > 1 else v for k, v in original.items()}
    safetensors_torch.save_file({k: v.contiguous() for k, v in shrunk.items()}, "shrunk.safetensors")
    one_line_error(ms("trace", "shrunk.safetensors", "--original", "orig.safetensors", "--fingerprint-key",
                      "fp.key", "--candidates", "a"), "none of the original's fingerprinted tensors")  # fmt: skip
    one_line_error(ms("trace", "orig.safetensors", "--original", "orig.safetensors", "--fingerprint-key",
                      secret, "--candidates", "a"), "withheld")  # fmt: skip


def tr_exit_not_identified() -> int:
    from modelseal.cli.trace import NOT_IDENTIFIED

    return NOT_IDENTIFIED
