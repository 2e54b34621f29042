import pytest
import torch

from attnctrl.errors import PromptMismatchError, WordNotFoundError
from attnctrl.tokens import refinement_alignment, replacement_mapper, tokenize_prompt


def test_word_lookup_ignores_case_and_punctuation(tokenizer):
    p = tokenize_prompt(tokenizer, "A Cat, on the grass.")
    assert p.positions_of("cat") == [2]
    assert p.positions_of("CAT") == [2]
    assert p.positions_of("grass") == [6]
    assert p.positions_of("on the") == [4, 5]


def test_multi_token_words(tokenizer):
    p = tokenize_prompt(tokenizer, "a tiger on a bicycle")
    assert p.positions_of("tiger") == [2, 3]
    assert p.positions_of("bicycle") == [6, 7]
    assert p.end == 8
    assert p.ids[0] == tokenizer.bos_token_id and p.ids[-1] == tokenizer.eos_token_id


def test_missing_word_lists_prompt_words(tokenizer):
    p = tokenize_prompt(tokenizer, "a cat on the grass")
    with pytest.raises(WordNotFoundError, match=r"\['a', 'cat', 'on', 'the', 'grass'\]"):
        p.positions_of("dog")


def test_replacement_mapper_keeps_tokens_after_a_longer_swap_aligned(tokenizer):
    src = tokenize_prompt(tokenizer, "a cat on the grass")
    tgt = tokenize_prompt(tokenizer, "a tiger on the grass")
    m = replacement_mapper(src, tgt)
    assert m.shape == (16, 16)
    assert torch.allclose(m.sum(1), torch.ones(16))  # every source token keeps its mass
    assert m[2, 2] == pytest.approx(0.5) and m[2, 3] == pytest.approx(0.5)  # cat -> ti + ger
    for s, t in [(0, 0), (3, 4), (4, 5), (5, 6), (6, 7)]:  # on the grass <eos>, shifted by one
        assert m[s, t] == 1.0
    # The padding tail stays aligned too.
    assert m[7, 8] == 1.0 and m[14, 15] == 1.0


def test_replacement_mapper_shorter_swap(tokenizer):
    src = tokenize_prompt(tokenizer, "a tiger on the grass")
    tgt = tokenize_prompt(tokenizer, "a cat on the grass")
    m = replacement_mapper(src, tgt)
    assert m[2, 2] == 1.0 and m[3, 2] == 1.0  # both tiger tokens flow into cat
    assert m[4, 3] == 1.0 and m[7, 6] == 1.0
    assert torch.allclose(m.sum(1), torch.ones(16))


def test_replace_rejects_different_word_counts(tokenizer):
    src = tokenize_prompt(tokenizer, "a cat")
    tgt = tokenize_prompt(tokenizer, "a big cat")
    with pytest.raises(PromptMismatchError, match="Refine"):
        replacement_mapper(src, tgt)


def test_refinement_alignment(tokenizer):
    src = tokenize_prompt(tokenizer, "a cat on the grass")
    tgt = tokenize_prompt(tokenizer, "a big red cat on the grass")
    index, keep = refinement_alignment(src, tgt)
    assert keep[:8].tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    assert index[[0, 1, 4, 5, 6, 7, 8]].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert keep[8:].eq(1).all()  # end/padding aligned with the source's tail
    assert index[9].item() == 7


def test_replacement_mapper_maps_punctuation(tokenizer):
    src = tokenize_prompt(tokenizer, "a cat, on the grass")
    tgt = tokenize_prompt(tokenizer, "a tiger, on the grass")
    m = replacement_mapper(src, tgt)
    assert m[3, 4] == 1.0  # the comma follows the swapped word
    assert torch.allclose(m.sum(1), torch.ones(16))
