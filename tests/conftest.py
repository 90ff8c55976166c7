import os

# Triton kernels run in the interpreter on CPU; this must be set before any kernel module
# is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """A private cache directory holding the built-in corpus, built once per session."""
    cache = tmp_path_factory.mktemp("d2v_cache")
    old = os.environ.get("D2V_FAST_CACHE")
    os.environ["D2V_FAST_CACHE"] = str(cache)
    from d2v_fast.data.text.builtin import builtin_corpus

    path = builtin_corpus(progress=False)
    yield path
    if old is None:
        os.environ.pop("D2V_FAST_CACHE", None)
    else:
        os.environ["D2V_FAST_CACHE"] = old


@pytest.fixture
def poisoned():
    """torch.empty & co. return NaN-filled memory, so an element a kernel forgot to write
    shows up as NaN."""
    old_mode = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
