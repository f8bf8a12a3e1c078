"""Checks at the door: one-line errors for values that would otherwise fail late, with a
traceback, or not at all (a silently wrong number).

Every check returns the value it accepted (converted where that is the point: a number from a
string, a :class:`pathlib.Path`) or raises :class:`ValidationError` naming the option, the value
and what would be valid. The library entry points and the command line call the same functions,
so a bad value reads the same wherever it is given. This module sits low in the layering: it
imports only :mod:`steerlab.errors` (and torch lazily, for devices).

Secrets: :func:`redact_url` and :func:`redact` remove keys from URLs and text before they reach a
message, a log or a run file; :func:`public_options` drops secret-looking options from what is
recorded; :func:`check_url` is the rule for every URL that may carry a key.
"""

from __future__ import annotations

import ipaddress
import math
import numbers
import os
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import SteerlabError


class ValidationError(SteerlabError):
    """A value refused at the door: out of range, of the wrong type, not finite, an unusable path or device."""


class NonFiniteError(SteerlabError):
    """NaN or infinite values where numbers must be finite (a forward's logits, a saved tensor, a metric)."""


# --- numbers ---------------------------------------------------------------------------------------
def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "a finite number"


def number(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (a numeric string is read as a number); NaN,
    infinity, a bool or anything that is not a number is a :class:`ValidationError` naming ``name``."""
    rng = _range_text(lo, hi, lo_open, hi_open)
    want = "" if lo is None and hi is None else f" ({rng})"
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a one-element tensor
        value = value.item()
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValidationError(f"{name} must be a number{want}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(f"{name} must be a number{want}, got {type(value).__name__} {value!r:.40}")
    x = float(value)
    if not math.isfinite(x):
        raise ValidationError(f"{name} must be a finite number{want}, got {x}")
    if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and (x > hi or (hi_open and x == hi))):
        raise ValidationError(f"{name} must be {rng}, got {value}")
    return x


def integer(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]``; a float with a fraction, a bool, NaN or a
    non-numeric string is a :class:`ValidationError` naming ``name``."""
    rng = _range_text(minimum, maximum, False, False)
    want = "" if minimum is None and maximum is None else f" ({rng})"
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValidationError(f"{name} must be an integer{want}, got {value!r}") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValidationError(f"{name} must be an integer{want}, got {type(value).__name__} {value!r:.40}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValidationError(f"{name} must be an integer {rng}, got {v}")
    return v


def choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else an error listing them."""
    options = list(choices)
    if value not in options:
        raise ValidationError(f"{name} must be one of {', '.join(map(str, options))}; got {value!r:.60}")
    return value


def allocation(n_bytes: float, what: str, hint: str, limit: float | None = None) -> None:
    """Refuse work whose estimated memory ``n_bytes`` exceeds ``limit`` (default: this machine's
    physical memory), before anything is allocated: one option can ask for hundreds of GB."""
    cap = limit if limit is not None else physical_memory()
    if cap and n_bytes > cap:
        raise ValidationError(f"{what} would need about {_gb(n_bytes)} of memory, more than the {_gb(cap)} "
                              f"available; {hint}")


def physical_memory() -> int:
    """Bytes of physical memory (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_text(value: Any, name: str = "text") -> Any:
    """``value`` unless it is a string holding undecodable bytes (lone surrogates: Python's stand-in
    for bytes that are not UTF-8, e.g. in a command-line argument), which no tokenizer accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start:e.end].encode("utf-8", "surrogateescape")
            raise ValidationError(f"{name} is not valid UTF-8 (undecodable bytes {bad!r} at character {e.start}); "
                                  f"give text in UTF-8") from None
    return value


def keywords(fn: Any, given: Iterable[str], what: str) -> None:
    """Refuse keywords that ``fn`` does not take (unless it takes ``**kwargs``), listing those it does."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ValidationError(f"{what} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}")


# --- paths -----------------------------------------------------------------------------------------
def _path(path: Any, name: str, kind: str) -> Path:
    if not isinstance(path, str | os.PathLike) or str(path).strip() == "":
        got = "an empty string" if isinstance(path, str) else type(path).__name__
        raise ValidationError(f"{name} must be a {kind} path, got {got}")
    return Path(path).expanduser()


def _writable_ancestor(p: Path, name: str) -> None:
    """The nearest existing ancestor of ``p`` must be a directory this process may write into."""
    a = p.parent if p.parent != p else p
    while not a.exists() and a.parent != a:
        a = a.parent
    if not a.is_dir():
        raise ValidationError(f"cannot create {name} {p}: {a} is a file, not a directory")
    if not os.access(a, os.W_OK | os.X_OK):
        raise ValidationError(f"cannot write {name} {p}: {a} is not writable (read-only or permission denied)")


def output_file(path: Any, name: str = "output file") -> Path:
    """A path a file can be written to: not empty, not a directory, under a writable directory
    (missing parents are created when writing)."""
    p = _path(path, name, "file")
    if p.is_dir():
        raise ValidationError(f"{name} {p} is a directory; give a file path such as {p / 'out'}")
    _writable_ancestor(p, name)
    return p


def output_dir(path: Any, name: str = "output directory") -> Path:
    """A path a directory can be created (or reused) at: not empty, not a file, writable."""
    p = _path(path, name, "directory")
    if p.exists() and not p.is_dir():
        raise ValidationError(f"{name} {p} exists and is not a directory; choose a directory")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValidationError(f"cannot write into {name} {p}: it is not writable (read-only or permission denied)")
    else:
        _writable_ancestor(p, name)
    return p


def env_dir(var: str) -> Path | None:
    """The directory named by environment variable ``var`` (None when unset or empty); one that
    exists and is not a directory is an error naming the variable."""
    raw = os.environ.get(var, "")
    if not raw:
        return None
    p = Path(raw).expanduser()
    if p.exists() and not p.is_dir():
        raise ValidationError(f"the environment variable {var}={raw} names a file, not a directory; point it at a "
                              f"directory (or unset it)")
    return p


# --- devices ---------------------------------------------------------------------------------------
def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, each ``cuda:i``, ``mps`` when present."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def device(spec: Any, name: str = "device") -> str | None:
    """``spec`` if it names a device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``), else
    an error listing the ones that do. None passes through."""
    if spec is None:
        return None
    import torch

    text = str(spec)
    have = available_devices()
    try:
        d = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValidationError(f"unknown {name} {text!r}; devices here: {', '.join(have)}") from None
    ok = d.type == "cpu" or (d.type == "mps" and "mps" in have)
    if d.type == "cuda":
        ok = f"cuda:{d.index or 0}" in have
    if not ok:
        raise ValidationError(f"{name} {text!r} is not available on this machine; devices here: {', '.join(have)}")
    return text


# --- secrets ---------------------------------------------------------------------------------------
SECRET_NAME = re.compile(r"(?i)(^|[_-])(key|api[_-]?key|apikey|token|secret|password|passwd|pwd|auth|"
                         r"authorization|bearer|credential|credentials|sig|signature)s?($|[_-])")
_TOKENLIKE = re.compile(r"(?=.*[A-Za-z])(?=.*\d)[A-Za-z0-9_\-.~+/=]{24,}")
MASK = "***"


def is_secret_name(name: str) -> bool:
    """Whether an option or query-parameter name looks like it holds a secret (``api_key``, ``token``...)."""
    return bool(SECRET_NAME.search(str(name)))


def redact_url(url: str) -> str:
    """``url`` safe to show: user info, every query value and fragment masked, and path segments that
    follow a secret-looking segment (``.../key/SECRET``), carry ``name=value`` with a secret name, or
    look like a token (24+ letters and digits) replaced by ``***``."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return re.sub(r"[^/:@?#]{3,}", MASK, url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    segs, out, after_secret = parts.path.split("/"), [], False
    for s in segs:
        key, eq, _ = s.partition("=")
        if after_secret and s or (eq and is_secret_name(key)) or _TOKENLIKE.fullmatch(s):
            out.append(f"{key}={MASK}" if eq else MASK)
            after_secret = False
        else:
            out.append(s)
            after_secret = bool(s) and is_secret_name(s)
    query = "&".join(f"{k}={MASK}" for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if parts.query and not query:
        query = MASK
    return urllib.parse.urlunsplit((parts.scheme, netloc, "/".join(out), query, MASK if parts.fragment else ""))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_KV_IN_TEXT = re.compile(r"(?i)\b([A-Za-z_-]*?(?:api[_-]?key|key|token|secret|password|passwd|pwd|authorization|auth))"
                         r"(\s*[=:]\s*)(?!\*\*\*|bearer\b|basic\b)([^\s'\",;&]+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]+")


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with each of ``secrets`` (also URL-encoded) masked, every URL in it passed through
    :func:`redact_url`, and ``name=value`` / ``name:value`` pairs with a secret-looking name masked."""
    s = str(text)
    for secret in secrets:
        if secret:
            for form in {secret, urllib.parse.quote_plus(secret), urllib.parse.quote(secret, safe="")}:
                s = s.replace(form, MASK)
    s = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), s)
    s = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", s)
    return _KV_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", s)


def public_options(options: dict) -> dict:
    """``options`` fit to record or show: values of secret-looking names dropped, URLs redacted."""
    out = {}
    for k, v in options.items():
        if is_secret_name(k):
            continue
        out[k] = redact_url(v) if isinstance(v, str) and "://" in v else v
    return out


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: Any, what: str, key_sent: bool = True, error: type[SteerlabError] = ValidationError) -> str:
    """``url`` if it is a usable endpoint, else ``error`` saying why (the URL shown redacted):
    ``http``/``https`` with a host; no user name or password in it; a numeric port; no spaces or
    control characters; and, when ``key_sent``, ``https`` unless the host is loopback (a key never
    travels unencrypted over a network)."""
    if not isinstance(url, str) or not url:
        got = "an empty string" if url == "" else type(url).__name__
        raise error(f"the {what} must be a non-empty URL string, got {got}")
    shown = repr(redact_url(url.split("?", 1)[0].split("#", 1)[0]))
    rule = ("use https://HOST/PATH (or http:// to localhost, 127.0.0.0/8 or [::1] for a local server)" if key_sent
            else "use http://HOST/PATH or https://HOST/PATH")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise error(f"the {what} {shown} contains spaces or control characters; {rule}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError as e:
        raise error(f"the {what} {shown} is not a valid URL ({redact(str(e))}); {rule}") from None
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in ("https", "http") or not host:
        has = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise error(f"the {what} {shown} has {has}{'' if host else ' and no host'}; {rule}")
    if parts.username is not None or parts.password is not None:
        raise error(f"the {what} {shown} carries a user name or password (before '@'); {rule}")
    if key_sent and scheme == "http" and not is_loopback(host):
        raise error(f"the {what} {shown} is plain http to {host!r}, which would send the key unencrypted; {rule}")
    return url


# --- JSON ------------------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, so that the JSON written is
    standard (no bare ``NaN``) and a missing number reads as ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
