import pytest

from tiny import ARCHS, tiny_model


@pytest.fixture(params=ARCHS)
def any_model(request):
    return tiny_model(request.param)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def real_model():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    import steerlab

    return steerlab.load()
