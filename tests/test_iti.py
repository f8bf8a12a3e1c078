"""ITI (steerlab.steer.iti): head choice, directions, runtime edits only where they should be,
baking into the output projection, files."""

import numpy as np
import pytest
import torch

import steerlab as sl
from steerlab import interventions as I
from steerlab.explain import probes as pr
from steerlab.steer.iti import ITI
from tiny import tiny_model, token_by_token_logits

WORDS = ["calm", "kind", "warm", "nice", "rude", "vile", "mean", "nasty"]


def _labelled():
    texts = [f"{w} {i} {WORDS[(i * 3) % 8]}" for i in range(40) for w in WORDS[i % 8:i % 8 + 1]]
    labels = [int(t.split()[0] in WORDS[4:]) for t in texts]
    return pr.labelled_from_texts(texts, labels, validation=0.3, seed=0)


def test_fit_picks_top_heads_and_centre_of_mass(llama):
    lab = _labelled()
    iv = I.fit("iti", llama, lab, k=3)
    data = pr.probe_data(llama, lab)
    assert sorted(iv.heads) == sorted(pr.probe_heads(data).top_heads(3))
    # independent: numpy centre of mass and projection std on the training activations
    X = sl.capture(llama, lab.train[0], [f"blocks.{i}.attn.heads" for i in range(3)], "last")
    y = np.array(lab.train[1])
    for layer, h in iv.heads:
        a = X[f"blocks.{layer}.attn.heads"][:, h].double().numpy()
        d = a[y == 0].mean(0) - a[y == 1].mean(0)
        u = d / np.linalg.norm(d)
        want = np.std(a @ u, ddof=1) * u
        np.testing.assert_allclose(iv.deltas[f"blocks.{layer}.attn.heads"][h].numpy(), want, rtol=1e-4, atol=1e-6)
    assert iv.describe().startswith("iti at blocks.") and len(iv.meta["heads"]) == 3


def _record_heads(m, ids, iv=None, **opts):
    """Head inputs of every layer; the record hooks are installed after the edit's, so they see its result."""
    sites = [f"blocks.{i}.attn.heads" for i in range(m.n_layers)]
    if iv is None:
        with sl.record(m, sites, "all") as rec:
            m.hf(**ids)
        return rec
    with iv.apply(m, **opts), sl.record(m, sites, "all") as rec:
        m.hf(**ids)
    return rec


def test_runtime_edit_touches_only_chosen_heads_at_the_last_position(llama):
    delta = torch.zeros(4, 8)
    delta[2] = torch.linspace(-1, 1, 8)
    iv = ITI({"blocks.1.attn.heads": delta}, {"model": llama.name})
    enc = llama.encode(["hello world", "a b"])
    ids = {k: enc[k] for k in ("input_ids", "attention_mask")}
    base, new = _record_heads(llama, ids), _record_heads(llama, ids, iv, alpha=3.0)
    torch.testing.assert_close(new["blocks.0.attn.heads"], base["blocks.0.attn.heads"], rtol=0, atol=0)
    b1, n1 = base["blocks.1.attn.heads"], new["blocks.1.attn.heads"]
    torch.testing.assert_close(n1[:, :-1], b1[:, :-1], rtol=0, atol=0)          # earlier positions
    keep = [0, 1, 3]
    torch.testing.assert_close(n1[:, -1, keep], b1[:, -1, keep], rtol=0, atol=0)  # other heads
    torch.testing.assert_close(n1[:, -1, 2] - b1[:, -1, 2], (3.0 * delta[2]).expand(2, 8))
    assert iv.heads == [(1, 2)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_baked_equals_runtime_and_restores_exactly(arch):
    m = tiny_model(arch)
    iv = I.fit("iti", m, _labelled(), k=3)
    enc = m.encode(["hello world", "steer me now"])
    ids = {k: enc[k] for k in ("input_ids", "attention_mask")}
    mods = [sl.Model.site(m, s).hook_point(m.hf, m.arch)[0] for s in iv.deltas]
    before = [None if mod.bias is None else mod.bias.detach().clone() for mod in mods]
    with torch.no_grad():
        plain = m.hf(**ids).logits[:, -1]
        with iv.apply(m, alpha=2.0, where="all"):
            runtime = m.hf(**ids).logits[:, -1]
        with iv.apply(m, alpha=2.0, bake=True):
            baked = m.hf(**ids).logits[:, -1]
    torch.testing.assert_close(baked, runtime, rtol=1e-4, atol=1e-4)
    assert (baked - plain).abs().max() > 1e-3
    for mod, b in zip(mods, before):
        assert (mod.bias is None) if b is None else torch.equal(mod.bias, b)
    with torch.no_grad():
        torch.testing.assert_close(m.hf(**ids).logits[:, -1], plain, rtol=0, atol=0)
    with pytest.raises(I.InterventionError, match="baked shift acts at every position"):
        with iv.apply(m, bake=True, where="last"):
            pass


def test_files_and_other_models(tmp_path, llama):
    iv = I.fit("iti", llama, _labelled(), k=2)
    path = iv.save(tmp_path / "iti.safetensors")
    back = I.load(path, llama)
    assert isinstance(back, ITI) and back.heads == iv.heads and back.meta["heads"] == iv.meta["heads"]
    for s in iv.deltas:
        assert torch.equal(back.deltas[s], iv.deltas[s])
    with pytest.raises(I.InterventionError, match="fitted on model 'tiny-llama'"):
        I.load(path, tiny_model("llama", seed=1))
    far = ITI({"blocks.2.attn.heads": torch.ones(4, 8)}, {"model": "tiny-llama"})
    with pytest.raises(I.InterventionError, match="'tiny-gpt2' has 2 layers of 4 heads x 8"):
        far.check(tiny_model("gpt2"), strict=False)
    with pytest.raises(pr.ProbeError, match="both classes"):
        I.fit("iti", llama, pr.Labelled((["a", "b"], [0, 0]), (["c", "d"], [0, 1])))


def test_cli_fit_iti_slim_probes_then_generate(tmp_path):
    """`steerlab probes`, `fit iti`, `fit slim` on a tiny model saved to disk, then `generate
    --intervention` with each; the CLI's ITI equals the one fitted in Python on the same data."""
    from typer.testing import CliRunner

    from steerlab.cli import app

    class Len:
        name = "len"

        def toxicity(self, texts):
            return np.array([len(t) % 13 for t in texts], float)

    m = tiny_model("llama")
    d = tmp_path / "tiny"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"{WORDS[i % 8]} line {i}" for i in range(40)) + "\n")
    sl.scoring.register_scorer("len13", lambda **kw: Len(), overwrite=True)
    r = CliRunner()
    common = ["--model", str(d), "--prompts", str(prompts), "--n-train", "8", "--n-val", "4", "--scorer", "len13"]
    res = r.invoke(app, ["probes", "--out", str(tmp_path / "pr"), *common])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pr" / "figures" / "probe_accuracy.png").is_file()
    res = r.invoke(app, ["fit", "iti", "--out", str(tmp_path / "iti.safetensors"), "--k", "2", *common])
    assert res.exit_code == 0, res.output
    lab = pr.toxicity_labels(str(prompts), Len(), 8, 4)
    py = I.fit("iti", sl.load(str(d)), lab, k=2)
    cli = I.load(tmp_path / "iti.safetensors")
    assert cli.heads == py.heads and all(torch.equal(cli.deltas[s], py.deltas[s]) for s in py.deltas)
    res = r.invoke(app, ["fit", "slim", "--out", str(tmp_path / "slim.safetensors"), "--epochs", "30", *common])
    assert res.exit_code == 0, res.output
    for f, extra in (("iti", ["--alpha", "2"]), ("slim", ["--apply-option", "kappa=0.5"])):
        res = r.invoke(app, ["generate", "--out", str(tmp_path / f"run_{f}"), "--model", str(d), "--prompts",
                             str(prompts), "--split", "test", "--n", "3", "--max-new-tokens", "3", "--scorer", "profanity",
                             "--no-fluency", "--intervention", str(tmp_path / f"{f}.safetensors"), *extra])
        assert res.exit_code == 0, res.output
    res = r.invoke(app, ["fit", "iti", "--out", str(tmp_path), *common])
    assert res.exit_code == 2 and "directory" in res.output
    res = r.invoke(app, ["fit", "slim", "--out", str(tmp_path / "s2.safetensors"), "--solver", "mosek", *common])
    assert res.exit_code == 2 and "unknown solver 'mosek'" in res.output
    assert not (tmp_path / "s2.safetensors").exists()


def test_fixed_text_pass_equals_token_by_token_generation(llama):
    """The side-effect pass (``fixed_text_options``: every position) gives the logits of feeding the
    tokens one call at a time with the method's last-position edit (KV cache), as generation does."""
    iv = I.fit("iti", llama, _labelled(), k=3)
    ids = llama.encode(["The quick brown fox jumps"])["input_ids"]
    with torch.no_grad(), iv.apply(llama, **iv.fixed_text_options({"alpha": 4.0})):
        full = llama.hf(input_ids=ids).logits[0]
    with iv.apply(llama, alpha=4.0):
        steps = token_by_token_logits(llama, ids)
    torch.testing.assert_close(full, steps, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(llama.hf(input_ids=ids).logits[0], full)


def test_ties_in_accuracy_are_broken_by_auroc_then_layer_then_head():
    acc = torch.tensor([[0.9, 0.8, 0.9], [0.9, 0.7, 0.8]])
    auc = torch.tensor([[0.95, 0.99, 0.97], [0.97, 0.5, 0.99]])
    res = pr.HeadProbes([4, 7], acc, auc, None, None, torch.zeros(2, 3, 2), torch.zeros(2, 3))
    # 0.9: (4,2) and (7,0) tie at AUROC 0.97 -> the earlier layer first, then (4,0); 0.8: (4,1), (7,2) tie again
    assert res.top_heads(6) == [(4, 2), (7, 0), (4, 0), (4, 1), (7, 2), (7, 1)]
    # the order of a hand-made sort key over (-acc, -auc, layer, head)
    keys = sorted((-float(acc[i, j]), -float(auc[i, j]), [4, 7][i], j) for i in range(2) for j in range(3))
    assert res.top_heads(6) == [(k[2], k[3]) for k in keys]


def test_bootstrap_stability_of_the_chosen_heads(llama):
    from steerlab.steer.iti import head_stability, resample

    data = pr.probe_data(llama, _labelled())
    r = resample(data, torch.Generator().manual_seed(0))
    for part in ("train", "validation"):  # class counts kept, rows drawn from the original rows
        assert r.labels[part].sum() == data.labels[part].sum() and r.heads[part].shape == data.heads[part].shape
        orig = {tuple(x.flatten().tolist()) for x in data.heads[part][0]}
        assert all(tuple(x.flatten().tolist()) in orig for x in r.heads[part][0])
    iv = ITI.fit(llama, data, k=3, bootstrap=4, seed=1)
    st = iv.meta["stability"]
    assert st["resamples"] == 4 and sorted(st["per_head"]) == sorted(f"{a}.{b}" for a, b in iv.heads)
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in st["per_head"].values())
    assert st["mean_kept"] == pytest.approx(np.mean(list(st["per_head"].values())), abs=1e-3)
    assert st == head_stability(data, pr.probe_heads(data).top_heads(3), 1e-2, 4, seed=1)  # seeded
