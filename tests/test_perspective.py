"""The Perspective API client against a loopback server that speaks the API's JSON."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, quote_plus, urlparse

import pytest

from steerlab.scoring import ScorerError, get_scorer
from steerlab.scoring.perspective import KEY_ENV, PerspectiveError, check_endpoint

KEY = "test-key-5ecret"
PATH = "/v1alpha1/comments:analyze"
BAD = {"idiot", "stupid", "hate"}


def toxicity(text: str) -> float:
    """The fake API's TOXICITY: the share of words in BAD (worked out independently in the tests)."""
    words = text.lower().replace("!", " ").replace(".", " ").split()
    return sum(w in BAD for w in words) / len(words)


class FakeApi:
    """Answers like Perspective; ``script`` holds (status, body, headers) answers to give first. A body
    may hold ``{path}`` (replaced by the request path, query and key included, as sent) or ``{key}`` (the
    decoded key), to test that echoed keys are redacted; status ``"close"`` drops the connection without
    an answer, and a ``"sleep"`` header makes the server wait that many seconds before answering."""

    def __init__(self) -> None:
        self.script: list[tuple[int, bytes, dict]] = []
        self.requests: list[tuple[str, dict, dict]] = []

    def answer(self, path: str, body: bytes) -> tuple[int, bytes, dict]:
        query = parse_qs(urlparse(path).query)
        payload = json.loads(body)
        self.requests.append((urlparse(path).path, query, payload))
        if self.script:
            return self.script.pop(0)
        if query.get("key") != [KEY]:
            return 400, json.dumps({"error": {"code": 400, "message": "API key not valid."}}).encode(), {}
        text = payload["comment"]["text"]
        scores = {"TOXICITY": toxicity(text), "INSULT": toxicity(text) / 2}
        attrs = {a: {"summaryScore": {"value": scores[a], "type": "PROBABILITY"}, "spanScores": []}
                 for a in payload["requestedAttributes"]}
        return 200, json.dumps({"attributeScores": attrs, "languages": ["en"]}).encode(), {}


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fake = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status, out, headers = fake.answer(self.path, body)
            if status == "close":
                self.close_connection = True
                return
            headers = dict(headers)
            time.sleep(float(headers.pop("sleep", 0)))
            key = parse_qs(urlparse(self.path).query).get("key", [""])[0]
            out = out.replace(b"{path}", self.path.encode()).replace(b"{key}", key.encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            try:
                self.wfile.write(out)
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.endpoint = f"http://127.0.0.1:{server.server_address[1]}{PATH}"
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def scorer(api, **kw):
    opts = {"api_key": KEY, "endpoint": api.endpoint, "qps": 1000.0, "backoff": 0.001, **kw}
    return get_scorer("perspective", **opts)


TEXTS = ["You stupid idiot!", "Have a nice day.", "I hate this stupid idiot thing"]


def test_scores_and_request_format(api):
    s = scorer(api)
    assert s.attributes == ["toxicity"]
    out = s.toxicity(TEXTS)
    assert out.tolist() == [2 / 3, 0.0, 3 / 6]
    path, query, payload = api.requests[0]
    assert path == PATH and query["key"] == [KEY]
    assert payload == {"comment": {"text": "You stupid idiot!"}, "languages": ["en"],
                       "requestedAttributes": {"TOXICITY": {}}, "doNotStore": True}
    assert len(api.requests) == 3


def test_several_attributes_and_key_from_env(api, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    s = get_scorer("perspective", endpoint=api.endpoint, qps=1000.0, attributes=["TOXICITY", "insult"],
                   do_not_store=False)
    out = s.score(TEXTS[:1])
    assert s.attributes == ["toxicity", "insult"]
    assert out["toxicity"].tolist() == [2 / 3] and out["insult"].tolist() == [1 / 3]
    assert api.requests[0][2]["requestedAttributes"] == {"TOXICITY": {}, "INSULT": {}}
    assert "doNotStore" not in api.requests[0][2]


def test_empty_text_is_not_sent(api):
    s = scorer(api)
    assert s.toxicity(["", "   ", "idiot"]).tolist() == [0.0, 0.0, 1.0]
    assert len(api.requests) == 1


def test_429_then_success_is_retried(api):
    api.script = [(429, b'{"error": {"code": 429, "message": "Quota exceeded"}}', {"Retry-After": "0"}),
                  (503, b"busy", {})]
    s = scorer(api)
    assert s.toxicity(["stupid"]).tolist() == [1.0]
    assert len(api.requests) == 3 and s.requests_sent == 3


def test_5xx_until_retries_run_out(api):
    api.script = [(500, b"", {})] * 3
    s = scorer(api, max_retries=2)
    with pytest.raises(PerspectiveError, match=r"after 3 attempts.*HTTP 500"):
        s.toxicity(["stupid"])
    assert len(api.requests) == 3


def test_400_is_an_error_without_retry_and_hides_the_key(api):
    msg = f"Attribute TOXICITY does not support request languages: xx (request {PATH}?key={KEY})"
    api.script = [(400, json.dumps({"error": {"code": 400, "message": msg}}).encode(), {})]
    s = scorer(api, languages=["xx"])
    with pytest.raises(PerspectiveError) as e:
        s.toxicity(["stupid"])
    text = str(e.value)
    assert "HTTP 400" in text and "does not support request languages" in text
    assert KEY not in text and "***" in text and KEY not in repr(s)
    assert len(api.requests) == 1
    # a wrong key: the API's own message comes through
    with pytest.raises(PerspectiveError, match="API key not valid"):
        scorer(api, api_key="wrong").toxicity(["x"])


def test_garbage_answers(api):
    api.script = [(200, b"<html>surprise</html>", {})]
    with pytest.raises(PerspectiveError, match="not JSON"):
        scorer(api).toxicity(["stupid"])
    api.script = [(200, b'{"attributeScores": {}}', {})]
    with pytest.raises(PerspectiveError, match=r"without attributeScores\.TOXICITY\.summaryScore\.value"):
        scorer(api).toxicity(["stupid"])
    api.script = [(200, b'{"attributeScores": {"TOXICITY": {"summaryScore": {"value": 7}}}}', {})]
    with pytest.raises(PerspectiveError, match="not a probability"):
        scorer(api).toxicity(["stupid"])


def test_rate_limit_spaces_requests(api):
    s = scorer(api, qps=20.0)
    t0 = time.monotonic()
    s.toxicity(["a b", "c d", "e f", "g h"])
    assert time.monotonic() - t0 >= 3 / 20 - 0.01  # 4 requests, at least 3 gaps of 1/20 s
    assert len(api.requests) == 4


def test_missing_key_and_unreachable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(PerspectiveError, match=KEY_ENV):
        get_scorer("perspective")
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = get_scorer("perspective", api_key=KEY, endpoint=f"http://127.0.0.1:{port}{PATH}", max_retries=1,
                   backoff=0.001, qps=1000.0)
    with pytest.raises(PerspectiveError, match=r"after 2 attempts.*could not reach") as e:
        s.toxicity(["stupid"])
    assert KEY not in str(e.value)


# --- endpoints and error paths never show the key ------------------------------------------------

def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and every exception chained to it (causes and contexts)."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is not None and all(x is not y for y in out):
            out.append(x)
            todo += [x.__cause__, x.__context__]
    return out


def _assert_no_key(e: BaseException, key: str) -> None:
    forms = {key, quote_plus(key), quote(key, safe="")}
    for x in _chain(e):
        for text in (str(x), repr(x), *map(str, x.args)):
            assert not any(f in text for f in forms), (type(x).__name__, text)


@pytest.mark.parametrize("endpoint, why", [
    (f"nonsense?key={KEY}", "no scheme"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://example.com/analyze", "scheme 'ftp'"),
    ("https://", "no host"),
    ("http://example.com/v1alpha1/comments:analyze", "plain http to 'example.com'"),
    ("http://localhost.example.com/x", "plain http"),
    (f"http://127.0.0.1@example.com/x?key={KEY}", "user name or password"),
    (f"https://user:{KEY}@example.com/x", "user name or password"),
    ("http://127.0.0.1:port/x", "not a valid URL"),
    ("https://exa mple.com/x", "spaces or control characters"),
    ("", "non-empty URL"),
    (None, "non-empty URL"),
])
def test_bad_endpoints_are_refused_without_the_key(endpoint, why):
    with pytest.raises(ScorerError, match=re.escape(why)) as e:
        get_scorer("perspective", api_key=KEY, endpoint=endpoint)
    assert isinstance(e.value, PerspectiveError)
    _assert_no_key(e.value, KEY)


@pytest.mark.parametrize("endpoint", ["https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze",
                                      "http://localhost:9/x", "http://127.0.0.5:9/x", "http://[::1]:9/x",
                                      "HTTPS://example.com/x?alt=json"])
def test_good_endpoints_are_accepted(endpoint):
    assert check_endpoint(endpoint) == endpoint
    assert get_scorer("perspective", api_key=KEY, endpoint=endpoint).endpoint == endpoint


ODD_KEY = "k+y/=&é 5ecret"   # a key that URL encoding changes


@pytest.mark.parametrize("key", [KEY, ODD_KEY])
def test_failure_modes_never_show_the_key(api, key):
    """Every way a request can fail, with servers that echo the request (and so the key) back."""
    echo = b'{"error": {"message": "bad request {path} for key {key}"}}'
    cases = [
        ([(400, echo, {})], "HTTP 400"),                                  # error answer quoting the key
        ([(500, echo, {})] * 2, r"after 2 attempts.*HTTP 500"),           # retried, then given up
        ([(200, b"<html>{path} {key}</html>", {})], "not JSON"),          # garbage body quoting the key
        ([(302, echo, {"Location": "file:///etc/passwd?{path}"})], "redirect, which is not followed.*HTTP 302"),
        ([(307, echo, {"Location": "http://example.com/?{path}"})], "redirect.*HTTP 307"),
        ([("close", b"", {})] * 2, "could not reach.*RemoteDisconnected"),  # connection dropped
        ([(200, b"{}", {"sleep": "1"})] * 2, "could not reach.*time"),    # timeout
    ]
    for script, pattern in cases:
        api.script = list(script)
        api.requests.clear()
        s = scorer(api, api_key=key, max_retries=1, timeout=0.3)
        with pytest.raises(PerspectiveError, match=pattern) as e:
            s.toxicity(["stupid"])
        _assert_no_key(e.value, key)
        assert len(api.requests) == len(script)   # nothing followed a redirect elsewhere
    # TLS spoken to a plain-HTTP server, and a port with nothing listening
    port = urlparse(api.endpoint).port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    for endpoint, pattern in [(f"https://127.0.0.1:{port}{PATH}", "could not reach.*SSL"),
                              (f"http://127.0.0.1:{free}{PATH}?alt=json", "could not reach.*Connection")]:
        s = get_scorer("perspective", api_key=key, endpoint=endpoint, max_retries=0, qps=1000.0, timeout=2.0)
        with pytest.raises(PerspectiveError, match=pattern) as e:
            s.toxicity(["stupid"])
        _assert_no_key(e.value, key)
        assert key not in repr(s) and key not in s.key
