"""Parity with an implementation nobody here wrote: Hugging Face's GPT2LMHeadModel."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minigpt.model import GPTModel  # noqa: E402


def small_hf_model():
    cfg = transformers.GPT2Config(
        vocab_size=211, n_positions=40, n_embd=48, n_layer=3, n_head=4,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_loaded_hf_weights_give_the_same_logits():
    hf = small_hf_model()
    ours = GPTModel.from_hf_gpt2(hf.state_dict(), n_heads=4).eval()
    assert (ours.cfg.vocab_size, ours.cfg.context_length, ours.cfg.n_layers) == (211, 40, 3)
    idx = torch.randint(0, 211, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_export_round_trips_into_hf():
    ours = GPTModel.from_hf_gpt2(small_hf_model().state_dict(), n_heads=4).eval()
    ours.reset_parameters()  # fresh weights that HF never saw
    hf = small_hf_model()
    missing, unexpected = hf.load_state_dict(ours.to_hf_gpt2_state_dict(), strict=False)
    assert not unexpected and all(k.endswith("attn.bias") or k.endswith("masked_bias") for k in missing)
    idx = torch.randint(0, 211, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=0, atol=1e-4)
    again = GPTModel.from_hf_gpt2(ours.to_hf_gpt2_state_dict(), n_heads=4)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_from_saved_hf_directory(tmp_path):
    hf = small_hf_model()
    hf.save_pretrained(tmp_path)  # model.safetensors + config.json (n_head read from it)
    ours = GPTModel.from_hf_gpt2(tmp_path).eval()
    assert ours.cfg.n_heads == 4
    idx = torch.randint(0, 211, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPTModel.from_hf_gpt2(tmp_path)
