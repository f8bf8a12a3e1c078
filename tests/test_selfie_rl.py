"""SelfIE reinforcement control: rewards, the two estimators' gradients by hand, the direction of an
update, the saved intervention and the command line."""

import pytest
import torch

from steerlab.explain.selfie_control import ControlError
from steerlab.explain.selfie_rl import SelfieRL, _surrogate, reward_from_spec, word_reward
from tiny import flat, model_dir, tiny_model

PARTS = ["ab", 3, " cd ", 2, "!"]


def _after_block(m, text, b):
    ids = m.tok([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return m.hf(input_ids=ids, output_hidden_states=True).hidden_states[b + 1][0]


def test_rewards():
    r = word_reward(["Paris", "France"])
    assert r(["paris is nice", "Frances", "a French city", "FRANCE!"]) == [-1.0, 1.0, 1.0, -1.0]
    assert reward_from_spec("words:cat,dog")(["a dog", "a bird"]) == [-1.0, 1.0]
    with pytest.raises(ControlError, match="word list is empty"):
        reward_from_spec("words:")
    with pytest.raises(ControlError, match="unknown reward 'smell:x'"):
        reward_from_spec("smell:x")


def test_paper_surrogate_gradient_moves_each_state_along_itself():
    h = torch.randn(3, 5, requires_grad=True)
    r = torch.tensor([1.0, -1.0, 0.0])
    (g,) = torch.autograd.grad(_surrogate(h, r, "paper"), h)
    expected = -(r[:, None] * h.detach() / h.detach().pow(2).sum(-1, keepdim=True)) / 3
    torch.testing.assert_close(g, expected)


def test_gaussian_surrogate_is_reinforce():
    torch.manual_seed(0)
    h = torch.randn(2, 4, requires_grad=True)
    draws = h.detach()[None] + 0.1 * torch.randn(3, 2, 4)
    rd = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0]])
    (g,) = torch.autograd.grad(_surrogate(h, rd, "gaussian", draws, 0.1), h)
    scale2 = (0.1 * h.detach().norm(dim=-1)) ** 2  # [N]
    adv = rd - rd.mean(0, keepdim=True)
    # d/dh of -mean(adv * -(d - h)^2 / (2 s^2)) = -mean over (S, N) of adv * (d - h) / s^2, per state
    expected = -(adv[..., None] * (draws - h.detach()[None]) / scale2[None, :, None]).sum(0) / rd.numel()
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_update_shrinks_states_with_negative_reward_and_grows_the_others(sign):
    m = tiny_model("llama")
    iv = SelfieRL.fit(m, ["hello world", "steer me"], layer=1, reward=lambda texts: [sign] * len(texts),
                      interpretation=PARTS, steps=3, lr=1e-2, max_new_tokens=3)
    before = _after_block(m, "hello world", 1).norm(dim=-1)
    with iv.apply(m):
        after = _after_block(m, "hello world", 1).norm(dim=-1)
    assert (sign * (after - before)).mean() > 0
    assert iv.meta["n_states"] == 12 + 9 and iv.meta["carrying"] == [0.0 if sign > 0 else 1.0] * 3  # <bos> included
    assert iv.sites == ["blocks.1.mlp.out"] and len(iv.meta["interpretations_after"]) == 21


def test_fit_saves_loads_and_the_gaussian_estimator_runs(tmp_path):
    from steerlab.interventions import list_interventions, load

    m = tiny_model("llama")
    def parity(texts):  # a reward that differs between draws
        return [1.0 if sum(map(ord, t)) % 2 else -1.0 for t in texts]

    iv = SelfieRL.fit(m, "hello world", layer=0, reward=parity, interpretation=PARTS, steps=2, sigma=0.5,
                      estimator="gaussian", samples=4, max_new_tokens=3, preserve=["steer me"])
    assert all(torch.isfinite(d).all() for d in iv.deltas.values()) and any(d.abs().sum() > 0 for d in iv.deltas.values())
    back = load(iv.save(tmp_path / "rl.safetensors"), m)
    assert back.method == "selfie-rl" and sorted(back.deltas) == sorted(iv.deltas)
    assert "selfie-rl" in list_interventions()
    with pytest.raises(ControlError, match="unknown estimator"):
        SelfieRL.fit(m, "hi", layer=0, reward="words:a", estimator="ppo")
    with pytest.raises(ControlError, match="source prompts"):
        SelfieRL.fit(m, ["hi", ""], layer=0, reward="words:a")
    with pytest.raises(ControlError, match="token 5 is beyond source prompt 1"):
        SelfieRL.fit(m, ["hello world", "hi"], layer=0, reward="words:a", tokens=[5])


def test_chosen_tokens_are_the_states_used():
    m = tiny_model("llama")
    seen = []

    def record(texts):
        seen.append(list(texts))
        return [1.0] * len(texts)

    iv = SelfieRL.fit(m, ["hello world", "steer me"], layer=1, reward=record, interpretation=PARTS, steps=1,
                      max_new_tokens=3, tokens=[-1, 0])
    assert iv.meta["n_states"] == 4
    from steerlab.explain.selfie import interpret_states, read_states

    states = torch.cat([read_states(m, p, [(1, -1), (1, 0)]).vectors for p in ("hello world", "steer me")])
    # the rows come in batch order: per prompt, its tokens in position order (<bos> first, then the last)
    order = [1, 0, 3, 2]
    expected = [t for t, _, _ in interpret_states(m, states[order], PARTS, max_new_tokens=3, relevancy=False)]
    assert seen[0] == expected


def test_fit_selfie_rl_cli(tmp_path):
    from typer.testing import CliRunner

    from steerlab.cli import app
    from steerlab.interventions import load

    d = model_dir(tmp_path)
    out = tmp_path / "rl.safetensors"
    r = CliRunner().invoke(app, ["fit", "selfie-rl", "--out", str(out), "--model", d, "--prompt", "hello world",
                                 "--prompt", "steer me", "--layer", "1", "--reward", "words:e", "--steps", "2",
                                 "--tokens", "-1",
                                 "--template", "[X][X] means:", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    iv = load(out)
    text = flat(r.output)
    assert f"{100 * iv.meta['carrying_before']:.0f}% -> {100 * iv.meta['carrying_after']:.0f}%" in text
    assert iv.meta["block"] == 1 and iv.meta["sources"] == ["hello world", "steer me"] and iv.meta["n_states"] == 2
    bad = CliRunner().invoke(app, ["fit", "selfie-rl", "--out", str(out), "--model", d, "--prompt", "x",
                                   "--layer", "1", "--reward", "smell:x"])
    assert bad.exit_code == 2 and "unknown reward" in bad.output
