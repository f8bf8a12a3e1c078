"""AurA: vectorised AUROC against sklearn (with ties), the factor rules, the runtime edit against a
hand-written hook, files and bad inputs."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import steerlab as sl
from steerlab import interventions as I
from steerlab.steer.aura import AurA, AuraError, aura_factors, auroc
from tiny import flat, model_dir, tiny_model

GOOD = ["what a lovely day", "thank you so much", "have a nice time", "you are kind", "the sun is out",
        "tea is ready", "I like this book", "good morning all", "nice to meet you"]
BAD = ["you stupid idiot", "shut up moron", "I hate you all", "get lost loser", "you dumb fool",
       "what a jerk", "go away creep", "you are trash", "idiots everywhere"]


def test_auroc_equals_sklearn_on_every_unit_with_ties():
    g = torch.Generator().manual_seed(0)
    R = torch.randint(0, 4, (40, 70), generator=g).float()  # many ties
    R[:, 0] = 1.0  # all tied: 0.5
    y = torch.arange(40) % 3 == 0
    got = auroc(R, y, chunk=16).numpy()
    ref = np.array([roc_auc_score(y.numpy(), R[:, j].numpy()) for j in range(R.shape[1])])
    np.testing.assert_allclose(got, ref, atol=1e-12)
    R2 = torch.randn(25, 9, generator=g)
    y2 = torch.rand(25, generator=g) > 0.5
    np.testing.assert_allclose(auroc(R2, y2).numpy(),
                               [roc_auc_score(y2.numpy(), R2[:, j].numpy()) for j in range(9)], atol=1e-12)


def test_factors_follow_the_formulas():
    auc = torch.tensor([0.2, 0.5, 0.6, 0.9, 1.0, 0.75])
    f = aura_factors(auc, "aura")
    ref = [1.0 if a <= 0.5 else 1 - 2 * (a - 0.5) for a in auc.tolist()]
    np.testing.assert_allclose(f.numpy(), ref, atol=1e-7)
    assert aura_factors(auc, "damp", 2).tolist() == [1, 1, 1, 0.5, 0.5, 1]
    assert aura_factors(auc, "det0", 3).tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(AuraError, match="needs top_n between 1 and the number of units \\(6\\), got 7"):
        aura_factors(auc, "det0", 7)
    with pytest.raises(AuraError, match="unknown AurA variant 'zero'; choose one of aura, damp, det0"):
        aura_factors(auc, "zero")


def test_fit_aurocs_match_sklearn_on_captured_responses():
    m = tiny_model("llama")
    iv = AurA.fit(m, (GOOD, BAD), layers=[0, 2], experts="act")
    caps = sl.capture(m, GOOD + BAD, ["blocks.0.mlp.act", "blocks.2.mlp.act"], "max")
    y = np.r_[np.zeros(len(GOOD)), np.ones(len(BAD))]
    for s in ("blocks.0.mlp.act", "blocks.2.mlp.act"):
        ref = [roc_auc_score(y, caps[s][:, j].numpy()) for j in range(m.d_mlp)]
        np.testing.assert_allclose(iv.aurocs[s].numpy(), ref, atol=1e-6)
        np.testing.assert_allclose(iv.factors[s].numpy(), aura_factors(torch.tensor(ref), "aura").numpy(), atol=1e-6)
    assert iv.sites == [s for s in iv.factors if (iv.factors[s] < 1).any()]


EXPERT_MODULES = {"llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "gpt2": ("mlp.c_fc", "mlp.c_proj")}


def _hooked_max_responses(m, texts, layers, names):
    """Per (layer, module name), each text's max over tokens of the module's output, read with plain
    forward hooks, one text at a time (no padding)."""
    out = {(li, n): [] for li in layers for n in names}
    for t in texts:
        got, handles = {}, []
        for li in layers:
            for n in names:
                mod = m.layer(li).get_submodule(n)
                handles.append(mod.register_forward_hook(lambda mod, a, o, key=(li, n), got=got: got.__setitem__(key, o[0])))
        with torch.no_grad():
            m.hf(**{k: v for k, v in m.encode([t]).items() if k in ("input_ids", "attention_mask")})
        for h in handles:
            h.remove()
        for key, o in got.items():
            out[key].append(o.max(0).values)
    return {key: torch.stack(v) for key, v in out.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_expert_sites_are_the_projection_outputs_as_plain_hooks_read_them(arch):
    m = tiny_model(arch)
    names = EXPERT_MODULES[arch]
    iv = AurA.fit(m, (GOOD, BAD), layers=[0, 1], variant="det0", top_n=12)
    ref = _hooked_max_responses(m, GOOD + BAD, [0, 1], names)
    y = np.r_[np.zeros(len(GOOD)), np.ones(len(BAD))]
    kinds = {"mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down", "mlp.c_fc": "mlp.up",
             "mlp.c_proj": "mlp.down"}
    assert sorted(iv.aurocs) == sorted(f"blocks.{li}.{kinds[n]}" for li in (0, 1) for n in names)
    caps = sl.capture(m, GOOD + BAD, list(iv.aurocs), "max")
    for (li, n), r in ref.items():
        site = f"blocks.{li}.{kinds[n]}"
        assert torch.allclose(caps[site], r, atol=1e-4), site  # batched (left-padded) = one text at a time
        auc = [roc_auc_score(y, caps[site][:, j].numpy()) for j in range(r.shape[1])]
        np.testing.assert_allclose(iv.aurocs[site].numpy(), auc, atol=1e-6)
    # applying scales exactly those module outputs
    enc = m.encode(["hello there"])
    kw = {k: enc[k] for k in ("input_ids", "attention_mask")}
    handles = [m.layer(li).get_submodule(n).register_forward_hook(
        lambda mod, a, o, f=iv.factors[f"blocks.{li}.{kinds[n]}"]: o * f) for li in (0, 1) for n in names]
    with torch.no_grad():
        ref_logits = m.hf(**kw).logits
        for h in handles:
            h.remove()
        with iv.apply(m):
            got = m.hf(**kw).logits
    assert torch.allclose(got, ref_logits, atol=1e-5)
    assert set(iv.meta["null"]) == {"real", "shuffled_labels", "exceeds_noise"}


def test_apply_equals_hand_hook_and_files_roundtrip(tmp_path):
    m = tiny_model("llama")
    iv = AurA.fit(m, (GOOD, BAD), variant="det0", top_n=10, experts="act")
    assert sum(int((f == 0).sum()) for f in iv.factors.values()) == 10
    enc = m.encode(["hello there"])
    kw = {k: enc[k] for k in ("input_ids", "attention_mask")}
    handles = []
    for s, f in iv.factors.items():  # by hand: scale the input of each down projection
        down = m.layer(m.site(s).layer).mlp.down_proj
        handles.append(down.register_forward_pre_hook(lambda mod, args, f=f: (args[0] * f,)))
    with torch.no_grad():
        ref = m.hf(**kw).logits
        for h in handles:
            h.remove()
        base = m.hf(**kw).logits
        with iv.apply(m):
            got = m.hf(**kw).logits
        after = m.hf(**kw).logits
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(got, base) and torch.equal(after, base)
    back = I.load(iv.save(tmp_path / "aura.safetensors"), m)
    assert isinstance(back, AurA) and back.meta["options"] == {"variant": "det0", "experts": "act", "top_n": 10}
    assert all(torch.equal(back.factors[s], iv.factors[s]) for s in iv.factors)
    with pytest.raises(I.InterventionError, match="fitted on model 'tiny-llama'"):
        I.load(tmp_path / "aura.safetensors", tiny_model("llama", seed=1))


def test_bad_inputs():
    m = tiny_model("llama")
    with pytest.raises(AuraError, match=r"found 2 toxic and 9 non-toxic texts; AurA needs at least 8 of each: "
                       r"use more prompts \(--n-prompts\)"):
        AurA.fit(m, (GOOD, BAD[:2]))
    with pytest.raises(AuraError, match="AUROC needs positive and negative examples; got 0 positive"):
        auroc(torch.randn(5, 3), torch.zeros(5, dtype=torch.bool))
    iv = AurA.fit(m, (GOOD, BAD))
    with pytest.raises(AuraError, match="unknown AurA experts"):
        AurA.fit(m, (GOOD, BAD), experts="neurons")
    bad = AurA({"blocks.0.mlp.act": torch.ones(7) * 0.5}, meta=dict(iv.meta))
    with pytest.raises(AuraError, match=r"factors for 'blocks.0.mlp.act' has size \(7,\) but tiny-llama has \(48,\)"):
        bad.check(m)


def test_cli_fit_aura_bad_variant_and_too_few_texts(tmp_path):
    from typer.testing import CliRunner

    from steerlab.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["fit", "aura", "--out", str(tmp_path / "a.safetensors"), "--variant", "zero"])
    assert r.exit_code == 2 and "unknown variant 'zero'; choose one of aura, damp, det0" in flat(r.output)
    d = model_dir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"line {i} of text" for i in range(4)) + "\n")
    r = runner.invoke(app, ["fit", "aura", "--out", str(tmp_path / "a.safetensors"), "--model", str(d), "--prompts",
                            str(prompts), "--n-prompts", "0", "--max-new-tokens", "3", "--scorer", "profanity"])
    assert r.exit_code == 2 and "AurA needs at least 8 of each" in flat(r.output), r.output
    m = tiny_model("llama")
    with pytest.raises(I.InterventionError, match=r"aura's apply has no option 'alpha'; its options are: variant "
                                                  r"\(.*\); top_n \(.*units\)"):
        with AurA.fit(m, (GOOD, BAD)).apply(m, alpha=2.0):
            pass
    with pytest.raises(I.InterventionError, match="unknown variant 'zero'; choose one of aura, damp, det0"):
        with AurA.fit(m, (GOOD, BAD)).apply(m, variant="zero"):
            pass


def test_generate_refuses_apply_options_aura_lacks_before_writing(tmp_path):
    """`generate --intervention aura.safetensors --alpha 2 --out D` (AurA has no strength) and a typo in an
    apply option fail before D exists, listing AurA's apply options."""
    from typer.testing import CliRunner

    from steerlab.cli import app

    d = model_dir(tmp_path)
    m = sl.load(d)
    f = AurA.fit(m, (GOOD, BAD)).save(tmp_path / "aura.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a line\nanother line\n")
    base = ["generate", "--model", d, "--prompts", str(prompts), "--max-new-tokens", "2", "--scorer", "profanity",
            "--intervention", str(f)]
    for extra, msg in [(["--alpha", "2"], "aura has no strength option for --alpha; its apply options are: variant ("),
                       (["--apply-option", "varient=damp"], "aura's apply has no option 'varient'; its options are: "
                                                            "variant (")]:
        out = tmp_path / "D"
        r = CliRunner().invoke(app, [*base, "--out", str(out), *extra])
        assert r.exit_code == 2 and msg in flat(r.output) and "top_n (" in flat(r.output), r.output
        assert not out.exists()
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "ok"), "--apply-option", "variant=damp"])
    assert r.exit_code == 0, r.output


def test_variant_apply_from_saved_aurocs_equals_a_fit_of_that_variant():
    m = tiny_model("llama")
    iv = AurA.fit(m, (GOOD, BAD))  # proportional; the AUROCs are kept
    from steerlab.experiments.recipes import recipe_for

    n = sum(a.numel() for a in iv.aurocs.values())  # 3 layers x (gate 48 + up 48 + down 32) = 384 experts
    # 0.1% and 0.3% (both 1 unit), 1%, 3% and 10% of them; det0 only in quick, damp too otherwise
    assert n == 384 and recipe_for("aura").settings(iv, m, None, "quick") == [{"variant": "aura"}] + [
        {"variant": "det0", "top_n": t} for t in (1, 4, 12, 38)]
    assert recipe_for("aura").settings(iv, m, None, "standard") == [{"variant": "aura"}] + [
        {"variant": v, "top_n": t} for v in ("damp", "det0") for t in (1, 4, 12, 38)]
    auc = np.concatenate([iv.aurocs[s].numpy() for s in iv.aurocs])
    top = np.argsort(-auc, kind="stable")[:5]  # by hand: the 5 units with the highest AUROC over all layers
    hand = np.ones_like(auc)
    hand[top] = 0.0
    got = np.concatenate([f.numpy() for f in iv.variant_factors("det0", 5).values()])
    np.testing.assert_array_equal(got, hand)
    default_n = math.ceil(0.01 * auc.size)  # damp without top_n: 1% of the units at 0.5
    assert np.sort(np.concatenate([f.numpy() for f in iv.variant_factors("damp").values()]))[:default_n + 1].tolist() \
        == [0.5] * default_n + [1.0]
    enc = m.encode(["hello there"])
    kw = {k: enc[k] for k in ("input_ids", "attention_mask")}
    ref_iv = AurA.fit(m, (GOOD, BAD), variant="det0", top_n=5)  # the fitted variant, through its own factors
    with torch.no_grad():
        with ref_iv.apply(m):
            ref = m.hf(**kw).logits
        with iv.apply(m, variant="det0", top_n=5):
            got_logits = m.hf(**kw).logits
        with iv.apply(m):
            prop = m.hf(**kw).logits
    assert torch.allclose(got_logits, ref, atol=1e-6) and not torch.allclose(prop, ref, atol=1e-4)
    with pytest.raises(AuraError, match="no AUROCs"):
        with AurA(dict(iv.factors), meta=dict(iv.meta)).apply(m, variant="det0"):
            pass
