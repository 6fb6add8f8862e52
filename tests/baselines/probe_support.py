"""Helpers shared by the probe scripts (tests/baselines/*_probe.py), which run in a fresh interpreter with an
exported upstream tree first on PYTHONPATH (support.run_probe) and import this module from their own folder."""
from __future__ import annotations

import io
import os
import random
from pathlib import Path


def configure_debias(mode: str, trend: str | None, **extra: str) -> None:
    """DEBIAS=``mode`` (and DEBIAS_TREND=``trend``, ``extra`` DEBIAS_* variables) for debias_core to read on
    import, after dropping every inherited DEBIAS_* variable: none may change what a probe tests."""
    for key in [k for k in os.environ if k.startswith("DEBIAS")]:
        del os.environ[key]
    os.environ.update(DEBIAS=mode, **extra)
    if trend:
        os.environ["DEBIAS_TREND"] = trend


def require_tree_module(module, what: str = "the tree under test") -> None:
    """Exit naming both paths unless the imported ``module`` comes from the tree first on PYTHONPATH (a pristine
    or patched export), not from an installed package."""
    tree = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]).resolve()
    if tree not in Path(module.__file__).resolve().parents:
        raise SystemExit(f"`{module.__name__}` was imported from {module.__file__}, not from {what} {tree}")


def train_tokenizer(model_dir: Path, words: list[str]):
    """A real (slow) LlamaTokenizer on a tiny BPE sentencepiece model (vocabulary 160) trained here on random
    16-word sentences of ``words`` (seed 0; no hub access), saved in ``model_dir``."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rnd = random.Random(0)
    corpus = [" ".join(rnd.choice(words) for _ in range(16)) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=160,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (model_dir / "spm.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer(vocab_file=str(model_dir / "spm.model"), legacy=True)
    tok.save_pretrained(str(model_dir))
    return tok
