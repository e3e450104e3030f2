"""Rebuild data/tokenizers/shakespeare-bpe: a byte-level BPE (4,096 tokens) trained on
data/tinyshakespeare/train.txt, for the GPT-2-style decoder objectives.

    python data/tokenizers/make_shakespeare_bpe.py
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "tinyshakespeare" / "train.txt"
EOS = "<|endoftext|>"


def main() -> None:
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(TEXT)], vocab_size=4096, min_frequency=2, special_tokens=[EOS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=1024,
    )
    tokenizer.save_pretrained(HERE / "shakespeare-bpe")


if __name__ == "__main__":
    main()
