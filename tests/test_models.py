"""Loading: embedded default, GGUF cache (atomic, self-healing), local dirs, hub path, errors."""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.models import loading
from tiny import PROMPTS, tiny_model


def _save_tiny(tmp_path, arch="llama"):
    m = tiny_model(arch)
    d = tmp_path / f"tiny-{arch}"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    return m, d


def test_local_directory_roundtrip(tmp_path):
    m, d = _save_tiny(tmp_path)
    got = sl.load(d)
    assert got.source == str(d.resolve())
    assert got.fingerprint == loading.files_fingerprint(list(d.glob("*.safetensors")))
    enc = m.encode(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(got.hf(**enc).logits, m.hf(**enc).logits, atol=1e-6)


def test_dtype_option(tmp_path):
    _, d = _save_tiny(tmp_path)
    assert sl.load(d, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(sl.ModelLoadError, match="unknown dtype 'float8'"):
        sl.load(d, dtype="float8")


def test_load_errors(tmp_path):
    with pytest.raises(sl.ModelLoadError, match="not an embedded model"):
        sl.load("no such model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sl.ModelLoadError, match="no config.json"):
        sl.load(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(sl.ModelLoadError, match="not a .gguf model"):
        sl.load(tmp_path / "weights.bin")
    with pytest.raises(sl.ModelLoadError, match="GGUF file not found"):
        sl.load(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(sl.ModelLoadError, match="not a GGUF file"):
        sl.load(bad)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(sl.ModelLoadError, match="could not be fetched from the Hugging Face hub.*local directory"):
        sl.load("some-org/some-model")


def test_hub_id_resolves_through_the_hub_cache(monkeypatch, tmp_path):
    """The hub path goes through huggingface_hub; a populated hub cache stands in for the network."""
    m, d = _save_tiny(tmp_path)
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--some-org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(d, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    got = sl.load("some-org/tiny")
    assert got.source == "hub:some-org/tiny"
    assert got.fingerprint == loading.files_fingerprint(list(d.glob("*.safetensors")))


def test_wrap_and_untie(llama):
    m = llama
    assert m.tied()
    emb = m.hf.get_input_embeddings().weight.detach().clone()
    m.untie_unembedding()
    assert not m.tied()
    with torch.no_grad():
        m.W_U.mul_(0)
    assert torch.equal(m.hf.get_input_embeddings().weight, emb)
    assert m.hf.config.tie_word_embeddings is False


@pytest.mark.integration
def test_default_model(real_model):
    m = real_model
    assert m.name == "smollm2-135m-instruct"
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_head, m.d_mlp, m.vocab_size) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert len(m.fingerprint) == 16 and m.tied()
    assert "<|im_start|>" in m.chat_template
    assert m.chat_text("hi").endswith("<|im_start|>assistant\n")
    t0 = time.perf_counter()
    again = sl.load()
    assert time.perf_counter() - t0 < 10  # from the dequantised cache, not the GGUF
    assert again.fingerprint == m.fingerprint
    # resid_post equals output_hidden_states on the real model, padded batch
    enc = m.encode(PROMPTS)
    with torch.no_grad():
        hidden = m.hf(**enc, output_hidden_states=True).hidden_states
    got = sl.capture(m, PROMPTS, ["blocks.10.resid_post", "final"], "all")
    mask = got.mask.bool()
    assert (got["blocks.10.resid_post"] - hidden[11])[mask].abs().max() <= 1e-4
    assert (got["final"] - hidden[-1])[mask].abs().max() <= 1e-4


@pytest.mark.integration
def test_gguf_cache_atomic_and_self_healing(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    src = loading.EMBEDDED["smollm2-135m-instruct"][0]()
    gguf = tmp_path / "smol.gguf"
    shutil.copy(src, gguf)
    models_dir = tmp_path / "cache" / "models"

    # 1. a first load interrupted while writing leaves no cache directory behind
    from transformers import PreTrainedTokenizerBase

    real_save = PreTrainedTokenizerBase.save_pretrained

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(OSError, match="simulated"):
        sl.load(gguf)
    assert list(models_dir.iterdir()) == []
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", real_save)

    # 2. a normal load builds it; the manifest records every file's size and SHA-256
    m = sl.load(gguf)
    (cache,) = list(models_dir.iterdir())
    manifest = json.loads((cache / "steerlab-cache.json").read_text())
    assert manifest["files"]["model.safetensors"] == (cache / "model.safetensors").stat().st_size
    assert manifest["sha256"]["model.safetensors"] == loading.file_sha256(cache / "model.safetensors")
    ref = m.hf(**m.encode(["Hello"])).logits

    # 3. a truncated cache is detected by name and rebuilt
    with open(cache / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match="model.safetensors has 1000 bytes.*rebuilding"):
        m2 = sl.load(gguf)
    assert torch.equal(m2.hf(**m2.encode(["Hello"])).logits, ref)

    # 4. a truncated GGUF is a clear error
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(Path(gguf).read_bytes()[: 1 << 20])
    with pytest.raises(sl.ModelLoadError, match="could not read GGUF file .*trunc.gguf"):
        sl.load(trunc)


def _flip_bytes(path: Path, offset: int, n: int = 4096) -> None:
    """Overwrite ``n`` bytes at ``offset`` with 0xFF (a float32 NaN pattern), keeping the file's size."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * n)
    assert path.stat().st_size == size


def test_cache_manifest_detects_changes_by_content(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "cache"
    d.mkdir()
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, d / "model.safetensors")
    (d / "config.json").write_text('{"a": 1}')
    sha = "ab" * 32
    size = (d / "model.safetensors").stat().st_size
    man = loading.write_manifest(d, tmp_path / "m.gguf", sha)
    assert man["sha256"]["config.json"] == hashlib.sha256(b'{"a": 1}').hexdigest()   # independent hash
    assert man["files"] == {"config.json": 8, "model.safetensors": size}
    assert loading.cache_problem(d, sha) is None and loading.cache_problem(d, sha, full=True) is None
    assert loading.cache_problem(d, "cd" * 32) == "manifest does not match the GGUF file"
    # same size, other content, same modification time (restored): only the full check sees it
    t = (d / "model.safetensors").stat().st_mtime_ns
    _flip_bytes(d / "model.safetensors", size - 1000, 16)
    os.utime(d / "model.safetensors", ns=(t, t))
    bad = "model.safetensors does not match the SHA-256 recorded in the manifest (changed or corrupt)"
    assert loading.cache_problem(d, sha) is None
    assert loading.cache_problem(d, sha, full=True) == bad
    # ... or any check once its modification time differs from the manifest's
    os.utime(d / "model.safetensors", ns=(t + 10**9, t + 10**9))
    assert loading.cache_problem(d, sha) == bad
    # a file written in place whose content is unchanged is hashed once, then the manifest knows its time
    loading.write_manifest(d, tmp_path / "m.gguf", sha)
    os.utime(d / "config.json", ns=(t + 2 * 10**9, t + 2 * 10**9))
    assert loading.cache_problem(d, sha) is None
    assert json.loads((d / "steerlab-cache.json").read_text())["mtime_ns"]["config.json"] == t + 2 * 10**9
    # a damaged safetensors header at the same size is caught without hashing
    _flip_bytes(d / "model.safetensors", 8, 4)
    os.utime(d / "model.safetensors", ns=(t, t))
    loading.write_manifest(d, tmp_path / "m.gguf", sha)
    assert "model.safetensors has a damaged safetensors header" in loading.cache_problem(d, sha)
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, d / "model.safetensors")
    loading.write_manifest(d, tmp_path / "m.gguf", sha)
    legacy = json.loads((d / "steerlab-cache.json").read_text())
    del legacy["sha256"]                                    # a manifest from before content hashes
    (d / "steerlab-cache.json").write_text(json.dumps(legacy))
    assert "no content hashes" in loading.cache_problem(d, sha)
    loading.write_manifest(d, tmp_path / "m.gguf", sha)
    (d / "config.json").unlink()
    assert loading.cache_problem(d, sha) == "missing file config.json"


@pytest.mark.integration
def test_cache_corrupted_in_place_is_rebuilt(tmp_path, monkeypatch, real_model):
    """A dequantised cache damaged without changing its size (NaN weights) is caught by its content
    hash and rebuilt; the model then computes what the healthy one does."""
    from safetensors.torch import load_file

    gguf = loading.EMBEDDED[loading.DEFAULT][0]()
    good, sha = loading.dequantised_dir(gguf)               # the verified default cache
    copy = tmp_path / "cache" / "models" / good.name
    shutil.copytree(good, copy)
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    weights = copy / "model.safetensors"
    _flip_bytes(weights, weights.stat().st_size // 2)
    assert any(not torch.isfinite(t).all() for t in load_file(weights).values())   # the damage is real
    with pytest.warns(UserWarning, match=r"model.safetensors does not match the SHA-256.*rebuilding it from"):
        m = sl.load()
    assert m.fingerprint == real_model.fingerprint
    enc = real_model.encode(PROMPTS)
    with torch.no_grad():
        got, ref = m.hf(**enc).logits, real_model.hf(**enc).logits
    assert torch.isfinite(got).all() and torch.equal(got, ref)
    assert loading.cache_problem(copy, sha) is None
