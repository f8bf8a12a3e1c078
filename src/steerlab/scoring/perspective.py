"""``perspective``: Google's Perspective API (Jigsaw), the scorer RealToxicityPrompts was built with.

One request per text (the API scores one comment per call)::

    POST {endpoint}?key=KEY
    {"comment": {"text": TEXT}, "languages": ["en"], "requestedAttributes": {"TOXICITY": {}},
     "doNotStore": true}
    -> {"attributeScores": {"TOXICITY": {"summaryScore": {"value": 0.93, ...}, ...}}, ...}

The key comes from ``api_key=`` or the ``PERSPECTIVE_API_KEY`` environment variable and never appears
in an error message, a chained cause or a repr. The endpoint must be ``https://``, or ``http://`` to a
loopback host only (``localhost``, ``127.0.0.0/8``, ``[::1]``: local test servers), so the key is never
sent in clear over a network nor to a ``file:`` or other URL scheme; redirects are not followed. Requests are spaced to at most ``qps`` per second (the API's default
quota is 1 QPS). HTTP 429 and 5xx answers and connection failures are retried up to ``max_retries``
times, waiting ``backoff * 2**attempt`` seconds (or the server's ``Retry-After``, whichever is longer,
capped at ``max_backoff``); any other 4xx is an error carrying the API's own message, and so is a reply
that is not JSON or lacks a score. Only the standard library is used for HTTP.

Empty or whitespace-only texts are not sent (the API refuses empty comments) and score 0; texts are
cut to the API's 20 KB limit.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

import numpy as np

from ..validate import check_url, redact, redact_url
from .registry import Scorer, ScorerError

DEFAULT_ENDPOINT = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
KEY_ENV = "PERSPECTIVE_API_KEY"
MAX_BYTES = 20480  # the API's limit on a comment's UTF-8 size


class PerspectiveError(ScorerError):
    """The Perspective API could not be used: no key, an error answer, or a reply that makes no sense."""


def check_endpoint(endpoint: object) -> str:
    """``endpoint`` if it is a usable Perspective endpoint, else a :class:`PerspectiveError` saying why:
    an ``https://`` URL with a host, or ``http://`` to a loopback host; no user name or password in
    it, a numeric port, no spaces or control characters (:func:`steerlab.validate.check_url`; the
    endpoint is shown redacted)."""
    return check_url(endpoint, "Perspective endpoint", key_sent=True, error=PerspectiveError)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand a 3xx answer back as it is: the API never redirects, and a redirect is not followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _truncate_utf8(text: str, limit: int = MAX_BYTES) -> str:
    raw = text.encode("utf-8")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", errors="ignore")


class PerspectiveScorer(Scorer):
    """Perspective API client. ``attributes`` are API attribute names (``TOXICITY``, ``SEVERE_TOXICITY``,
    ``INSULT``, ...), reported in lower case with the first as the main one."""

    name = "perspective"
    batch_size = 1

    def __init__(self, api_key: str | None = None, attributes: Sequence[str] = ("TOXICITY",),
                 languages: Sequence[str] = ("en",), endpoint: str = DEFAULT_ENDPOINT, qps: float = 1.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 30.0,
                 do_not_store: bool = True) -> None:
        key = api_key if api_key is not None else os.environ.get(KEY_ENV, "")
        if not isinstance(key, str):
            raise PerspectiveError(f"the Perspective API key must be a string, got {type(key).__name__}")
        if not key:
            raise PerspectiveError(f"scorer 'perspective' needs an API key: set the environment variable {KEY_ENV} "
                                   "or pass api_key=")
        if isinstance(attributes, str) or not attributes:
            raise PerspectiveError(f"attributes must be a non-empty list of names, got {attributes!r}")
        if not (qps > 0) or max_retries < 0 or backoff < 0 or timeout <= 0:
            raise PerspectiveError(f"need qps > 0, max_retries >= 0, backoff >= 0, timeout > 0; got qps={qps}, "
                                   f"max_retries={max_retries}, backoff={backoff}, timeout={timeout}")
        self._key = key
        self.api_attributes = [a.upper() for a in attributes]
        self.attributes = [a.lower() for a in self.api_attributes]
        self.languages = list(languages)
        problem = None
        try:
            self.endpoint = check_endpoint(endpoint)
        except PerspectiveError as e:
            problem = self._redact(str(e))  # raised outside the handler, so no chained copy keeps the key
        if problem is not None:
            raise PerspectiveError(problem)
        self.min_interval = 0.0 if math.isinf(qps) else 1.0 / qps
        self.max_retries, self.backoff, self.max_backoff, self.timeout = max_retries, backoff, max_backoff, timeout
        self.do_not_store = do_not_store
        if endpoint != DEFAULT_ENDPOINT:  # another endpoint gives other numbers: part of a run's identity
            self.options = {"endpoint": redact_url(endpoint)}
        self.requests_sent = 0
        self._next_slot = 0.0

    @property
    def key(self) -> str:
        return f"perspective[{','.join(self.api_attributes)}:{','.join(self.languages)}]"

    def _redact(self, s: str) -> str:
        """``s`` without the key (also in its URL-encoded forms) nor any key-like part of a URL."""
        return redact(s, [self._key])

    def _throttle(self) -> None:
        now = time.monotonic()
        if now < self._next_slot:
            time.sleep(self._next_slot - now)
            now = self._next_slot
        self._next_slot = now + self.min_interval

    def _post(self, body: bytes) -> tuple[int, bytes, str | None]:
        """One POST: (HTTP status, body, Retry-After header); raises OSError subclasses when unreachable."""
        sep = "&" if "?" in self.endpoint else "?"
        url = f"{self.endpoint}{sep}{urllib.parse.urlencode({'key': self._key})}"
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        self._throttle()
        self.requests_sent += 1
        try:
            with _OPENER.open(req, timeout=self.timeout) as r:
                return r.status, r.read(), r.headers.get("Retry-After")
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read(), e.headers.get("Retry-After") if e.headers else None

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2 ** attempt
        try:
            delay = max(delay, float(retry_after)) if retry_after is not None else delay
        except ValueError:
            pass  # an HTTP-date Retry-After: keep the exponential delay
        time.sleep(min(delay, self.max_backoff))

    def analyze(self, text: str) -> dict[str, float]:
        """Scores of one text for each requested attribute (lower-case names)."""
        if not text.strip():
            return dict.fromkeys(self.attributes, 0.0)
        payload = {"comment": {"text": _truncate_utf8(text)}, "languages": self.languages,
                   "requestedAttributes": {a: {} for a in self.api_attributes}}
        if self.do_not_store:
            payload["doNotStore"] = True
        body = json.dumps(payload).encode("utf-8")
        where = redact_url(self.endpoint.split("?", 1)[0])
        problem = ""
        for attempt in range(self.max_retries + 1):
            try:
                status, raw, retry_after = self._post(body)
            except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, DNS, timeout, TLS
                why = getattr(e, "reason", e)
                problem = f"could not reach {where}: {type(why).__name__}: {self._redact(str(why))}"
                status, raw, retry_after = None, b"", None
            if status == 200:
                return self._parse(raw, where)
            if status is not None and status != 429 and not 500 <= status < 600:
                what = "answered with a redirect, which is not followed (check the endpoint)" \
                    if 300 <= status < 400 else "refused the request"
                raise PerspectiveError(f"Perspective API at {where} {what}: HTTP {status}: "
                                       f"{self._redact(self._message(raw))}")
            if status is not None:
                problem = f"HTTP {status} from {where}: {self._redact(self._message(raw))}"
            if attempt < self.max_retries:
                self._wait(attempt, retry_after)
        raise PerspectiveError(f"Perspective API failed after {self.max_retries + 1} attempts; last: {problem}")

    @staticmethod
    def _message(raw: bytes) -> str:
        """The API's error message (``{"error": {"message": ...}}``), else the start of the body."""
        try:
            msg = json.loads(raw)["error"]["message"]
            if isinstance(msg, str):
                return msg
        except (ValueError, KeyError, TypeError):
            pass
        text = raw[:200].decode("utf-8", errors="replace").strip()
        return text or "(empty body)"

    def _parse(self, raw: bytes, where: str) -> dict[str, float]:
        try:
            data = json.loads(raw)
        except ValueError as e:
            snippet = raw[:120].decode("utf-8", errors="replace")
            raise PerspectiveError(f"Perspective API at {where} answered with a body that is not JSON "
                                   f"({e.__class__.__name__}): {self._redact(snippet)!r}") from None
        out = {}
        for api, attr in zip(self.api_attributes, self.attributes, strict=True):
            try:
                value = data["attributeScores"][api]["summaryScore"]["value"]
            except (KeyError, TypeError) as e:
                raise PerspectiveError(f"Perspective API at {where} answered without "
                                       f"attributeScores.{api}.summaryScore.value") from e
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise PerspectiveError(f"Perspective API at {where} answered {api} = {value!r}, "
                                       "not a probability in [0, 1]")
            out[attr] = float(value)
        return out

    def _score(self, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
        rows = [self.analyze(t) for t in texts]
        return {a: np.array([r[a] for r in rows], dtype=np.float64) for a in self.attributes}
