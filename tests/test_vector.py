"""Steering vectors: planted-direction recovery, apply == hand hook, file round trips, errors."""

import gguf
import numpy as np
import pytest
import torch

import steerlab as sl
from steerlab.interventions import InterventionError
from steerlab.steer import SteeringVector, VectorError
from steerlab.steer.vector import direction
from tiny import PROMPTS, first_real_tokens, tiny_model

GOOD = ["what a lovely day", "thank you so much", "you are kind", "nice work friend"]
BAD = ["you stupid idiot", "I hate all of you", "shut up loser", "go to hell now"]


def _planted(n=2000, d=32, seed=0):
    """Two overlapping isotropic Gaussian classes whose means differ by 1.0 along a unit u."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    return u, torch.randn(n, d, generator=g) + 0.5 * u, torch.randn(n, d, generator=g) - 0.5 * u


@pytest.mark.parametrize("method", ["mean_diff", "pca", "probe"])
def test_planted_direction_is_recovered(method):
    u, hd, hu = _planted()
    v = direction(hd, hu, method, "unit", paired=True)
    assert float(v @ u) > 0.95, float(v @ u)
    raw = direction(hd, hu, method, "raw", paired=True)
    assert float(raw.norm()) == pytest.approx(1.0, rel=0.15)  # the planted mean shift is 1 along u


def test_mean_diff_hand_example():
    hd = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    hu = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # mean(hd) = (2, 3), mean(hu) = (0.5, 0) -> (1.5, 3); norm = sqrt(11.25)
    assert torch.allclose(direction(hd, hu, scale="raw"), torch.tensor([1.5, 3.0]))
    assert torch.allclose(direction(hd, hu), torch.tensor([1.5, 3.0]) / 11.25 ** 0.5)


def test_fit_matches_capture_mean_difference(llama):
    sv = SteeringVector.fit(llama, GOOD, BAD, ["blocks.1.resid_post", "blocks.-1.resid_post"], scale="raw", positions="last")
    assert set(sv.directions) == {"blocks.1.resid_post", "blocks.2.resid_post"}
    caps = sl.capture(llama, GOOD + BAD, "blocks.1.resid_post")["blocks.1.resid_post"]
    ref = caps[:4].mean(0) - caps[4:].mean(0)
    assert torch.allclose(sv.directions["blocks.1.resid_post"], ref, atol=1e-5)
    assert sv.meta["model_fingerprint"] == llama.fingerprint and sv.meta["n_desirable"] == 4
    unit = SteeringVector.fit(llama, GOOD, BAD, "blocks.1.resid_post")
    assert unit.norms()["blocks.1.resid_post"] == pytest.approx(1.0, abs=1e-5)
    aligned = SteeringVector.fit(llama, GOOD, BAD, "blocks.1.resid_post", positions="aligned", scale="raw")
    full = sl.capture(llama, GOOD + BAD, "blocks.1.resid_post", "all")
    a, m = full["blocks.1.resid_post"], full.mask.sum(1)
    diffs = []
    for i in range(4):  # hand loop: aligned from the end over the shorter length, first token left out
        L = int(min(m[i], m[4 + i])) - 1
        diffs.append((a[i, -L:] - a[4 + i, -L:]).mean(0))
    assert torch.allclose(aligned.directions["blocks.1.resid_post"], torch.stack(diffs).mean(0), atol=1e-5)
    rest = SteeringVector.fit(llama, GOOD, BAD, "blocks.1.resid_post", positions="mean_skip_first", scale="raw")
    pooled = torch.stack([a[i, -int(m[i]) + 1:].mean(0) for i in range(8)])  # each text without its first token
    ref = pooled[:4].mean(0) - pooled[4:].mean(0)
    assert torch.allclose(rest.directions["blocks.1.resid_post"], ref, atol=1e-5)


def test_apply_equals_hand_hook(llama):
    sv = SteeringVector.fit(llama, GOOD, BAD, "blocks.1.resid_post")
    v = sv.directions["blocks.1.resid_post"]
    enc = llama.encode(PROMPTS)
    h = llama.layer(1).register_forward_hook(lambda m, a, o: o + 6.0 * v)
    with torch.no_grad():
        ref = llama.hf(**enc).logits
    h.remove()
    with sv.apply(llama, alpha=6.0), torch.no_grad():
        got = llama.hf(**enc).logits
    assert torch.equal(got, ref)
    with (-sv).apply(llama, alpha=-6.0), torch.no_grad():  # -(-v) * 6 == v * 6
        assert torch.allclose(llama.hf(**enc).logits, ref, atol=1e-6)


def test_arithmetic_and_controls(llama):
    a = SteeringVector.fit(llama, GOOD, BAD, ["blocks.0.resid_post", "blocks.1.resid_post"])
    b = SteeringVector.fit(llama, GOOD[:2], BAD[:2], ["blocks.1.resid_post"])
    c = a + b * 2
    assert torch.allclose(c.directions["blocks.1.resid_post"],
                          a.directions["blocks.1.resid_post"] + 2 * b.directions["blocks.1.resid_post"])
    assert torch.equal(c.directions["blocks.0.resid_post"], a.directions["blocks.0.resid_post"])
    assert torch.allclose((a - a).directions["blocks.0.resid_post"], torch.zeros(32))
    p, r = a.permuted(1), a.random(1)
    for s, v in a.directions.items():
        assert torch.equal(p.directions[s].sort().values, v.sort().values)
        assert float(r.directions[s].norm()) == pytest.approx(float(v.norm()), rel=1e-5)
    assert a.cosine(a)["blocks.0.resid_post"] == pytest.approx(1.0, abs=1e-6)


def test_save_load_bit_for_bit_and_checks(tmp_path, llama):
    sv = SteeringVector.fit(llama, GOOD, BAD, ["blocks.0.resid_post", "blocks.2.mlp.out"], method="pca")
    f = sv.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(f, llama)
    assert back.meta["fit_method"] == "pca" and back.meta["data_fingerprint"] == sv.meta["data_fingerprint"]
    for s in sv.directions:
        assert torch.equal(back.directions[s], sv.directions[s])
    other = tiny_model("llama", seed=1)
    with pytest.raises(InterventionError, match="fingerprint"):
        SteeringVector.load(f, other)
    SteeringVector.load(f, other, strict=False)  # same sizes: allowed when asked
    wrong = SteeringVector({"blocks.0.resid_post": torch.ones(31)}, {"model": "other"}).save(tmp_path / "w.safetensors")
    with pytest.raises(VectorError, match=r"has size \(31,\) but tiny-llama has \(32,\)"):
        SteeringVector.load(wrong, llama)
    with pytest.raises(InterventionError, match="not found"):
        SteeringVector.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InterventionError, match="not a readable safetensors"):
        SteeringVector.load(tmp_path / "junk.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(InterventionError, match="truncated"):
        SteeringVector.load(truncated)
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InterventionError, match="not a steerlab intervention"):
        SteeringVector.load(tmp_path / "plain.safetensors")


def test_gguf_control_vector_round_trip(tmp_path, llama):
    sv = SteeringVector.fit(llama, GOOD, BAD, ["blocks.1.resid_post", "blocks.2.resid_post"])
    f = sv.to_gguf(tmp_path / "v.gguf")
    r = gguf.GGUFReader(str(f))  # read back with the gguf package, independently of steerlab
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert int(r.fields["controlvector.layer_count"].parts[-1][0]) == 2
    assert bytes(r.fields["controlvector.model_hint"].parts[-1]).decode() == "llama"
    got = {t.name: np.array(t.data) for t in r.tensors}
    assert set(got) == {"direction.1", "direction.2"}
    for layer in (1, 2):
        np.testing.assert_array_equal(got[f"direction.{layer}"], sv.directions[f"blocks.{layer}.resid_post"].numpy())
    back = SteeringVector.from_gguf(f)
    assert torch.equal(back.directions["blocks.2.resid_post"], sv.directions["blocks.2.resid_post"])
    with pytest.raises(VectorError, match="no slot for block 0"):
        SteeringVector.fit(llama, GOOD, BAD, "blocks.0.resid_post").to_gguf(tmp_path / "x.gguf")
    with pytest.raises(VectorError, match="resid_post directions only"):
        SteeringVector.fit(llama, GOOD, BAD, "blocks.1.mlp.out").to_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize(
    "kw, err, message",
    [
        (dict(data=[], undesirable=BAD), sl.EmptyInputError, "empty contrast set"),
        (dict(sites="blocks.7.resid_post"), sl.SiteError, "out of range"),
        (dict(method="ica"), VectorError, "unknown method"),
        (dict(method="pca", undesirable=BAD[:3]), VectorError, "needs paired texts"),
        (dict(sites="blocks.0.attn.heads"), VectorError, "d-dimensional"),
    ],
)
def test_fit_errors(llama, kw, err, message):
    args = dict(data=GOOD, undesirable=BAD, sites="blocks.0.resid_post") | kw
    with pytest.raises(err, match=message):
        SteeringVector.fit(llama, **args)


@pytest.mark.parametrize("mode", ["ablate", "clamp", "gated"])
def test_projection_modes_against_hand_computation(llama, mode):
    site = "blocks.1.resid_post"
    sv = SteeringVector.fit(llama, GOOD, BAD, site, positions="mean_skip_first")
    v = sv.directions[site]
    u = v / v.norm()
    proj = sv.meta["projection"][site]
    # the fitted projection statistics are the means over the fitting texts' token states, each
    # text's first token left out
    fit = sl.capture(llama, GOOD + BAD, site, "all")
    kept = fit.mask.bool() & ~first_real_tokens(fit.mask)
    p_fit = fit[site] @ u
    assert proj["desirable"] == pytest.approx(float(p_fit[:4][kept[:4]].mean()), rel=1e-5)
    assert proj["undesirable"] == pytest.approx(float(p_fit[4:][kept[4:]].mean()), rel=1e-5)
    before = sl.capture(llama, PROMPTS, site, "all")
    with sv.apply(llama, alpha=2.0, mode=mode):
        after = sl.capture(llama, PROMPTS, site, "all")
    first = first_real_tokens(before.mask)
    # each row's first token is never edited
    torch.testing.assert_close(after[site][first], before[site][first], atol=1e-5, rtol=1e-5)
    real = before.mask.bool() & ~first
    h, g = before[site][real], after[site][real]
    p = h @ u
    if mode == "ablate":   # alpha=2 removes twice the component: the projection flips sign
        want = h - 2.0 * p[:, None] * u
    elif mode == "clamp":  # raised to undesirable + 2 x (desirable - undesirable) mean, never lowered
        level = proj["undesirable"] + 2.0 * (proj["desirable"] - proj["undesirable"])
        want = h + (level - p).clamp_min(0)[:, None] * u
        assert ((g @ u) >= level - 1e-3).all()
    else:                  # added only where the state projects below the midpoint
        thr = 0.5 * (proj["desirable"] + proj["undesirable"])
        want = h + 2.0 * (p < thr).float()[:, None] * v
    # block 1's output depends on block 1 only through this edit at this site (no earlier edit)
    torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(VectorError, match="unknown mode"):
        with sv.apply(llama, mode="nope"):
            pass
    bare = SteeringVector({site: v})
    if mode != "ablate":
        with pytest.raises(VectorError, match="projection statistics"):
            with bare.apply(llama, mode=mode):
                pass


def test_fitted_levels_follow_arithmetic(llama):
    """Negation is the vector fitted with the roles swapped (levels negated and swapped), a positive
    scale keeps the levels, and sums and controls have none: gated and clamp refuse them until the
    levels are recomputed from data."""
    site = "blocks.1.resid_post"
    v = SteeringVector.fit(llama, GOOD, BAD, site, positions="mean_skip_first")
    swapped = SteeringVector.fit(llama, BAD, GOOD, site, positions="mean_skip_first")
    neg = -v
    torch.testing.assert_close(neg.directions[site], swapped.directions[site], atol=1e-5, rtol=1e-5)
    for key in ("desirable", "undesirable", "desirable_std", "undesirable_std"):
        assert neg.meta["projection"][site][key] == pytest.approx(swapped.meta["projection"][site][key], abs=1e-4)
    before = sl.capture(llama, PROMPTS, site, "all")[site]
    with neg.apply(llama, mode="clamp", alpha=1.0):
        got = sl.capture(llama, PROMPTS, site, "all")[site]
    with swapped.apply(llama, mode="clamp", alpha=1.0):
        want = sl.capture(llama, PROMPTS, site, "all")[site]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, before, atol=1e-3)  # the clamp did move states
    assert (3 * v).meta["projection"] == v.meta["projection"]
    assert (-2 * v).meta["projection"] == neg.meta["projection"]
    for derived in (v.random(0), v.permuted(0), v + v, v - swapped, 0 * v):
        assert "projection" not in derived.meta
        for mode in ("gated", "clamp"):
            with pytest.raises(VectorError, match="with_levels"):
                with derived.apply(llama, mode=mode):
                    pass
    # recomputed from the fitting texts, the levels of a refitted vector are the fitted ones
    again = (v + v).with_levels(llama, GOOD, BAD)
    for key in ("desirable", "undesirable"):
        assert again.meta["projection"][site][key] == pytest.approx(v.meta["projection"][site][key], rel=1e-5)
    r = v.random(0).with_levels(llama, GOOD, BAD)
    fit = sl.capture(llama, GOOD + BAD, site, "all")
    kept = fit.mask.bool() & ~first_real_tokens(fit.mask)
    p = fit[site] @ (r.directions[site] / r.directions[site].norm())
    assert r.meta["projection"][site]["undesirable"] == pytest.approx(float(p[4:][kept[4:]].mean()), rel=1e-5)
    with r.apply(llama, mode="gated", alpha=1.0):
        sl.capture(llama, PROMPTS, site, "all")
