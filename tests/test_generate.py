import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.generate import filter_logits, generate, stream_tokens
from minigpt.model import GPTModel

CFG = ModelConfig(vocab_size=61, context_length=24, emb_dim=32, n_heads=4, n_layers=2)


@pytest.fixture
def model():
    return GPTModel(CFG).eval()


def test_cached_greedy_equals_uncached(model):
    idx = torch.randint(0, 61, (3, 7))
    cached = generate(model, idx, 40, use_cache=True)  # runs past context: window slides
    uncached = generate(model, idx, 40, use_cache=False)
    assert cached.shape == (3, 47)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :7], idx)


def test_greedy_picks_argmax_of_full_forward(model):
    idx = torch.randint(0, 61, (2, 5))
    out = generate(model, idx, 1)
    assert torch.equal(out[:, -1], model(idx)[:, -1].argmax(-1))


def test_sampling_is_reproducible_from_a_seeded_generator(model):
    idx = torch.randint(0, 61, (2, 4))
    a = generate(model, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = generate(model, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cached_sampling_equals_uncached_sampling(model):
    idx = torch.randint(0, 61, (2, 4))
    kw = dict(temperature=0.8, top_k=10, top_p=0.9)
    a = generate(model, idx, 30, use_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, idx, 30, use_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_long_prompt_is_cropped(model):
    idx = torch.randint(0, 61, (1, 50))  # longer than context_length 24
    out = generate(model, idx, 3)
    assert out.shape == (1, 53)
    assert torch.equal(out[:, -3:], generate(model, idx[:, -24:], 3)[:, -3:])


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75, 0.5 + 0.3 covers it
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.1))
    assert kept.tolist() == [[True, False, False, False]]  # the top token always survives


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.5), (8, 0.3)])
def test_sampling_never_leaves_the_allowed_set(model, top_k, top_p):
    idx = torch.randint(0, 61, (4, 6))
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        logits = model(idx)[:, -1] / 1.5  # the nucleus is taken after temperature scaling
        allowed = torch.isfinite(filter_logits(logits, top_k, top_p))  # (batch, vocab)
        out = generate(model, idx, 1, temperature=1.5, top_k=top_k, top_p=top_p, generator=gen)
        assert allowed.gather(1, out[:, -1:]).all()
        idx = out[:, -20:]


def test_each_sequence_stops_at_its_own_eos(model):
    idx = torch.randint(0, 61, (2, 5))
    greedy = generate(model, idx, 12)
    # Make the 3rd new token of row 0 the stop token; row 1 never emits it (with high probability).
    eos = int(greedy[0, 7])
    out = generate(model, idx, 12, eos_id=eos)
    row0_first_eos = (out[0, 5:] == eos).nonzero()[0].item()
    assert torch.all(out[0, 5 + row0_first_eos:] == eos)
    assert torch.equal(out[0, :5 + row0_first_eos], greedy[0, :5 + row0_first_eos])
    if (greedy[1, 5:] != eos).all():
        assert torch.equal(out[1], greedy[1])


def test_generation_ends_early_when_all_sequences_stop(model):
    idx = torch.randint(0, 61, (1, 5))
    eos = int(generate(model, idx, 1)[0, -1])
    assert generate(model, idx, 50, eos_id=eos).shape == (1, 6)


def test_bad_sampling_arguments(model):
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, idx, 1, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, idx, 1, temperature=1, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, idx, 1, temperature=1, top_k=0)


def test_generate_restores_training_mode(model):
    model.train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 2)
    assert model.training


@pytest.mark.parametrize("kw", [{}, dict(temperature=0.9, top_k=20, top_p=0.95)], ids=["greedy", "seeded sample"])
def test_stream_tokens_yields_what_generate_appends(model, kw):
    idx = torch.randint(0, 61, (1, 5))
    whole = generate(model, idx, 40, generator=torch.Generator().manual_seed(3), **kw)  # slides past context
    streamed = list(stream_tokens(model, idx, 40, generator=torch.Generator().manual_seed(3), **kw))
    assert streamed == whole[0, 5:].tolist()


def test_stream_tokens_ends_with_eos_and_restores_training_mode(model):
    idx = torch.randint(0, 61, (1, 5))
    eos = int(generate(model, idx, 3)[0, -1])
    model.train()
    tokens = stream_tokens(model, idx, 50, eos_id=eos)
    first = next(tokens)
    assert not model.training  # decoding in eval mode
    streamed = [first, *tokens]
    assert model.training and streamed[-1] == eos and len(streamed) <= 3
    assert streamed == generate(model, idx, 50, eos_id=eos)[0, 5:].tolist()


def test_stream_tokens_checks_its_input_at_the_call(model):
    with pytest.raises(ValueError, match="one sequence"):
        stream_tokens(model, torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream_tokens(model, torch.zeros(1, 3, dtype=torch.long), -1)
