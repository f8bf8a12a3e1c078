"""``jigsaw-bilstm``: the Jigsaw toxic-comment BiLSTM of the ``toxic-comment-classifier`` package, run
in torch without TensorFlow.

The package ships Keras 3 weights (``model/model.weights.h5``) and a pickled Keras ``Tokenizer``
(``model/tokenizer.pickle``); its own code imports TensorFlow. Here the weights are read with h5py into
an equivalent torch network, and the tokenizer pickle is read by a restricted unpickler that only
resolves the four globals the file references (the Keras ``Tokenizer`` class, mapped to a local
state holder, ``collections.OrderedDict``, ``collections.defaultdict`` and ``builtins.int``), so
unpickling cannot run code.

The network (``toxic_classifier/model.py``), for ids padded to 100 positions:
``Embedding(20000, 50) -> Bidirectional(LSTM(50, return_sequences)) -> GlobalMaxPooling1D
-> Dense(50, relu) -> Dense(6, sigmoid)``; dropout is inactive at inference. A Keras LSTM cell's
kernels hold the gates in the order i, f, c, o, which is torch's i, f, g, o; Keras has one bias per
gate, so torch's ``bias_hh`` is zero. Keras's ``Bidirectional`` runs a second LSTM on the reversed
sequence, as torch's ``bidirectional=True`` does; the global max over time makes the outputs'
time alignment irrelevant.

Preprocessing is the package's ``classify``: ``tokenizer.texts_to_sequences`` (lower-case, each
character of ``filters`` replaced by ``split``, split on ``split``, empty pieces dropped, words with
index >= ``num_words`` dropped since the tokenizer has no OOV token) then Keras ``pad_sequences``
with its defaults (``maxlen=100``, zeros and truncation both at the front). The package's
``utils.clean_text`` is not called by its model, so it is not applied here either.
"""

from __future__ import annotations

import collections
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .registry import Scorer, ScorerError

LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
MAXLEN = 100  # toxic_classifier/model.py: MAXLEN; pad_sequences(seq, maxlen=MAXLEN)
PACKAGE = "toxic_classifier"
INSTALL_HINT = "pip install --no-deps toxic-comment-classifier==0.3.0 h5py"

# Module paths under which Keras versions have pickled their Tokenizer class.
_KERAS_TOKENIZER_CLASSES = {
    ("keras.src.legacy.preprocessing.text", "Tokenizer"),
    ("keras.preprocessing.text", "Tokenizer"),
    ("keras_preprocessing.text", "Tokenizer"),
}


class KerasTokenizerState:
    """Stand-in for a pickled Keras ``Tokenizer``: it only receives the pickled attribute dict."""

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"Keras tokenizer state is a {type(state).__name__}, expected a dict")
        self.__dict__.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a Keras tokenizer pickle needs; anything else is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "int"): int,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in _KERAS_TOKENIZER_CLASSES:
            return KerasTokenizerState
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"tokenizer pickle refers to {module}.{name}, which is not allowed "
                                     "(only a Keras Tokenizer's state may be loaded)")


class KerasWordTokenizer:
    """The parts of a Keras ``Tokenizer`` that ``texts_to_sequences`` uses, reproduced exactly."""

    def __init__(self, word_index: dict[str, int], num_words: int | None = None, lower: bool = True,
                 filters: str = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n', split: str = " ",
                 char_level: bool = False, oov_token: str | None = None) -> None:
        self.num_words = num_words
        self.lower = lower
        self.split = split
        self.char_level = char_level
        self.oov_index = word_index.get(oov_token) if oov_token is not None else None
        # words at or past num_words map to the OOV index (or are dropped when there is none)
        self.word_index = {w: i for w, i in word_index.items() if not num_words or i < num_words}
        self._table = str.maketrans({c: split for c in filters})

    @classmethod
    def from_pickle(cls, path: str | Path) -> KerasWordTokenizer:
        """Read a pickled Keras ``Tokenizer`` with the restricted unpickler."""
        try:
            with open(path, "rb") as fh:
                state = _RestrictedUnpickler(fh).load()
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise ScorerError(f"cannot read the Keras tokenizer pickle {path}: {e}") from e
        if not isinstance(state, KerasTokenizerState) or not isinstance(getattr(state, "word_index", None), dict):
            raise ScorerError(f"{path} does not hold a Keras Tokenizer (no word_index)")
        if getattr(state, "analyzer", None) is not None:
            raise ScorerError(f"{path}: tokenizers with a custom analyzer are not supported")
        return cls(state.word_index, num_words=state.num_words, lower=state.lower, filters=state.filters,
                   split=state.split, char_level=state.char_level, oov_token=state.oov_token)

    def words(self, text: str) -> list[str]:
        """Keras ``text_to_word_sequence`` (or the characters, for a char-level tokenizer)."""
        if self.lower:
            text = text.lower()
        if self.char_level:
            return list(text)
        return [w for w in text.translate(self._table).split(self.split) if w]

    def ids(self, text: str) -> list[int]:
        """Keras ``texts_to_sequences`` for one text."""
        wi, out = self.word_index, []
        for w in self.words(text):
            i = wi.get(w)
            if i is not None:
                out.append(i)
            elif self.oov_index is not None:
                out.append(self.oov_index)
        return out

    def pad(self, texts: list[str], maxlen: int = MAXLEN) -> np.ndarray:
        """``pad_sequences(texts_to_sequences(texts), maxlen)`` with Keras's defaults: pad and truncate
        at the front, pad value 0. Shape ``[len(texts), maxlen]``, int64."""
        out = np.zeros((len(texts), maxlen), dtype=np.int64)
        for r, t in enumerate(texts):
            ids = self.ids(t)[-maxlen:]
            if ids:
                out[r, maxlen - len(ids):] = ids
        return out


class BiLSTMNet(nn.Module):
    """Embedding, one bidirectional LSTM, max over time, ReLU dense layer, sigmoid outputs."""

    def __init__(self, vocab: int, dim: int, units: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * units, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(ids))
        return torch.sigmoid(self.out(torch.relu(self.dense(h.amax(dim=1)))))


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # located, never imported: its __init__ imports TensorFlow
    if spec is None or not spec.submodule_search_locations:
        raise ScorerError(f"scorer 'jigsaw-bilstm' needs the package toxic-comment-classifier: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_keras_bilstm(weights: str | Path) -> BiLSTMNet:
    """Build :class:`BiLSTMNet` from the package's Keras 3 ``model.weights.h5``."""
    try:
        import h5py
    except ImportError as e:
        raise ScorerError(f"scorer 'jigsaw-bilstm' reads Keras weights with h5py: {INSTALL_HINT}") from e
    try:
        f = h5py.File(weights, "r")
    except OSError as e:
        raise ScorerError(f"cannot open the Keras weights {weights}: {e}") from e
    with f:
        def var(path: str) -> torch.Tensor:
            full = f"layers/{path}"
            if full not in f:
                raise ScorerError(f"{weights} has no variable {full!r}: not the toxic-comment-classifier BiLSTM")
            return torch.from_numpy(np.asarray(f[full][()], dtype=np.float32))

        emb = var("embedding/vars/0")
        fwd = [var(f"bidirectional/forward_layer/cell/vars/{i}") for i in range(3)]
        bwd = [var(f"bidirectional/backward_layer/cell/vars/{i}") for i in range(3)]
        d1w, d1b = var("dense/vars/0"), var("dense/vars/1")
        d2w, d2b = var("dense_1/vars/0"), var("dense_1/vars/1")
    vocab, dim = emb.shape
    units = fwd[1].shape[0]
    net = BiLSTMNet(vocab, dim, units, d1w.shape[1], d2w.shape[1])
    with torch.no_grad():
        net.embed.weight.copy_(emb)
        for suffix, (kernel, recurrent, bias) in (("", fwd), ("_reverse", bwd)):
            # Keras: z = x @ kernel + h @ recurrent + bias, gates split i, f, c, o (= torch i, f, g, o)
            getattr(net.lstm, f"weight_ih_l0{suffix}").copy_(kernel.T)
            getattr(net.lstm, f"weight_hh_l0{suffix}").copy_(recurrent.T)
            getattr(net.lstm, f"bias_ih_l0{suffix}").copy_(bias)
            getattr(net.lstm, f"bias_hh_l0{suffix}").zero_()
        net.dense.weight.copy_(d1w.T)
        net.dense.bias.copy_(d1b)
        net.out.weight.copy_(d2w.T)
        net.out.bias.copy_(d2b)
    return net.eval()


class JigsawBiLSTM(Scorer):
    """Jigsaw toxic-comment BiLSTM (six labels, ``toxic`` first) from toxic-comment-classifier 0.3.0.

    ``model_dir`` overrides the folder holding ``model.weights.h5`` and ``tokenizer.pickle``.
    ``threads`` is torch's intra-op thread count while this scorer runs (restored afterwards): the
    network's 50-unit matrices are too small to gain from more threads, and on a busy machine extra
    threads cost far more than they give (measured in docs/scoring.md); None leaves torch's setting.
    """

    name = "jigsaw-bilstm"
    attributes = list(LABELS)
    batch_size = 256

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", threads: int | None = 1) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ScorerError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads
        d = Path(model_dir) if model_dir is not None else _package_dir()
        self.tokenizer = KerasWordTokenizer.from_pickle(d / "tokenizer.pickle")
        self.net = load_keras_bilstm(d / "model.weights.h5").to(device)
        if self.net.out.out_features != len(LABELS):
            raise ScorerError(f"{d}: the network has {self.net.out.out_features} outputs, expected {len(LABELS)}")
        self.device = torch.device(device)

    @torch.inference_mode()
    def _score(self, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(self.tokenizer.pad(texts))
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            probs = torch.cat([self.net(ids[i:i + batch_size].to(self.device)).float().cpu()
                               for i in range(0, len(texts), batch_size)]).numpy()
        finally:
            torch.set_num_threads(before)
        return {a: probs[:, j] for j, a in enumerate(LABELS)}
