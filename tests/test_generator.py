"""The multimodal RNN generator (Eqs. 13-15) and beam search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from dsalign.models.decode import beam_search, greedy_decode
from dsalign.models.generator import CaptionGenerator, GeneratorConfig, caption_targets, teacher_forced_loss
from dsalign.text import Vocabulary

END, START = Vocabulary.end_id, Vocabulary.start_id


def _model(cell: str = "lstm", vocab: int = 7, feature_dim: int = 5, hidden: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = CaptionGenerator(GeneratorConfig(vocab, feature_dim, cell=cell, word_dim=6, hidden_dim=hidden,
                                             dropout=0.0))
    with torch.no_grad():  # larger weights make the distributions peaked enough for the search to matter
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def test_caption_targets_shift_by_one_and_end_each_sentence():
    tokens = torch.tensor([[5, 6, 7], [8, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    inputs, targets = caption_targets(tokens, mask)
    assert inputs.tolist() == [[START, 5, 6, 7], [START, 8, 0, 0]]
    assert targets.tolist() == [[5, 6, 7, END], [8, END, -100, -100]]


def test_rnn_cell_is_the_papers_equations():
    model = _model("rnn")
    feature = torch.randn(1, 5)
    words = [START, 4, 5]
    logits = model(feature, torch.tensor([words]))[0]
    b_v = model.image_proj(feature)[0]
    h = torch.zeros(8)
    for t, word in enumerate(words):
        x = model.embed.weight[word]
        h = torch.relu(model.input_proj(x) + model.hidden_proj(h) + (b_v if t == 0 else 0))
        torch.testing.assert_close(logits[t], model.out(h))


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_padding_never_changes_a_sentences_loss(cell):
    model = _model(cell)
    features = torch.randn(2, 5)
    short = torch.tensor([[4, 5, 0, 0, 0]])
    long = torch.tensor([[6, 4, 5, 6, 4]])
    tokens = torch.cat([short, long])
    mask = tokens > 0
    together, n = teacher_forced_loss(model, features, tokens, mask)
    alone_short, n_short = teacher_forced_loss(model, features[:1], short[:, :2], mask[:1, :2])
    alone_long, n_long = teacher_forced_loss(model, features[1:], long, mask[1:])
    assert n == n_short + n_long == 3 + 6
    torch.testing.assert_close(together, alone_short + alone_long)


def test_image_context_enters_at_the_first_step_only():
    model = _model("rnn")
    inputs = torch.tensor([[START, 4, 5]])
    a, b = torch.randn(1, 5), torch.randn(1, 5)
    with torch.no_grad():
        model.hidden_proj.weight.zero_()  # without recurrence, only step 0 can see the image
    la, lb = model(a, inputs), model(b, inputs)
    assert not torch.allclose(la[0, 0], lb[0, 0])
    torch.testing.assert_close(la[0, 1:], lb[0, 1:])


def test_output_bias_starts_at_log_word_frequencies():
    model = _model()
    counts = torch.tensor([0, 0, 0, 10, 30, 40, 20], dtype=torch.float64)
    model.init_output_bias(counts)
    probs = torch.softmax(model.out.bias.double(), 0)
    expected = counts.clamp(min=0.5) / counts.clamp(min=0.5).sum()
    torch.testing.assert_close(probs, expected)


def _sequence_log_prob(model: CaptionGenerator, feature: torch.Tensor, words: list[int]) -> float:
    total, _ = teacher_forced_loss(model, feature[None], torch.tensor([words or [0]]),
                                   torch.tensor([[True] * len(words) or [False]]))
    return -float(total.detach())


def _enumerate_best(model, feature, max_len, alpha):
    best, best_score = None, -math.inf
    real_words = range(END + 1, model.config.vocab_size)
    for n in range(max_len + 1):
        for words in itertools.product(real_words, repeat=n):
            log_p = _sequence_log_prob(model, feature, list(words))
            ranked = log_p / (((5 + n + 1) / 6) ** alpha if alpha else 1.0)
            if ranked > best_score:
                best, best_score = list(words), ranked
    return best, best_score


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_beam_search_finds_the_exact_best_sentence(cell, alpha):
    """3 words, at most 3 per sentence: 40 sentences; a beam of 40 can hold them all, so it must be exact."""
    model = _model(cell)
    features = torch.randn(4, 5)
    found = beam_search(model, features, beam_size=40, max_len=3, length_penalty=alpha)
    for feature, hyp in zip(features, found):
        best, _ = _enumerate_best(model, feature, 3, alpha)
        assert hyp.tokens == best
        assert hyp.log_prob == pytest.approx(_sequence_log_prob(model, feature, best), abs=1e-4)


def test_greedy_takes_the_argmax_at_every_step():
    model = _model("lstm", vocab=12)
    feature = torch.randn(1, 5)
    words: list[int] = []
    state = model.initial_state(1, torch.device("cpu"))
    word, context = torch.tensor([START]), model.image_context(feature)
    for _ in range(6):
        logits, state = model.step(word, state, context if not words else None)
        logits[0, [0, 1, 2]] = -math.inf
        word = logits.argmax(1)
        if int(word) == END:
            break
        words.append(int(word))
        context = None
    assert greedy_decode(model, feature, max_len=6)[0].tokens == words[:6]


def test_batched_beam_search_equals_one_image_at_a_time():
    model = _model("lstm", vocab=15)
    features = torch.randn(5, 5)
    batched = beam_search(model, features, beam_size=4, max_len=8)
    for feature, hyp in zip(features, batched):
        single = beam_search(model, feature[None], beam_size=4, max_len=8)[0]
        assert single.tokens == hyp.tokens
        assert single.log_prob == pytest.approx(hyp.log_prob, abs=1e-5)
    assert all(len(h.tokens) <= 8 and END not in h.tokens for h in batched)


def test_never_generates_pad_start_or_unk():
    model = _model("rnn", vocab=9)
    with torch.no_grad():
        model.out.bias[[0, 1, 2]] = 100.0  # the model would love to say them
    for hyp in beam_search(model, torch.randn(3, 5), beam_size=3, max_len=5):
        assert not {0, 1, 2} & set(hyp.tokens)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_learns_to_caption_a_tiny_set_exactly(cell):
    """Four images, one sentence each: after training, beam search must say each image's own sentence."""
    torch.manual_seed(0)
    model = CaptionGenerator(GeneratorConfig(12, 6, cell=cell, word_dim=16, hidden_dim=32, dropout=0.0))
    features = torch.eye(4, 6) * 3
    sentences = [[4, 5, 6], [7, 8], [9, 10, 11, 4], [5]]
    tokens = torch.zeros(4, 4, dtype=torch.long)
    for i, s in enumerate(sentences):
        tokens[i, : len(s)] = torch.tensor(s)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        total, n = teacher_forced_loss(model, features, tokens, tokens > 0)
        optimizer.zero_grad()
        (total / n).backward()
        optimizer.step()
    assert [h.tokens for h in beam_search(model, features, beam_size=3, max_len=6)] == sentences
    assert [h.tokens for h in greedy_decode(model, features, max_len=6)] == sentences


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="model.cell"):
        GeneratorConfig(10, 4, cell="gru")
    with pytest.raises(ValueError, match="hidden_dim"):
        GeneratorConfig(10, 4, hidden_dim=0)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(_model(), torch.randn(1, 5), beam_size=0)
    assert beam_search(_model(), torch.randn(0, 5)) == []


def test_loss_matches_cross_entropy_by_hand():
    model = _model()
    features, tokens = torch.randn(1, 5), torch.tensor([[4, 5]])
    total, n = teacher_forced_loss(model, features, tokens, tokens > 0)
    logits = model(features, torch.tensor([[START, 4, 5]]))[0]
    expected = F.cross_entropy(logits, torch.tensor([4, 5, END]), reduction="sum")
    assert n == 3
    torch.testing.assert_close(total, expected)


def test_lstm_memory_stays_fp32_under_bf16_autocast():
    """Under bf16 autocast (CUDA training's default) the gates are bf16; the memory c, which adds up over every
    step, is carried in fp32, and teacher forcing and beam search run through with it."""
    model = _model("lstm")
    features, inputs = torch.randn(3, 5), torch.tensor([[START, 5, 6, 4], [START, 4, 0, 0], [START, 6, 5, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context = model.image_context(features)
        state = model.initial_state(3, torch.device("cpu"), context.dtype)
        _, state = model.step(inputs[:, 0], state, context)
        _, state = model.step(inputs[:, 1], state)
        logits = model(features, inputs, torch.tensor([4, 2, 3]))
        hypotheses = beam_search(model, features, beam_size=3, max_len=6)
    assert state[0].dtype == torch.bfloat16 and state[1].dtype == torch.float32
    assert logits.shape == (9, 7) and torch.isfinite(logits.float()).all() and len(hypotheses) == 3
    # the same predictions as in fp32 up to bf16 rounding of the gates and matmuls
    torch.testing.assert_close(logits.float(), model(features, inputs, torch.tensor([4, 2, 3])), atol=0.3, rtol=0.05)
